"""Tool calls out of generated text, one parser per model family's native format.

Parsers are tried in a fixed order (as upstream does) and the first that recognises its
format wins. A parser that recognises its markers but cannot read a call (broken JSON, an
unknown tool) makes the whole text plain content: a malformed call is never an exception
and never a half-parsed call. Text before the first call marker is kept as content.
"""
from __future__ import annotations

import json
import re
from typing import Callable, Iterable

import attrs


@attrs.frozen
class ParsedCall:
    name: str
    arguments: str       # JSON text of an object


@attrs.frozen
class ParseResult:
    content: str | None          # text for the user (None when only calls were made)
    calls: tuple[ParsedCall, ...] = ()


# Every marker a parser looks for: the streaming filter holds text back while it may
# still become one of these, and user-visible content never shows them.
HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"
PYTHON_TAG = "<|python_tag|>"
MISTRAL_CALLS, MISTRAL_ARGS, MISTRAL_CALL_ID = "[TOOL_CALLS]", "[ARGS]", "[CALL_ID]"
DS_CALLS_BEGIN, DS_CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
DS_CALL_BEGIN, DS_CALL_END, DS_SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"
HARMONY_CHANNEL, HARMONY_MESSAGE, HARMONY_CALL = "<|channel|>", "<|message|>", "<|call|>"
HARMONY_CONSTRAIN, HARMONY_START, HARMONY_END = "<|constrain|>", "<|start|>", "<|end|>"
GEMMA_CALL_OPEN, GEMMA_CALL_CLOSE = "<start_function_call>", "<end_function_call>"
GEMMA4_CALL_OPEN, GEMMA4_CALL_CLOSE = "<|tool_call>", "<tool_call|>"
GEMMA_STRING = "<escape>"

CALL_MARKERS = (HERMES_OPEN, PYTHON_TAG, MISTRAL_CALLS, DS_CALLS_BEGIN, DS_CALL_BEGIN, GEMMA_CALL_OPEN,
                GEMMA4_CALL_OPEN, HARMONY_CHANNEL)
ALL_MARKERS = CALL_MARKERS + (HERMES_CLOSE, MISTRAL_ARGS, MISTRAL_CALL_ID, DS_CALLS_END, DS_CALL_END, DS_SEP,
                              HARMONY_MESSAGE, HARMONY_CALL, HARMONY_CONSTRAIN, HARMONY_START, HARMONY_END,
                              GEMMA_CALL_CLOSE, GEMMA4_CALL_CLOSE, GEMMA_STRING)


class _Malformed(Exception):
    """A recognised format whose call could not be read: the text stays content."""


_DECODER = json.JSONDecoder()


def _json_at(text: str, pos: int):
    """The JSON value starting at ``pos`` (after whitespace) and the index after it."""
    while pos < len(text) and text[pos].isspace():
        pos += 1
    try:
        return _DECODER.raw_decode(text, pos)
    except json.JSONDecodeError:
        raise _Malformed from None


def _args_text(value) -> str:
    # OpenAI sends arguments as JSON text of an object; some models emit them as a string.
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise _Malformed from None
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise _Malformed
    return json.dumps(value, ensure_ascii=False)


def _call_from_object(obj) -> ParsedCall:
    """``{"name": ..., "arguments"|"parameters": {...}}`` (also OpenAI's nested ``function``)."""
    if not isinstance(obj, dict):
        raise _Malformed
    if isinstance(obj.get("function"), dict) and "name" not in obj:
        obj = obj["function"]
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        raise _Malformed
    args = obj["arguments"] if "arguments" in obj else obj.get("parameters")
    return ParsedCall(name, _args_text(args))


def _content(text: str) -> str | None:
    text = text.strip()
    return text or None


_XML_FUNCTION = re.compile(r"\s*<function=([A-Za-z0-9_.\-]+)>(.*?)</function>", re.S)
_XML_PARAMETER = re.compile(r"\s*<parameter=([A-Za-z0-9_.\-]+)>\n?(.*?)\n?</parameter>", re.S)


