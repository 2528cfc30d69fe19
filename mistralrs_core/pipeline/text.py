"""A loaded text model: tokenizer, chat template, engine, and response assembly."""
from __future__ import annotations

import time
import uuid
from typing import Iterator

import attrs

from mistralrs_core.adapters.lora import request_adapter_id
from mistralrs_core.agent.calling import ToolCalling, no_tools_messages, template_tools, to_tool_calls
from mistralrs_core.api import responses as R
from mistralrs_core.api.enums import ToolCallType
from mistralrs_core.engine.engine import Engine, RequestGroup
from mistralrs_core.engine.step import FeatureSpan
from mistralrs_core.engine.cancel import on_cancel
from mistralrs_core.errors import engine_error
from mistralrs_core.pipeline.base import TextGeneration
from mistralrs_core.plugins import logits_processors_for
from mistralrs_core.pipeline.requests import (normalize_messages, reject_unavailable, sampling_params,
                                              validate_chat_request, validate_completion_request)
from mistralrs_core.tokenization.prompt import apply_chat_template, encode_prompt


class ResponseStream:
    """The chunks of a streamed request. ``cancel()`` may be called from any thread, even
    while another thread waits inside ``next()`` (closing a generator from outside is not
    allowed then); that waiting ``next()`` returns the final, cancelled chunk."""

    def __init__(self, chunks: Iterator, cancel):
        self._chunks = chunks
        self._cancel = cancel

    def __iter__(self):
        return self

    def __next__(self):
        return next(self._chunks)

    def close(self) -> None:
        self._chunks.close()

    def cancel(self) -> None:
        self._cancel()


def _compose(procs: list):
    if len(procs) == 1:
        return procs[0]

    def composed(output_ids, logits):
        for p in procs:
            logits = p(output_ids, logits)
        return logits
    return composed


@attrs.define
class Prompt:
    """Token ids plus the encoder inputs whose features replace placeholder tokens."""
    ids: list[int]
    spans: list[FeatureSpan] = attrs.field(factory=list)


