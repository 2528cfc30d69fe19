"""A configurable decoder-only transformer that most text families are built from.

A family module reads its Hugging Face config into ``DecoderConfig`` and, where its
math differs, overrides one small method; the variants shared by several families
(q/k norms, sandwich norms, soft-capping, sliding windows, partial rotary, fused
projections, parallel attention + MLP, norm offsets) are options here.
"""
from __future__ import annotations

import math

import attrs
import torch
from torch import nn

from mistralrs_core.layers.attention import AttentionMetadata, KVCacheSpec, LayerKVCache, attention
from mistralrs_core.layers.linear import Embedding, Linear, fuse_linears
from mistralrs_core.layers.mlp import GatedMLP, PlainMLP
from mistralrs_core.layers.norms import LayerNorm, RMSNorm
from mistralrs_core.layers.rope import RopeConfig, RotaryEmbedding, apply_rotary
from mistralrs_core.models.base import CausalLM


@attrs.define
class DecoderConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope: RopeConfig | None
    max_position_embeddings: int = 4096
    norm_eps: float = 1e-6
    norm_kind: str = "rms"                  # "rms" | "layer"
    norm_offset: float = 0.0                # 1.0 for Gemma's (1 + w)
    norm_bias: bool = True                  # LayerNorm bias
    hidden_act: str = "silu"
    mlp_kind: str = "gated"                 # "gated" | "plain"
    mlp_bias: bool = False
    mlp_fused: bool = False                 # gate_up_proj
    mlp_names: tuple[str, str] = ("fc1", "fc2")
    qkv_bias: bool = False
    o_bias: bool = False
    qkv_fused: bool = False                 # qkv_proj
    o_name: str = "o_proj"
    qk_norm: bool = False                   # per-head RMSNorm on q and k (Qwen3, Gemma3)
    qk_norm_kind: str = "rms"               # "layer": per-head LayerNorm with bias (Phi-2)
    qk_norm_names: tuple[str, str] = ("q_norm", "k_norm")
    attn_scale: float | None = None         # default 1/sqrt(head_dim)
    attn_softcap: float | None = None
    attn_sinks: bool = False                # per-head learned sink logit (GPT-OSS)
    final_softcap: float | None = None
    sliding_window: int | None = None
    layer_types: list[str] | None = None    # per layer "sliding_attention" | "full_attention"
    local_rope: RopeConfig | None = None    # rope for sliding layers when it differs (Gemma3)
    rope_interleaved: bool = False          # rotate (even, odd) pairs instead of halves (GLM-4)
    no_rope_layers: list[int] | None = None  # 1 = use rope, 0 = skip (SmolLM3)
    sandwich_norms: bool = False            # pre/post feed-forward norms (Gemma2/3)
    parallel_block: bool = False            # attn and MLP from one norm (Phi-2)
    embed_scale: float | None = None        # Gemma multiplies embeddings by sqrt(hidden)
    tie_word_embeddings: bool = False
    lm_head_bias: bool = False
    final_norm_name: str = "norm"
    causal: bool = True

    def is_sliding(self, layer: int) -> bool:
        if self.layer_types is not None:
            return self.layer_types[layer] == "sliding_attention"
        return self.sliding_window is not None

    def uses_rope(self, layer: int) -> bool:
        return self.rope is not None and (self.no_rope_layers is None or bool(self.no_rope_layers[layer]))


def make_norm(cfg: DecoderConfig, dim: int | None = None) -> nn.Module:
    dim = dim or cfg.hidden_size
    if cfg.norm_kind == "layer":
        return LayerNorm(dim, cfg.norm_eps, bias=cfg.norm_bias)
    return RMSNorm(dim, cfg.norm_eps, offset=cfg.norm_offset)


