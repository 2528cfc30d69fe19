"""Configuration for tools and agents: MCP, code execution, shell, web search."""

from __future__ import annotations

import json
from typing import Any, Callable, ClassVar

import attrs

from ._fields import enum_field, field, instance_field, int_field, list_field, str_field
from .enums import (
    AgentPermission,
    AgentToolApprovalDecisionKind,
    AgentToolKind,
    AgentToolSource,
    NetworkMode,
    SearchContextSize,
)


def _opt_dict(value: Any) -> Any:
    return dict(value) if value is not None else None


def _check_str_map(owner: str, name: str, value: dict | None) -> None:
    for k, v in (value or {}).items():
        if not isinstance(k, str) or not k or not isinstance(v, str):
            raise ValueError(f"{owner}.{name}: must map non-empty str to str, got {k!r}: {v!r}")


def _check_url(owner: str, url: str, schemes: tuple[str, ...]) -> None:
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in schemes or not rest.strip("/"):
        raise ValueError(f"{owner}.url: must be a {' or '.join(s + '://' for s in schemes)} URL, got {url!r}")


def _check_timeout(owner: str, name: str, value: int | None) -> None:
    if value is not None and value <= 0:
        raise ValueError(f"{owner}.{name}: must be > 0 seconds, got {value}")


class McpServerSourcePy:
    """Namespace of MCP transports: `.Http(...)`, `.Process(...)`, `.WebSocket(...)`."""

    @attrs.define
    class Http:
        url: str = str_field()
        timeout_secs: int | None = int_field(None)
        headers: dict[str, str] | None = field(None, converter=_opt_dict)
        transport: ClassVar[str] = "http"

        def __attrs_post_init__(self) -> None:
            _check_url("McpServerSourcePy.Http", self.url, ("http", "https"))
            _check_timeout("McpServerSourcePy.Http", "timeout_secs", self.timeout_secs)
            _check_str_map("McpServerSourcePy.Http", "headers", self.headers)

    @attrs.define
    class Process:
        command: str = str_field()
        args: list[str] = list_field()
        work_dir: str | None = str_field(None)
        env: dict[str, str] | None = field(None, converter=_opt_dict)
        transport: ClassVar[str] = "process"

        def __attrs_post_init__(self) -> None:
            if not self.command.strip():
                raise ValueError("McpServerSourcePy.Process.command: must be a non-empty command")
            if not isinstance(self.args, list) or not all(isinstance(a, str) for a in self.args):
                raise ValueError(f"McpServerSourcePy.Process.args: must be a list of str, got {self.args!r}")
            if self.work_dir is not None and not self.work_dir:
                raise ValueError("McpServerSourcePy.Process.work_dir: must be a directory path or None")
            _check_str_map("McpServerSourcePy.Process", "env", self.env)

    @attrs.define
    class WebSocket:
        url: str = str_field()
        timeout_secs: int | None = int_field(None)
        headers: dict[str, str] | None = field(None, converter=_opt_dict)
        transport: ClassVar[str] = "websocket"

        def __attrs_post_init__(self) -> None:
            _check_url("McpServerSourcePy.WebSocket", self.url, ("ws", "wss"))
            _check_timeout("McpServerSourcePy.WebSocket", "timeout_secs", self.timeout_secs)
            _check_str_map("McpServerSourcePy.WebSocket", "headers", self.headers)


_MCP_SOURCES = (McpServerSourcePy.Http, McpServerSourcePy.Process, McpServerSourcePy.WebSocket)
# Tool names reach the model's tool list, whose names OpenAI limits to these characters.
_TOOL_PREFIX_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")


@attrs.define
class McpServerConfigPy:
    id: str = str_field()
    name: str = str_field()
    source: Any = field(validator=attrs.validators.instance_of(_MCP_SOURCES))
    enabled: bool = field(True)
    tool_prefix: str | None = str_field(None)
    resources: list[str] | None = field(None, converter=lambda v: list(v) if isinstance(v, tuple) else v)
    bearer_token: str | None = str_field(None)

    def __attrs_post_init__(self) -> None:
        if not self.id.strip():
            raise ValueError("McpServerConfigPy.id: must be a non-empty str")
        if not isinstance(self.enabled, bool):
            raise ValueError(f"McpServerConfigPy.enabled: must be a bool, got {self.enabled!r}")
        if self.tool_prefix is not None and (not self.tool_prefix
                                             or not set(self.tool_prefix) <= _TOOL_PREFIX_CHARS):
            raise ValueError(f"McpServerConfigPy.tool_prefix: must be letters, digits, '_' or '-', "
                             f"got {self.tool_prefix!r}")
        if self.resources is not None and (not isinstance(self.resources, list) or not all(
                isinstance(r, str) and r for r in self.resources)):
            raise ValueError(f"McpServerConfigPy.resources: must be a list of non-empty URI patterns, "
                             f"got {self.resources!r}")
        if self.bearer_token is not None and not self.bearer_token:
            raise ValueError("McpServerConfigPy.bearer_token: must be a non-empty token or None")


