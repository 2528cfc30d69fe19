"""Rotary position embeddings with the scaling variants of Hugging Face configs.

Frequencies are computed in float32 exactly as the reference does; cos/sin are built
per step from the flat position vector, so every sequence of a batch may sit at a
different position.
"""
from __future__ import annotations

import math

import attrs
import torch


@attrs.define
class RopeConfig:
    head_dim: int                     # rotated dims = head_dim * partial_rotary_factor
    theta: float = 10000.0
    rope_type: str = "default"
    params: dict = attrs.field(factory=dict)
    max_position_embeddings: int = 4096
    partial_rotary_factor: float = 1.0

    @classmethod
    def from_hf(cls, hf: dict, head_dim: int, *, theta_key: str = "rope_theta",
                default_theta: float = 10000.0, default_partial: float = 1.0) -> "RopeConfig":
        """Read both the old (``rope_theta`` + ``rope_scaling``) and the new
        (``rope_parameters``) layouts of config.json. ``default_partial`` is the rotary
        fraction a family assumes when config.json names none (Phi-2, GLM-4: 0.5)."""
        params = dict(hf.get("rope_parameters") or {})
        # Models with per-layer-type rope parameters are handled by their own module.
        scaling = hf.get("rope_scaling") or {}
        if scaling and not params.get("rope_type"):
            params.update(scaling)
        theta = params.get("rope_theta", hf.get(theta_key, default_theta))
        rope_type = params.get("rope_type") or params.get("type") or "default"
        if rope_type == "su":
            rope_type = "longrope"
        if "original_max_position_embeddings" not in params and "original_max_position_embeddings" in hf:
            params["original_max_position_embeddings"] = hf["original_max_position_embeddings"]
        prf = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", default_partial))
        return cls(head_dim=head_dim, theta=float(theta), rope_type=rope_type, params=params,
                   max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
                   partial_rotary_factor=float(prf))

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)


def _base_inv_freq(base: float, dim: int) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def compute_inv_freq(cfg: RopeConfig, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """(inv_freq, attention_scaling) for ``cfg``; ``seq_len`` matters for dynamic/longrope."""
    dim, base, p, kind = cfg.rotary_dim, cfg.theta, cfg.params, cfg.rope_type
    if kind in ("default", "mrope"):   # M-RoPE: default frequencies, split across axes
        return _base_inv_freq(base, dim), 1.0
    if kind == "linear":
        return _base_inv_freq(base, dim) / p["factor"], 1.0
    if kind == "dynamic":
        factor, max_pos = p["factor"], cfg.max_position_embeddings
        s = max(seq_len or max_pos, max_pos)
        base = base * ((factor * s / max_pos) - (factor - 1)) ** (dim / (dim - 2))
        return _base_inv_freq(base, dim), 1.0
    if kind == "llama3":
        inv = _base_inv_freq(base, dim)
        factor, lo, hi = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
        old = p["original_max_position_embeddings"]
        lo_wl, hi_wl = old / lo, old / hi
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > lo_wl, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < hi_wl) * ~(wavelen > lo_wl)
        return torch.where(medium, smoothed, scaled), 1.0
    if kind == "yarn":
        return _yarn(cfg)
    if kind == "longrope":
        orig = p["original_max_position_embeddings"]
        factor = p.get("factor") or cfg.max_position_embeddings / orig
        att = p.get("attention_factor")
        if att is None:
            att = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig))
        ext = p["long_factor"] if seq_len and seq_len > orig else p["short_factor"]
        ext = torch.tensor(ext, dtype=torch.float32)
        shape = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
        return 1.0 / (ext * base ** shape), float(att)
    raise ValueError(f"rope_scaling: unsupported rope type {kind!r}")


