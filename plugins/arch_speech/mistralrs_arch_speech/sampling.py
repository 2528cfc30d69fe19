"""Dia's per-frame sampling: guidance, the end-of-speech rules across codebooks, the
delay pattern.

Order per frame (as transformers' Dia generation applies its processors): classifier-free
guidance (conditional + scale x (conditional - unconditional)), whose top-k filter keeps the
*conditional* logits at the guided top-k; temperature; the EOS channel filter (only codebook
0 may end, and only when EOS is its best token: then it is the only candidate); top-k and
top-p when sampling; then the delay pattern: once codebook 0 ends (or the maximum length is
reached), codebook c is forced to EOS ``delay[c]`` frames later and pads after that.
"""
from __future__ import annotations

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


def guided_scores(logits: torch.Tensor, s: SpeechSampling) -> torch.Tensor:
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
