"""The logits pipeline: batched transforms applied to a [B, V] float32 logits tensor.

Stages run in upstream's order: DRY -> frequency/presence/repetition penalties -> logit
bias -> custom processors -> temperature -> top-k -> top-p -> min-p. The first four edit
the batch tensor in place (the sampler hands them a private copy); the filters take the
rows being sampled and return new tensors. Every stage is written over the batch; the
only Python loops are over sequences (at most B) or over a request's few logit-bias
entries and breaker sequences, never over the vocabulary or a sequence's tokens.
"""

from __future__ import annotations

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


def dry_match_lengths(context: torch.Tensor, breakers: Sequence[Sequence[int]], vocab_size: int) -> torch.Tensor:
    """Long [V]: for each token, the longest repeat of the context's tail it would extend.

    For every earlier occurrence i of the last token, the repeat length is how far
    context[..i] and the whole context agree reading backwards (capped at DRY_MAX_MATCH,
    stopped by a breaker), and the token that followed i is the one that would extend
    it. All occurrences and all backwards offsets are compared at once as a
    [occurrences, DRY_MAX_MATCH] grid; the cumulative product turns "agrees at offset m"
    into "agrees at every offset up to m".
    """
    lengths = torch.zeros(vocab_size, dtype=torch.long, device=context.device)
    n = context.shape[0]
    if n < 2:
        return lengths
    is_break = breaker_mask(context, breakers)
    # A tail that ends in a breaker starts a fresh segment: nothing to extend.
    if bool(is_break[-1]):
        return lengths
    occ = torch.nonzero(context[:-1] == context[-1]).squeeze(1)
    occ = occ[~is_break[occ + 1]]  # continuing with a breaker is never penalised
    if occ.numel() == 0:
        return lengths
    width = min(DRY_MAX_MATCH, n)
    offsets = torch.arange(width, device=context.device)
    tail_pos = n - 1 - offsets
    tail_ok = ~is_break[tail_pos]
    tail_ok[0] = True
    back = occ[:, None] - offsets[None, :]
    agree = (back >= 0) & (context[back.clamp(min=0)] == context[tail_pos][None, :]) & tail_ok[None, :]
    match = agree.to(torch.long).cumprod(dim=1).sum(dim=1)
    follower = context[occ + 1]
    if vocab_size:
        follower = follower.clamp(max=vocab_size - 1)
    return lengths.scatter_reduce_(0, follower, match, reduce="amax")


def apply_dry(logits: torch.Tensor, states: Sequence[SamplingState]) -> None:
    vocab = logits.shape[1]
    for row, st in enumerate(states):
        p = st.params
        if not p.dry_multiplier:
            continue
        context = _long(list(st.prompt_ids) + list(st.output_ids), logits.device)
        lengths = dry_match_lengths(context, p.dry_sequence_breakers, vocab)
        hit = lengths >= max(p.dry_allowed_length, 1)
        exponent = (lengths - p.dry_allowed_length).clamp(min=0).to(logits.dtype)
        penalty = p.dry_multiplier * torch.pow(p.dry_base, exponent)
        logits[row] -= torch.where(hit, penalty, torch.zeros_like(penalty))


# --------------------------------------------------------------------- penalties


