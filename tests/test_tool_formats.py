"""A model's tool-call format, tools in the prompt, and the grammars that force a call:
each grammar text compiles with llguidance against a tokenizer that has the family's
special tokens, accepts the family's own call (which the parser then reads back), and
refuses arguments outside a strict tool's schema."""
import json

import pytest
import tokenizers

llguidance = pytest.importorskip("llguidance")

from mistralrs_core.agent import formats  # noqa: E402
from mistralrs_core.agent.parsers import parse_tool_calls  # noqa: E402
from mistralrs_core.agent.tool_specs import ToolMode, parse_tool_specs, resolve_tool_mode  # noqa: E402
from mistralrs_core.api import ChatCompletionRequest, ToolChoice  # noqa: E402
from mistralrs_core.tokenization.tokenizer import Tokenizer  # noqa: E402

SPECIALS = ["<|eot|>", "[TOOL_CALLS]", "[ARGS]", "<|python_tag|>", "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>",
            "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>", "<|channel|>", "<|constrain|>",
            "<|message|>", "<|call|>", "<start_function_call>", "<end_function_call>"]

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city", "strict": True,
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                   "required": ["city"], "additionalProperties": False}}}
SEARCH = {"type": "function", "function": {"name": "search", "parameters": {"type": "object"}}}


@pytest.fixture(scope="module")
def tok():
    from tokenizers import decoders, models, pre_tokenizers, trainers
    t = tokenizers.Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    t.train_from_iterator(['{"name": "get_weather", "arguments": {"city": "Paris"}}'] * 4, trainer)
    return Tokenizer.from_tokenizers(t, eos_token="<|eot|>")


@pytest.fixture(scope="module")
def ll_tok(tok):
    return llguidance.LLTokenizer(tok._tok.to_str(), eos_token=tok.token_to_id("<|eot|>"))


def _specs():
    return parse_tool_specs([json.dumps(WEATHER), json.dumps(SEARCH)])


# (format, a call in that format to get_weather with {"city": "Paris"})
NATIVE = [
    (formats.HERMES, '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'),
    (formats.LLAMA, '{"name": "get_weather", "parameters": {"city": "Paris"}}'),
    (formats.MISTRAL, '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}]'),
    (formats.MISTRAL_V11, '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}'),
    (formats.DEEPSEEK, '<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n'
                       '{"city": "Paris"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>'),
    (formats.HARMONY, '<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>'
                      '{"city": "Paris"}<|call|>'),
    (formats.GEMMA, '<start_function_call>{"name": "get_weather", "arguments": {"city": "Paris"}}'
                    '<end_function_call>'),
]


def _matcher(ll_tok, grammar_type, grammar):
    err = llguidance.LLMatcher.validate_grammar(llguidance.grammar_from(grammar_type, grammar), ll_tok)
    assert err == "", err
    return llguidance.LLMatcher(ll_tok, llguidance.grammar_from(grammar_type, grammar))


def _accepts(ll_tok, tok, grammar_type, grammar, text) -> bool:
    m = _matcher(ll_tok, grammar_type, grammar)
    ids = tok.encode(text, add_special_tokens=False)
    return m.consume_tokens(ids) and m.is_accepting()


@pytest.mark.parametrize("fmt,call", NATIVE, ids=[n[0] for n in NATIVE])
def test_forced_grammar_compiles_and_accepts_the_native_call(tok, ll_tok, fmt, call):
    specs = _specs()
    for mode in (ToolMode("named", ("get_weather",)), ToolMode("required", ("get_weather", "search"))):
        gtype, grammar = formats.forced_call_grammar(fmt, specs, mode, tok)
        assert _accepts(ll_tok, tok, gtype, grammar, call), (fmt, mode, grammar)
    # What the grammar lets through is what the parser reads.
    result = parse_tool_calls(call, ("get_weather", "search"))
    assert [(c.name, json.loads(c.arguments)) for c in result.calls] == [("get_weather", {"city": "Paris"})]


@pytest.mark.parametrize("fmt,call", NATIVE, ids=[n[0] for n in NATIVE])
def test_strict_arguments_are_held_to_the_schema(tok, ll_tok, fmt, call):
    specs = _specs()
    gtype, grammar = formats.forced_call_grammar(fmt, specs, ToolMode("named", ("get_weather",)), tok)
    for bad in ('{"city": 3}', '{"town": "Paris"}', '{"city": "Paris", "extra": 1}'):
        assert not _accepts(ll_tok, tok, gtype, grammar, call.replace('{"city": "Paris"}', bad)), (fmt, bad)
    # A named choice allows no other tool.
    other = call.replace("get_weather", "search")
    assert not _accepts(ll_tok, tok, gtype, grammar, other)


def test_non_strict_tool_takes_any_object(tok, ll_tok):
    specs = _specs()
    gtype, grammar = formats.forced_call_grammar(formats.HERMES, specs, ToolMode("named", ("search",)), tok)
    call = '<tool_call>\n{"name": "search", "arguments": {"anything": [1, 2]}}\n</tool_call>'
    assert _accepts(ll_tok, tok, gtype, grammar, call)
    assert not _accepts(ll_tok, tok, gtype, grammar, call.replace("{\"anything\": [1, 2]}", "[1]"))


