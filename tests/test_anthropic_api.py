"""Anthropic's Messages API on the real server with the bundled SmolLM2, driven by the
official ``anthropic`` client: answers equal the chat route's, Anthropic's streaming
events, count_tokens, and errors in Anthropic's shape naming the field."""
from __future__ import annotations

import json

import anthropic
import httpx
import jsonschema
import pydantic
import pytest

from mistralrs_core.testing.server import Server, smollm2_args

QUESTION = "What is the capital of France?"
SYSTEM = "You are a helpful assistant."
GREEDY = {"temperature": 0}   # this anthropic SDK takes sampling fields through extra_body
WEATHER = {"name": "get_weather", "description": "Get the current weather in a city.", "strict": True,
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
                            "additionalProperties": False}}
FORCED = {"type": "tool", "name": "get_weather"}
ASK = {"role": "user", "content": "What is the weather in Paris?"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = Server(smollm2_args(), tmp_path_factory.mktemp("anthropic") / "log.txt")
    yield srv.wait()
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0, timeout=60)


def chat(server, messages, **kw):
    res = server.client().chat.completions.create(model="default", messages=messages, temperature=0, **kw)
    return res.choices[0].message.content, res.usage


def test_create_answers_as_the_chat_route_does(client, server):
    m = client.messages.create(model="default", max_tokens=24, system=SYSTEM,
                               messages=[{"role": "user", "content": QUESTION}], extra_body=GREEDY)
    text, usage = chat(server, [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}],
                       max_tokens=24)
    assert m.type == "message" and m.role == "assistant" and m.id.startswith("msg_")
    anthropic.types.Message.model_validate(m.to_dict())
    assert m.content[0].type == "text" and m.content[0].text == text and "Paris" in text
    assert m.stop_reason == "end_turn" and m.stop_sequence is None
    assert m.usage.input_tokens == usage.prompt_tokens and m.usage.output_tokens == usage.completion_tokens


def test_system_and_content_blocks_mean_the_same_as_strings(client):
    blocks = client.messages.create(
        model="default", max_tokens=12, system=[{"type": "text", "text": SYSTEM}],
        messages=[{"role": "user", "content": [{"type": "text", "text": "What is the capital "},
                                               {"type": "text", "text": "of France?"}]}], extra_body=GREEDY)
    plain = client.messages.create(model="default", max_tokens=12, system=SYSTEM,
                                   messages=[{"role": "user", "content": QUESTION}], extra_body=GREEDY)
    assert blocks.content[0].text == plain.content[0].text
    assert blocks.usage.input_tokens == plain.usage.input_tokens


def test_max_tokens_and_stop_sequences(client, server):
    m = client.messages.create(model="default", max_tokens=5, messages=[{"role": "user", "content": QUESTION}],
                               extra_body=GREEDY)
    assert m.stop_reason == "max_tokens" and m.usage.output_tokens == 5
    stopped = client.messages.create(model="default", max_tokens=24, stop_sequences=["Paris"],
                                     messages=[{"role": "user", "content": QUESTION}], extra_body=GREEDY)
    text, _ = chat(server, [{"role": "user", "content": QUESTION}], max_tokens=24, stop=["Paris"])
    assert stopped.content[0].text == text and "Paris" not in text


def test_stream_events_and_text(client, server):
    kw = dict(model="default", max_tokens=16, messages=[{"role": "user", "content": QUESTION}], extra_body=GREEDY)
    full = client.messages.create(**kw)
    with client.messages.stream(**kw) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    assert len(pieces) >= 2 and "".join(pieces) == full.content[0].text == final.content[0].text
    assert final.stop_reason == full.stop_reason and final.usage.output_tokens == full.usage.output_tokens
    assert final.usage.input_tokens == full.usage.input_tokens > 0

    # The wire: named events in Anthropic's order, input tokens known at message_start.
    body = {**kw.pop("extra_body"), **kw, "stream": True}
    with httpx.stream("POST", server.url + "/v1/messages", json=body, timeout=60) as r:
        names = [line[7:] for line in r.iter_lines() if line.startswith("event: ")]
    n = names.count("content_block_delta")
    assert names == ["message_start", "content_block_start"] + ["content_block_delta"] * n + \
        ["content_block_stop", "message_delta", "message_stop"]
    events = stream_events(server, body)
    strict = pydantic.TypeAdapter(anthropic.types.RawMessageStreamEvent)
    for e in events:
        strict.validate_python(e)   # every field Anthropic's types require is there
    start = events[0]
    assert start["message"]["usage"]["input_tokens"] == full.usage.input_tokens


def stream_events(server, body):
    with httpx.stream("POST", server.url + "/v1/messages", json=body, timeout=60) as r:
        return [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]


def test_count_tokens_matches_usage(client):
    kw = dict(model="default", system=SYSTEM, messages=[{"role": "user", "content": QUESTION}])
    counted = client.messages.count_tokens(**kw)
    used = client.messages.create(max_tokens=1, **kw)
    assert counted.input_tokens == used.usage.input_tokens > 0


