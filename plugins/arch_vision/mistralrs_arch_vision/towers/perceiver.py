"""Idefics2's connector: a gated-MLP modality projection, then a perceiver resampler that
compresses any number of image patches to a fixed ``n_latents`` rows.

The resampler's learned latents attend (grouped-query attention, no positions) over the
projected patches *and themselves*: keys and values come from [context; latents], queries
from the latents only; padded patches are hidden by the key mask. Each of ``depth`` layers
is pre-norm (separate RMSNorms for latents and context) with a gated MLP of 4 x hidden; a
final RMSNorm closes it. Module names equal transformers' ``Idefics2Connector``
(``modality_projection.{gate,up,down}_proj``, ``perceiver_resampler.latents``,
``perceiver_resampler.layers.N.self_attn.q_proj`` ...).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mistralrs_core.layers.activations import get_activation
from mistralrs_core.layers.attention_backends import EncoderBatch, encoder_attention
from mistralrs_core.layers.linear import Linear
from mistralrs_core.layers.norms import RMSNorm


@dataclass(frozen=True)
class PerceiverConfig:
    """An HF ``perceiver_config``; defaults equal transformers' ``Idefics2PerceiverConfig``."""
    hidden_size: int = 4096
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    resampler_n_latents: int = 64
    resampler_depth: int = 3
    resampler_n_heads: int = 16
    resampler_head_dim: int = 96
    num_key_value_heads: int = 4

    @classmethod
    def from_hf(cls, perceiver: dict, text_hidden: int, text_eps: float) -> "PerceiverConfig":
        """The resampler works in the text model's width: when the perceiver config says
        otherwise, the reference's ``Idefics2Config`` overrides its hidden size *and* its
        norm eps with the text model's, and so do we."""
        kwargs = {k: perceiver[k] for k in cls.__dataclass_fields__ if perceiver.get(k) is not None}
        cfg = cls(**kwargs)
        if cfg.hidden_size != text_hidden:
            cfg = cls(**{**kwargs, "hidden_size": text_hidden, "rms_norm_eps": text_eps})
        if cfg.resampler_n_heads % cfg.num_key_value_heads:
            raise ValueError(f"perceiver_config: resampler_n_heads {cfg.resampler_n_heads} is not a multiple of "
                             f"num_key_value_heads {cfg.num_key_value_heads}")
        return cfg


class GatedProjection(nn.Module):
    """down(act(gate(x)) * up(x)), bias-free, with an output width of its own (the core's
    ``GatedMLP`` maps back to its input width)."""

    def __init__(self, d_in: int, d_mid: int, d_out: int, act: str):
        super().__init__()
        self.gate_proj = Linear(d_in, d_mid, bias=False)
        self.up_proj = Linear(d_in, d_mid, bias=False)
        self.down_proj = Linear(d_mid, d_out, bias=False)
        self.act = get_activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class PerceiverAttention(nn.Module):
    def __init__(self, cfg: PerceiverConfig):
        super().__init__()
        d, hd = cfg.hidden_size, cfg.resampler_head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.resampler_n_heads, cfg.num_key_value_heads, hd
        self.q_proj = Linear(d, self.num_heads * hd, bias=False)
        self.k_proj = Linear(d, self.num_kv_heads * hd, bias=False)
        self.v_proj = Linear(d, self.num_kv_heads * hd, bias=False)
        self.o_proj = Linear(self.num_heads * hd, d, bias=False)

    def forward(self, latents: torch.Tensor, context: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        """latents [B, L, D] attend over [context; latents] [B, S + L, D]."""
        b, n, _ = latents.shape
        both = torch.cat([context, latents], dim=1)
        q = self.q_proj(latents).view(b, n, self.num_heads, self.head_dim)
        k = self.k_proj(both).view(b, both.shape[1], self.num_kv_heads, self.head_dim)
        v = self.v_proj(both).view(b, both.shape[1], self.num_kv_heads, self.head_dim)
        out = encoder_attention(q, k, v, EncoderBatch.padded(key_mask), scale=self.head_dim ** -0.5)
        return self.o_proj(out.reshape(b, n, -1))


class PerceiverLayer(nn.Module):
    def __init__(self, cfg: PerceiverConfig):
        super().__init__()
        d, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.input_latents_norm = RMSNorm(d, eps)
        self.input_context_norm = RMSNorm(d, eps)
        self.self_attn = PerceiverAttention(cfg)
        self.post_attention_layernorm = RMSNorm(d, eps)
        self.mlp = GatedProjection(d, 4 * d, d, cfg.hidden_act)

    def forward(self, latents, context, key_mask):
        latents = latents + self.self_attn(self.input_latents_norm(latents), self.input_context_norm(context),
                                           key_mask)
        return latents + self.mlp(self.post_attention_layernorm(latents))


class PerceiverResampler(nn.Module):
    def __init__(self, cfg: PerceiverConfig):
        super().__init__()
        self.cfg = cfg
        self.latents = nn.Parameter(torch.empty(cfg.resampler_n_latents, cfg.hidden_size, device="meta"),
                                    requires_grad=False)
        self.layers = nn.ModuleList(PerceiverLayer(cfg) for _ in range(cfg.resampler_depth))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, context: torch.Tensor, context_mask: torch.Tensor | None) -> torch.Tensor:
        """context [B, S, D] (context_mask [B, S] True on real rows, None: all real)
        -> [B, n_latents, D]."""
        b = context.shape[0]
        latents = self.latents.to(context.dtype).expand(b, -1, -1)
        key_mask = None
        if context_mask is not None:
            # The latents are keys too, and always visible.
            key_mask = torch.cat([context_mask, context_mask.new_ones(b, latents.shape[1])], dim=1)
        for layer in self.layers:
            latents = layer(latents, context, key_mask)
        return self.norm(latents)


class Idefics2Connector(nn.Module):
    """Vision patches [B, S, vision_hidden] -> [B, n_latents, text_hidden]."""

    def __init__(self, vision_hidden: int, text_intermediate: int, text_hidden: int, text_act: str,
                 perceiver: PerceiverConfig):
        super().__init__()
        self.modality_projection = GatedProjection(vision_hidden, text_intermediate, text_hidden, text_act)
        self.perceiver_resampler = PerceiverResampler(perceiver)

    def forward(self, patches: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        return self.perceiver_resampler(self.modality_projection(patches), mask)