def test_format_detection():
    assert formats.detect_format("{% if tools %}<tool_call>{% endif %}", None) == formats.HERMES
    assert formats.detect_format("{{ '<|python_tag|>' }}", None) == formats.LLAMA
    assert formats.detect_format("[TOOL_CALLS]", None) == formats.MISTRAL
    assert formats.detect_format("<｜tool▁call▁begin｜>", None) == formats.DEEPSEEK
    assert formats.detect_format("<|channel|>commentary to=functions.x", None) == formats.HARMONY
    assert formats.detect_format("<start_function_call>", None) == formats.GEMMA
    assert formats.detect_format("plain chatml", None) == formats.HERMES


def test_template_without_tools_gets_them_as_a_system_message():
    specs = _specs()
    mode = ToolMode("auto", ("get_weather", "search"))
    history = [{"role": "user", "content": "Weather in Paris?"},
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "call_1", "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "21 C"}]
    msgs, tools = formats.prepare_messages(history, "{{ messages }}", specs, mode)
    assert tools is None
    assert msgs[0]["role"] == "system" and '"name": "get_weather"' in msgs[0]["content"]
    assert msgs[2] == {"role": "assistant", "content":
                       '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'}
    assert msgs[3] == {"role": "user", "content": "The get_weather tool returned: 21 C"}
    # A template that renders tools gets them, with past arguments as objects (as HF expects).
    msgs, tools = formats.prepare_messages(history, "{% for t in tools %}{% endfor %}", specs, mode)
    assert [t["function"]["name"] for t in tools] == ["get_weather", "search"]
    assert msgs[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    assert msgs[2]["role"] == "tool"


def test_tool_choice_resolution_and_bad_input():
    specs = _specs()
    req = lambda **kw: ChatCompletionRequest(messages=[{"role": "user", "content": "x"}], **kw)  # noqa: E731
    assert resolve_tool_mode(req(), specs).kind == "auto"
    assert resolve_tool_mode(req(tool_choice=ToolChoice.NoTools), specs).kind == "none"
    assert resolve_tool_mode(req(tool_choice_openai="required"), specs) == ToolMode("required", ("get_weather", "search"))
    named = resolve_tool_mode(req(tool_choice_openai={"type": "function", "function": {"name": "search"}}), specs)
    assert named == ToolMode("named", ("search",))
    with pytest.raises(ValueError, match=r"^tool_choice: names the unknown tool 'nope'"):
        resolve_tool_mode(req(tool_choice_openai={"type": "function", "function": {"name": "nope"}}), specs)
    with pytest.raises(ValueError, match=r"^tool_choice: 'required' needs tools"):
        resolve_tool_mode(req(tool_choice_openai="required"), [])
    with pytest.raises(ValueError, match=r"^tool_schemas\[0\]\.function\.parameters: is not a valid JSON Schema"):
        parse_tool_specs([json.dumps({"type": "function", "function": {
            "name": "f", "parameters": {"type": "object", "properties": {"a": {"type": "strin"}}}}})])
    with pytest.raises(ValueError, match=r"^tool_schemas\[1\]: tool 'search' is also defined"):
        parse_tool_specs([json.dumps(SEARCH), json.dumps(SEARCH)])
    with pytest.raises(ValueError, match=r"^tool_schemas\[0\]\.function\.name"):
        parse_tool_specs([json.dumps({"type": "function", "function": {"name": "has space"}})])


AUTO = [n for n in NATIVE if n[0] not in (formats.LLAMA, formats.HARMONY)]


@pytest.mark.parametrize("fmt,call", AUTO, ids=[n[0] for n in AUTO])
def test_auto_choice_with_a_strict_tool_holds_a_call_to_the_schema(tok, ll_tok, fmt, call):
    specs = _specs()
    mode = ToolMode("auto", ("get_weather", "search"))
    gtype, grammar = formats.auto_call_grammar(fmt, specs, mode, tok)
    # Free text, a call, or text and then a call all pass ...
    for text in ("It is sunny in Paris today.", call, "Let me check.\n" + call):
        assert _accepts(ll_tok, tok, gtype, grammar, text), (fmt, text)
    # ... but a call's strict arguments must follow the schema, even after some text, and
    # the opener cannot hide inside text.
    bad = call.replace('{"city": "Paris"}', '{"city": 3}')
    for text in (bad, "Let me check.\n" + bad):
        assert not _accepts(ll_tok, tok, gtype, grammar, text), (fmt, text)
    # The non-strict tool still takes any object.
    assert _accepts(ll_tok, tok, gtype, grammar, call.replace("get_weather", "search"))


def test_auto_choice_without_strict_tools_or_opener_is_free(tok):
    specs = _specs()
    mode = ToolMode("auto", ("get_weather", "search"))
    assert formats.auto_call_grammar(formats.LLAMA, specs, mode, tok) is None
    assert formats.auto_call_grammar(formats.HARMONY, specs, mode, tok) is None
    loose = parse_tool_specs([json.dumps(SEARCH)])
    assert formats.auto_call_grammar(formats.HERMES, loose, ToolMode("auto", ("search",)), tok) is None