def _xml_call(text: str, pos: int):
    """Qwen3-Coder's body: ``<function=NAME><parameter=KEY>value</parameter>...</function>``;
    a value that reads as JSON is that value, else it is a string."""
    m = _XML_FUNCTION.match(text, pos)
    if m is None:
        raise _Malformed
    args, body, at = {}, m.group(2), 0
    while True:
        p = _XML_PARAMETER.match(body, at)
        if p is None:
            break
        try:
            args[p.group(1)] = json.loads(p.group(2))
        except json.JSONDecodeError:
            args[p.group(1)] = p.group(2)
        at = p.end()
    if body[at:].strip():
        raise _Malformed
    return ParsedCall(m.group(1), _args_text(args)), m.end()


def _hermes(text: str):
    """Qwen / Hermes: ``<tool_call>{"name":..,"arguments":..}</tool_call>``, repeated (or
    Qwen3-Coder's XML body inside the same tags)."""
    start = text.find(HERMES_OPEN)
    if start < 0:
        return None
    calls, pos = [], start
    while True:
        pos = text.find(HERMES_OPEN, pos)
        if pos < 0:
            break
        body_at = pos + len(HERMES_OPEN)
        if text[body_at:].lstrip().startswith("<function="):
            call, end = _xml_call(text, body_at)
            calls.append(call)
        else:
            obj, end = _json_at(text, body_at)
            calls.append(_call_from_object(obj))
        close = text.find(HERMES_CLOSE, end)
        # The closing tag may be missing when generation stopped at it (a stop string).
        if close >= 0 and text[end:close].strip():
            raise _Malformed
        pos = close + len(HERMES_CLOSE) if close >= 0 else len(text)
        rest = text[pos:]
        if rest.strip() and HERMES_OPEN not in rest:
            raise _Malformed
    return text[:start], calls


def _objects(value) -> list:
    return value if isinstance(value, list) else [value]


def _llama(text: str):
    """Llama 3.x: ``<|python_tag|>{"name":..,"parameters":..}`` (several joined by ';'), or
    the whole answer being such a JSON object (or a list of them)."""
    tag = text.find(PYTHON_TAG)
    if tag >= 0:
        head, pos = text[:tag], tag + len(PYTHON_TAG)
    else:
        stripped = text.lstrip()
        if not stripped.startswith(("{", "[")):
            return None
        head, pos = "", len(text) - len(stripped)
        # Bare JSON that is not a call (a JSON answer) stays content.
        try:
            value, _ = _json_at(text, pos)
        except _Malformed:
            return None
        if not all(isinstance(o, dict) and isinstance(o.get("name"), str)
                   and ("arguments" in o or "parameters" in o) for o in _objects(value)):
            return None
    calls = []
    while True:
        value, pos = _json_at(text, pos)
        calls.extend(_call_from_object(o) for o in _objects(value))
        rest = text[pos:].lstrip()
        if rest.startswith(";"):
            pos = len(text) - len(rest) + 1
            continue
        if rest.startswith(PYTHON_TAG):
            pos = len(text) - len(rest) + len(PYTHON_TAG)
            continue
        if rest:
            raise _Malformed
        return head, calls


def _mistral(text: str):
    """Mistral: ``[TOOL_CALLS][{"name":..,"arguments":..}, ...]`` (Nemo, v3) or, from v11
    tokenizers on, ``[TOOL_CALLS]name[ARGS]{...}`` repeated (``[CALL_ID]id`` optional)."""
    start = text.find(MISTRAL_CALLS)
    if start < 0:
        return None
    calls, pos = [], start
    while pos < len(text):
        if not text.startswith(MISTRAL_CALLS, pos):
            if text[pos:].strip():
                raise _Malformed
            break
        pos += len(MISTRAL_CALLS)
        args_at = text.find(MISTRAL_ARGS, pos)
        nxt = text.find(MISTRAL_CALLS, pos)
        if args_at >= 0 and (nxt < 0 or args_at < nxt):
            name = text[pos:args_at]
            if MISTRAL_CALL_ID in name:
                name = name[:name.find(MISTRAL_CALL_ID)]
            name = name.strip()
            if not re.fullmatch(r"[A-Za-z0-9_.\-]+", name):
                raise _Malformed
            obj, pos = _json_at(text, args_at + len(MISTRAL_ARGS))
            calls.append(ParsedCall(name, _args_text(obj)))
        else:
            value, pos = _json_at(text, pos)
            calls.extend(_call_from_object(o) for o in _objects(value))
        while pos < len(text) and text[pos].isspace():
            pos += 1
    return text[:start], calls


