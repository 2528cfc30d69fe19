"""Registrations of mistralrs-tools-mcp (entry point ``tools_mcp``). Targets are
``"module:attr"`` strings: listing plugins imports none of the tool code."""
from mistralrs_core.hookspecs import hookimpl

_PKG = "mistralrs_tools_mcp"


@hookimpl
def mistralrs_register_tool_providers(register):
    register("mcp", f"{_PKG}.mcp_provider:McpToolProvider")
    register("web_search", f"{_PKG}.search_provider:SearchToolProvider")
    register("code_execution", f"{_PKG}.code_provider:CodeExecutionToolProvider")


@hookimpl
def mistralrs_register_capabilities(register):
    register("mcp", provides="Runner(mcp_client_config=...): MCP servers over process, HTTP and WebSocket")
    register("web_search", provides="Runner(enable_search=True) and web_search_options")
    register("code_execution", provides="Runner(code_execution_config=...) and enable_code_execution")
