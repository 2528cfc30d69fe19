"""The agentic loop: run the model, execute the tools it calls, append the results as
``tool`` messages and run it again, until it answers without a call it can run. After
``max_tool_rounds`` rounds (capped at 256, as upstream) the model runs once more with no
tools offered, so the response is an answer from the results so far.

It is the one place tools run: the Runner sends every chat request through ``Agent.chat``
(the server uses the Runner), and tools come from the Runner's tool providers
(``mistralrs_core.tools``), the Python callbacks among them.
"""
from __future__ import annotations

import json
import threading
from typing import Any, Iterator

import attrs

from mistralrs_core import capabilities
from mistralrs_core.api import responses as R
from mistralrs_core.api.enums import ToolChoice
from mistralrs_core.api.validate import normalize_messages, validate_chat_request
from mistralrs_core.pipeline.text import ResponseStream
from mistralrs_core.agent.sessions import FileStore, SessionStore
from mistralrs_core.tools import ToolOutput

SAFETY_CAP = 256


class Toolbox:
    """The tools the Runner's providers serve (what their ``build`` returned)."""

    def __init__(self, handles: dict[str, Any]):
        self._handles = [h for h in handles.values() if callable(getattr(h, "can_call", None))]

    def __bool__(self) -> bool:
        return bool(self._handles)

    def definitions(self, req=None) -> list[dict]:
        out = []
        for h in self._handles:
            defs = getattr(h, "tool_definitions", None)
            out.extend(defs() if callable(defs) else ())
            per_request = getattr(h, "request_tool_definitions", None)
            if req is not None and callable(per_request):
                out.extend(per_request(req))
        return out

    def serves(self, field: str) -> bool:
        """Whether some provider serves request field ``field`` (its ``request_fields``)."""
        return any(field in getattr(h, "request_fields", ()) for h in self._handles)

    def can_call(self, name: str) -> bool:
        return any(h.can_call(name) for h in self._handles)

    def run(self, name: str, arguments: str, request=None) -> ToolOutput:
        """Never raises: a failing tool is a result that says so (the model may recover).
        ``request``: the chat request of the round, passed to providers that ask for it
        (``call_with_request = True``) for per-request settings (a search's context size)."""
        try:
            args = json.loads(arguments) if arguments else {}
        except json.JSONDecodeError as exc:
            return ToolOutput(f"Error: the arguments of {name!r} are not valid JSON: {exc}")
        for h in self._handles:
            if h.can_call(name):
                try:
                    out = (h.call(name, args, request=request) if getattr(h, "call_with_request", False)
                           else h.call(name, args))
                except Exception as exc:  # a tool's failure is the model's information
                    return ToolOutput(f"Error: tool {name!r} failed: {type(exc).__name__}: {exc}")
                if isinstance(out, ToolOutput):
                    return out
                return ToolOutput(out if isinstance(out, str) else json.dumps(out, ensure_ascii=False, default=str))
        return ToolOutput(f"Error: no tool named {name!r}")


def _sum_usage(a: R.Usage | None, b: R.Usage) -> R.Usage:
    if a is None:
        return b
    prompt, compl = a.prompt_tokens + b.prompt_tokens, a.completion_tokens + b.completion_tokens
    total_t = a.total_time_sec + b.total_time_sec
    prompt_t = a.total_prompt_time_sec + b.total_prompt_time_sec
    compl_t = a.total_completion_time_sec + b.total_completion_time_sec
    return R.Usage(completion_tokens=compl, prompt_tokens=prompt, total_tokens=prompt + compl,
                   avg_tok_per_sec=(prompt + compl) / max(total_t, 1e-9),
                   avg_prompt_tok_per_sec=prompt / max(prompt_t, 1e-9),
                   avg_compl_tok_per_sec=compl / max(compl_t, 1e-9),
                   total_time_sec=total_t, total_prompt_time_sec=prompt_t, total_completion_time_sec=compl_t)


