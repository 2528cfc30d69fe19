"""mistralrs-tools-mcp: tool providers for the Runner's MCP, web search and code execution
arguments (registered through ``mistralrs_register_tool_providers``)."""