_DS_FENCE = re.compile(r"\s*```(?:json)?\s*\n?")


def _deepseek(text: str):
    """DeepSeek V2/V3/R1: ``<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME
    ```json {...} ```<｜tool▁call▁end｜>...<｜tool▁calls▁end｜>``; V3.1 drops the word and the
    fence: ``<｜tool▁call▁begin｜>NAME<｜tool▁sep｜>{...}<｜tool▁call▁end｜>``."""
    first = text.find(DS_CALL_BEGIN)
    if first < 0:
        return None
    begin = text.find(DS_CALLS_BEGIN)
    head_end = begin if 0 <= begin < first else first
    calls, pos = [], first
    while True:
        pos = text.find(DS_CALL_BEGIN, pos)
        if pos < 0:
            break
        sep = text.find(DS_SEP, pos)
        if sep < 0:
            raise _Malformed
        kind = text[pos + len(DS_CALL_BEGIN):sep].strip()
        if kind == "function":
            # V2/V3/R1: the name on the line after the separator, then fenced JSON.
            line_end = text.find("\n", sep)
            if line_end < 0:
                raise _Malformed
            name = text[sep + len(DS_SEP):line_end].strip()
            fence = _DS_FENCE.match(text, line_end)
            body_at = fence.end() if fence else line_end
        else:
            # V3.1: NAME<｜tool▁sep｜>{json}, no fence.
            name, body_at = kind, sep + len(DS_SEP)
        if not re.fullmatch(r"[A-Za-z0-9_.\-]+", name):
            raise _Malformed
        obj, end = _json_at(text, body_at)
        close = text.find(DS_CALL_END, end)
        tail = text[end:close] if close >= 0 else text[end:]
        if tail.strip().strip("`").strip():
            raise _Malformed
        calls.append(ParsedCall(name, _args_text(obj)))
        pos = close + len(DS_CALL_END) if close >= 0 else len(text)
    return text[:head_end], calls


_HARMONY_RECIPIENT = re.compile(r"to=functions\.([A-Za-z0-9_.\-]+)")


def _harmony(text: str):
    """GPT-OSS Harmony: ``<|channel|>commentary to=functions.NAME <|constrain|>json<|message|>{...}<|call|>``
    (the recipient may also precede ``<|channel|>``). Analysis/final messages around the
    calls are not content of a call; the final channel's message is the content."""
    if HARMONY_CHANNEL not in text and HARMONY_MESSAGE not in text:
        return None
    calls, finals = [], []
    # Split into messages at <|start|> / <|end|> / <|call|> boundaries.
    for part in re.split(re.escape(HARMONY_START) + "|" + re.escape(HARMONY_END), text):
        for msg in part.split(HARMONY_CALL):
            if HARMONY_MESSAGE not in msg:
                continue
            header, _, body = msg.partition(HARMONY_MESSAGE)
            m = _HARMONY_RECIPIENT.search(header)
            if m is not None:
                obj, end = _json_at(body, 0)
                if body[end:].strip():
                    raise _Malformed
                calls.append(ParsedCall(m.group(1), _args_text(obj)))
            elif "final" in header:
                finals.append(body)
    if not calls:
        return None
    return "".join(finals), calls


_GEMMA_CALL = re.compile(r"call:([A-Za-z0-9_.\-]+)\s*\{")


def _gemma_value(text: str, pos: int):
    """One value of Gemma's call syntax: ``<escape>str<escape>``, a number, true/false/null,
    a nested ``{k:v,...}`` or ``[v,...]``. Returns (value, next index)."""
    while pos < len(text) and text[pos].isspace():
        pos += 1
    if text.startswith(GEMMA_STRING, pos):
        end = text.find(GEMMA_STRING, pos + len(GEMMA_STRING))
        if end < 0:
            raise _Malformed
        return text[pos + len(GEMMA_STRING):end], end + len(GEMMA_STRING)
    if text.startswith("{", pos):
        return _gemma_object(text, pos + 1)
    if text.startswith("[", pos):
        items, pos = [], pos + 1
        while True:
            while pos < len(text) and text[pos].isspace():
                pos += 1
            if text.startswith("]", pos):
                return items, pos + 1
            value, pos = _gemma_value(text, pos)
            items.append(value)
            while pos < len(text) and text[pos].isspace():
                pos += 1
            if text.startswith(",", pos):
                pos += 1
    if text.startswith('"', pos):
        return _json_at(text, pos)
    m = re.compile(r"-?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?|true|false|null").match(text, pos)
    if m is None:
        raise _Malformed
    return json.loads(m.group(0)), m.end()