class DecoderAttention(nn.Module):
    def __init__(self, cfg: DecoderConfig, layer: int):
        super().__init__()
        self.cfg = cfg
        self.layer = layer
        self.nh, self.nkv, self.hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q_out, kv_out = self.nh * self.hd, self.nkv * self.hd
        if cfg.qkv_fused:
            self.qkv_proj = Linear(cfg.hidden_size, q_out + 2 * kv_out, cfg.qkv_bias)
        else:
            self.q_proj = Linear(cfg.hidden_size, q_out, cfg.qkv_bias)
            self.k_proj = Linear(cfg.hidden_size, kv_out, cfg.qkv_bias)
            self.v_proj = Linear(cfg.hidden_size, kv_out, cfg.qkv_bias)
        setattr(self, cfg.o_name, Linear(q_out, cfg.hidden_size, cfg.o_bias))
        if cfg.qk_norm:
            for name in cfg.qk_norm_names:
                setattr(self, name, make_norm(attrs.evolve(cfg, norm_kind=cfg.qk_norm_kind), self.hd))
        self.sinks = (nn.Parameter(torch.empty(self.nh, device="meta"), requires_grad=False)
                      if cfg.attn_sinks else None)
        self.scale = cfg.attn_scale if cfg.attn_scale is not None else 1.0 / math.sqrt(self.hd)
        self.sliding_window = cfg.sliding_window if cfg.is_sliding(layer) else None
        self.use_rope = cfg.uses_rope(layer)

    def post_load(self) -> None:
        """Fuse q/k/v into one matmul when the storage allows (subclasses that compute
        q/k/v their own way keep the separate projections)."""
        self._qkv_runtime = None
        if self.cfg.qkv_fused or type(self).project_qkv is not DecoderAttention.project_qkv:
            return
        fused = fuse_linears([self.q_proj, self.k_proj, self.v_proj])
        if fused is not None:
            self._qkv_runtime = fused
            del self.q_proj, self.k_proj, self.v_proj

    def project_qkv(self, x: torch.Tensor):
        fused = getattr(self, "_qkv_runtime", None)
        if fused is not None:
            q_out, kv_out = self.nh * self.hd, self.nkv * self.hd
            return fused(x).split([q_out, kv_out, kv_out], dim=-1)
        if self.cfg.qkv_fused:
            qkv = self.qkv_proj(x)
            q_out, kv_out = self.nh * self.hd, self.nkv * self.hd
            return qkv.split([q_out, kv_out, kv_out], dim=-1)
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    def forward(self, x, rope_cs, meta: AttentionMetadata, cache: LayerKVCache | None):
        t = x.shape[0]
        q, k, v = self.project_qkv(x)
        q = q.view(t, self.nh, self.hd)
        k = k.view(t, self.nkv, self.hd)
        v = v.view(t, self.nkv, self.hd)
        if self.cfg.qk_norm:
            qn, kn = self.cfg.qk_norm_names
            q, k = getattr(self, qn)(q), getattr(self, kn)(k)
        if self.use_rope:
            cos, sin = rope_cs
            il = self.cfg.rope_interleaved
            q, k = apply_rotary(q, cos, sin, interleaved=il), apply_rotary(k, cos, sin, interleaved=il)
        o = attention(q, k, v, meta, cache, scale=self.scale, sliding_window=self.sliding_window,
                      softcap=self.cfg.attn_softcap, sinks=self.sinks)
        return getattr(self, self.cfg.o_name)(o.reshape(t, self.nh * self.hd))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: DecoderConfig, layer: int):
        super().__init__()
        self.cfg = cfg
        self.self_attn = self.build_attention(cfg, layer)
        self.mlp = self.build_mlp(cfg, layer)
        self.input_layernorm = make_norm(cfg)
        if not cfg.parallel_block:
            self.post_attention_layernorm = make_norm(cfg)
        if cfg.sandwich_norms:
            self.pre_feedforward_layernorm = make_norm(cfg)
            self.post_feedforward_layernorm = make_norm(cfg)

    def build_attention(self, cfg: DecoderConfig, layer: int) -> nn.Module:
        return DecoderAttention(cfg, layer)

    def build_mlp(self, cfg: DecoderConfig, layer: int) -> nn.Module:
        """The feed-forward block of ``layer`` (MoE families return a sparse block here)."""
        if cfg.mlp_kind == "gated":
            return GatedMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act, cfg.mlp_bias,
                            fused=cfg.mlp_fused)
        return PlainMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act, cfg.mlp_bias,
                        names=cfg.mlp_names)

    def forward(self, h, rope_cs, meta, cache):
        if self.cfg.parallel_block:
            n = self.input_layernorm(h)
            return h + self.self_attn(n, rope_cs, meta, cache) + self.mlp(n)
        a = self.self_attn(self.input_layernorm(h), rope_cs, meta, cache)
        if self.cfg.sandwich_norms:
            h = h + self.post_attention_layernorm(a)
            return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))
        h = h + a
        return h + self.mlp(self.post_attention_layernorm(h))


