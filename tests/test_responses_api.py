"""OpenAI's Responses API on the real server with the bundled SmolLM2, driven by the
official ``openai`` client: answers equal the chat route's for the same conversation,
OpenAI's streaming event sequence, chaining, the store (get/delete/cancel), errors."""
from __future__ import annotations

import json
import time

import httpx
import jsonschema
import openai
import pydantic
import pytest
from openai.types.responses import Response, ResponseStreamEvent

from mistralrs_core.server.responses_store import ResponseStore, Stored
from mistralrs_core.testing.server import Server, smollm2_args

QUESTION = "What is the capital of France?"
STREAM_EVENTS_HEAD = ["response.created", "response.in_progress", "response.output_item.added",
                      "response.content_part.added"]
STREAM_EVENTS_TAIL = ["response.output_text.done", "response.content_part.done", "response.output_item.done"]
WEATHER = {"type": "function", "name": "get_weather", "description": "Get the current weather in a city.",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
                          "additionalProperties": False}, "strict": True}
FORCED = {"type": "function", "name": "get_weather"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = Server(smollm2_args(), tmp_path_factory.mktemp("responses") / "log.txt")
    yield srv.wait()
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return server.client()


def chat_text(client, messages, **kw):
    res = client.chat.completions.create(model="default", messages=messages, temperature=0, **kw)
    return res.choices[0].message.content, res.usage


def engine_idle(server, timeout=30.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        eng = server.status()["engine"]
        if eng["running"] == 0 and eng["waiting"] == 0 or time.monotonic() > deadline:
            return eng
        time.sleep(0.05)


def test_create_answers_as_the_chat_route_does(client):
    r = client.responses.create(model="default", input=QUESTION, instructions="You are a helpful assistant.",
                                max_output_tokens=24, temperature=0)
    text, usage = chat_text(client, [{"role": "system", "content": "You are a helpful assistant."},
                                     {"role": "user", "content": QUESTION}], max_tokens=24)
    assert r.object == "response" and r.id.startswith("resp_") and r.status == "completed"
    Response.model_validate(r.to_dict())   # strictly: every required field is there
    assert "Paris" in r.output_text and r.output_text == text
    assert r.instructions == "You are a helpful assistant." and r.max_output_tokens == 24
    item = r.output[0]
    assert item.type == "message" and item.role == "assistant" and item.status == "completed"
    assert item.content[0].type == "output_text" and item.content[0].text == text
    assert r.usage.input_tokens == usage.prompt_tokens and r.usage.output_tokens == usage.completion_tokens
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens


def test_items_input_and_previous_response_id_chaining(client):
    items = [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": QUESTION}]}]
    first = client.responses.create(model="default", input=items, instructions="Answer in one sentence.",
                                    max_output_tokens=24, temperature=0)
    second = client.responses.create(model="default", input="And the capital of Germany?",
                                     previous_response_id=first.id, max_output_tokens=24, temperature=0)
    assert second.previous_response_id == first.id
    # The chain carries the turns, not the first request's instructions (as OpenAI).
    text, usage = chat_text(client, [{"role": "user", "content": QUESTION},
                                     {"role": "assistant", "content": first.output_text},
                                     {"role": "user", "content": "And the capital of Germany?"}], max_tokens=24)
    assert second.output_text == text and "Berlin" in text
    assert second.usage.input_tokens == usage.prompt_tokens
    items = client.responses.input_items.list(second.id)
    assert [i.role for i in items.data] == ["user", "assistant", "user"]   # newest first


def test_stream_follows_openais_event_sequence(client):
    kw = dict(model="default", input=QUESTION, max_output_tokens=16, temperature=0)
    full = client.responses.create(**kw)
    events = list(client.responses.create(stream=True, **kw))
    types = [e.type for e in events]
    n_deltas = types.count("response.output_text.delta")
    assert n_deltas >= 2
    assert types == STREAM_EVENTS_HEAD + ["response.output_text.delta"] * n_deltas + STREAM_EVENTS_TAIL + \
        ["response.completed"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    # Every event carries all the fields OpenAI's types require (the client only constructs).
    strict = pydantic.TypeAdapter(ResponseStreamEvent)
    for e in events:
        strict.validate_python(e.to_dict())
    assert events[0].response.status == "in_progress" and events[0].response.output == []
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    item_id = events[2].item.id
    assert all(e.item_id == item_id for e in events if hasattr(e, "item_id"))
    assert text == full.output_text == events[-4].text == events[-3].part.text
    final = events[-1].response
    assert final.status == "completed" and final.output_text == text and final.usage.output_tokens > 0
    # What was streamed is stored like any other response.
    assert client.responses.retrieve(final.id).output_text == text


def test_stream_helper_and_incomplete_at_max_output_tokens(client):
    with client.responses.stream(model="default", input=QUESTION, max_output_tokens=16, temperature=0) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert final.status == "completed" and final.output_text == "".join(deltas)
    events = list(client.responses.create(model="default", input="Write a long story about a dragon.",
                                          max_output_tokens=6, temperature=0, stream=True))
    last = events[-1]
    assert last.type == "response.incomplete" and last.response.status == "incomplete"
    assert last.response.incomplete_details.reason == "max_output_tokens"
    assert last.response.output[0].status == "incomplete" and last.response.usage.output_tokens == 6


def test_retrieve_delete_and_store_false(client):
    r = client.responses.create(model="default", input="Hi", max_output_tokens=4, metadata={"run": "7"})
    got = client.responses.retrieve(r.id)
    assert got.output_text == r.output_text and got.metadata == {"run": "7"}
    client.responses.delete(r.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)
    unstored = client.responses.create(model="default", input="Hi", max_output_tokens=4, store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)
    with pytest.raises(openai.NotFoundError) as exc:
        client.responses.create(model="default", input="Hi", previous_response_id=unstored.id)
    assert exc.value.body["param"] == "previous_response_id"


def test_background_response_runs_and_cancel_stops_it(client, server):
    done = client.responses.create(model="default", input=QUESTION, background=True, max_output_tokens=24,
                                   temperature=0)
    assert done.status == "in_progress" and done.background
    deadline = time.monotonic() + 120   # generous: the first request of a fresh server warms it up
    while (got := client.responses.retrieve(done.id)).status == "in_progress" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert got.status == "completed" and "Paris" in got.output_text

    long = client.responses.create(model="default", input="Write a long story about a dragon.", background=True,
                                   max_output_tokens=4000, temperature=0, extra_body={"ignore_eos": True})
    deadline = time.monotonic() + 120
    while not client.responses.retrieve(long.id).output_text and time.monotonic() < deadline:
        time.sleep(0.05)
    cancelled = client.responses.cancel(long.id)
    assert cancelled.status == "cancelled"
    assert cancelled.usage is not None and 0 < cancelled.usage.output_tokens < 4000
    eng = engine_idle(server)
    assert eng["running"] == 0 and eng["waiting"] == 0
    # Cancelling again is harmless; cancelling a finished response is an error naming it.
    assert client.responses.cancel(long.id).status == "cancelled"
    with pytest.raises(openai.BadRequestError):
        client.responses.cancel(done.id)


def test_cancel_ends_a_running_stream(client, server):
    stream = client.responses.create(model="default", input="Write a long story about a dragon.", stream=True,
                                     max_output_tokens=4000, temperature=0, extra_body={"ignore_eos": True})
    events = iter(stream)
    created = next(events)
    types = [created.type]
    for event in events:
        types.append(event.type)
        if event.type == "response.output_text.delta" and types.count(event.type) == 3:
            server.client().responses.cancel(created.response.id)
    assert types[-4:] == STREAM_EVENTS_TAIL + ["response.incomplete"]
    assert event.response.status == "cancelled" and event.response.output[0].status == "incomplete"
    assert event.response.usage.output_tokens < 4000
    assert engine_idle(server)["running"] == 0


def test_client_leaving_a_stream_cancels_it(server):
    body = {"model": "default", "input": "Write a long story about a dragon.", "stream": True,
            "max_output_tokens": 4000, "ignore_eos": True}
    with httpx.stream("POST", server.url + "/v1/responses", json=body, timeout=30) as r:
        lines = r.iter_lines()
        first = next(line for line in lines if line.startswith("data:"))
    rid = openai.types.responses.ResponseCreatedEvent.model_validate_json(first[5:]).response.id
    assert engine_idle(server)["running"] == 0
    assert server.client().responses.retrieve(rid).status == "cancelled"


def test_forced_function_call_then_its_output_gets_an_answer(client):
    r = client.responses.create(model="default", input="What is the weather in Paris?", tools=[WEATHER],
                                tool_choice=FORCED, max_output_tokens=60, temperature=0)
    Response.model_validate(r.to_dict())
    assert r.status == "completed" and [i.type for i in r.output] == ["function_call"]
    call = r.output[0]
    assert call.name == "get_weather" and call.call_id.startswith("call_") and call.status == "completed"
    jsonschema.validate(json.loads(call.arguments), WEATHER["parameters"])
    assert r.tools[0].name == "get_weather" and r.tool_choice.name == "get_weather"

    result = {"type": "function_call_output", "call_id": call.call_id, "output": "21 C and sunny"}
    # SmolLM2 offered the tool again calls it again; "none" asks for the answer.
    chained = client.responses.create(model="default", input=[result], previous_response_id=r.id, tools=[WEATHER],
                                      tool_choice="none", max_output_tokens=24, temperature=0)
    assert chained.status == "completed" and "21" in chained.output_text
    assert all(i.type == "message" for i in chained.output)
    # The same conversation spelled out as items (the call item sent back as it came) answers the same.
    explicit = client.responses.create(
        model="default", input=[{"role": "user", "content": "What is the weather in Paris?"}, call.to_dict(), result],
        tools=[WEATHER], tool_choice="none", max_output_tokens=24, temperature=0)
    assert explicit.output_text == chained.output_text
    assert explicit.usage.input_tokens == chained.usage.input_tokens
    items = client.responses.input_items.list(chained.id).data
    assert [i.type for i in items] == ["function_call_output", "function_call", "message"]   # newest first
    assert items[1].call_id == call.call_id and items[0].output == "21 C and sunny"


def test_streamed_function_call_follows_openais_events(client):
    kw = dict(model="default", input="What is the weather in Paris?", tools=[WEATHER], tool_choice=FORCED,
              max_output_tokens=60, temperature=0)
    full = client.responses.create(**kw)
    events = list(client.responses.create(stream=True, **kw))
    types = [e.type for e in events]
    n = types.count("response.function_call_arguments.delta")
    assert n >= 1 and types == ["response.created", "response.in_progress", "response.output_item.added"] + \
        ["response.function_call_arguments.delta"] * n + \
        ["response.function_call_arguments.done", "response.output_item.done", "response.completed"]
    strict = pydantic.TypeAdapter(ResponseStreamEvent)
    for e in events:
        strict.validate_python(e.to_dict())
    added, done, final = events[2].item, events[-2].item, events[-1].response
    assert added.type == "function_call" and added.status == "in_progress" and added.arguments == ""
    args = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    assert args == events[-3].arguments == done.arguments == final.output[0].arguments == full.output[0].arguments
    assert done.status == "completed" and done.id == added.id and final.output[0].call_id == added.call_id
    jsonschema.validate(json.loads(args), WEATHER["parameters"])
    # Streamed, the call is stored and chains like any other.
    nxt = client.responses.create(model="default", previous_response_id=final.id, tools=[WEATHER], temperature=0,
                                  tool_choice="none", max_output_tokens=24, stream=True, input=[
                                      {"type": "function_call_output", "call_id": done.call_id, "output": "21 C"}])
    assert "21" in [e for e in nxt][-1].response.output_text


@pytest.mark.parametrize("kw, param", [
    (dict(input=QUESTION, max_output_tokens=0), "max_output_tokens"),
    (dict(input=[{"type": "reasoning", "summary": []}]), "input[0].type"),
    (dict(input=[{"type": "function_call", "name": "f", "arguments": "{}"}]), "input[0].call_id"),
    (dict(input=QUESTION, tools=[WEATHER], tool_choice={"type": "function", "name": "nope"}), "tool_choice"),
    (dict(input=QUESTION, tools=[{"type": "web_search"}]), "tools[0].type"),
    (dict(input=QUESTION, tools=[{**WEATHER, "name": "bad name!"}]), "tools[0].name"),
    (dict(input=QUESTION, tools=[WEATHER], tool_choice={"type": "mcp"}), "tool_choice"),
    (dict(input=[{"role": "robot", "content": "hi"}]), "input[0].role"),
    (dict(input=[{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]), "input[0].content[0].type"),
    (dict(input=QUESTION, temperature="hot"), "temperature"),
    (dict(input=QUESTION, stream=True, background=True), "background"),
    (dict(input=QUESTION, metadata={"n": 1}), "metadata"),
    (dict(), "input"),
])
def test_bad_input_is_a_400_naming_the_field(client, kw, param):
    with pytest.raises(openai.BadRequestError) as exc:
        client.responses.create(model="default", **kw)
    assert exc.value.body["param"] == param and exc.value.body["message"].startswith(param)


def test_unknown_ids_are_404(client):
    for call in (client.responses.retrieve, client.responses.delete, client.responses.cancel):
        with pytest.raises(openai.NotFoundError):
            call("resp_missing")
    with pytest.raises(openai.NotFoundError) as exc:
        client.responses.create(model="default", input="Hi", previous_response_id="resp_missing")
    assert exc.value.body["param"] == "previous_response_id"


def test_store_keeps_the_newest_and_never_drops_running_responses():
    store = ResponseStore(limit=3)

    def rec(i, status="completed"):
        return Stored({"id": f"r{i}", "status": status}, [], True)
    store.put(rec(0, "in_progress"))
    for i in range(1, 6):
        store.put(rec(i))
    assert len(store) == 3
    store.get("r0")   # running: kept although oldest
    store.get("r5")
    with pytest.raises(Exception):
        store.get("r1")
