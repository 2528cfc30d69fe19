"""A model's native tool-call format: how its template shows tools and past calls, which
special tokens mark calls (kept through detokenisation), and the grammar that forces a call
in that format when ``tool_choice`` is ``required`` or a named function.

The format is read from the chat template (and the tokenizer's vocabulary); a template
that knows nothing about tools gets them in the Hermes format through a system message,
so any chat model can be offered tools.
"""
from __future__ import annotations

import json
import re
from typing import Any

from mistralrs_core.agent import parsers as P
from mistralrs_core.agent.tool_specs import ToolMode, ToolSpec

HERMES, LLAMA, MISTRAL, MISTRAL_V11, DEEPSEEK, HARMONY, GEMMA = (
    "hermes", "llama", "mistral", "mistral_v11", "deepseek", "harmony", "gemma")


def detect_format(template_source: str | None, tokenizer) -> str:
    src = template_source or ""

    def has_token(text: str) -> bool:
        return tokenizer is not None and tokenizer.token_to_id(text) is not None

    if P.HARMONY_CHANNEL in src and "functions." in src:
        return HARMONY
    if P.DS_CALL_BEGIN in src or P.DS_CALLS_BEGIN in src:
        return DEEPSEEK
    if P.MISTRAL_CALLS in src or has_token(P.MISTRAL_CALLS):
        return MISTRAL_V11 if has_token(P.MISTRAL_ARGS) else MISTRAL
    if P.GEMMA_CALL_OPEN in src or P.GEMMA4_CALL_OPEN in src:
        return GEMMA
    if P.HERMES_OPEN in src:
        return HERMES
    if P.PYTHON_TAG in src or ("ipython" in src and "parameters" in src):
        return LLAMA
    return HERMES


def keep_token_ids(tokenizer) -> frozenset[int]:
    """The special tokens that mark calls: kept in the text the parser sees (the user never
    sees them: content has them removed)."""
    special = tokenizer.special_ids
    out = set()
    for marker in P.ALL_MARKERS:
        tid = tokenizer.token_to_id(marker)
        if tid is not None and tid in special:
            out.add(tid)
    return frozenset(out)


# --- prompts -------------------------------------------------------------------------------

def template_knows_tools(source: str | None) -> bool:
    return bool(source) and "tools" in source


def _args_dict(arguments: Any) -> Any:
    # OpenAI history carries arguments as JSON text; templates render them with tojson.
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except json.JSONDecodeError:
            return arguments
    return arguments


def _hermes_call_text(call: dict) -> str:
    fn = call.get("function", call)
    body = {"name": fn.get("name"), "arguments": _args_dict(fn.get("arguments", {}))}
    return f"{P.HERMES_OPEN}\n{json.dumps(body, ensure_ascii=False)}\n{P.HERMES_CLOSE}"


# How a tool result reads in a template without a tool role. Plain words: small models
# answered from them, where a "<tool_response>" block was copied back verbatim (SmolLM2).
TOOL_RESULT_WORDS = "The {name} tool returned: {content}"


def tools_system_prompt(specs: list[ToolSpec], mode: ToolMode) -> str:
    offered = [s for s in specs if s.name in mode.names]
    lines = "\n".join(json.dumps(s.openai()["function"], ensure_ascii=False) for s in offered)
    return ("You may call functions to help answer. The functions are described inside <tools></tools>:\n"
            f"<tools>\n{lines}\n</tools>\n"
            "To call a function, reply with a JSON object holding its name and arguments inside "
            "<tool_call></tool_call> tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
            "<arguments-object>}\n</tool_call>")


