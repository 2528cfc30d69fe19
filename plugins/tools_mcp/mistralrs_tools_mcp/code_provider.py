"""``Runner(code_execution_config=CodeExecutionConfig(...))``: the ``execute_python`` tool,
offered to requests that set ``enable_code_execution=True``.

Each call runs in its own process under the sandbox (``code_exec``): wall-clock timeout
(``timeout_secs``), rlimits from ``sandbox_policy`` (address space, CPU time, file size,
processes, open files), a new user/network/PID namespace (no network unless the policy
says ``NetworkMode.Full``; where namespaces are not permitted the call is refused with the
reason), a per-call working directory (under ``working_directory`` when set, kept there;
else a temporary one, removed), captured and truncated stdout/stderr, and the files it
wrote returned as ``File`` objects.

Permission: ``config.permission``, else the request's ``code_execution_permission``, else
its ``agent_permission``, else Auto. Ask calls ``config.approval_callback`` (else the
request's ``agent_approval_callback``) with an ``AgentToolApproval``; no callback denies.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from typing import Any, Mapping

from mistralrs_core.api.enums import AgentPermission, AgentToolKind, AgentToolSource
from mistralrs_core.api.tools import (AgentToolApproval, AgentToolApprovalDecision, AgentToolMetadata,
                                      CodeExecutionConfig)
from mistralrs_core.tools import ToolOutput, ToolProvider

from mistralrs_tools_mcp.code_exec import sandbox

TOOL = {"type": "function", "function": {
    "name": sandbox.TOOL_NAME, "strict": True,
    "description": ("Run a Python 3 program in a sandbox and get its exit code, stdout, stderr and the files "
                    "it wrote in its working directory. No network. Print what you need to see."),
    "parameters": {"type": "object", "additionalProperties": False, "required": ["code"],
                   "properties": {"code": {"type": "string", "minLength": 1,
                                           "description": "The complete Python program to run."}}}}}


def _approved(decision: Any) -> tuple[bool, str | None]:
    if isinstance(decision, AgentToolApprovalDecision):
        return decision.decision.value.lower() == "approve", decision.message
    return bool(decision), None


class CodeExecutionTools:
    request_fields = ("enable_code_execution",)
    call_with_request = True

    def __init__(self, config: CodeExecutionConfig, python: str):
        self.config = config
        self.python = python
        self.limits = sandbox.limits_from(config)

    def tool_definitions(self) -> list[dict]:
        return []

    def request_tool_definitions(self, req) -> list[dict]:
        return [TOOL] if getattr(req, "enable_code_execution", False) else []

    def can_call(self, name: str) -> bool:
        return name == sandbox.TOOL_NAME

    def _permission(self, req) -> AgentPermission:
        for p in (self.config.permission, getattr(req, "code_execution_permission", None),
                  getattr(req, "agent_permission", None)):
            if p is not None:
                return p
        return AgentPermission.Auto

    def call(self, name: str, arguments: dict, request=None) -> ToolOutput:
        code = arguments.get("code")
        if not isinstance(code, str) or not code.strip():
            return ToolOutput("Error: execute_python needs a non-empty string argument 'code'")
        permission = self._permission(request)
        if permission is AgentPermission.Deny:
            return ToolOutput("Error: code execution is denied by the permission setting")
        if permission is AgentPermission.Ask:
            callback = self.config.approval_callback or getattr(request, "agent_approval_callback", None)
            if callback is None:
                return ToolOutput("Error: code execution needs approval and no approval callback is set")
            approval = AgentToolApproval(
                approval_id=f"approval-{uuid.uuid4().hex}", session_id=getattr(request, "session_id", None) or "",
                round=0, tool=AgentToolMetadata(source=AgentToolSource.BuiltIn, kind=AgentToolKind.CodeExecution,
                                                label=sandbox.TOOL_NAME),
                arguments_json=json.dumps(arguments, ensure_ascii=False), code=code)
            ok, message = _approved(callback(approval))
            if not ok:
                return ToolOutput("Error: code execution was denied" + (f": {message}" if message else ""))
        return sandbox.run(code, self.python, self.limits, self.config.working_directory)

    def close(self) -> None:
        pass


class CodeExecutionToolProvider(ToolProvider):
    accepts = ("code_execution_config",)

    def build(self, args: Mapping[str, Any]) -> CodeExecutionTools:
        config = args["code_execution_config"]
        if not isinstance(config, CodeExecutionConfig):
            raise ValueError(f"code_execution_config: must be a CodeExecutionConfig, got {type(config).__name__}")
        python = shutil.which(config.python_path)
        if python is None:
            raise ValueError(f"code_execution_config.python_path: no interpreter {config.python_path!r} found")
        if config.timeout_secs <= 0:
            raise ValueError(f"code_execution_config.timeout_secs: must be > 0, got {config.timeout_secs}")
        policy = config.sandbox_policy
        if policy is not None:
            for field in ("max_memory_mb", "max_cpu_secs", "max_procs", "max_open_fds", "max_file_sz_mb"):
                if getattr(policy, field) <= 0:
                    raise ValueError(f"code_execution_config.sandbox_policy.{field}: must be > 0, "
                                     f"got {getattr(policy, field)}")
            if policy.strict and (policy.extra_fs_read or policy.extra_fs_write):
                raise ValueError("code_execution_config.sandbox_policy.extra_fs_read/extra_fs_write: "
                                 "file-system rules (Landlock) are not implemented; strict=True refuses them")
        if config.approval_callback is not None and not callable(config.approval_callback):
            raise ValueError("code_execution_config.approval_callback: must be callable")
        wd = config.working_directory
        if wd is not None:
            os.makedirs(wd, exist_ok=True)
        return CodeExecutionTools(config, os.path.abspath(python))
