"""Speculative decoding: drafters that propose tokens, and the rejection sampling that
verifies a draft model's proposals without changing the target's output distribution.

The engine (``engine.py``) asks its drafter for proposals before each step, verifies them in
one target forward (k + 1 logits rows) and rolls the target's KV back to what was kept. This
module supplies the two drafters and the sampled verification:

* ``DraftModelDrafter``: a smaller model with its own paged KV pool (its own
  ``BlockManager`` and ``ModelRunner``). Per round it runs ``gamma`` batched draft
  forwards (the first also catches each sequence up on the tokens the target accepted
  since the last round), so one draft forward per draft step serves every sequence. Its KV
  is rolled back lazily: at the next round the tokens it computed are compared with the
  sequence's tokens and the rejected tail is shrunk away.
* ``PromptLookupDrafter``: no model; proposes what followed the latest earlier occurrence
  of the sequence's last n tokens (n = ``max_ngram`` down to ``min_ngram``).

Greedy sequences, and every proposal that comes without its draft distribution (prompt
lookup), are verified by exact match: each kept token is the target's own draw, so the
output is what plain decoding gives, seeded sampling included. A draft model's sampled
proposals come with the distribution q they were drawn from; ``rejection_sample`` keeps
draft token d with probability min(1, p(d) / q(d)) and otherwise draws from
norm(max(0, p - q)), with a bonus draw from the last row when all are kept: every emitted
token is then distributed exactly as the target's p (Leviathan et al., 2023; Chen et al.,
2023). p is the target's final sampling distribution (DRY, penalties, logit bias, the
request's logits processors, temperature, top-k/top-p/min-p), computed row by row after the
previous rows' tokens were appended, as plain decoding would see them. The draft side
applies the same context-dependent edits (penalties, DRY, bias, temperature, filters) to
propose well, but not the request's custom logits processors: those may be stateful (a
grammar matcher) and must only see tokens that were kept. That costs acceptance, never
correctness, since the target side applies them.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence as Seq

import numpy as np
import torch

from mistralrs_core.engine.block_manager import BlockManager, NoFreeBlocks
from mistralrs_core.engine.model_runner import ModelRunner
from mistralrs_core.engine.step import StepRecord
from mistralrs_core.sampling import pipeline as P
from mistralrs_core.sampling.sampler import Sampler, greedy_tokens
from mistralrs_core.sampling.state import SamplingState

log = logging.getLogger("mistralrs")


# --------------------------------------------------------------------- distributions

def _edit(raw: torch.Tensor, states: Seq[SamplingState], processors=None) -> torch.Tensor:
    """The sampler's logit edits (DRY, penalties, bias, processors) on a private copy."""
    if processors is None and not any(s.params.uses_dry or s.params.uses_penalties or s.params.logit_bias
                                      for s in states):
        return raw
    x = raw.float().clone()
    P.apply_dry(x, states)
    P.apply_penalties(x, states)
    P.apply_logit_bias(x, states)
    P.apply_processors(x, states, processors)
    return x


def sampling_probs(x: torch.Tensor, states: Seq[SamplingState]) -> torch.Tensor:
    """Dense [n, V] probabilities the sampler draws from, for edited logits of sampled rows
    (temperature, then top-k, top-p, min-p: the sampler's own filters)."""
    ps = [s.params for s in states]
    scaled = P.apply_temperature(x.float(), [p.temperature for p in ps])
    return P.filtered_probs(scaled, [p.top_k for p in ps], [p.top_p for p in ps], [p.min_p for p in ps])


def _uniform(generator: torch.Generator | None) -> torch.Tensor:
    if generator is None:
        return torch.rand((), dtype=torch.float64)
    return torch.rand((), dtype=torch.float64, generator=generator, device=generator.device).cpu()


def _draw(weights: torch.Tensor, generator) -> int:
    """One token with probability proportional to ``weights`` [V] (the sampler's inverse CDF)."""
    u = _uniform(generator).reshape(1).to(weights.device)
    return int(P.sample_inverse_cdf(weights.reshape(1, -1).clone(), u)[0])