def prepare_messages(messages: list[dict], template_source: str | None, specs: list[ToolSpec],
                     mode: ToolMode) -> tuple[list[dict], list[dict] | None]:
    """The messages and ``tools=`` the template renders. A template that handles tools gets
    the OpenAI tool objects and past calls with their arguments as objects; one that does not
    gets the tools as a system message, past calls as Hermes text and tool results as user
    turns (their role may be unknown to it)."""
    offered = [s.openai() for s in specs if s.name in mode.names] if mode.kind != "none" else []
    if template_knows_tools(template_source):
        out = []
        for m in messages:
            m = dict(m)
            if m.get("tool_calls"):
                m["tool_calls"] = [
                    {**c, "function": {**c.get("function", {}),
                                       "arguments": _args_dict(c.get("function", {}).get("arguments", {}))}}
                    if isinstance(c, dict) else c for c in m["tool_calls"]]
            out.append(m)
        return out, (offered or None)
    out, names = [], {}
    for m in messages:
        m = dict(m)
        if m.get("role") == "assistant" and m.get("tool_calls"):
            calls = [c for c in m.pop("tool_calls") if isinstance(c, dict)]
            names.update((c.get("id"), c.get("function", c).get("name")) for c in calls)
            text = "\n".join(_hermes_call_text(c) for c in calls)
            m["content"] = f"{m['content']}\n{text}" if m.get("content") else text
        elif m.get("role") == "tool":
            content = m.get("content")
            if not isinstance(content, str):
                content = json.dumps(content, ensure_ascii=False)
            name = m.get("name") or names.get(m.get("tool_call_id")) or "called"
            m = {"role": "user", "content": TOOL_RESULT_WORDS.format(name=name, content=content)}
        elif m.get("content") is None:
            m["content"] = ""
        out.append(m)
    if offered:
        prompt = tools_system_prompt(specs, mode)
        if out and out[0].get("role") == "system" and isinstance(out[0].get("content"), str):
            out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{prompt}"}
        else:
            out.insert(0, {"role": "system", "content": prompt})
    return out, None


# --- forced calls ---------------------------------------------------------------------------

# Compact JSON keeps small models from wandering into whitespace inside a forced call.
_COMPACT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def _args_schema(spec: ToolSpec) -> dict:
    # As upstream: only ``strict`` tools have their arguments held to their schema; others
    # get any JSON object.
    if spec.strict and spec.parameters is not None:
        return spec.parameters
    return {"type": "object"}


def _call_schema(specs: list[ToolSpec], args_key: str) -> dict:
    variants = [{"type": "object",
                 "properties": {"name": {"const": s.name}, args_key: _args_schema(s)},
                 "required": ["name", args_key], "additionalProperties": False} for s in specs]
    schema = variants[0] if len(variants) == 1 else {"anyOf": variants}
    return {**schema, "x-guidance": _COMPACT}


def _json(schema: dict) -> str:
    return "%json " + json.dumps(schema, ensure_ascii=False)


def _lit(text: str, tokenizer) -> str:
    """A marker in lark: its special token by id when the vocabulary has it as one (a
    special token's bytes never match text), else the literal text."""
    if tokenizer is not None:
        tid = tokenizer.token_to_id(text)
        if tid is not None and tid in tokenizer.special_ids:
            return f"<[{tid}]>"
    return json.dumps(text, ensure_ascii=False)


def _alts(rules: list[str]) -> str:
    return " | ".join(rules)