class TextPipeline(TextGeneration):
    """A generative model behind the chat and completion calls. Multimodal pipelines
    override ``chat_prompt`` to turn image/audio parts into placeholder tokens plus
    ``FeatureSpan``s; everything after that (engine, streaming, responses) is shared."""

    kind = "text"

    def __init__(self, name: str, model, tokenizer, template, engine: Engine, generation_config: dict):
        self.name = name
        self.model = model
        self.tokenizer = tokenizer
        self.template = template
        self.engine = engine
        self.generation_config = generation_config or {}

    # --- helpers ----------------------------------------------------------
    @property
    def max_context(self) -> int:
        return self.engine.max_context

    def shutdown(self) -> None:
        self.engine.shutdown()

    def _fit_prompt(self, prompt: "Prompt | list[int]", truncate: bool, max_tokens: int | None) -> Prompt:
        if not isinstance(prompt, Prompt):
            prompt = Prompt(list(prompt))
        ids = prompt.ids
        limit = min(self.max_context, self.engine.capacity_tokens()) - 1
        if len(ids) <= limit:
            return prompt
        if not truncate:
            raise ValueError(
                f"messages: prompt is {len(ids)} tokens, over the model's maximum context length of "
                f"{limit + 1}; shorten it or set truncate_sequence=True")
        keep = max(1, limit - (max_tokens or 0)) if max_tokens and max_tokens < limit else limit
        cut = len(ids) - keep
        if any(sp.start < cut < sp.end for sp in prompt.spans):
            raise ValueError("truncate_sequence: truncating this prompt would cut an image or audio "
                             "input in half; shorten the conversation instead")
        spans = [attrs.evolve(sp, start=sp.start - cut) for sp in prompt.spans if sp.start >= cut]
        return Prompt(ids[cut:], spans)

    def _max_tokens(self, requested: int | None, prompt_len: int) -> int:
        if requested is not None and requested > self.max_context:
            raise ValueError(f"max_tokens: {requested} is over the model's maximum context length of "
                             f"{self.max_context}")
        room = self.max_context - prompt_len
        return max(1, min(requested, room) if requested is not None else room)

    def chat_prompt(self, req) -> Prompt:
        """The prompt of a chat request (text models: token ids only)."""
        return Prompt(self.chat_prompt_ids(req))

    def chat_prompt_ids(self, req) -> list[int]:
        if isinstance(req.messages, str):
            # A pretemplated prompt: same BOS rule as rendered templates (never twice).
            return encode_prompt(self.tokenizer, req.messages)
        if self.template is None:
            raise ValueError("messages: this model has no chat template; pass chat_template= to Runner "
                             "or use a completion request")
        messages = normalize_messages(req.messages)
        for i, m in enumerate(messages):
            if isinstance(m.get("content"), list):
                kinds = {p.get("type") for p in m["content"] if isinstance(p, dict)}
                if kinds - {"text"}:
                    raise ValueError(f"messages[{i}].content: {sorted(kinds - {'text'})} parts need a "
                                     f"vision model; this is a text model")
                m["content"] = "".join(p.get("text", "") for p in m["content"])
        extra = {}
        if req.reasoning_effort is not None:
            extra["reasoning_effort"] = req.reasoning_effort
        return apply_chat_template(self.template, self.tokenizer, messages,
                                   enable_thinking=req.enable_thinking, tools=template_tools(req), **extra)

    def logits_processors(self, req, n: int) -> list | None:
        """Per choice one processor composed of what the registered factories make for this
        request (each choice gets its own: a grammar matcher keeps per-sequence state)."""
        per_choice = [logits_processors_for(req, self.tokenizer) for _ in range(n)]
        if not any(per_choice):
            return None
        return [_compose(procs) if procs else None for procs in per_choice]

    def tool_calling(self, req):
        """``(request as run, ToolCalling or None)``: with tools offered, the request's messages
        and tools are rewritten for the template and a forced call gets its grammar."""
        source = getattr(self.template, "source", None)
        calling = ToolCalling.for_request(req, source, self.tokenizer)
        messages = None if isinstance(req.messages, str) else normalize_messages(req.messages)
        if calling is None:
            # No tools offered, yet past calls and results still have to render.
            if messages is not None and any(m.get("tool_calls") or m.get("role") == "tool" for m in messages):
                return attrs.evolve(req, messages=no_tools_messages(messages, source), tool_schemas=None), None
            return (attrs.evolve(req, tool_schemas=None) if req.tool_schemas else req), None
        return calling.prepare(req, source, self.tokenizer, messages), calling

    @property
    def grammar_compiler(self):
        """Compiles this model's grammars (``constrained.GrammarCompiler``), made on first use."""
        compiler = self.__dict__.get("_grammar_compiler")
        if compiler is None:
            from mistralrs_core.constrained.compile import GrammarCompiler
            compiler = self.__dict__.setdefault("_grammar_compiler",
                                                GrammarCompiler(self.tokenizer, self.engine.eos_ids))
        return compiler

    def compile_grammar(self, req):
        """The request's grammar compiled for this model, or None (ValueError naming the
        field when it does not compile)."""
        if getattr(req, "grammar_type", None) is None:
            return None
        return self.grammar_compiler.compile(req.grammar_type, req.grammar)

    def _check_vocab(self, req) -> None:
        """Token ids a request names must exist (OpenAI answers 400 for unknown logit_bias keys)."""
        vocab = self.tokenizer.vocab_size
        for tok in (req.logit_bias or {}):
            if int(tok) >= vocab:
                raise ValueError(f"logit_bias[{tok!r}]: token id {tok} is not in the model's vocabulary "
                                 f"of {vocab} tokens")

    def _submit(self, req, prompt: Prompt, *, n, stream, force_logprobs=False, keep_special_ids=frozenset()):
        self._check_vocab(req)
        grammar = self.compile_grammar(req)
        max_tokens = self._max_tokens(req.max_tokens, len(prompt.ids))
        params = sampling_params(req, self.tokenizer, self.generation_config, max_tokens=max_tokens,
                                 n=n, force_logprobs=force_logprobs)
        adapter_id = request_adapter_id(self.model, req)
        group = RequestGroup(prompt.ids, params, n, stream, max_tokens, stop_strings=params.stop_strings,
                             seed=getattr(req, "seed", None), spans=tuple(prompt.spans), adapter_id=adapter_id,
                             logits_processors=self.logits_processors(req, n),
                             cache_salt=getattr(req, "cache_salt", None), keep_special_ids=keep_special_ids,
                             grammar=grammar)
        self.engine.submit(group)
        # A caller that gives up (an HTTP client that left) cancels through its scope.
        on_cancel(lambda: self.engine.cancel(group))
        return group

    def _wait(self, group: RequestGroup) -> None:
        try:
            while True:
                kind, a, b, *_ = group.events.get()
                if kind == "done":
                    return
                if kind == "error":
                    raise engine_error(a, b)
        except BaseException:
            self.engine.cancel(group)
            raise

    def _usage(self, group: RequestGroup) -> R.Usage:
        prompt = len(group.prompt_ids)
        completion = sum(len(s.output_ids) for s in group.seqs)
        end = group.t_done or time.perf_counter()
        firsts = [s.first_token_time for s in group.seqs if s.first_token_time]
        first = min(firsts) if firsts else end
        prompt_t = max(first - group.t_submit, 1e-9)
        compl_t = max(end - first, 1e-9)
        total_t = max(end - group.t_submit, 1e-9)
        details = None
        if group.draft_tokens:
            details = R.CompletionTokensDetails(
                accepted_prediction_tokens=group.accepted_draft_tokens,
                rejected_prediction_tokens=group.draft_tokens - group.accepted_draft_tokens)
        return R.Usage(completion_tokens=completion, prompt_tokens=prompt, total_tokens=prompt + completion,
                       avg_tok_per_sec=(prompt + completion) / total_t,
                       avg_prompt_tok_per_sec=prompt / prompt_t,
                       avg_compl_tok_per_sec=completion / compl_t,
                       total_time_sec=total_t, total_prompt_time_sec=prompt_t,
                       total_completion_time_sec=compl_t, completion_tokens_details=details)

    def _logprob_entry(self, tok) -> R.ResponseLogprob:
        tk = self.tokenizer
        text = tk.decode([tok.token_id], skip_special_tokens=False)
        top = [R.TopLogprob(token=t, logprob=lp, bytes=tk.decode([t], skip_special_tokens=False))
               for t, lp in (tok.top_logprobs or [])]
        return R.ResponseLogprob(token=text, logprob=tok.logprob, bytes=list(tk.token_bytes(tok.token_id)),
                                 top_logprobs=top)

    # --- chat -------------------------------------------------------------
    def chat(self, req):
        validate_chat_request(req)
        req, calling = self.tool_calling(req)
        reject_unavailable(req)
        ids = self._fit_prompt(self.chat_prompt(req), req.truncate_sequence, req.max_tokens)
        keep = calling.keep_ids if calling is not None else frozenset()
        if req.stream:
            group = self._submit(req, ids, n=req.n_choices, stream=True, keep_special_ids=keep)
            return ResponseStream(self._chat_stream(group, calling), lambda: self.engine.cancel(group))
        group = self._submit(req, ids, n=req.n_choices, stream=False, keep_special_ids=keep)
        self._wait(group)
        choices = []
        for s in group.seqs:
            lp = R.Logprobs(content=[self._logprob_entry(t) for t in s.logprobs]) if req.logprobs else None
            content, calls, finish = s.text, None, s.finish_reason
            if calling is not None:
                parsed = calling.parse(s.text)
                content = parsed.content
                if parsed.calls:
                    calls, finish = to_tool_calls(parsed), "tool_calls"
            choices.append(R.Choice(finish_reason=finish, index=s.index,
                                    message=R.ResponseMessage(content=content, role="assistant", tool_calls=calls),
                                    logprobs=lp))
        return R.ChatCompletionResponse(id=f"chatcmpl-{uuid.uuid4().hex}", choices=choices,
                                        created=int(group.created), model=self.name,
                                        system_fingerprint="local", object="chat.completion",
                                        usage=self._usage(group))

    @staticmethod
    def _tool_choices(filt, index: int, text: str, lp, finish) -> list:
        """A streamed event of a choice with tools: content that is surely not a call goes out
        now; at the end, the calls as OpenAI streams them (id and name, then arguments)."""
        shown = filt.push(text) if text else ""
        if finish is None:
            if not shown and lp is None:
                return []
            return [R.ChunkChoice(finish_reason=None, index=index, delta=R.Delta(content=shown), logprobs=lp)]
        tail, calls = filt.finish()
        out = []
        if shown + tail or lp is not None:
            out.append(R.ChunkChoice(finish_reason=None, index=index, delta=R.Delta(content=shown + tail),
                                     logprobs=lp))
        for c in calls:
            first = R.ToolCallDelta(index=c.index, id=c.id, tp=ToolCallType.Function,
                                    function=R.FunctionDelta(name=c.function.name, arguments=""))
            args = R.ToolCallDelta(index=c.index, function=R.FunctionDelta(arguments=c.function.arguments))
            out.append(R.ChunkChoice(finish_reason=None, index=index, delta=R.Delta(tool_calls=[first])))
            out.append(R.ChunkChoice(finish_reason=None, index=index, delta=R.Delta(tool_calls=[args])))
        out.append(R.ChunkChoice(finish_reason="tool_calls" if calls else finish, index=index, delta=R.Delta()))
        return out

    def _chat_stream(self, group: RequestGroup, calling=None) -> Iterator:
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(group.created)
        lp_on = group.params.logprobs
        filters = [calling.stream_filter() for _ in range(group.n)] if calling is not None else None

        def chunk(choices, usage=None):
            return R.ChatCompletionChunkResponse(id=cid, choices=choices, created=created, model=self.name,
                                                 system_fingerprint="local",
                                                 object="chat.completion.chunk", usage=usage)
        # Each chunk is held until the next event so that the last one can carry usage.
        pending = None
        try:
            while True:
                kind, a, text, tok, finish = group.events.get()
                if kind == "error":
                    raise engine_error(a, text)
                if kind == "done":
                    if pending is not None:
                        yield chunk([pending], self._usage(group))
                    return
                lp = self._logprob_entry(tok) if (lp_on and tok is not None) else None
                if filters is not None:
                    choices = self._tool_choices(filters[a], a, text, lp, finish)
                else:
                    choices = [R.ChunkChoice(finish_reason=finish, index=a,
                                             delta=R.Delta(content=text, role="assistant"), logprobs=lp)]
                for choice in choices:
                    if pending is not None:
                        yield chunk([pending])
                    pending = choice
        finally:
            if not group.done:
                self.engine.cancel(group)

    # --- completion -------------------------------------------------------
    @staticmethod
    def _no_completion_tools(req) -> None:
        # A completion's choices have no tool_calls field: tools there could only be ignored.
        if req.tool_schemas:
            raise ValueError("tool_schemas: completion requests cannot return tool calls; "
                             "send a chat completion request")

    def completion(self, req):
        validate_completion_request(req)
        self._no_completion_tools(req)
        reject_unavailable(req)
        ids = self.tokenizer.encode(req.prompt, add_special_tokens=True)
        ids = self._fit_prompt(ids, req.truncate_sequence, req.max_tokens)
        best_of = max(req.best_of or 1, req.n_choices)
        group = self._submit(req, ids, n=best_of, stream=False, force_logprobs=best_of > req.n_choices)
        self._wait(group)
        seqs = group.seqs
        if best_of > req.n_choices:
            # best_of keeps the candidates with the highest total log-probability.
            seqs = sorted(seqs, key=lambda s: -sum(t.logprob for t in s.logprobs))[:req.n_choices]
        choices = []
        for i, s in enumerate(seqs):
            text = s.text
            if req.echo_prompt:
                text = req.prompt + text
            if req.suffix:
                text = text + req.suffix
            choices.append(R.CompletionChoice(finish_reason=s.finish_reason, index=i, text=text,
                                              logprobs=None))
        return R.CompletionResponse(id=f"cmpl-{uuid.uuid4().hex}", choices=choices, created=int(group.created),
                                    model=self.name, system_fingerprint="local", object="text_completion",
                                    usage=self._usage(group))

    def completion_stream(self, req) -> ResponseStream:
        """``completion`` streamed: ``CompletionResponse`` chunks holding text deltas (the
        OpenAI completions stream shape); the last one carries usage."""
        validate_completion_request(req)
        self._no_completion_tools(req)
        reject_unavailable(req)
        if (req.best_of or 1) > req.n_choices:
            raise ValueError("best_of: cannot be combined with streaming")
        ids = self.tokenizer.encode(req.prompt, add_special_tokens=True)
        ids = self._fit_prompt(ids, req.truncate_sequence, req.max_tokens)
        group = self._submit(req, ids, n=req.n_choices, stream=True)
        return ResponseStream(self._completion_stream(req, group), lambda: self.engine.cancel(group))

    def _completion_stream(self, req, group: RequestGroup) -> Iterator:
        cid, created = f"cmpl-{uuid.uuid4().hex}", int(group.created)

        def chunk(choices, usage=None):
            extra = {"usage": usage} if usage is not None else {}   # usage is not optional here
            return R.CompletionResponse(id=cid, choices=choices, created=created, model=self.name,
                                        system_fingerprint="local", object="text_completion", **extra)
        pending = [R.CompletionChoice(finish_reason=None, index=i, text=req.prompt)
                   for i in range(group.n)] if req.echo_prompt else []
        try:
            while True:
                kind, a, text, _tok, finish = group.events.get()
                if kind == "error":
                    raise engine_error(a, text)
                if kind == "done":
                    for i, c in enumerate(pending):
                        yield chunk([c], self._usage(group) if i == len(pending) - 1 else None)
                    return
                if finish is not None and req.suffix:
                    text += req.suffix
                for c in pending:
                    yield chunk([c])
                pending = [R.CompletionChoice(finish_reason=finish, index=a, text=text)]
        finally:
            if not group.done:
                self.engine.cancel(group)

    # --- tokenizer access -------------------------------------------------
    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def detokenize(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
