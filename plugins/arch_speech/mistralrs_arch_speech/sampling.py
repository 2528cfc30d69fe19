"""Dia's per-frame sampling: guidance, the end-of-speech rules across codebooks, the
delay pattern.

Order per frame (as transformers' Dia generation applies its processors): classifier-free
guidance (conditional + scale x (conditional - unconditional)), whose top-k filter keeps the
*conditional* logits at the guided top-k; temperature; the EOS channel filter (only codebook
0 may end, and only when EOS is its best token: then it is the only candidate); top-k and
top-p when sampling; then the delay pattern: once codebook 0 ends (or the maximum length is
reached), codebook c is forced to EOS ``delay[c]`` frames later and pads after that.

One call handles every codebook of every request that shares the settings. With guidance and
a top-k (Dia's defaults) only the guided top-k survive the first filter, so everything after
it runs on those k candidates per codebook ([n, C, k]) instead of the 1028-wide rows: one
top-k over the vocabulary is the only full-width sort left. Sampling draws one exponential
per candidate from the request's own generator and takes ``argmax(p / q)`` (the exponential
race ``torch.multinomial`` itself uses, here over k candidates instead of the whole row).
"""
from __future__ import annotations

import functools

import attrs
import torch

# Defaults of the original Dia release, used where the model folder's
# generation_config.json does not say.
DIA_DEFAULTS = {"guidance_scale": 3.0, "temperature": 1.3, "top_p": 0.95, "top_k": 35}


@attrs.define(frozen=True)
class SpeechSampling:
    cfg_scale: float = 3.0
    temperature: float = 1.3
    top_p: float | None = 0.95
    top_k: int | None = 35            # CFG filter top-k (and the sampling top-k)
    greedy: bool = False              # argmax instead of sampling (tests)
    max_frames: int = 3072            # frames before the forced end (transformers' max_length)

    @classmethod
    def from_generation_config(cls, gen: dict, model_max_frames: int) -> "SpeechSampling":
        def get(key):
            v = gen.get(key)
            return DIA_DEFAULTS.get(key) if v is None else v

        top_k = get("top_k")
        top_p = get("top_p")
        max_frames = gen.get("max_length") or model_max_frames
        return cls(cfg_scale=float(get("guidance_scale")),
                   # transformers clamps Dia's temperature to >= 1 (lower is unsupported).
                   temperature=max(1.0, float(get("temperature"))),
                   top_p=None if top_p is None or float(top_p) >= 1.0 else float(top_p),
                   top_k=int(top_k) if top_k else None,
                   greedy=gen.get("do_sample") is False,
                   max_frames=min(int(max_frames), model_max_frames))


_NEG_INF = float("-inf")


def _first_argmax(scores: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The token id of each row's best score, the lowest id among ties (``argmax`` over the
    full row picks the first), whatever order the candidates are in. ids broadcasts to scores."""
    best = scores.amax(-1, keepdim=True)
    big = torch.iinfo(torch.long).max
    return torch.where(scores == best, ids, big).amin(-1)


@functools.lru_cache(maxsize=8)
def _banned_from(channels: int, eos: int, device) -> torch.Tensor:
    """[C, 1]: the first id each codebook may not emit (EOS + 1 for codebook 0, EOS after)."""
    limit = torch.full((channels, 1), eos, device=device)
    limit[0] = eos + 1
    return limit


@attrs.define
class FrameDraw:
    """One frame's outcome for n requests."""
    tokens: torch.Tensor        # [n, C] the codes to feed back
    ended: torch.Tensor         # [n] the speech has ended (naturally or at the maximum)
    delay_left: torch.Tensor    # [n, C] frames until codebook c is forced to EOS; < 0: padding
    natural_end: torch.Tensor   # [n] codebook 0 chose EOS this frame


