"""Tool-call parsers on recorded outputs of each family's native format: calls come out with
JSON-object arguments; malformed calls come back as text (never an exception); streamed
text that may start a call is held back until decided, however the text is split."""
import json

import pytest

from mistralrs_core.agent.calling import CallStreamFilter
from mistralrs_core.agent.parsers import parse_tool_calls

NAMES = ("get_weather", "search")

# (family, generated text, expected content, expected [(name, arguments)])
CASES = [
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
     None, [("get_weather", {"city": "Paris"})]),
    ("hermes two calls + text", 'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
     '</tool_call>\n<tool_call>\n{"name": "search", "arguments": {"q": "Louvre"}}\n</tool_call>',
     "Let me look.", [("get_weather", {"city": "Paris"}), ("search", {"q": "Louvre"})]),
    ("hermes unclosed (stopped at the tag)", '<tool_call>\n{"name": "search", "arguments": {"q": "x"}}',
     None, [("search", {"q": "x"})]),
    ("hermes string arguments", '<tool_call>{"name": "search", "arguments": "{\\"q\\": \\"x\\"}"}</tool_call>',
     None, [("search", {"q": "x"})]),
    ("qwen3-coder xml", '<tool_call>\n<function=get_weather>\n<parameter=city>\nSão Paulo\n</parameter>\n'
     '<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>', None,
     [("get_weather", {"city": "São Paulo", "days": 3})]),
    ("llama python_tag", '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Rome"}}',
     None, [("get_weather", {"city": "Rome"})]),
    ("llama bare json", '{"name": "get_weather", "parameters": {"city": "Oslo"}}',
     None, [("get_weather", {"city": "Oslo"})]),
    ("llama two calls ;", '<|python_tag|>{"name": "search", "parameters": {"q": "a"}}; '
     '{"name": "search", "parameters": {"q": "b"}}', None, [("search", {"q": "a"}), ("search", {"q": "b"})]),
    ("mistral array", '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Lyon"}}, '
     '{"name": "search", "arguments": {"q": "wine"}}]', None,
     [("get_weather", {"city": "Lyon"}), ("search", {"q": "wine"})]),
    ("mistral v11", '[TOOL_CALLS]get_weather[ARGS]{"city": "Nice"}[TOOL_CALLS]search[ARGS]{"q": "sea"}',
     None, [("get_weather", {"city": "Nice"}), ("search", {"q": "sea"})]),
    ("mistral v11 call id", '[TOOL_CALLS]search[CALL_ID]abc123XYZ[ARGS]{"q": "sea"}', None, [("search", {"q": "sea"})]),
    ("deepseek", 'Checking.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n'
     '{"city": "Tokyo"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>', "Checking.", [("get_weather", {"city": "Tokyo"})]),
    ("deepseek two", '<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>search\n```json\n{"q": "a"}\n```'
     '<｜tool▁call▁end｜>\n<｜tool▁call▁begin｜>function<｜tool▁sep｜>search\n```json\n{"q": "b"}\n```'
     '<｜tool▁call▁end｜><｜tool▁calls▁end｜>', None, [("search", {"q": "a"}), ("search", {"q": "b"})]),
    ("deepseek v3.1", '<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{"city": "Seoul"}'
     '<｜tool▁call▁end｜><｜tool▁calls▁end｜>', None, [("get_weather", {"city": "Seoul"})]),
    ("harmony", '<|channel|>analysis<|message|>Need weather.<|end|><|start|>assistant<|channel|>commentary '
     'to=functions.get_weather <|constrain|>json<|message|>{"city": "Berlin"}<|call|>', None,
     [("get_weather", {"city": "Berlin"})]),
    ("harmony recipient first", '<|start|>assistant to=functions.search<|channel|>commentary json<|message|>'
     '{"q": "x"}<|call|>', None, [("search", {"q": "x"})]),
    ("functiongemma", '<start_function_call>call:get_weather{city:<escape>Madrid<escape>,days:3}<end_function_call>',
     None, [("get_weather", {"city": "Madrid", "days": 3})]),
    ("gemma4", '<|tool_call>call:search{q:<escape>a, b<escape>,opts:{exact:true},tags:[<escape>x<escape>]}<tool_call|>',
     None, [("search", {"q": "a, b", "opts": {"exact": True}, "tags": ["x"]})]),
]


