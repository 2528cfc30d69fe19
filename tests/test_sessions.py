"""Sessions: ``session_id`` continues a conversation; export -> import (into another Runner)
-> continue gives the same next answer as the uninterrupted session; the store's methods
behave as the spec says; tool rounds are part of the session."""
import json

import pytest

from mistralrs import ChatCompletionRequest, Runner, Which
from tool_testing import SCRIPT, call_text, scripted, tool


def say(runner, text, session, **kw):
    return runner.send_chat_completion_request(ChatCompletionRequest(
        messages=[{"role": "user", "content": text}], session_id=session, max_tokens=6, temperature=0, **kw))


@pytest.fixture(scope="module")
def second_runner(tiny_dir):
    r = Runner(which=Which.Plain(model_id=str(tiny_dir), dtype="F32"), seed=0)
    yield r
    r.shutdown()


def test_export_import_continue_equals_uninterrupted(tiny_runner, second_runner):
    first = say(tiny_runner, "Tell me a story.", "straight")
    assert first.session_id == "straight"
    second = say(tiny_runner, "And then?", "straight")
    # The second turn saw the first: its prompt holds both turns.
    assert second.usage.prompt_tokens > first.usage.prompt_tokens + 5

    again = say(tiny_runner, "Tell me a story.", "paused")
    assert again.choices[0].message.content == first.choices[0].message.content
    exported = tiny_runner.export_session("paused")
    data = json.loads(exported)
    assert [m["role"] for m in data["messages"]] == ["user", "assistant"]
    assert data["messages"][1]["content"] == first.choices[0].message.content
    assert tiny_runner.delete_session("paused") is True
    assert tiny_runner.delete_session("paused") is False
    assert tiny_runner.export_session("paused") is None
    assert "paused" not in tiny_runner.list_session_ids() and "straight" in tiny_runner.list_session_ids()

    second_runner.import_session("resumed", exported)
    assert second_runner.list_session_ids() == ["resumed"]
    resumed = say(second_runner, "And then?", "resumed")
    assert resumed.choices[0].message.content == second.choices[0].message.content
    assert resumed.usage.prompt_tokens == second.usage.prompt_tokens
    # Importing replaces a session of the same id.
    second_runner.import_session("resumed", exported)
    assert len(json.loads(second_runner.export_session("resumed"))["messages"]) == 2


def test_streamed_turns_are_kept(tiny_runner):
    chunks = list(say(tiny_runner, "Tell me a story.", "streamed", stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert chunks[-1].session_id == "streamed"
    messages = json.loads(tiny_runner.export_session("streamed"))["messages"]
    assert messages[-1] == {"role": "assistant", "content": text}


def test_tool_rounds_are_part_of_the_session(tiny_dir):
    r = Runner(which=Which.Plain(model_id=str(tiny_dir), dtype="F32"),
               tool_callbacks={"now": lambda name, args: "noon"})
    try:
        with scripted([call_text("now", {}), "It is noon."]):
            res = r.send_chat_completion_request(ChatCompletionRequest(
                messages=[SCRIPT, {"role": "user", "content": "Time?"}], session_id="s",
                tool_schemas=[json.dumps(tool("now"))], max_tokens=60))
        assert res.choices[0].message.content == "It is noon."
        roles = [m["role"] for m in json.loads(r.export_session("s"))["messages"]]
        assert roles == ["system", "user", "assistant", "tool", "assistant"]
    finally:
        r.shutdown()


def test_bad_session_input(tiny_runner):
    with pytest.raises(ValueError, match=r"^session_json: is not valid JSON"):
        tiny_runner.import_session("x", "{not json")
    with pytest.raises(ValueError, match=r"^session_json: is not an exported session"):
        tiny_runner.import_session("x", json.dumps({"messages": []}))
    with pytest.raises(ValueError, match=r"^session_json.messages\[0\]: must be a message object"):
        tiny_runner.import_session("x", json.dumps({"format": "mistralrs-session", "version": 1,
                                                    "messages": [{"content": "no role"}]}))
    with pytest.raises(ValueError, match=r"^session_id: must be a non-empty string"):
        tiny_runner.export_session("")
    with pytest.raises(ValueError, match=r"^model_id: unknown model"):
        tiny_runner.list_session_ids(model_id="nope")
    with pytest.raises(ValueError, match=r"^n_choices: the agentic loop and sessions run one choice"):
        say(tiny_runner, "hi", "multi", n_choices=2)
    with pytest.raises(ValueError, match=r"^file_id"):
        tiny_runner.find_file("")


def test_sessions_over_http(tiny_runner):
    import httpx
    from tool_testing import running_server
    body = {"model": "default", "messages": [{"role": "user", "content": "Tell me a story."}],
            "session_id": "web", "max_tokens": 6, "temperature": 0}
    with running_server(tiny_runner) as base:
        out = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=60).json()
        assert out["session_id"] == "web"
        assert "web" in [s["id"] for s in httpx.get(f"{base}/v1/sessions").json()["data"]]
        exported = httpx.get(f"{base}/v1/sessions/web").json()
        assert exported["messages"][-1]["content"] == out["choices"][0]["message"]["content"]
        assert httpx.put(f"{base}/v1/sessions/copy", json=exported).status_code == 200
        assert httpx.get(f"{base}/v1/sessions/copy").json()["messages"] == exported["messages"]
        assert httpx.delete(f"{base}/v1/sessions/copy").status_code == 200
        missing = httpx.get(f"{base}/v1/sessions/copy")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "session_not_found"
        bad = httpx.put(f"{base}/v1/sessions/x", json={"messages": []})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "session_json"
    tiny_runner.delete_session("web")