def _yarn(cfg: RopeConfig) -> tuple[torch.Tensor, float]:
    dim, base, p = cfg.rotary_dim, cfg.theta, cfg.params
    orig = p["original_max_position_embeddings"]
    factor = p.get("factor") or cfg.max_position_embeddings / orig
    att, mscale, mscale_all = p.get("attention_factor"), p.get("mscale"), p.get("mscale_all_dim")

    def get_mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    if att is None:
        att = (float(get_mscale(factor, mscale) / get_mscale(factor, mscale_all))
               if mscale and mscale_all else get_mscale(factor))
    beta_fast, beta_slow = p.get("beta_fast") or 32, p.get("beta_slow") or 1

    def corr_dim(rot):
        return (dim * math.log(orig / (rot * 2 * math.pi))) / (2 * math.log(base))

    low, high = corr_dim(beta_fast), corr_dim(beta_slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extra, inter = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    keep = 1 - ramp
    return inter * (1 - keep) + extra * keep, float(att)


class RotaryEmbedding:
    """Produces cos/sin for a flat position vector (rotate-half layout).

    The model calls ``cos_sin`` once per step and hands the pair to every layer.
    """

    def __init__(self, cfg: RopeConfig):
        self.cfg = cfg
        self._inv, self.scaling = compute_inv_freq(cfg)

    @property
    def rotary_dim(self) -> int:
        return self.cfg.rotary_dim

    def inv_freq_for(self, positions: torch.Tensor) -> tuple[torch.Tensor, float]:
        kind = self.cfg.rope_type
        if kind in ("dynamic", "longrope") and positions.numel():
            # The reference switches frequencies on the longest position in the batch.
            seq_len = int(positions.max()) + 1
            threshold = (self.cfg.params.get("original_max_position_embeddings")
                         if kind == "longrope" else self.cfg.max_position_embeddings)
            if seq_len > threshold:
                return compute_inv_freq(self.cfg, seq_len)
        return self._inv, self.scaling

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        inv, scale = self.inv_freq_for(positions)
        freqs = positions.to(torch.float32)[:, None] * inv.to(positions.device)[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)


class MultiAxisRotaryEmbedding(RotaryEmbedding):
    """M-RoPE (Qwen2-VL): positions [axes, T]; frequency ``j`` of the rotary half takes
    its angle from the axis whose section holds ``j`` (sections [t, h, w] sum to
    rotary_dim / 2). Text tokens have equal positions on every axis, which makes this
    plain rope for them; 1-D positions are accepted as that case.

    ``interleaved`` (Qwen3-VL's ``mrope_interleaved``): the axes take turns instead of
    holding contiguous blocks, so every axis gets high and low frequencies: frequency ``j``
    belongs to axis ``a = j % 3`` (a = 1, 2) while ``j < 3 * sections[a]``, else to axis 0."""

    def __init__(self, cfg: RopeConfig, sections: list[int], interleaved: bool = False):
        super().__init__(cfg)
        if sum(sections) != self.rotary_dim // 2:
            raise ValueError(f"mrope_section {sections} must sum to rotary_dim / 2 = {self.rotary_dim // 2}")
        self.sections = list(sections)
        self.interleaved = interleaved
        if interleaved:
            if len(sections) != 3:
                raise ValueError(f"mrope_section {sections}: the interleaved layout takes 3 axes (t, h, w)")
            j = torch.arange(self.rotary_dim // 2)
            axis = torch.zeros_like(j)
            for a in (1, 2):
                axis[(j % 3 == a) & (j < 3 * sections[a])] = a
            self._axis_of = axis
        else:
            self._axis_of = torch.repeat_interleave(torch.arange(len(sections)), torch.tensor(sections))

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        if positions.dim() == 1:
            return super().cos_sin(positions, dtype)
        inv, scale = self.inv_freq_for(positions)
        axis = self._axis_of.to(positions.device)
        # [rot/2, T]: row j holds the positions of frequency j's axis
        pos = positions.to(torch.float32).index_select(0, axis)
        freqs = pos.t() * inv.to(positions.device)[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...)."""
    return torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 interleaved: bool = False) -> torch.Tensor:
    """Rotate the first ``cos.shape[-1]`` dims of x [T, heads, head_dim].

    ``interleaved`` pairs dims (2i, 2i+1) instead of (i, i + d/2) (GLM-4's layout); cos/sin
    keep the rotate-half layout [f0..fn, f0..fn] and are re-spread to [f0, f0, f1, f1, ...]."""
    cos, sin = cos[:, None, :], sin[:, None, :]
    rotate = rotate_half
    if interleaved:
        half = cos.shape[-1] // 2
        cos, sin = cos[..., :half].repeat_interleave(2, -1), sin[..., :half].repeat_interleave(2, -1)
        rotate = rotate_pairs
    rd = cos.shape[-1]
    if rd == x.shape[-1]:
        return x * cos + rotate(x) * sin
    x_rot, x_pass = x[..., :rd], x[..., rd:]
    return torch.cat((x_rot * cos + rotate(x_rot) * sin, x_pass), -1)
