"""Tool providers: plugins that take the Runner's tool arguments (MCP, web search, code
execution, Python callbacks) and give the model tools.

A provider is a class registered through ``mistralrs_register_tool_providers``; the Runner
makes one per Runner, offers it the tool arguments that were set, and keeps what
``build`` returns. Every argument that was set must be taken by some provider; one no
provider takes is refused through the capability table (``NotAvailableYet`` naming the
distribution to install), never ignored.

What ``build`` returns may also serve tools to the agentic loop (``mistralrs_core.agent``),
by duck type:

* ``tool_definitions() -> list[dict]`` (optional): OpenAI tool objects offered on every chat
  request of the Runner (MCP servers' tools); a request's own tool of the same
  name wins;
* ``request_tool_definitions(request) -> list[dict]`` (optional): tools offered to this one
  request, for tools a request field turns on (``web_search_options`` offers the search
  tool, ``enable_code_execution`` offers ``execute_python``);
* ``request_fields: tuple[str, ...]`` (optional): the request fields it serves; a request
  setting such a field (of a capability with Runner arguments) on a Runner none of whose
  providers serves it is refused with a ``ValueError`` naming the field;
* ``can_call(name) -> bool``: whether it runs tool ``name``;
* ``call(name, arguments: dict) -> str | ToolOutput``: runs it. An exception becomes an error
  result the model reads, never a failed request. With ``call_with_request = True`` it is
  called as ``call(name, arguments, request=...)``, the chat request of the round (for
  per-request settings such as ``web_search_options``);
* ``close()`` (optional): called by ``Runner.shutdown``.
"""
from __future__ import annotations

import logging
from typing import Any, Mapping

import attrs

from mistralrs_core import capabilities
from mistralrs_core.errors import NotAvailableYet

log = logging.getLogger("mistralrs")

# The Runner keywords that configure tools.
TOOL_ARGS = ("tool_callbacks", "mcp_client_config", "enable_search", "search_callback",
             "search_embedding_model", "code_execution_config", "shell_config")


@attrs.define
class ToolOutput:
    """A tool's result: text for the model, plus images (base64) and produced files
    (``mistralrs_core.api.responses.File``; the Runner keeps them for ``find_file``)."""
    content: str
    images_base64: list[str] = attrs.field(factory=list)
    files: list = attrs.field(factory=list)


class ToolProvider:
    """Base class (subclassing is optional: the duck type is ``accepts``/``claims``/``build``)."""

    #: the Runner keywords (from ``TOOL_ARGS``) this provider can serve
    accepts: tuple[str, ...] = ()

    def claims(self, args: Mapping[str, Any]) -> bool:
        """Whether to take part given the set tool arguments (default: any it accepts)."""
        return any(a in args for a in self.accepts)

    def build(self, args: Mapping[str, Any]) -> Any:
        """Set the tools up from the accepted arguments (only those are passed); the
        result is what the Runner keeps for this provider (``Runner.shutdown`` calls its
        ``close()`` when it has one)."""
        raise NotImplementedError


def attach_tool_providers(args: Mapping[str, Any]) -> dict[str, Any]:
    """``args``: the set tool arguments. Returns provider name -> what its ``build`` made."""
    args = {k: v for k, v in args.items() if capabilities._present(v)}
    if not args:
        return {}
    from mistralrs_core.plugins import get_registry
    built: dict[str, Any] = {}
    taken: set[str] = set()
    broken: list[str] = []
    for entry in get_registry().tool_providers.values():
        try:
            provider = entry.load()()
        except ImportError as exc:
            # One distribution's missing or broken provider must not refuse the arguments
            # other providers take; an argument left untaken says why below.
            log.warning("tool provider %r (%s) failed to load: %s", entry.name, entry.plugin, exc)
            broken.append(f"{entry.name} ({entry.plugin}) failed to load: {type(exc).__name__}: {exc}")
            continue
        if not provider.claims(args):
            continue
        mine = {k: v for k, v in args.items() if k in provider.accepts}
        built[entry.name] = provider.build(mine)
        taken.update(mine)
    for name in args:
        if name in taken:
            continue
        field = f"Runner({name}=...)"
        capabilities.check_runner_args(**{name: args[name]})
        # The capability is registered, yet no provider takes the argument: still refused.
        raise NotAvailableYet(field, "; ".join(["no installed tool provider accepts it", *broken]))
    return built