def rejection_sample(seq, logits: torch.Tensor, drafts: list[int], q: torch.Tensor, processor,
                     append: Callable) -> int:
    """Verify sampled drafts of a draft model. ``logits``: the target's k + 1 raw rows;
    ``q``: [k, Vd] the draft distributions the drafts were drawn from. Emits tokens through
    ``append(seq, SampledToken)`` (which may finish the sequence) and returns how many
    drafts were kept. Draws come from the sequence's own generator."""
    state = seq.state
    gen = state.generator
    procs = [processor] if processor is not None else None
    vocab = logits.shape[1]
    accepted = 0
    for i in range(logits.shape[0]):
        raw = logits[i:i + 1]
        p = sampling_probs(_edit(raw, [state], procs), [state])[0]
        if i < len(drafts):
            d = drafts[i]
            qi = q[i].to(p.device, torch.float32)
            q_d = float(qi[d]) if d < qi.shape[0] else 0.0
            p_d = float(p[d]) if d < vocab else 0.0
            if float(_uniform(gen)) * q_d < p_d:          # kept with probability min(1, p/q)
                tok = d
            else:
                resid = p.clone()
                n = min(vocab, qi.shape[0])
                resid[:n] = (p[:n] - qi[:n]).clamp_(min=0)
                # p == q up to rounding leaves no residual mass: p itself is then the answer.
                tok = _draw(resid if float(resid.sum()) > 0 else p, gen)
        else:
            tok = _draw(p, gen)                          # the bonus token
        # Logprobs (if asked) come from the raw row, as the sampler reports them.
        append(seq, Sampler._finish(raw.float(), torch.tensor([tok], device=raw.device), [state])[0])
        if seq.finished or i >= len(drafts) or tok != drafts[i]:
            break
        accepted += 1
    return accepted


# --------------------------------------------------------------------- room

def draft_room(seq, gamma: int, max_context: int) -> int:
    """How many tokens may be drafted after ``seq``: every kept token must be one it may
    still emit (the verified step always adds one more of its own)."""
    return max(0, min(gamma, seq.max_tokens - len(seq.output_ids) - 1, max_context - seq.num_tokens - 1))


# --------------------------------------------------------------------- prompt lookup

class PromptLookupDrafter:
    """Prompt-lookup (n-gram) speculation: no draft model. The sequence's last n tokens are
    looked up in its earlier tokens (prompt and output), longest n first; what followed the
    latest earlier occurrence is proposed. Pays off where the output copies its input
    (summaries, edits, extraction, code), costs one wider target step where it does not."""

    def __init__(self, gamma: int, max_ngram: int = 3, min_ngram: int = 1, max_context: int = 1 << 30):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"speculative_ngram: need 1 <= min n-gram <= max n-gram, got {min_ngram}, {max_ngram}")
        self.gamma, self.max_ngram, self.min_ngram = gamma, max_ngram, min_ngram
        self.max_context = max_context

    def propose(self, seqs) -> list[list[int]]:
        return [self.lookup(s.token_ids, draft_room(s, self.gamma, self.max_context)) for s in seqs]

    def lookup(self, tokens: Seq[int], k: int) -> list[int]:
        n_tok = len(tokens)
        if k <= 0 or n_tok < self.min_ngram + 1:
            return []
        arr = np.fromiter(tokens, dtype=np.int64, count=n_tok)
        for n in range(min(self.max_ngram, n_tok - 1), self.min_ngram - 1, -1):
            # Windows starting before the tail itself: arr[p:p + n] for p < n_tok - n.
            windows = np.lib.stride_tricks.sliding_window_view(arr[:n_tok - 1], n)
            hits = np.flatnonzero((windows == arr[n_tok - n:]).all(axis=1))
            if hits.size:
                start = int(hits[-1]) + n
                return arr[start:start + k].tolist()
        return []


# --------------------------------------------------------------------- draft model