def forced_call_grammar(fmt: str, specs: list[ToolSpec], mode: ToolMode, tokenizer=None) -> tuple[str, str]:
    """``(grammar_type, grammar)`` making the model emit exactly one call, in its native
    format, to one of ``mode.names``."""
    chosen = [s for s in specs if s.name in mode.names]
    L = lambda t: _lit(t, tokenizer)   # noqa: E731
    if fmt == LLAMA:
        # Llama 3.x templates ask for custom tools as bare JSON with "parameters".
        return "lark", f"start: call\ncall: {_json(_call_schema(chosen, 'parameters'))}\n"
    if fmt == MISTRAL:
        array = {"type": "array", "items": _call_schema(chosen, "arguments"), "minItems": 1, "maxItems": 1,
                 "x-guidance": _COMPACT}
        return "lark", f"start: {L(P.MISTRAL_CALLS)} calls\ncalls: {_json(array)}\n"
    if fmt == MISTRAL_V11:
        rules = [f"call_{i}" for i in range(len(chosen))]
        body = "".join(f"call_{i}: {json.dumps(s.name)} {L(P.MISTRAL_ARGS)} args_{i}\n"
                       f"args_{i}: {_json({**_args_schema(s), 'x-guidance': _COMPACT})}\n"
                       for i, s in enumerate(chosen))
        return "lark", f"start: {L(P.MISTRAL_CALLS)} ({_alts(rules)})\n{body}"
    if fmt == DEEPSEEK:
        rules = [f"call_{i}" for i in range(len(chosen))]
        body = "".join(f"call_{i}: {L(P.DS_CALL_BEGIN)} \"function\" {L(P.DS_SEP)} "
                       f"{json.dumps(s.name + chr(10) + '```json' + chr(10))} args_{i} "
                       f"\"\\n```\" {L(P.DS_CALL_END)}\n"
                       f"args_{i}: {_json({**_args_schema(s), 'x-guidance': _COMPACT})}\n"
                       for i, s in enumerate(chosen))
        return "lark", f"start: {L(P.DS_CALLS_BEGIN)} ({_alts(rules)}) {L(P.DS_CALLS_END)}\n{body}"
    if fmt == HARMONY:
        rules = [f"call_{i}" for i in range(len(chosen))]
        body = "".join(f"call_{i}: {L(P.HARMONY_CHANNEL)} {json.dumps('commentary to=functions.' + s.name + ' ')} "
                       f"{L(P.HARMONY_CONSTRAIN)} \"json\" {L(P.HARMONY_MESSAGE)} args_{i} {L(P.HARMONY_CALL)}\n"
                       f"args_{i}: {_json({**_args_schema(s), 'x-guidance': _COMPACT})}\n"
                       for i, s in enumerate(chosen))
        return "lark", f"start: {_alts(rules)}\n{body}"
    if fmt == GEMMA:
        # The parser reads a JSON body inside the call markers as well as Gemma's own syntax.
        return "lark", (f"start: {L(P.GEMMA_CALL_OPEN)} call {L(P.GEMMA_CALL_CLOSE)}\n"
                        f"call: {_json(_call_schema(chosen, 'arguments'))}\n")
    return "lark", (f"start: {L(P.HERMES_OPEN)} \"\\n\" call \"\\n\" {L(P.HERMES_CLOSE)}\n"
                    f"call: {_json(_call_schema(chosen, 'arguments'))}\n")


# The text that opens a call in each format whose calls have an opening marker. Llama's
# bare-JSON calls have none (text and call cannot be told apart while generating) and
# Harmony's calls sit in channels after free analysis text: both stay unconstrained in auto.
_CALL_OPENERS = {HERMES: P.HERMES_OPEN, MISTRAL: P.MISTRAL_CALLS, MISTRAL_V11: P.MISTRAL_CALLS,
                 DEEPSEEK: P.DS_CALLS_BEGIN, GEMMA: P.GEMMA_CALL_OPEN}


def auto_call_grammar(fmt: str, specs: list[ToolSpec], mode: ToolMode, tokenizer=None) -> tuple[str, str] | None:
    """``(grammar_type, grammar)`` for ``tool_choice`` auto with a ``strict`` tool: the model
    may answer in text, or write text and then one call whose arguments are held to the
    tool's schema (what upstream does by switching to a grammar once a call starts). None
    when no offered tool is strict or the format has no call opener to switch on."""
    opener = _CALL_OPENERS.get(fmt)
    if opener is None or not any(s.strict and s.name in mode.names for s in specs):
        return None
    gtype, forced = forced_call_grammar(fmt, specs, ToolMode("required", mode.names), tokenizer)
    head, _, rules = forced.partition("\n")
    lit = _lit(opener, tokenizer)
    assert head.startswith(f"start: {lit} "), head
    body = head[len("start: "):]
    # Free text never contains the opener spelled in ordinary tokens, so every call the
    # parser will read goes through the call rule.
    escaped = re.escape(opener).replace("/", "\\/")
    text = f"FREE_TEXT: /(?s:.+)/ & ~/(?s:.*{escaped}.*)/\n"
    if lit.startswith("<["):
        # A special-token opener ends the text lexeme by itself.
        return gtype, f"start: FREE_TEXT | FREE_TEXT? tool_call\n{text}tool_call: {body}\n{rules}"
    # A text opener: llguidance's lexer is greedy, so the text before a call is a lexeme that
    # stops at the opener (which it consumes), and the call goes on after it.
    rest = body[len(lit) + 1:]
    return gtype, (f"start: FREE_TEXT | text_then_call\n{text}"
                   f"text_then_call: text_before_call tool_call_rest\n"
                   f"text_before_call[stop={lit}]: /(?s:.*)/\n"
                   f"tool_call_rest: {rest}\n{rules}")
