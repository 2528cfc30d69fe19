"""The logits pipeline: batched transforms applied to a [B, V] float32 logits tensor.

Stages run in upstream's order: DRY -> frequency/presence/repetition penalties -> logit
bias -> custom processors -> temperature -> top-k -> top-p -> min-p. The first four edit
the batch tensor in place (the sampler hands them a private copy); the filters take the
rows being sampled and return new tensors. Every stage is written over the batch; the
only Python loops are over sequences (at most B) or over a request's few logit-bias
entries and breaker sequences, never over the vocabulary or a sequence's tokens.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from .state import SamplingState

LogitsProcessor = Callable[[list[int], torch.Tensor], torch.Tensor]

# Longest repeat DRY measures. Upstream and the reference implementation cap the
# backwards scan here: it bounds the work per candidate and keeps base**(len - allowed)
# far from float overflow.
DRY_MAX_MATCH = 50

_NEG_INF = float("-inf")


def _long(values: Sequence[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long, device=device)


def padded_ids(rows: Sequence[Sequence[Sequence[int]]], device: torch.device) -> tuple[torch.Tensor, list[int]]:
    """Long [n, W] of token ids, row r being the concatenation of the id lists in rows[r].

    Short rows are padded by repeating their own first id, so a padded slot always names
    a token the row really contains: a gather/compute/scatter over it recomputes the same
    value as the real slot and needs no separate mask. Lists go through an int64 array
    (a C-level copy) rather than torch.tensor on nested lists, which walks every id in
    Python and dominated the cost for long contexts.
    """
    lengths = [sum(len(part) for part in parts) for parts in rows]
    width = max(1, max(lengths, default=0))
    buf = array("q")
    for parts, n in zip(rows, lengths):
        first = next((part[0] for part in parts if len(part)), 0)
        for part in parts:
            buf.extend(part)
        buf.extend([first] * (width - n))
    ids = torch.frombuffer(buf, dtype=torch.long).view(len(rows), width)
    return ids.to(device), lengths


# --------------------------------------------------------------------------- DRY


def breaker_mask(context: torch.Tensor, breakers: Sequence[Sequence[int]]) -> torch.Tensor:
    """Bool [L]: position p is a breaker when context[: p + 1] ends with a breaker sequence.

    Marking the last token of a multi-token breaker lets one check cover both the single-
    token case (the common one) and breakers a tokenizer splits into several ids.
    """
    mask = torch.zeros(context.shape[0], dtype=torch.bool, device=context.device)
    singles = [seq[0] for seq in breakers if len(seq) == 1]
    if singles:
        mask |= torch.isin(context, _long(singles, context.device))
    for seq in breakers:
        k = len(seq)
        if k < 2 or k > context.shape[0]:
            continue
        windows = context.unfold(0, k, 1)
        mask[k - 1 :] |= (windows == _long(seq, context.device)).all(dim=1)
    return mask


def dry_match_lengths(context: torch.Tensor, breakers: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens, lengths): each token that would extend a repeat of the context's tail, and
    the longest such repeat.

    For every earlier occurrence i of the last token, the repeat length is how far
    context[..i] and the whole context agree reading backwards (capped at DRY_MAX_MATCH,
    stopped by a breaker), and the token that followed i is the one that would extend
    it. All occurrences and all backwards offsets are compared at once as an
    [occurrences, DRY_MAX_MATCH] grid; the cumulative product turns "agrees at offset m"
    into "agrees at every offset up to m". The result is sparse (no vocabulary-sized
    tensor), as only tokens seen in the context can be penalised.
    """
    empty = context.new_zeros(0)
    n = context.shape[0]
    if n < 2:
        return empty, empty
    is_break = breaker_mask(context, breakers)
    # A tail that ends in a breaker starts a fresh segment: nothing to extend.
    if bool(is_break[-1]):
        return empty, empty
    occ = torch.nonzero(context[:-1] == context[-1]).squeeze(1)
    occ = occ[~is_break[occ + 1]]  # continuing with a breaker is never penalised
    if occ.numel() == 0:
        return empty, empty
    width = min(DRY_MAX_MATCH, n)
    offsets = torch.arange(width, device=context.device)
    tail_pos = n - 1 - offsets
    tail_ok = ~is_break[tail_pos]
    tail_ok[0] = True
    back = occ[:, None] - offsets[None, :]
    agree = (back >= 0) & (context[back.clamp(min=0)] == context[tail_pos][None, :]) & tail_ok[None, :]
    match = agree.to(torch.long).cumprod(dim=1).sum(dim=1)
    tokens, slot = torch.unique(context[occ + 1], return_inverse=True)
    longest = torch.zeros_like(tokens).scatter_reduce_(0, slot, match, reduce="amax")
    return tokens, longest


