"""Tool calling for one chat request: what the template sees, which grammar forces a call,
and how generated text becomes OpenAI ``tool_calls`` (whole, or while streaming)."""
from __future__ import annotations

import json
import uuid

import attrs

from mistralrs_core.agent import formats
from mistralrs_core.agent.parsers import ALL_MARKERS, CALL_MARKERS, ParseResult, parse_tool_calls, strip_markers
from mistralrs_core.agent.tool_specs import ToolMode, ToolSpec, parse_tool_specs, resolve_tool_mode
from mistralrs_core.api import responses as R
from mistralrs_core.api.enums import ToolCallType


def template_tools(req) -> list[dict] | None:
    """The ``tools=`` a chat template renders for a prepared request (``ToolCalling.prepare``
    leaves there exactly the tools the template should show)."""
    if not req.tool_schemas:
        return None
    return [json.loads(t) for t in req.tool_schemas]


def no_tools_messages(messages: list[dict], template_source: str | None) -> list[dict]:
    """A conversation holding past calls and results, rendered with no tools offered."""
    return formats.prepare_messages(messages, template_source, [], ToolMode("none"))[0]


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def to_tool_calls(result: ParseResult) -> list[R.ToolCallResponse]:
    return [R.ToolCallResponse(index=i, id=new_call_id(), tp=ToolCallType.Function,
                               function=R.CalledFunction(name=c.name, arguments=c.arguments))
            for i, c in enumerate(result.calls)]


@attrs.define
class ToolCalling:
    specs: list[ToolSpec]
    mode: ToolMode
    fmt: str
    keep_ids: frozenset[int]

    @classmethod
    def for_request(cls, req, template_source: str | None, tokenizer) -> "ToolCalling | None":
        """None when the request offers no tools (or ``tool_choice`` is none)."""
        specs = parse_tool_specs(req.tool_schemas)
        mode = resolve_tool_mode(req, specs)
        if mode.kind == "none":
            return None
        if mode.forced and req.grammar is not None:
            raise ValueError("grammar: cannot be combined with a 'required' or named tool_choice, "
                             "which constrains the output to a tool call itself")
        fmt = formats.detect_format(template_source, tokenizer)
        return cls(specs, mode, fmt, formats.keep_token_ids(tokenizer))

    def prepare(self, req, template_source: str | None, tokenizer, messages: list[dict] | None):
        """The request as the pipeline runs it: messages (and ``tool_schemas``) as the template
        should render them and, for a forced call, the grammar of one call."""
        changes: dict = {}
        if messages is not None:
            msgs, tools = formats.prepare_messages(messages, template_source, self.specs, self.mode)
            changes["messages"] = msgs
            changes["tool_schemas"] = [json.dumps(t) for t in tools] if tools else None
        if self.mode.forced:
            gtype, grammar = formats.forced_call_grammar(self.fmt, self.specs, self.mode, tokenizer)
            changes.update(grammar_type=gtype, grammar=grammar)
        elif req.grammar is None:
            # auto with a strict tool: a call, if the model makes one, follows the schema.
            auto = formats.auto_call_grammar(self.fmt, self.specs, self.mode, tokenizer)
            if auto is not None:
                changes.update(grammar_type=auto[0], grammar=auto[1])
        return attrs.evolve(req, **changes)

    @property
    def names(self) -> tuple[str, ...]:
        return self.mode.names

    def parse(self, text: str) -> ParseResult:
        return parse_tool_calls(text, self.names)

    def stream_filter(self) -> "CallStreamFilter":
        return CallStreamFilter(self.names)


def _held_tail(text: str) -> int:
    """Length of the longest tail of ``text`` that is a proper prefix of some marker."""
    best = 0
    for m in ALL_MARKERS:
        for k in range(min(len(m) - 1, len(text)), best, -1):
            if text.endswith(m[:k]):
                best = k
                break
    return best


class CallStreamFilter:
    """One streamed choice: ``push(delta)`` returns the text that is surely content; text
    that is, or may become, a call is held back until ``finish()`` decides it."""

    def __init__(self, names: tuple[str, ...]):
        self.names = names
        self.text = ""
        self.sent = 0           # chars of ``text`` decided as content
        self.capturing = False  # a call (or what may be one) started at ``sent``
        self.shown = False      # some non-space content was emitted

    def push(self, delta: str) -> str:
        self.text += delta
        if self.capturing or not delta:
            return ""
        pending = self.text[self.sent:]
        if not self.shown:
            head = pending.lstrip()
            if not head:
                return ""           # leading space: may still precede a bare JSON call
            if head[0] in "{[":
                self.capturing = True
                return ""
        hits = [i for i in (pending.find(m) for m in CALL_MARKERS) if i >= 0]
        if hits:
            cut = min(hits)
            self.capturing = True
        else:
            cut = len(pending) - _held_tail(pending)
        out = pending[:cut]
        self.sent += cut
        out = strip_markers(out)
        if out.strip():
            self.shown = True
        return out

    def finish(self) -> tuple[str, list[R.ToolCallResponse]]:
        """(the rest of the content, the calls)."""
        rest = self.text[self.sent:]
        self.sent = len(self.text)
        if self.capturing:
            result = parse_tool_calls(rest, self.names)
            if result.calls:
                return (result.content or ""), to_tool_calls(result)
        return strip_markers(rest), []