def _gemma_object(text: str, pos: int):
    out = {}
    while True:
        while pos < len(text) and text[pos].isspace():
            pos += 1
        if pos >= len(text):
            raise _Malformed
        if text[pos] == "}":
            return out, pos + 1
        m = re.compile(r"\"?([A-Za-z0-9_\-]+)\"?\s*:").match(text, pos)
        if m is None:
            raise _Malformed
        out[m.group(1)], pos = _gemma_value(text, m.end())
        while pos < len(text) and text[pos].isspace():
            pos += 1
        if text.startswith(",", pos):
            pos += 1


def _gemma(text: str):
    """Gemma function-call blocks: FunctionGemma's ``<start_function_call>call:NAME{k:v}
    <end_function_call>`` and Gemma 4's ``<|tool_call>call:NAME{...}<tool_call|>``; string
    values are wrapped in ``<escape>``. A JSON body is accepted too."""
    pairs = ((GEMMA_CALL_OPEN, GEMMA_CALL_CLOSE), (GEMMA4_CALL_OPEN, GEMMA4_CALL_CLOSE))
    found = [(text.find(o), o, c) for o, c in pairs if o in text]
    if not found:
        return None
    start, open_, close = min(found)
    calls, pos = [], start
    while True:
        pos = text.find(open_, pos)
        if pos < 0:
            break
        body_at = pos + len(open_)
        m = _GEMMA_CALL.match(text, body_at)
        if m is not None:
            args, end = _gemma_object(text, m.end())
            calls.append(ParsedCall(m.group(1), _args_text(args)))
        else:
            obj, end = _json_at(text, body_at)
            calls.append(_call_from_object(obj))
        stop = text.find(close, end)
        if stop >= 0 and text[end:stop].strip():
            raise _Malformed
        pos = stop + len(close) if stop >= 0 else len(text)
    return text[:start], calls


# Upstream's order: specific markers first, bare JSON (inside the Llama parser) after them.
PARSERS: tuple[tuple[str, Callable], ...] = (
    ("gemma", _gemma), ("llama", _llama), ("hermes", _hermes), ("mistral", _mistral),
    ("deepseek", _deepseek), ("harmony", _harmony))


def strip_markers(text: str, markers: Iterable[str] = ALL_MARKERS) -> str:
    """Text as the user sees it: the special tokens kept for the parser removed."""
    for m in markers:
        text = text.replace(m, "")
    return text


def parse_tool_calls(text: str, tool_names: Iterable[str] | None = None) -> ParseResult:
    """Calls in ``text``, or the text as content. ``tool_names``: when given, a call to any
    other name makes the text content (a model inventing a tool is not a call)."""
    known = set(tool_names) if tool_names is not None else None
    for _name, parser in PARSERS:
        # A parser that does not see its format returns None; the next one tries. One
        # that sees it but cannot read the call decides: the text is content.
        if _name == "llama" and PYTHON_TAG not in text and any(m in text for m in CALL_MARKERS):
            continue   # bare JSON is only a call when no explicit marker is present
        try:
            found = parser(text)
        except (_Malformed, RecursionError, ValueError):
            return ParseResult(strip_markers(text))
        if found is None:
            continue
        head, calls = found
        if not calls or (known is not None and any(c.name not in known for c in calls)):
            return ParseResult(strip_markers(text))
        return ParseResult(_content(strip_markers(head)), tuple(calls))
    return ParseResult(strip_markers(text))


def may_start_call(text: str) -> bool:
    """Whether ``text`` (the held-back tail of a stream) is, or may still grow into, the
    start of a call: a marker's prefix, or a JSON object opening the whole answer."""
    return any(m.startswith(text) or text.startswith(m) for m in CALL_MARKERS)