def apply_dry(logits: torch.Tensor, states: Sequence[SamplingState]) -> None:
    vocab = logits.shape[1]
    for row, st in enumerate(states):
        p = st.params
        if not p.dry_multiplier:
            continue
        context, _ = padded_ids([(st.prompt_ids, st.output_ids)], logits.device)
        tokens, lengths = dry_match_lengths(context[0], p.dry_sequence_breakers)
        hit = (lengths >= max(p.dry_allowed_length, 1)) & (tokens < vocab)
        if not bool(hit.any()):
            continue
        tokens, lengths = tokens[hit], lengths[hit]
        exponent = (lengths - p.dry_allowed_length).to(logits.dtype)
        logits[row, tokens] -= p.dry_multiplier * torch.pow(p.dry_base, exponent)


# --------------------------------------------------------------------- penalties


def apply_penalties(logits: torch.Tensor, states: Sequence[SamplingState]) -> None:
    """OpenAI presence/frequency penalties, then the HF/llama.cpp repetition penalty.

    Presence and frequency look at generated tokens only (OpenAI's definition:
    `logit - frequency * count - presence * (count > 0)`). The repetition penalty looks
    at prompt and generated tokens, as transformers does, and divides positive logits /
    multiplies negative ones once per distinct seen token. It runs after the additive
    penalties, as in upstream, so it sees the logit they left.

    Only tokens present in a context can change, so the work is done on the [n, L]
    context ids rather than on [n, V] rows: one scatter_add of the generated ids gives
    the counts, a gather reads the logits at every context slot, and a scatter writes the
    penalised values back (a token repeated in the context gets the same value written
    from each of its slots).
    """
    rows, parts, rep = [], [], []
    for r, st in enumerate(states):
        p = st.params
        if not p.uses_penalties:
            continue
        rp = p.repetition_penalty if p.repetition_penalty is not None else 1.0
        context = (st.output_ids, st.prompt_ids if rp != 1.0 else ())
        # An empty context has nothing to penalise (and no real id to pad with).
        if any(len(c) for c in context):
            rows.append(r)
            parts.append(context)
            rep.append(rp)
    if not rows:
        return
    dtype, device = logits.dtype, logits.device
    vocab = logits.shape[1]
    params = [states[r].params for r in rows]
    ids, _ = padded_ids(parts, device)
    ids = ids.clamp(0, vocab - 1)
    generated = torch.arange(ids.shape[1], device=device)[None, :] < _long(
        [len(states[r].output_ids) for r in rows], device
    )[:, None]
    counts = torch.zeros(len(rows), vocab, dtype=dtype, device=device)
    counts.scatter_add_(1, ids, generated.to(dtype))
    count = counts.gather(1, ids)

    freq = torch.tensor([p.frequency_penalty or 0.0 for p in params], dtype=dtype, device=device)[:, None]
    pres = torch.tensor([p.presence_penalty or 0.0 for p in params], dtype=dtype, device=device)[:, None]
    rep_t = torch.tensor(rep, dtype=dtype, device=device)[:, None]
    row_index = _long(rows, device)[:, None].expand_as(ids)
    vals = logits[row_index, ids]
    vals = vals - freq * count - pres * (count > 0).to(dtype)
    # Every slot is a seen token (padding repeats one); rows without a repetition penalty
    # carry 1.0, for which both branches are exact no-ops.
    vals = torch.where(vals > 0, vals / rep_t, vals * rep_t)
    logits.index_put_((row_index, ids), vals)


def apply_logit_bias(logits: torch.Tensor, states: Sequence[SamplingState]) -> None:
    """Add each request's logit_bias; ids outside the vocabulary are ignored.

    Ids are validated against the tokenizer where the request is built; ignoring the
    rest here keeps one bad entry from failing the whole batch.
    """
    vocab = logits.shape[1]
    rows: list[int] = []
    toks: list[int] = []
    vals: list[float] = []
    for row, st in enumerate(states):
        bias = st.params.logit_bias
        if not bias:
            continue
        for tok, val in bias.items():
            if 0 <= tok < vocab:
                rows.append(row)
                toks.append(tok)
                vals.append(val)
    if rows:
        device = logits.device
        logits.index_put_(
            (_long(rows, device), _long(toks, device)),
            torch.tensor(vals, dtype=logits.dtype, device=device),
            accumulate=True,
        )


def apply_processors(
    logits: torch.Tensor, states: Sequence[SamplingState], processors: Sequence[LogitsProcessor | None] | None
) -> None:
    """Custom per-sequence hooks (grammar masks): `proc(output_ids, logits_row) -> logits_row`.

    A processor gets the tokens generated so far (what a grammar matcher consumes) and
    may edit the row in place or return a new one.
    """
    if not processors:
        return
    for row, (st, proc) in enumerate(zip(states, processors)):
        if proc is None:
            continue
        out = proc(st.output_ids, logits[row])
        if out is not None and out is not logits[row]:
            logits[row] = out


# ---------------------------------------------------------------- temperature / filters
# These take the [n, V] rows being sampled and per-row parameter lists aligned to them.