def token_counts(
    logits: torch.Tensor, rows: Sequence[int], states: Sequence[SamplingState], with_prompt: Sequence[bool]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Counts of generated tokens and of prompt tokens for the given rows, each [n, V].

    One scatter_add over a padded [n, L] index tensor of output-then-prompt ids: prompt
    ids are shifted into a second vocabulary-sized band and padding into a trash column,
    so both count tables come out of a single pass. Prompt ids are only included for
    rows that need them (the repetition penalty).
    """
    vocab = logits.shape[1]
    device = logits.device
    seqs = [
        list(states[r].output_ids) + (list(states[r].prompt_ids) if inc else []) for r, inc in zip(rows, with_prompt)
    ]
    width = max(1, max(len(s) for s in seqs))
    padded = _long([s + [0] * (width - len(s)) for s in seqs], device)
    out_len = _long([len(states[r].output_ids) for r in rows], device)[:, None]
    total_len = _long([len(s) for s in seqs], device)[:, None]
    pos = torch.arange(width, device=device)[None, :]
    index = padded.clamp(0, vocab - 1) + torch.where(pos >= out_len, vocab, 0)
    index = torch.where(pos >= total_len, 2 * vocab, index)
    counts = torch.zeros(len(rows), 2 * vocab + 1, dtype=logits.dtype, device=device)
    counts.scatter_add_(1, index, torch.ones_like(index, dtype=logits.dtype))
    return counts[:, :vocab], counts[:, vocab : 2 * vocab]


def apply_penalties(logits: torch.Tensor, states: Sequence[SamplingState]) -> None:
    """OpenAI presence/frequency penalties, then the HF/llama.cpp repetition penalty.

    Presence and frequency look at generated tokens only (OpenAI's definition:
    `logit - frequency * count - presence * (count > 0)`). The repetition penalty looks
    at prompt and generated tokens, as transformers does, and divides positive logits /
    multiplies negative ones once per distinct seen token. It runs after the additive
    penalties, as in upstream, so it sees the logit they left.
    """
    rows = [r for r, st in enumerate(states) if st.params.uses_penalties]
    if not rows:
        return
    params = [states[r].params for r in rows]
    rep = [p.repetition_penalty if p.repetition_penalty is not None else 1.0 for p in params]
    gen, prompt = token_counts(logits, rows, states, [r != 1.0 for r in rep])
    dtype, device = logits.dtype, logits.device
    freq = torch.tensor([p.frequency_penalty or 0.0 for p in params], dtype=dtype, device=device)[:, None]
    pres = torch.tensor([p.presence_penalty or 0.0 for p in params], dtype=dtype, device=device)[:, None]
    rep_t = torch.tensor(rep, dtype=dtype, device=device)[:, None]
    index = _long(rows, device)
    sub = logits.index_select(0, index)
    sub = sub - freq * gen - pres * (gen > 0).to(dtype)
    seen = (gen + prompt) > 0
    # Rows without a repetition penalty carry 1.0, for which both branches are exact no-ops.
    sub = torch.where(seen, torch.where(sub > 0, sub / rep_t, sub * rep_t), sub)
    logits.index_copy_(0, index, sub)


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


def apply_top_p(logits: torch.Tensor, top_p: Sequence[float | None]) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches top_p.

    A token survives when the mass of the tokens ranked above it is still below top_p,
    so the token that crosses the threshold is included and the top token always is.
    """
    rows = [r for r, p in enumerate(top_p) if p is not None and p < 1.0]
    if not rows:
        return logits
    index = _long(rows, logits.device)
    p = torch.tensor([top_p[r] for r in rows], dtype=logits.dtype, device=logits.device)[:, None]
    sub = logits.index_select(0, index)
    sorted_probs, order = torch.softmax(sub, dim=-1).sort(dim=-1, descending=True, stable=True)
    mass_above = F.pad(sorted_probs.cumsum(dim=-1)[:, :-1], (1, 0))
    drop_sorted = mass_above >= p
    drop = torch.empty_like(drop_sorted).scatter_(1, order, drop_sorted)
    return logits.index_copy(0, index, sub.masked_fill(drop, _NEG_INF))


def apply_min_p(logits: torch.Tensor, min_p: Sequence[float | None]) -> torch.Tensor:
    """Drop tokens whose probability is below min_p times the most likely token's."""
    rows = [r for r, m in enumerate(min_p) if m]
    if not rows:
        return logits
    index = _long(rows, logits.device)
    m = torch.tensor([min_p[r] for r in rows], dtype=logits.dtype, device=logits.device)[:, None]
    sub = logits.index_select(0, index)
    probs = torch.softmax(sub, dim=-1)
    drop = probs < m * probs.max(dim=-1, keepdim=True).values
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
