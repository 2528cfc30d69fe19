"""The first Dia sampler, kept as the test reference for ``sampling.sample_frame``: the same
rules applied to whole rows of the vocabulary ([n, C, V]), sampled with ``torch.multinomial``.
(The engine's sampler works on the CFG filter's top-k candidates only; the tests check both
give the same distribution, the same greedy tokens and the same end-of-speech bookkeeping.)"""
from __future__ import annotations

import torch


def guided_scores(logits: torch.Tensor, s) -> torch.Tensor:
    """logits [n, 2, C, V] (conditional, unconditional) -> scores [n, C, V] before the
    EOS rules."""
    cond = logits[:, 0]
    if s.cfg_scale != 1.0:
        guided = cond + (cond - logits[:, 1]) * s.cfg_scale
        if s.top_k is not None:
            keep = torch.zeros_like(guided, dtype=torch.bool)
            keep.scatter_(-1, guided.topk(min(s.top_k, guided.shape[-1]), dim=-1).indices, True)
            scores = cond.masked_fill(~keep, float("-inf"))
        else:
            scores = guided
    else:
        scores = cond.clone()
    if s.temperature != 1.0:
        scores = scores / s.temperature
    return scores


def eos_channel_filter(scores: torch.Tensor, eos: int) -> torch.Tensor:
    """Codebooks past the first never emit EOS or the ids above it; codebook 0 emits EOS
    exactly when it is its best token, and then nothing else."""
    scores[:, 1:, eos:] = float("-inf")
    scores[:, 0, eos + 1:] = float("-inf")
    eos_best = (scores.argmax(-1) == eos)[..., None]            # [n, C, 1]
    below = torch.arange(scores.shape[-1], device=scores.device) < eos
    scores = scores.masked_fill(eos_best & below, float("-inf"))
    is_eos = torch.arange(scores.shape[-1], device=scores.device) == eos
    return scores.masked_fill(~eos_best & is_eos, float("-inf"))


def top_k_top_p(scores: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    if top_k is not None and top_k < scores.shape[-1]:
        kth = scores.topk(top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p is not None:
        # Drop the least likely tokens whose total mass is at most 1 - top_p; keep the best.
        ordered, order = scores.sort(dim=-1)
        mass = ordered.softmax(-1).cumsum(-1)
        drop = mass <= 1 - top_p
        drop[..., -1] = False
        scores = scores.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return scores


def force_delay_pattern(scores: torch.Tensor, ended: torch.Tensor, delay_left: torch.Tensor,
                        at_max: torch.Tensor, eos: int) -> torch.Tensor:
    """Updates ``ended`` [n] and ``delay_left`` [n, C] in place; forces EOS on codebooks whose
    delay has run out this frame."""
    ended |= scores[:, 0].argmax(-1) == eos
    ended |= at_max
    forced = ended[:, None] & (delay_left == 0)
    if bool(forced.any()):
        only_eos = torch.full_like(scores[0, 0], float("-inf"))
        only_eos[eos] = 0.0
        scores = torch.where(forced[..., None], only_eos, scores)
    delay_left -= ended[:, None].to(delay_left.dtype)
    return scores


def reference_sample(logits, s, ended, delay_left, at_max, generators, eos: int, pad: int):
    """The old engine's per-group step: (tokens [n, C], ended, delay_left, natural_end, probs)."""
    scores = eos_channel_filter(guided_scores(logits, s), eos)
    if not s.greedy:
        scores = top_k_top_p(scores, s.top_k, s.top_p)
    ended = ended.clone()
    delay_left = delay_left.clone()
    finished = delay_left < 0
    natural_end = scores[:, 0].argmax(-1) == eos
    scores = force_delay_pattern(scores, ended, delay_left, at_max, eos)
    probs = scores.softmax(-1)
    if s.greedy:
        tok = scores.max(-1).indices
    else:
        tok = torch.stack([torch.multinomial(probs[j], 1, generator=g).squeeze(-1)
                           for j, g in enumerate(generators)])
    return tok.masked_fill(finished, pad), ended, delay_left, natural_end, probs
