"""A loaded text model: tokenizer, chat template, engine, and response assembly."""
from __future__ import annotations

import time
import uuid
from typing import Iterator

import attrs

from mistralrs_core.api import responses as R
from mistralrs_core.engine.engine import Engine, RequestGroup
from mistralrs_core.engine.step import FeatureSpan
from mistralrs_core.errors import ModelError
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
                                   enable_thinking=req.enable_thinking, **extra)

    def logits_processors(self, req, n: int) -> list | None:
        """Per choice one processor composed of what the registered factories make for this
        request (each choice gets its own: a grammar matcher keeps per-sequence state)."""
        per_choice = [logits_processors_for(req, self.tokenizer) for _ in range(n)]
        if not any(per_choice):
            return None
        return [_compose(procs) if procs else None for procs in per_choice]

    def _submit(self, req, prompt: Prompt, *, n, stream, force_logprobs=False):
        max_tokens = self._max_tokens(req.max_tokens, len(prompt.ids))
        params = sampling_params(req, self.tokenizer, self.generation_config, max_tokens=max_tokens,
                                 n=n, force_logprobs=force_logprobs)
        group = RequestGroup(prompt.ids, params, n, stream, max_tokens, stop_strings=params.stop_strings,
                             seed=getattr(req, "seed", None), spans=tuple(prompt.spans),
                             logits_processors=self.logits_processors(req, n),
                             cache_salt=getattr(req, "cache_salt", None))
        self.engine.submit(group)
        return group

    def _wait(self, group: RequestGroup) -> None:
        try:
            while True:
                kind, a, *_ = group.events.get()
                if kind == "done":
                    return
                if kind == "error":
                    raise ModelError(a)
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
        reject_unavailable(req)
        ids = self._fit_prompt(self.chat_prompt(req), req.truncate_sequence, req.max_tokens)
        if req.stream:
            group = self._submit(req, ids, n=req.n_choices, stream=True)
            return ResponseStream(self._chat_stream(group), lambda: self.engine.cancel(group))
        group = self._submit(req, ids, n=req.n_choices, stream=False)
        self._wait(group)
        choices = []
        for s in group.seqs:
            lp = R.Logprobs(content=[self._logprob_entry(t) for t in s.logprobs]) if req.logprobs else None
            choices.append(R.Choice(finish_reason=s.finish_reason, index=s.index,
                                    message=R.ResponseMessage(content=s.text, role="assistant"), logprobs=lp))
        return R.ChatCompletionResponse(id=f"chatcmpl-{uuid.uuid4().hex}", choices=choices,
                                        created=int(group.created), model=self.name,
                                        system_fingerprint="local", object="chat.completion",
                                        usage=self._usage(group))

    def _chat_stream(self, group: RequestGroup) -> Iterator:
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(group.created)
        lp_on = group.params.logprobs

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
                    raise ModelError(a)
                if kind == "done":
                    if pending is not None:
                        yield chunk([pending], self._usage(group))
                    return
                lp = self._logprob_entry(tok) if (lp_on and tok is not None) else None
                choice = R.ChunkChoice(finish_reason=finish, index=a,
                                       delta=R.Delta(content=text, role="assistant"), logprobs=lp)
                if pending is not None:
                    yield chunk([pending])
                pending = choice
        finally:
            if not group.done:
                self.engine.cancel(group)

    # --- completion -------------------------------------------------------
    def completion(self, req):
        validate_completion_request(req)
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
                    raise ModelError(a)
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