def test_forced_tool_use_then_its_result_gets_an_answer(client):
    m = client.messages.create(model="default", max_tokens=60, messages=[ASK], tools=[WEATHER], tool_choice=FORCED,
                               extra_body=GREEDY)
    anthropic.types.Message.model_validate(m.to_dict())
    assert m.stop_reason == "tool_use" and [b.type for b in m.content] == ["tool_use"]
    use = m.content[0]
    assert use.name == "get_weather" and use.id.startswith("toolu_") and isinstance(use.input, dict)
    jsonschema.validate(use.input, WEATHER["input_schema"])
    # The offered tools are part of the prompt, and of its count.
    counted = client.messages.count_tokens(model="default", messages=[ASK], tools=[WEATHER], tool_choice=FORCED)
    assert counted.input_tokens == m.usage.input_tokens > client.messages.count_tokens(
        model="default", messages=[ASK]).input_tokens
    # SmolLM2 offered the tool again calls it again; "none" asks for the answer.
    answer = client.messages.create(
        model="default", max_tokens=24, tools=[WEATHER], tool_choice={"type": "none"}, extra_body=GREEDY,
        messages=[ASK, {"role": "assistant", "content": m.content},
                  {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id,
                                                "content": [{"type": "text", "text": "21 C and sunny"}]}]}])
    assert answer.stop_reason == "end_turn" and answer.content[0].type == "text" and "21" in answer.content[0].text


def test_streamed_tool_use(client, server):
    kw = dict(model="default", max_tokens=60, messages=[ASK], tools=[WEATHER], tool_choice=FORCED, extra_body=GREEDY)
    full = client.messages.create(**kw)
    with client.messages.stream(**kw) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use" and final.content[0].type == "tool_use"
    assert final.content[0].input == full.content[0].input and final.content[0].name == "get_weather"
    events = stream_events(server, {**kw.pop("extra_body"), **kw, "stream": True})
    assert [e["type"] for e in events] == ["message_start", "content_block_start"] + \
        ["content_block_delta"] * (len(events) - 5) + ["content_block_stop", "message_delta", "message_stop"]
    strict = pydantic.TypeAdapter(anthropic.types.RawMessageStreamEvent)
    for e in events:
        strict.validate_python(e)
    assert events[1]["content_block"]["type"] == "tool_use" and events[1]["content_block"]["input"] == {}
    assert events[0]["message"]["usage"]["input_tokens"] == full.usage.input_tokens   # tools counted up front
    deltas = [e["delta"] for e in events if e["type"] == "content_block_delta"]
    assert deltas and all(d["type"] == "input_json_delta" for d in deltas)
    assert json.loads("".join(d["partial_json"] for d in deltas)) == full.content[0].input
    assert events[-2]["delta"]["stop_reason"] == "tool_use"


@pytest.mark.parametrize("body, field", [
    ({"messages": [{"role": "user", "content": "hi"}]}, "max_tokens"),
    ({"max_tokens": 0, "messages": [{"role": "user", "content": "hi"}]}, "max_tokens"),
    ({"max_tokens": 8, "messages": []}, "messages"),
    ({"max_tokens": 8, "messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
    ({"max_tokens": 8, "messages": [{"role": "user", "content": [
        {"type": "tool_use", "id": "t", "name": "f", "input": {}}]}]}, "messages[0].content[0].type"),
    ({"max_tokens": 8, "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": [
        {"type": "tool_use", "id": "t", "name": "get_weather", "input": "Paris"}]}]}, "messages[1].content[0].input"),
    ({"max_tokens": 8, "messages": [{"role": "user", "content": [{"type": "tool_result", "content": "x"}]}]},
     "messages[0].content[0].tool_use_id"),
    ({"max_tokens": 8, "system": [{"type": "image"}], "messages": [{"role": "user", "content": "hi"}]}, "system[0]"),
    ({"max_tokens": 8, "temperature": "hot", "messages": [{"role": "user", "content": "hi"}]}, "temperature"),
    ({"max_tokens": 8, "stop_sequences": "END", "messages": [{"role": "user", "content": "hi"}]}, "stop_sequences"),
    ({"max_tokens": 8, "tools": [{"name": "f"}], "messages": [{"role": "user", "content": "hi"}]},
     "tools[0].input_schema"),
    ({"max_tokens": 8, "tools": [{**WEATHER, "name": "bad name!"}], "messages": [{"role": "user", "content": "hi"}]},
     "tools[0].name"),
    ({"max_tokens": 8, "tools": [{"type": "web_search_20250305", "name": "web_search"}],
      "messages": [{"role": "user", "content": "hi"}]}, "tools[0].type"),
    ({"max_tokens": 8, "tools": [WEATHER], "tool_choice": {"type": "tool", "name": "nope"},
      "messages": [{"role": "user", "content": "hi"}]}, "tool_choice"),
    ({"max_tokens": 8, "tools": [WEATHER], "tool_choice": {"type": "sometimes"},
      "messages": [{"role": "user", "content": "hi"}]}, "tool_choice"),
    # An image reaches the chat path as an image_url part, which a text model refuses.
    ({"max_tokens": 8, "system": SYSTEM, "messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}},
        {"type": "text", "text": "what is this?"}]}]}, "messages[0].content"),
])
def test_bad_input_is_a_400_in_anthropics_shape(server, body, field):
    r = httpx.post(server.url + "/v1/messages", json={"model": "default", **body}, timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()
    assert err["type"] == "error" and err["error"]["type"] == "invalid_request_error"
    assert err["error"]["message"].startswith(field + ":"), err


def test_client_errors(client):
    with pytest.raises(anthropic.NotFoundError) as exc:
        client.messages.create(model="no-such-model", max_tokens=4, messages=[{"role": "user", "content": "hi"}])
    assert exc.value.body["error"]["type"] == "not_found_error"
    with pytest.raises(anthropic.BadRequestError) as exc:
        client.messages.count_tokens(model="default", messages=[{"role": "assistant", "content": 7}])
    assert exc.value.body["error"]["message"].startswith("messages[0].content")