def _assistant_turn(content: str | None, calls: list) -> dict:
    msg: dict[str, Any] = {"role": "assistant", "content": content}
    if calls:
        msg["tool_calls"] = [{"id": c.id, "type": "function",
                              "function": {"name": c.function.name, "arguments": c.function.arguments}}
                             for c in calls]
    return msg


class _Run:
    """State of one looped request: the conversation, the rounds and what they produced."""

    def __init__(self, agent: "Agent", req, model_id: str):
        self.agent, self.model_id = agent, model_id
        self.session_id = req.session_id
        history = agent.sessions.messages(model_id, req.session_id) if req.session_id else []
        self.messages = history + normalize_messages(req.messages)
        self.max_rounds = min(req.max_tool_rounds or SAFETY_CAP, SAFETY_CAP)
        self.base = attrs.evolve(req, session_id=None, max_tool_rounds=None)
        self.rounds = 0
        self.records: list[R.AgenticToolCallRecord] = []
        self.files: list[R.File] = []
        self.usage: R.Usage | None = None

    def request(self, stream: bool):
        req = attrs.evolve(self.base, messages=list(self.messages), stream=stream)
        if self.rounds > 0 and req.tool_choice_openai is not None:
            # A forced call is for the first turn; after the results the model must be free
            # to answer, or a required call would loop until the cap.
            req = attrs.evolve(req, tool_choice_openai=None)
        if self.rounds >= self.max_rounds:
            # The rounds are spent: the last turn is offered no tools, so it answers from
            # the results it has instead of ending on a call nobody runs.
            req = attrs.evolve(req, tool_choice=ToolChoice.NoTools, tool_choice_openai=None)
        return req

    def wants_round(self, calls: list) -> bool:
        toolbox = self.agent.toolbox
        return (bool(calls) and self.rounds < self.max_rounds
                and all(toolbox.can_call(c.function.name) for c in calls))

    def execute(self, content: str | None, calls: list) -> None:
        self.rounds += 1
        self.messages.append(_assistant_turn(content, calls))
        for c in calls:
            out = self.agent.toolbox.run(c.function.name, c.function.arguments, self.base)
            ids = [self.agent.files.add(f).id for f in out.files]
            self.files.extend(self.agent.files.find(i) for i in ids)
            self.messages.append({"role": "tool", "tool_call_id": c.id, "name": c.function.name,
                                  "content": out.content})
            self.records.append(R.AgenticToolCallRecord(
                round=self.rounds, name=c.function.name, arguments=c.function.arguments,
                result_content=out.content, result_images_base64=list(out.images_base64), file_ids=ids))

    def finish(self, content: str | None, calls: list) -> None:
        self.messages.append(_assistant_turn(content, calls))
        if self.session_id:
            self.agent.sessions.store(self.model_id, self.session_id, self.messages)