@attrs.define
class McpClientConfigPy:
    """`None` limits mean upstream's defaults: 30 s per call, 10 concurrent calls."""

    servers: list[McpServerConfigPy] = field(converter=list)
    auto_register_tools: bool = field(True)
    tool_timeout_secs: int | None = int_field(None)
    max_concurrent_calls: int | None = int_field(None)

    def __attrs_post_init__(self) -> None:
        seen: set[str] = set()
        for i, server in enumerate(self.servers):
            if not isinstance(server, McpServerConfigPy):
                raise ValueError(f"McpClientConfigPy.servers[{i}]: must be a McpServerConfigPy, "
                                 f"got {type(server).__name__}")
            if server.id in seen:
                raise ValueError(f"McpClientConfigPy.servers[{i}].id: {server.id!r} is used by another server")
            seen.add(server.id)
        if not isinstance(self.auto_register_tools, bool):
            raise ValueError(f"McpClientConfigPy.auto_register_tools: must be a bool, "
                             f"got {self.auto_register_tools!r}")
        _check_timeout("McpClientConfigPy", "tool_timeout_secs", self.tool_timeout_secs)
        if self.max_concurrent_calls is not None and self.max_concurrent_calls < 1:
            raise ValueError(f"McpClientConfigPy.max_concurrent_calls: must be >= 1, "
                             f"got {self.max_concurrent_calls}")


@attrs.define
class SandboxPolicy:
    max_memory_mb: int = int_field(2048)
    max_cpu_secs: int = int_field(300)
    max_procs: int = int_field(64)
    max_open_fds: int = int_field(1024)
    max_file_sz_mb: int = int_field(256)
    network: NetworkMode = enum_field(NetworkMode, NetworkMode.Loopback)
    extra_fs_read: list[str] = list_field()
    extra_fs_write: list[str] = list_field()
    extra_env: list[str] = list_field()
    strict: bool = field(False)


@attrs.define
class CodeExecutionConfig:
    python_path: str = str_field("python3")
    timeout_secs: int = int_field(60)
    working_directory: str | None = str_field(None)
    sandbox_policy: SandboxPolicy | None = instance_field(SandboxPolicy)
    # None defers to the request's agent_permission (upstream: Auto).
    permission: AgentPermission | None = enum_field(AgentPermission, None, optional=True)
    approval_callback: Callable[..., Any] | None = field(None, no_json=True)


@attrs.define
class ShellConfig:
    shell_path: str = str_field("/bin/sh")
    timeout_secs: int = int_field(600)
    working_directory: str | None = str_field(None)
    sandbox_policy: SandboxPolicy | None = instance_field(SandboxPolicy)
    permission: AgentPermission | None = enum_field(AgentPermission, None, optional=True)


@attrs.define
class ApproximateUserLocation:
    # Upstream requires all four; OpenAI clients routinely send a subset.
    city: str | None = str_field(None, omit_if_none=True)
    country: str | None = str_field(None, omit_if_none=True)
    region: str | None = str_field(None, omit_if_none=True)
    timezone: str | None = str_field(None, omit_if_none=True)


# Not slotted: the instance attribute `approximate` (the location) and the
# class-level constructor `WebSearchUserLocation.approximate(loc)` share one
# name, which only works when instance values live in __dict__.
@attrs.define(slots=False)
class WebSearchUserLocation:
    approximate: ApproximateUserLocation = field(
        validator=attrs.validators.instance_of(ApproximateUserLocation)
    )
    type: str = field("approximate", validator=attrs.validators.in_(("approximate",)))


def _approximate(location: ApproximateUserLocation) -> WebSearchUserLocation:
    return WebSearchUserLocation(location)


WebSearchUserLocation.approximate = staticmethod(_approximate)  # type: ignore[assignment]


@attrs.define
class WebSearchOptions:
    search_context_size: SearchContextSize | None = enum_field(
        SearchContextSize, None, optional=True, omit_if_none=True
    )
    user_location: WebSearchUserLocation | None = instance_field(
        WebSearchUserLocation, omit_if_none=True
    )
    search_description: str | None = str_field(None, omit_if_none=True)
    extract_description: str | None = str_field(None, omit_if_none=True)


@attrs.define
class AgentToolMetadata:
    source: AgentToolSource = enum_field(AgentToolSource)
    kind: AgentToolKind = enum_field(AgentToolKind)
    label: str = str_field()


@attrs.define
class AgentToolApproval:
    """What `agent_approval_callback` receives before a server-side tool runs."""

    approval_id: str = str_field()
    session_id: str = str_field()
    round: int = int_field()
    tool: AgentToolMetadata = field(validator=attrs.validators.instance_of(AgentToolMetadata))
    arguments_json: str = str_field()
    code: str | None = str_field(None)

    def arguments(self) -> Any:
        return json.loads(self.arguments_json)


@attrs.define
class AgentToolApprovalDecision:
    decision: AgentToolApprovalDecisionKind = enum_field(AgentToolApprovalDecisionKind)
    remember_for_session: bool = field(False)
    message: str | None = str_field(None)

    @staticmethod
    def approve(remember_for_session: bool = False) -> AgentToolApprovalDecision:
        return AgentToolApprovalDecision(
            AgentToolApprovalDecisionKind.Approve, remember_for_session
        )

    @staticmethod
    def deny(message: str | None = None) -> AgentToolApprovalDecision:
        return AgentToolApprovalDecision(AgentToolApprovalDecisionKind.Deny, message=message)
