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


class McpServerSourcePy:
    """Namespace of MCP transports: `.Http(...)`, `.Process(...)`, `.WebSocket(...)`."""

    @attrs.define
    class Http:
        url: str = str_field()
        timeout_secs: int | None = int_field(None)
        headers: dict[str, str] | None = field(None, converter=_opt_dict)
        transport: ClassVar[str] = "http"

    @attrs.define
    class Process:
        command: str = str_field()
        args: list[str] = list_field()
        work_dir: str | None = str_field(None)
        env: dict[str, str] | None = field(None, converter=_opt_dict)
        transport: ClassVar[str] = "process"

    @attrs.define
    class WebSocket:
        url: str = str_field()
        timeout_secs: int | None = int_field(None)
        headers: dict[str, str] | None = field(None, converter=_opt_dict)
        transport: ClassVar[str] = "websocket"


_MCP_SOURCES = (McpServerSourcePy.Http, McpServerSourcePy.Process, McpServerSourcePy.WebSocket)


@attrs.define
class McpServerConfigPy:
    id: str = str_field()
    name: str = str_field()
    source: Any = field(validator=attrs.validators.instance_of(_MCP_SOURCES))
    enabled: bool = field(True)
    tool_prefix: str | None = str_field(None)
    resources: list[str] | None = field(None)
    bearer_token: str | None = str_field(None)


@attrs.define
class McpClientConfigPy:
    """`None` limits mean upstream's defaults: 30 s per call, 10 concurrent calls."""

    servers: list[McpServerConfigPy] = field(converter=list)
    auto_register_tools: bool = field(True)
    tool_timeout_secs: int | None = int_field(None)
    max_concurrent_calls: int | None = int_field(None)


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
