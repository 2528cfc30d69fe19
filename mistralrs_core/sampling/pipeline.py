"""The logits pipeline: batched transforms applied to a [B, V] float32 logits tensor.

Stages run in upstream's order: DRY -> frequency/presence/repetition penalties -> logit
bias -> custom processors -> temperature -> top-k -> top-p -> min-p. The first four edit
logits in place (the sampler hands them a private copy); the filters turn the rows being
sampled into draw weights over candidate tokens (see `filter_candidates`). Every stage is
written over the batch; the only Python loops are over sequences (at most B), over a
request's few logit-bias entries and breaker sequences, or over the two or three
candidate window sizes, never over the vocabulary or a sequence's tokens.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable, Sequence

import torch

from .state import SamplingState

LogitsProcessor = Callable[[list[int], torch.Tensor], torch.Tensor]

# Longest repeat DRY measures. Upstream and the reference implementation cap the
# backwards scan here: it bounds the work per candidate and keeps base**(len - allowed)
# far from float overflow.
DRY_MAX_MATCH = 50

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
    # Ids the head cannot emit (past the logits width) are only kept in bounds.
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
        view = logits[row]
        out = proc(st.output_ids, view)
        if out is not None and out is not view:
            view.copy_(out)


# ---------------------------------------------------------------- temperature / filters
# Top-k, top-p and min-p all keep a prefix of the tokens ranked by probability, and in
# practice a short one. So instead of masking [n, V] rows (a dozen full passes over the
# vocabulary for three filters), a row with any filter is cut down to its W most likely
# candidates with one partial top-k, the filters run on that [n, W] slice, and the draw
# happens among the candidates. A row only stays at a window size W when the filtered
# support provably fits in it; otherwise it moves to the next, larger window, the last
# being the whole vocabulary sorted. Rows without filters are drawn from the full
# softmax. Filtering is by zero weight, which is -inf logits plus renormalisation.

# Candidate window sizes tried in turn before a full sort.
FILTER_WINDOWS = (256, 4096)


class Candidates:
    """Rows (indices into the sampled batch) with their draw weights.

    `ids` maps each column of `weights` to a token id; None means the columns are the
    vocabulary itself.
    """

    __slots__ = ("rows", "weights", "ids")

    def __init__(self, rows: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor | None) -> None:
        self.rows, self.weights, self.ids = rows, weights, ids


def apply_temperature(logits: torch.Tensor, temperatures: Sequence[float], inplace: bool = False) -> torch.Tensor:
    t = torch.tensor(temperatures, dtype=logits.dtype, device=logits.device)[:, None]
    return logits.div_(t) if inplace else logits / t


def filter_candidates(
    logits: torch.Tensor,
    top_k: Sequence[int | None],
    top_p: Sequence[float | None],
    min_p: Sequence[float | None],
) -> list[Candidates]:
    """Apply top-k, then top-p, then min-p to temperature-scaled logits [n, V].

    - top-k keeps exactly the k most likely tokens (k <= 0 or >= V: off); ties at the
      k-th place are broken by torch.topk's order, as upstream truncates a sorted list.
    - top-p keeps the smallest most-likely prefix of the top-k survivors whose
      renormalised mass reaches p: a token stays while the mass ranked above it is < p.
    - min-p drops tokens below min_p times the most likely token's probability.
    """
    n, vocab = logits.shape
    device, dtype = logits.device, logits.dtype
    ks = [k if k is not None and 0 < k < vocab else 0 for k in top_k]
    ps = [p if p is not None and p < 1.0 else 1.0 for p in top_p]
    ms = [m or 0.0 for m in min_p]
    out: list[Candidates] = []
    plain = [r for r in range(n) if not ks[r] and ps[r] >= 1.0 and not ms[r]]
    if plain:
        index = _long(plain, device)
        rows = logits if len(plain) == n else logits[index]
        out.append(Candidates(index, torch.softmax(rows, dim=-1), None))

    pending = [r for r in range(n) if ks[r] or ps[r] < 1.0 or ms[r]]
    for width in (*(w for w in FILTER_WINDOWS if w < vocab), vocab):
        if not pending:
            break
        full = width == vocab
        index = _long(pending, device)
        rows = logits if len(pending) == n else logits[index]
        if full:
            top, ids = rows.sort(dim=-1, descending=True, stable=True)
        else:
            top, ids = rows.topk(width, dim=-1)
        k = torch.tensor([ks[r] or width for r in pending], device=device)[:, None]
        p = torch.tensor([ps[r] for r in pending], dtype=dtype, device=device)[:, None]
        m = torch.tensor([ms[r] for r in pending], dtype=dtype, device=device)[:, None]
        has_k = torch.tensor([bool(ks[r]) for r in pending], device=device)[:, None]

        # Weights relative to the row's best token, so exp never overflows.
        w = torch.exp(top - top[:, :1])
        w = w * (torch.arange(width, device=device)[None, :] < k)
        # top-p renormalises over the top-k survivors; without top-k that is the whole
        # vocabulary, whose mass the window alone does not hold.
        total = w.sum(dim=-1, keepdim=True)
        if any(not ks[r] and ps[r] < 1.0 for r in pending):
            vocab_mass = torch.exp(torch.logsumexp(rows, dim=-1, keepdim=True) - top[:, :1])
            total = torch.where(has_k, total, vocab_mass)
        mass = w.cumsum(dim=-1)
        mass_above = torch.cat([torch.zeros_like(mass[:, :1]), mass[:, :-1]], dim=1)
        keep = (mass_above < p * total) | (p >= 1.0)
        keep &= w >= m  # min-p: the best token's weight is exactly 1 here
        w = w * keep

        if full:
            settled = torch.ones(len(pending), dtype=torch.bool, device=device)
        else:
            # The filtered support fits in the window when top-k alone bounds it, when
            # the nucleus is already reached inside it, or when min-p already drops the
            # window's last token (everything ranked lower is dropped too).
            fits_k = has_k[:, 0] & (k[:, 0] <= width)
            fits_p = ~has_k[:, 0] & (p[:, 0] < 1.0) & (mass[:, -1] >= p[:, 0] * total[:, 0])
            fits_m = ~has_k[:, 0] & (p[:, 0] >= 1.0) & (w[:, -1] == 0)
            settled = fits_k | fits_p | fits_m
        done = settled.tolist()
        if all(done):
            out.append(Candidates(index, w, ids))
        elif any(done):
            out.append(Candidates(index[settled], w[settled], ids[settled]))
        pending = [r for r, d in zip(pending, done) if not d]
    return out


def filtered_probs(
    logits: torch.Tensor,
    top_k: Sequence[int | None],
    top_p: Sequence[float | None],
    min_p: Sequence[float | None],
) -> torch.Tensor:
    """Dense [n, V] probabilities after the filters (for inspection and tests)."""
    probs = torch.zeros_like(logits)
    for c in filter_candidates(logits, top_k, top_p, min_p):
        dense = c.weights if c.ids is None else torch.zeros_like(probs[c.rows]).scatter_(1, c.ids, c.weights)
        probs[c.rows] = dense / dense.sum(dim=-1, keepdim=True)
    return probs


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


def sample_inverse_cdf(weights: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Draw one token per row with probability proportional to its (non-negative) weight.

    Inverts the cumulative weights at uniform * total, in vocabulary order: no sort, and a
    row's result depends only on its own weights and draw. The cumulative sum overwrites
    `weights`. float32 is enough: rounding moves the boundaries between tokens by about
    1e-7 of the total mass; what must never happen is landing past the last token with
    non-zero weight, which keeping the target strictly below the total rules out
    (searchsorted returns the first slot whose running sum exceeds the target, and a
    zero-weight slot never raises the running sum).
    """
    cdf = weights.cumsum_(dim=-1)
    total = cdf[:, -1:]
    target = (uniforms.to(cdf.dtype)[:, None] * total).minimum(torch.nextafter(total, torch.zeros_like(total)))
    index = torch.searchsorted(cdf, target, right=True).squeeze(1)
    return index.clamp(max=weights.shape[1] - 1)