class _DraftSeq:
    """A sequence's state in the draft model's own KV pool."""
    __slots__ = ("seq", "blocks", "hashes", "tokens", "generator")

    def __init__(self, seq, blocks, hashes, tokens, generator):
        self.seq = seq
        self.blocks: list[int] = blocks
        self.hashes: list[bytes] = hashes
        self.tokens: list[int] = tokens        # the tokens whose draft K/V sit in ``blocks``
        self.generator = generator


class DraftModelDrafter:
    """Proposes ``gamma`` tokens per decoding sequence with a draft model (see the module
    docstring). All calls come from the target engine's thread."""

    def __init__(self, model, gamma: int, *, num_blocks: int, block_size: int, device, cache_dtype,
                 eos_ids=(), max_context: int = 4096, max_batch_tokens: int = 2048, prefix_cache: bool = True,
                 target_vocab: int | None = None):
        self.model = model
        # Ids the target cannot embed are never proposed (a draft head may be wider).
        self.target_vocab = target_vocab
        self.gamma = gamma
        self.eos_ids = frozenset(eos_ids)
        self.max_context = min(max_context, getattr(model, "max_context_len", max_context))
        self.max_batch_tokens = max_batch_tokens
        self.blocks = BlockManager(num_blocks, block_size, enable_prefix_cache=prefix_cache)
        self.runner = ModelRunner(model, num_blocks, block_size, device, cache_dtype)
        self.states: dict[int, _DraftSeq] = {}
        self._proposed: dict[int, tuple[list[int], torch.Tensor | None]] = {}
        self.stats = {"draft_forwards": 0, "draft_tokens_computed": 0}

    # --- engine hooks ---------------------------------------------------------
    def release(self, seq) -> None:
        """The sequence ended: its draft KV blocks go back to the pool."""
        st = self.states.pop(seq.id, None)
        self._proposed.pop(seq.id, None)
        if st is not None:
            self.blocks.release(st.blocks)

    def draft_probs(self, seq, drafts: list[int]) -> torch.Tensor | None:
        """The draft distributions [len(drafts), V] the sampled ``drafts`` were drawn from;
        None for greedy sequences (verified by exact match) or stale proposals."""
        toks, q = self._proposed.pop(seq.id, ([], None))
        if q is None or toks[:len(drafts)] != list(drafts):
            return None
        return q[:len(drafts)]

    def propose(self, seqs) -> list[list[int]]:
        for sid in [sid for sid, st in self.states.items() if st.seq.finished]:
            self.release(self.states[sid].seq)
        self._proposed.clear()
        try:
            return self._propose(seqs)
        except Exception as exc:   # a broken draft only costs speed: decode plainly this step
            log.error("draft model failed, decoding without drafts this step: %s", exc, exc_info=True)
            for st in list(self.states.values()):
                self.release(st.seq)
            self._proposed.clear()
            return [[] for _ in seqs]

    # --- internals ------------------------------------------------------------
    def _sync(self, seq) -> _DraftSeq:
        """The sequence's draft state, its KV rolled back to the tokens it shares with the
        sequence now (rejected drafts go), and its verified full blocks registered."""
        toks = seq.token_ids
        extras = getattr(seq.group, "cache_extras", None)
        st = self.states.get(seq.id)
        if st is None:
            blocks, hashes = self.blocks.match_prefix(toks, extras)
            gen = None
            if seq.state.generator is not None:
                # Its own stream, so that drafting never shifts the target's draws.
                gen = torch.Generator().manual_seed((seq.state.generator.initial_seed() ^ 0x5DEECE66D) % (1 << 63))
            st = self.states[seq.id] = _DraftSeq(seq, blocks, hashes, list(toks[:len(blocks) * self.blocks.block_size]),
                                                 gen)
            return st
        n = min(len(st.tokens), len(toks) - 1)
        # Only the last round's drafts can differ (everything before them was the
        # sequence's own tokens): compare from there.
        m = max(0, n - self.gamma - 1)
        while m < n and st.tokens[m] == toks[m]:
            m += 1
        if m < len(st.tokens):
            self.blocks.shrink(st.blocks, st.hashes, m)
            del st.tokens[m:]
        self.blocks.register_full_blocks(st.blocks, st.hashes, toks, m, extras)
        return st

    def _propose(self, seqs) -> list[list[int]]:
        out: list[list[int]] = [[] for _ in seqs]
        live: list[tuple[int, object, _DraftSeq, int]] = []     # (index, seq, state, drafts wanted)
        records: list[StepRecord] = []
        budget = self.max_batch_tokens
        for i, seq in enumerate(seqs):
            k = draft_room(seq, self.gamma, self.max_context)
            if k <= 0 or getattr(seq.group, "spans", ()):
                continue       # nothing may be drafted, or a multimodal prompt the draft cannot see
            st = self._sync(seq)
            todo = seq.token_ids[len(st.tokens):]
            chunk = todo[:max(budget, 1)]
            try:
                self.blocks.grow(st.blocks, len(st.tokens) + len(chunk))
            except NoFreeBlocks:
                self.release(seq)   # the pool is full: this sequence decodes plainly
                continue
            budget -= len(chunk)
            whole = len(chunk) == len(todo)
            records.append(StepRecord(seq_id=seq.id, token_ids=list(chunk), start=len(st.tokens), blocks=st.blocks,
                                      num_logits=1 if whole else 0, commit=False))
            if whole:
                live.append((i, seq, st, k))   # else: a long catch-up continues next round
        drafts: dict[int, list[int]] = {i: [] for i, *_ in live}
        probs: dict[int, list[torch.Tensor]] = {i: [] for i, *_ in live}
        while records:
            logits = self.runner.run(records)
            self.stats["draft_forwards"] += 1
            self.stats["draft_tokens_computed"] += sum(r.num_tokens for r in records)
            for r in records:
                self.states[r.seq_id].tokens.extend(r.token_ids)
            if not live:
                break
            toks, q = self._sample(logits, [(seq, drafts[i]) for i, seq, _, _ in live])
            records, still = [], []
            for (i, seq, st, k), tok, qi in zip(live, toks, q):
                drafts[i].append(tok)
                if qi is not None:
                    probs[i].append(qi)
                stop = (tok in self.eos_ids and not seq.group.params.ignore_eos) or tok in seq.group.params.stop_token_ids
                if len(drafts[i]) >= k or stop:
                    continue
                try:
                    self.blocks.grow(st.blocks, len(st.tokens) + 1)
                except NoFreeBlocks:
                    continue
                records.append(StepRecord(seq_id=seq.id, token_ids=[tok], start=len(st.tokens), blocks=st.blocks,
                                          num_logits=1, commit=False))
                still.append((i, seq, st, k))
            live = still
        for i, seq in enumerate(seqs):
            if i in drafts:
                out[i] = drafts[i]
                self._proposed[seq.id] = (drafts[i], torch.stack(probs[i]) if probs[i] else None)
        return out

    def _sample(self, logits: torch.Tensor, rows) -> tuple[list[int], list[torch.Tensor | None]]:
        """One draft token per row; sampled rows also return the distribution drawn from.
        Each row sees the sequence's output plus its drafts so far (penalties, DRY)."""
        states = [SamplingState(seq.state.params, seq.state.prompt_ids, seq.output_ids + d) if d else seq.state
                  for seq, d in rows]
        if self.target_vocab is not None and logits.shape[1] > self.target_vocab:
            logits = logits[:, :self.target_vocab]
        x = _edit(logits, states)
        sampled = [r for r, st in enumerate(states) if not st.params.greedy]
        toks = greedy_tokens(x).tolist() if len(sampled) < len(rows) else [0] * len(rows)
        q: list[torch.Tensor | None] = [None] * len(rows)
        if sampled:
            index = torch.tensor(sampled, device=x.device)
            dense = sampling_probs(x.index_select(0, index), [states[r] for r in sampled])
            for j, r in enumerate(sampled):
                st = self.states[rows[r][0].id]
                toks[r] = _draw(dense[j], st.generator)
                q[r] = dense[j]
        return toks, q
