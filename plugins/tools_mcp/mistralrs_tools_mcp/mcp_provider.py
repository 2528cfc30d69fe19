"""``Runner(mcp_client_config=McpClientConfigPy(...))``: the MCP client as a tool provider.

``build`` connects the servers (``mcp.client.McpClient``); what it returns serves the
servers' tools to the agentic loop (``tool_definitions``/``can_call``/``call``) and is
closed by ``Runner.shutdown``."""
from __future__ import annotations

from typing import Any, Mapping

from mistralrs_core.tools import ToolProvider


class McpToolProvider(ToolProvider):
    accepts = ("mcp_client_config",)

    def build(self, args: Mapping[str, Any]):
        from mistralrs_core.api.tools import McpClientConfigPy

        from .mcp.client import McpClient
        config = args["mcp_client_config"]
        if isinstance(config, Mapping):
            config = config_from_json(config)
        if not isinstance(config, McpClientConfigPy):
            raise ValueError(f"mcp_client_config: must be a McpClientConfigPy, got {type(config).__name__}")
        return McpClient(config)


def config_from_json(data: Mapping[str, Any]):
    """The JSON form of the config (upstream's ``--mcp-config`` file): servers whose
    ``source`` is ``{"type": "Http" | "Process" | "WebSocket", ...}``."""
    from mistralrs_core.api.tools import McpClientConfigPy, McpServerConfigPy, McpServerSourcePy
    kinds = {"http": McpServerSourcePy.Http, "process": McpServerSourcePy.Process,
             "websocket": McpServerSourcePy.WebSocket}
    servers = []
    for i, raw in enumerate(data.get("servers") or ()):
        field = f"mcp_client_config.servers[{i}]"
        if not isinstance(raw, Mapping) or not isinstance(raw.get("source"), Mapping):
            raise ValueError(f"{field}: must be an object with a 'source' object")
        source = dict(raw["source"])
        kind = kinds.get(str(source.pop("type", "")).lower())
        if kind is None:
            raise ValueError(f"{field}.source.type: must be one of Http, Process, WebSocket")
        fields = {k: v for k, v in raw.items() if k != "source"}
        fields.setdefault("id", fields.get("name"))
        fields.setdefault("name", fields.get("id"))
        try:
            servers.append(McpServerConfigPy(source=kind(**source), **fields))
        except TypeError as exc:
            raise ValueError(f"{field}: {exc}") from exc
    rest = {k: v for k, v in data.items() if k != "servers"}
    try:
        return McpClientConfigPy(servers=servers, **rest)
    except TypeError as exc:
        raise ValueError(f"mcp_client_config: {exc}") from exc