class DecoderBody(nn.Module):
    """The ``model.`` prefix of Hugging Face checkpoints."""

    def __init__(self, cfg: DecoderConfig, layer_cls=DecoderLayer):
        super().__init__()
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList([layer_cls(cfg, i) for i in range(cfg.num_layers)])
        setattr(self, cfg.final_norm_name, make_norm(cfg))


class DecoderLM(CausalLM):
    """Decoder-only LM: ``model.embed_tokens``, ``model.layers.N``, ``model.norm``, ``lm_head``."""

    layer_cls = DecoderLayer

    def __init__(self, cfg: DecoderConfig, dtype: torch.dtype = torch.float32):
        super().__init__(dtype)
        self.cfg = cfg
        self.max_context_len = cfg.max_position_embeddings
        self.model = DecoderBody(cfg, self.layer_cls)
        if not cfg.tie_word_embeddings:
            self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, cfg.lm_head_bias)
        self.rope = RotaryEmbedding(cfg.rope) if cfg.rope is not None else None
        self.local_rope = RotaryEmbedding(cfg.local_rope) if cfg.local_rope is not None else None

    @classmethod
    def from_hf_config(cls, hf: dict, dtype: torch.dtype = torch.float32) -> "DecoderLM":
        return cls(cls.config_from_hf(hf), dtype)

    @classmethod
    def config_from_hf(cls, hf: dict) -> DecoderConfig:
        raise NotImplementedError

    def kv_cache_specs(self):
        c = self.cfg
        return [KVCacheSpec(c.num_kv_heads, c.head_dim, c.head_dim) for _ in range(c.num_layers)]

    def map_weight_name(self, name):
        if self.cfg.tie_word_embeddings and name.startswith("lm_head."):
            return None
        return name

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.model.embed_tokens(input_ids, self.dtype)
        if self.cfg.embed_scale is not None:
            # The reference rounds the scale to the activation dtype first.
            h = h * torch.tensor(self.cfg.embed_scale, dtype=h.dtype)
        return h

    def forward_embeds(self, h, positions, meta, caches):
        if self.fast_forward is not None:
            out = self.fast_forward(h, positions, meta, caches)
            if out is not None:
                return out
        cs = self.rope.cos_sin(positions, h.dtype) if self.rope is not None else None
        cs_local = self.local_rope.cos_sin(positions, h.dtype) if self.local_rope is not None else cs
        for i, layer in enumerate(self.model.layers):
            rope_cs = cs_local if self.cfg.is_sliding(i) else cs
            h = layer(h, rope_cs, meta, caches[i] if caches is not None else None)
        return getattr(self.model, self.cfg.final_norm_name)(h)

    def compute_logits(self, hidden):
        if self.cfg.tie_word_embeddings:
            logits = self.model.embed_tokens.as_lm_head(hidden)
        else:
            logits = self.lm_head(hidden)
        logits = logits.float()
        if self.cfg.final_softcap is not None:
            logits = torch.tanh(logits / self.cfg.final_softcap) * self.cfg.final_softcap
        return logits