@pytest.mark.parametrize("family,text,content,calls", CASES, ids=[c[0] for c in CASES])
def test_recorded_calls_parse(family, text, content, calls):
    result = parse_tool_calls(text, NAMES)
    assert result.content == content
    assert [(c.name, json.loads(c.arguments)) for c in result.calls] == calls
    for c in result.calls:
        assert isinstance(json.loads(c.arguments), dict)


MALFORMED = [
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par',              # cut off
    '<tool_call>{"name": "get_weather"  "arguments": {}}</tool_call>',               # bad JSON
    '<tool_call>{"arguments": {"city": "x"}}</tool_call>',                           # no name
    '<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>',                      # unknown tool
    '<tool_call>{"name": "search", "arguments": [1, 2]}</tool_call>',                # not an object
    '<tool_call>{"name": "search", "arguments": {}}</tool_call> and then some text',  # trailing text
    '[TOOL_CALLS][{"name": "search", "arguments": {"q": 1}',
    '[TOOL_CALLS]bad name[ARGS]{}',
    '<|python_tag|>{"name": "search", "parameters": {"q": "a"}} garbage',
    '<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>search\n```json\n{"q": ```',
    '<|channel|>commentary to=functions.search <|constrain|>json<|message|>{"q": <|call|>',
    '<start_function_call>call:search{q:<escape>never closed}<end_function_call>',
    '<tool_call>' + '[' * 5000 + '</tool_call>',                                       # deep nesting
    '<tool_call>\n<function=search>\n<parameter=q>\nx\n</function>\n</tool_call>',          # unclosed parameter
]


@pytest.mark.parametrize("text", MALFORMED)
def test_malformed_calls_are_text(text):
    result = parse_tool_calls(text, NAMES)
    assert result.calls == ()
    assert isinstance(result.content, str) and result.content
    # The markers (special tokens kept for the parser) are not shown to the user.
    for marker in ("<tool_call>", "[TOOL_CALLS]", "<|python_tag|>", "<|channel|>", "<｜tool▁call▁begin｜>"):
        assert marker not in result.content


@pytest.mark.parametrize("text", [
    "The answer is 42.", "", "  ", '{"answer": 42}', '[1, 2, 3]', "Use <b>bold</b> [like this].",
    '{"name": "Bob", "age": 3}',   # JSON that is not a call
])
def test_plain_answers_stay_as_they_are(text):
    result = parse_tool_calls(text, NAMES)
    assert result.calls == () and result.content == text


def _stream(text: str, cuts: list[int]):
    filt = CallStreamFilter(NAMES)
    shown, pieces, prev = [], [], 0
    for cut in [*cuts, len(text)]:
        pieces.append(text[prev:cut])
        prev = cut
    for piece in pieces:
        shown.append(filt.push(piece))
    tail, calls = filt.finish()
    return "".join(shown) + tail, calls, shown


STREAMED = [
    ('Sure. <tool_call>\n{"name": "search", "arguments": {"q": "a"}}\n</tool_call>', "Sure. ", [("search", {"q": "a"})]),
    ('{"name": "get_weather", "parameters": {"city": "Oslo"}}', "", [("get_weather", {"city": "Oslo"})]),
    ('[TOOL_CALLS]search[ARGS]{"q": "sea"}', "", [("search", {"q": "sea"})]),
    ("A plain answer with < and [ signs.", "A plain answer with < and [ signs.", []),
    ('<tool_call>{"name": "nope", "arguments": {}}</tool_call>', '{"name": "nope", "arguments": {}}', []),
]


@pytest.mark.parametrize("text,content,calls", STREAMED)
@pytest.mark.parametrize("step", [1, 2, 3, 7, 1000])
def test_streaming_splits_hold_back_calls(text, content, calls, step):
    shown_all, got, pieces = _stream(text, list(range(step, len(text), step)))
    assert shown_all == content
    assert [(c.function.name, json.loads(c.function.arguments)) for c in got] == calls
    # No piece of a call was ever shown.
    for piece in pieces:
        assert "<tool_" not in piece and "TOOL_CALLS" not in piece and '"name"' not in piece
    assert [c.index for c in got] == list(range(len(calls)))
    assert all(c.id.startswith("call_") for c in got)


def test_streaming_shows_plain_text_promptly():
    filt = CallStreamFilter(NAMES)
    assert filt.push("Hello") == "Hello"
    assert filt.push(" world <") == " world "       # '<' may open a marker: held
    assert filt.push("3 is true") == "<3 is true"    # it did not
    assert filt.finish() == ("", [])
