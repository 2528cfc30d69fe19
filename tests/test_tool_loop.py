"""The agentic loop (mistralrs_core/agent/loop.py) through the Runner and the server: the
model's calls run Python callbacks, results go back as tool messages, rounds repeat until
the answer; max_tool_rounds stops it; a raising callback is an error result, not a crash;
tools of a plugin's provider (the seam MCP and web search use) are offered and run.
The model is scripted (tests/tool_testing.py) so every round is known in advance."""
import json
import types

import httpx
import pytest

from mistralrs import ChatCompletionRequest, Runner, Which
from mistralrs_core import plugins
from mistralrs_core.hookspecs import hookimpl
from tool_testing import SCRIPT, call_text, running_server, scripted, tool

ADD = tool("add", {"a": {"type": "number"}, "b": {"type": "number"}}, ["a", "b"])
MUL = tool("mul", {"a": {"type": "number"}, "b": {"type": "number"}}, ["a", "b"])
BOOM = tool("boom")
SEEN = []


def _add(name, args):
    SEEN.append((name, args))
    return str(args["a"] + args["b"])


def _mul(name, args):
    SEEN.append((name, args))
    return str(args["a"] * args["b"])


def _boom(name, args):
    raise RuntimeError("the tool broke")


@pytest.fixture(scope="module")
def runner(tiny_dir):
    r = Runner(which=Which.Plain(model_id=str(tiny_dir), dtype="F32"), seed=0,
               tool_callbacks={"add": _add, "mul": _mul, "boom": _boom})
    yield r
    r.shutdown()


def req(tools, **kw):
    return ChatCompletionRequest(messages=[SCRIPT, {"role": "user", "content": "(2 + 3) * 4?"}],
                                 tool_schemas=[json.dumps(t) for t in tools], max_tokens=80, **kw)


TWO_ROUNDS = [call_text("add", {"a": 2, "b": 3}), call_text("mul", {"a": 5, "b": 4}), "It is 20."]


def test_two_tools_two_rounds_then_the_answer(runner):
    SEEN.clear()
    with scripted(TWO_ROUNDS):
        res = runner.send_chat_completion_request(req([ADD, MUL]))
    assert SEEN == [("add", {"a": 2, "b": 3}), ("mul", {"a": 5, "b": 4})]
    assert res.choices[0].message.content == "It is 20." and res.choices[0].finish_reason == "stop"
    assert res.choices[0].message.tool_calls is None
    records = res.agentic_tool_calls
    assert [(r.round, r.name, json.loads(r.arguments), r.result_content) for r in records] == [
        (1, "add", {"a": 2, "b": 3}, "5"), (2, "mul", {"a": 5, "b": 4}, "20")]
    # Usage covers the three model runs.
    assert res.usage.completion_tokens > 3 * 5


def test_max_tool_rounds_stops_the_loop(runner):
    SEEN.clear()
    with scripted([call_text("add", {"a": 1, "b": 1})]):      # calls forever
        res = runner.send_chat_completion_request(req([ADD], max_tool_rounds=1))
    assert len(SEEN) == 1 and [r.round for r in res.agentic_tool_calls] == [1]
    # The rounds are spent: the last turn had no tools, so its call-shaped text is an answer.
    assert res.choices[0].finish_reason == "stop" and res.choices[0].message.tool_calls is None
    assert res.choices[0].message.content == call_text("add", {"a": 1, "b": 1})


def test_a_raising_callback_is_an_error_result(runner):
    with scripted([call_text("boom", {}), "Sorry, the tool failed."]):
        res = runner.send_chat_completion_request(req([BOOM]))
    (record,) = res.agentic_tool_calls
    assert record.result_content == "Error: tool 'boom' failed: RuntimeError: the tool broke"
    assert res.choices[0].message.content == "Sorry, the tool failed."


def test_client_tools_are_returned_not_run(runner):
    other = tool("lookup", {"q": {"type": "string"}})
    with scripted([call_text("lookup", {"q": "x"})]):
        res = runner.send_chat_completion_request(req([ADD, other]))
    assert res.choices[0].finish_reason == "tool_calls" and not res.agentic_tool_calls
    assert res.choices[0].message.tool_calls[0].function.name == "lookup"


def test_streamed_loop(runner):
    SEEN.clear()
    with scripted(TWO_ROUNDS):
        chunks = list(runner.send_chat_completion_request(req([ADD, MUL], stream=True)))
    assert len(SEEN) == 2
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "It is 20."
    assert not any(c.choices[0].delta.tool_calls for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "stop" and chunks[-1].usage is not None
    assert [c.choices[0].finish_reason for c in chunks[:-1]] == [None] * (len(chunks) - 1)


class _CalcTools:
    """What an MCP-like provider builds: tools with schemas, run by name."""
    def tool_definitions(self):
        return [ADD]

    def can_call(self, name):
        return name == "add"

    def call(self, name, arguments):
        from mistralrs_core.tools import ToolOutput
        from mistralrs_core.api.responses import File
        return ToolOutput(str(arguments["a"] + arguments["b"]),
                          files=[File(id="", name="sum.txt", mime_type="text/plain", text="5")])

    def close(self):
        pass


class _CalcProvider:
    accepts = ("mcp_client_config",)

    def claims(self, args):
        return "mcp_client_config" in args

    def build(self, args):
        return _CalcTools()


def test_a_plugin_providers_tools_are_offered_and_run(tiny_dir, without_tools_distribution):
    # (without mistralrs-tools-mcp, whose "mcp" capability this stand-in registers)
    hooks = types.SimpleNamespace(
        mistralrs_register_tool_providers=hookimpl(lambda register: register("calc", _CalcProvider)),
        mistralrs_register_capabilities=hookimpl(lambda register: register("mcp", provides="calc")))
    plugins.register_plugin(hooks, "calc_tools_plugin")
    try:
        r = Runner(which=Which.Plain(model_id=str(tiny_dir), dtype="F32"), mcp_client_config={"servers": []})
        with scripted([call_text("add", {"a": 2, "b": 3}), "5."]):
            res = r.send_chat_completion_request(req([]))   # no tools in the request: the provider's
        (record,) = res.agentic_tool_calls
        assert record.result_content == "5" and res.choices[0].message.content == "5."
        (file,) = res.files
        assert record.file_ids == [file.id] and r.find_file(file.id).text == "5"
        assert r.find_file("file-unknown") is None
        r.shutdown()
    finally:
        plugins.reset()


def test_loop_over_http(runner):
    SEEN.clear()
    body = {"model": "default", "messages": [SCRIPT, {"role": "user", "content": "(2 + 3) * 4?"}],
            "tools": [ADD, MUL], "max_tokens": 80, "max_tool_rounds": 4}
    with scripted(TWO_ROUNDS), running_server(runner) as base:
        out = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=120).json()
    assert out["choices"][0]["message"]["content"] == "It is 20."
    assert [(r["round"], r["name"], r["result_content"]) for r in out["agentic_tool_calls"]] == [
        (1, "add", "5"), (2, "mul", "20")]