def candidate_scores(logits: torch.Tensor, s: SpeechSampling,
                     eos: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits [n, 2, C, V] -> (scores [n, C, K], their token ids [n, C, K] or [1, 1, V],
    eos_best [n, C]) after guidance, temperature, the EOS channel filter and (when sampling)
    top-k and top-p; -inf marks a dropped candidate. K is the CFG filter's top-k where it
    applies, else the vocabulary. eos_best: EOS was the codebook's best token (then it is its
    only candidate)."""
    cond = logits[:, 0]
    vocab = cond.shape[-1]
    cfg_filter = s.cfg_scale != 1.0 and s.top_k is not None
    if s.cfg_scale != 1.0:
        guided = cond + (cond - logits[:, 1]) * s.cfg_scale
        if cfg_filter:
            ids = guided.topk(min(s.top_k, vocab), dim=-1).indices
            scores = cond.gather(-1, ids)
        else:
            scores = guided
    else:
        scores = cond
    if not cfg_filter:
        ids = torch.arange(vocab, device=cond.device)[None, None]
    if s.temperature != 1.0:
        scores = scores / s.temperature
    else:
        scores = scores.clone()       # filled in place below; the logits stay untouched

    # EOS channel filter: codebook 0 keeps ids <= EOS, the others ids < EOS; a codebook whose
    # best is EOS keeps only EOS, any other never EOS.
    scores.masked_fill_(ids >= _banned_from(scores.shape[1], eos, scores.device), _NEG_INF)
    eos_best = _first_argmax(scores, ids) == eos                  # [n, C]
    scores.masked_fill_(torch.where(eos_best[..., None], ids < eos, ids == eos), _NEG_INF)

    if s.greedy:
        return scores, ids, eos_best
    # The sampling top-k: after the CFG filter at most top_k candidates are left, so it only
    # acts without guidance or without that filter (keeping ties at the k-th score, as before).
    if not cfg_filter and s.top_k is not None and s.top_k < scores.shape[-1]:
        kth = scores.topk(s.top_k, dim=-1).values[..., -1:]
        scores.masked_fill_(scores < kth, _NEG_INF)
    if s.top_p is not None:
        # Drop the least likely candidates whose total mass is at most 1 - top_p; keep the best.
        ordered, order = scores.sort(dim=-1)
        drop = ordered.softmax(-1).cumsum(-1) <= 1 - s.top_p
        drop[..., -1] = False
        scores.masked_fill_(drop.scatter(-1, order, drop), _NEG_INF)
    return scores, ids, eos_best


def sample_frame(logits: torch.Tensor, s: SpeechSampling, ended: torch.Tensor, delay_left: torch.Tensor,
                 at_max: torch.Tensor, generators: list[torch.Generator], eos: int, pad: int) -> FrameDraw:
    """One frame for n requests sharing ``s``: logits [n, 2, C, V] float32, ended [n],
    delay_left [n, C], at_max [n] (this frame is the last one allowed), one generator per
    request (a request's draw never depends on the others in the batch)."""
    scores, ids, eos_best = candidate_scores(logits, s, eos)
    natural_end = eos_best[:, 0]
    ended = ended | natural_end | at_max
    forced = ended[:, None] & (delay_left == 0)
    padding = delay_left < 0
    if s.greedy:
        tokens = _first_argmax(scores, ids)
    else:
        probs = scores.softmax(-1)
        race = torch.empty_like(probs)
        for j, g in enumerate(generators):
            race[j].exponential_(generator=g)
        # (An exponential of exactly 0 must not turn a dropped candidate's 0 into NaN.)
        pick = (probs / race.clamp_min_(torch.finfo(race.dtype).tiny)).argmax(-1, keepdim=True)
        tokens = ids.expand_as(scores).gather(-1, pick)[..., 0]
    tokens = torch.where(forced, eos, tokens).masked_fill_(padding, pad)
    return FrameDraw(tokens, ended, delay_left - ended[:, None].to(delay_left.dtype), natural_end)
