"""``Runner(tool_callbacks={name: f(name, args) -> str})`` as a tool provider: the same shape
as the plugins' providers (MCP, web search), so the agentic loop treats them alike."""
from __future__ import annotations

from typing import Any, Callable, Mapping

from mistralrs_core.tools import ToolProvider


class CallbackTools:
    def __init__(self, callbacks: Mapping[str, Callable[[str, dict], Any]]):
        self.callbacks = dict(callbacks)

    def tool_definitions(self) -> list[dict]:
        # Callbacks carry no schema: requests describe them in tool_schemas (as upstream).
        return []

    def can_call(self, name: str) -> bool:
        return name in self.callbacks

    def call(self, name: str, arguments: dict) -> Any:
        return self.callbacks[name](name, arguments)

    def close(self) -> None:
        pass


class CallbackToolProvider(ToolProvider):
    accepts = ("tool_callbacks",)

    def build(self, args: Mapping[str, Any]) -> CallbackTools:
        callbacks = args["tool_callbacks"]
        if not isinstance(callbacks, Mapping):
            raise ValueError(f"tool_callbacks: must be a mapping of tool name -> callable, got "
                             f"{type(callbacks).__name__}")
        for name, fn in callbacks.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"tool_callbacks: tool names must be non-empty strings, got {name!r}")
            if not callable(fn):
                raise ValueError(f"tool_callbacks[{name!r}]: must be callable, got {type(fn).__name__}")
        return CallbackTools(callbacks)