class Agent:
    """One per Runner: its toolbox, sessions and produced files."""

    def __init__(self, toolbox: Toolbox, sessions: SessionStore | None = None, files: FileStore | None = None):
        self.toolbox = toolbox
        self.sessions = sessions or SessionStore()
        self.files = files or FileStore()

    def _check_served(self, req) -> None:
        """A request field that turns on a Runner-level tool (``web_search_options``,
        ``enable_code_execution``) on a Runner built without that tool is refused: its
        plugin is installed (else the capability gate names it), the Runner lacks the
        argument that sets the tool up."""
        for cap in capabilities.KNOWN.values():
            if not (cap.request_fields and cap.runner_args) or not capabilities.available(cap.name):
                continue
            for field in cap.request_fields:
                if capabilities._present(getattr(req, field, None)) and not self.toolbox.serves(field):
                    args = " or ".join(f"Runner({a}=...)" for a in cap.runner_args
                                       if a != "search_embedding_model")
                    raise ValueError(f"{field}: this Runner has no {cap.what}; build it with {args}")

    def _with_provider_tools(self, req):
        self._check_served(req)
        defs = self.toolbox.definitions(req)
        if not defs or req.tool_choice is ToolChoice.NoTools:
            return req
        own = set()
        for text in req.tool_schemas or ():
            try:
                tool = json.loads(text)
                own.add((tool.get("function") or tool).get("name"))
            except (json.JSONDecodeError, AttributeError):
                pass   # validation reports it with the field's name
        extra = [json.dumps(d) for d in defs if (d.get("function") or d).get("name") not in own]
        return attrs.evolve(req, tool_schemas=[*(req.tool_schemas or ()), *extra]) if extra else req

    def loops(self, req) -> bool:
        offered = bool(req.tool_schemas) and req.tool_choice is not ToolChoice.NoTools
        return (req.max_tool_rounds is not None or req.session_id is not None
                or (bool(self.toolbox) and offered))

    def chat(self, pipe, req, model_id: str):
        """A chat request, looped when it needs the loop (tools the Runner runs, a session or
        ``max_tool_rounds``), else straight to the pipeline."""
        req = self._with_provider_tools(req)
        if not self.loops(req):
            return pipe.chat(req)
        validate_chat_request(req)
        if isinstance(req.messages, str):
            raise ValueError("messages: the agentic loop and sessions need a list of messages, "
                             "not a pretemplated prompt")
        if req.n_choices != 1:
            raise ValueError("n_choices: the agentic loop and sessions run one choice")
        run = _Run(self, req, model_id)
        if req.stream:
            return _LoopStream(pipe, run)
        while True:
            resp = pipe.chat(run.request(stream=False))
            run.usage = _sum_usage(run.usage, resp.usage)
            msg = resp.choices[0].message
            calls = msg.tool_calls or []
            if not run.wants_round(calls):
                run.finish(msg.content, calls)
                return attrs.evolve(resp, usage=run.usage, agentic_tool_calls=run.records or None,
                                    files=run.files or None, session_id=run.session_id)
            run.execute(msg.content, calls)


class _LoopStream(ResponseStream):
    """The loop, streamed: each round's content streams as it comes; a round that ends in
    calls the loop runs streams no calls and no finish; the last round streams whole."""

    def __init__(self, pipe, run: _Run):
        self._pipe, self._run = pipe, run
        self._current = None
        self._cancelled = threading.Event()
        super().__init__(self._generate(), self._cancel_round)

    def _cancel_round(self) -> None:
        self._cancelled.set()
        current = self._current
        if current is not None:
            current.cancel()

    def _generate(self) -> Iterator:
        run = self._run
        while True:
            stream = self._pipe.chat(run.request(stream=True))
            self._current = stream
            if self._cancelled.is_set():
                stream.cancel()
            held, content, calls = [], [], {}
            try:
                for chunk in stream:
                    choice = chunk.choices[0]
                    delta = choice.delta
                    if delta.content:
                        content.append(delta.content)
                    for tc in delta.tool_calls or ():
                        entry = calls.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
                        entry["id"] = tc.id or entry["id"]
                        entry["name"] += tc.function.name or ""
                        entry["arguments"] += tc.function.arguments or ""
                    if delta.tool_calls or choice.finish_reason is not None or chunk.usage is not None:
                        held.append(chunk)   # undecided until the round ends
                    else:
                        yield chunk
            finally:
                stream.close()
            if held and held[-1].usage is not None:
                run.usage = _sum_usage(run.usage, held[-1].usage)
            made = [R.ToolCallResponse(index=i, id=c["id"], tp="function",
                                       function=R.CalledFunction(name=c["name"], arguments=c["arguments"]))
                    for i, c in sorted(calls.items())]
            text = "".join(content) or None
            if self._cancelled.is_set() or not run.wants_round(made):
                run.finish(text, made)
                for i, chunk in enumerate(held):
                    if i == len(held) - 1:
                        chunk = attrs.evolve(chunk, session_id=run.session_id, usage=run.usage)
                    yield chunk
                return
            run.execute(text, made)