def apply_temperature(logits: torch.Tensor, temperatures: Sequence[float]) -> torch.Tensor:
    t = torch.tensor(temperatures, dtype=logits.dtype, device=logits.device)[:, None]
    return logits / t


def apply_top_k(logits: torch.Tensor, top_k: Sequence[int | None]) -> torch.Tensor:
    """Keep each row's k highest logits (ties with the k-th are kept, as in transformers)."""
    vocab = logits.shape[1]
    rows = [r for r, k in enumerate(top_k) if k is not None and 0 < k < vocab]
    if not rows:
        return logits
    index = _long(rows, logits.device)
    ks = _long([top_k[r] for r in rows], logits.device)
    sub = logits.index_select(0, index)
    kth = sub.topk(int(ks.max()), dim=1).values.gather(1, (ks - 1)[:, None])
    return logits.index_copy(0, index, sub.masked_fill(sub < kth, _NEG_INF))


# Nucleus search windows: most nuclei fit in the few hundred most likely tokens, so a
# partial top-k settles them without sorting the whole vocabulary; rows whose nucleus
# is wider move to the next window, and the last resort is a full sort.
TOP_P_WINDOWS = (256, 4096)


def apply_top_p(logits: torch.Tensor, top_p: Sequence[float | None]) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches top_p.

    A token survives when the mass of the tokens ranked above it is still below top_p,
    so the token that crosses the threshold is included and the top token always is.
    """
    vocab = logits.shape[1]
    pending = [r for r, p in enumerate(top_p) if p is not None and p < 1.0]
    if not pending:
        return logits
    out = logits.clone()
    for window in (*(w for w in TOP_P_WINDOWS if w < vocab), vocab):
        index = _long(pending, logits.device)
        p = torch.tensor([top_p[r] for r in pending], dtype=logits.dtype, device=logits.device)[:, None]
        sub = logits.index_select(0, index)
        probs = torch.softmax(sub, dim=-1)
        if window < vocab:
            top_probs, order = probs.topk(window, dim=-1)
        else:
            top_probs, order = probs.sort(dim=-1, descending=True, stable=True)
        mass = top_probs.cumsum(dim=-1)
        done = (mass[:, -1] >= p[:, 0]) if window < vocab else torch.ones_like(mass[:, -1], dtype=torch.bool)
        keep_ranked = F.pad(mass[:, :-1], (1, 0)) < p
        keep = torch.zeros_like(sub, dtype=torch.bool).scatter_(1, order, keep_ranked)
        settled = torch.nonzero(done).squeeze(1)
        out.index_copy_(0, index[settled], sub.masked_fill(~keep, _NEG_INF)[settled])
        pending = [r for r, d in zip(pending, done.tolist()) if not d]
        if not pending:
            break
    return out


def apply_min_p(logits: torch.Tensor, min_p: Sequence[float | None]) -> torch.Tensor:
    """Drop tokens whose probability is below min_p times the most likely token's.

    p_i < m * p_max is l_i - l_max < log(m) in logit space, which needs no softmax.
    """
    rows = [r for r, m in enumerate(min_p) if m]
    if not rows:
        return logits
    index = _long(rows, logits.device)
    log_m = torch.tensor([math.log(min_p[r]) for r in rows], dtype=logits.dtype, device=logits.device)[:, None]
    sub = logits.index_select(0, index)
    drop = sub - sub.max(dim=-1, keepdim=True).values < log_m
    return logits.index_copy(0, index, sub.masked_fill(drop, _NEG_INF))


# --------------------------------------------------------------------- drawing


def draw_uniforms(states: Sequence[SamplingState], device: torch.device) -> torch.Tensor:
    """One U[0, 1) draw per sequence, each from that sequence's own generator.

    A sequence consumes exactly one draw per sampled step whatever else is in the batch,
    which is what makes seeded output independent of batch composition.
    """
    draws = []
    for st in states:
        g = st.generator
        if g is None:
            draws.append(torch.rand((), dtype=torch.float64))
        else:
            draws.append(torch.rand((), dtype=torch.float64, generator=g, device=g.device).cpu())
    return torch.stack(draws).to(device)


def sample_inverse_cdf(logits: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Sample one token per row by inverting the CDF at the row's uniform draw.

    Works in vocabulary order, so no sort is needed and a row's result depends only on
    its own logits and draw. The CDF is built in float64 so rounding in a 100k+ entry
    sum cannot shift a draw onto a neighbouring token; the target is kept strictly below
    the total so it can never land past the last token with non-zero probability.
    """
    cdf = torch.softmax(logits, dim=-1).to(torch.float64).cumsum(dim=-1)
    total = cdf[:, -1:]
    target = torch.minimum(uniforms[:, None] * total, torch.nextafter(total, torch.zeros_like(total)))
    index = torch.searchsorted(cdf, target, right=True).squeeze(1)
    return index.clamp(max=logits.shape[1] - 1)
