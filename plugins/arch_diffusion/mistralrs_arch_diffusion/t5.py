"""The T5 v1.1 encoder (Flux's ``text_encoder_2``): RMS-style layer norms, unscaled
attention with a bucketed relative-position bias computed once (block 0) and shared by
every block, and a gated-GELU feed-forward. HF module names (``shared``,
``encoder.block.N.layer.{0,1}``, ``encoder.final_layer_norm``)."""
from __future__ import annotations

import math

import attrs
import torch
from torch import nn

from mistralrs_core.layers.activations import get_activation
from mistralrs_core.layers.attention_backends import EncoderAttention
from mistralrs_core.layers.linear import Embedding, Linear
from mistralrs_core.layers.norms import RMSNorm


@attrs.frozen
class T5Config:
    vocab_size: int = 32128
    d_model: int = 4096
    d_kv: int = 64
    d_ff: int = 10240
    num_layers: int = 24
    num_heads: int = 64
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    dense_act_fn: str = "gelu_new"
    is_gated_act: bool = True

    @classmethod
    def from_hf(cls, hf: dict) -> "T5Config":
        d = cls()
        proj = hf.get("feed_forward_proj", "gated-gelu")
        act = proj.split("-")[-1]
        gated = proj.startswith("gated-")
        # transformers maps "gated-gelu" to the tanh approximation (gelu_new).
        act = "gelu_new" if act == "gelu" and gated else act
        return cls(**{k: hf.get(k, getattr(d, k)) for k in (
            "vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads",
            "relative_attention_num_buckets", "relative_attention_max_distance", "layer_norm_epsilon")},
            dense_act_fn=act, is_gated_act=gated)


def relative_position_buckets(relative: torch.Tensor, num_buckets: int, max_distance: int) -> torch.Tensor:
    """Bidirectional buckets: half for keys after the query; within each half, exact offsets
    below ``num_buckets // 4`` and logarithmic bins up to ``max_distance``."""
    half = num_buckets // 2
    buckets = (relative > 0).long() * half
    distance = relative.abs()
    exact = half // 2
    log_bin = exact + (torch.log(distance.float() / exact) / math.log(max_distance / exact)
                       * (half - exact)).long()
    log_bin = log_bin.clamp(max=half - 1)
    return buckets + torch.where(distance < exact, distance, log_bin)


class T5LayerNorm(RMSNorm):
    """No mean subtraction, no bias; the scale multiplies after casting to the weight's dtype."""

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            h = h.to(self.weight.dtype)
        return self.weight * h


class T5Attention(nn.Module):
    def __init__(self, cfg: T5Config, has_bias: bool):
        super().__init__()
        inner = cfg.num_heads * cfg.d_kv
        self.cfg = cfg
        self.q = Linear(cfg.d_model, inner)
        self.k = Linear(cfg.d_model, inner)
        self.v = Linear(cfg.d_model, inner)
        self.o = Linear(inner, cfg.d_model)
        if has_bias:
            self.relative_attention_bias = Embedding(cfg.relative_attention_num_buckets, cfg.num_heads)
        self.attn = EncoderAttention()

    def position_bias(self, length: int, device) -> torch.Tensor:
        pos = torch.arange(length, device=device)
        buckets = relative_position_buckets(pos[None, :] - pos[:, None], self.cfg.relative_attention_num_buckets,
                                            self.cfg.relative_attention_max_distance)
        return self.relative_attention_bias(buckets).permute(2, 0, 1)[None]  # [1, H, S, S]

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        h, d = self.cfg.num_heads, self.cfg.d_kv
        q, k, v = (p(x).view(b, s, h, d) for p in (self.q, self.k, self.v))
        # T5 folds the 1/sqrt(d) into its initialisation: scores are unscaled.
        out = self.attn(q, k, v, None, scale=1.0, bias=bias)
        return self.o(out.reshape(b, s, h * d))


class T5FeedForward(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.gated = cfg.is_gated_act
        if self.gated:
            self.wi_0 = Linear(cfg.d_model, cfg.d_ff)
            self.wi_1 = Linear(cfg.d_model, cfg.d_ff)
        else:
            self.wi = Linear(cfg.d_model, cfg.d_ff)
        self.wo = Linear(cfg.d_ff, cfg.d_model)
        self.act = get_activation(cfg.dense_act_fn)

    def forward(self, x):
        h = self.act(self.wi_0(x)) * self.wi_1(x) if self.gated else self.act(self.wi(x))
        return self.wo(h)


class _SelfAttentionLayer(nn.Module):
    def __init__(self, cfg: T5Config, has_bias: bool):
        super().__init__()
        self.SelfAttention = T5Attention(cfg, has_bias)
        self.layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)


class _FeedForwardLayer(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.DenseReluDense = T5FeedForward(cfg)
        self.layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)


class T5Block(nn.Module):
    def __init__(self, cfg: T5Config, has_bias: bool):
        super().__init__()
        self.layer = nn.ModuleList([_SelfAttentionLayer(cfg, has_bias), _FeedForwardLayer(cfg)])

    def forward(self, x, bias):
        attn, ff = self.layer
        x = x + attn.SelfAttention(attn.layer_norm(x), bias)
        return x + ff.DenseReluDense(ff.layer_norm(x))


class _T5Stack(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.block = nn.ModuleList([T5Block(cfg, i == 0) for i in range(cfg.num_layers)])
        self.final_layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)


class T5EncoderModel(nn.Module):
    # The encoder's own copy of the tied embedding; ``shared`` is what is stored.
    ignored_weight_suffixes = ("encoder.embed_tokens.weight",)

    def __init__(self, cfg: T5Config):
        super().__init__()
        self.cfg = cfg
        self.shared = Embedding(cfg.vocab_size, cfg.d_model)
        self.encoder = _T5Stack(cfg)

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder.final_layer_norm.weight.dtype

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[B, S] ids -> last hidden state [B, S, d_model] (every position attends every other:
        Flux feeds the padded prompt without a mask)."""
        x = self.shared(input_ids)
        bias = self.encoder.block[0].layer[0].SelfAttention.position_bias(input_ids.shape[1], input_ids.device)
        bias = bias.to(x.dtype)
        for blk in self.encoder.block:
            x = blk(x, bias)
        return self.encoder.final_layer_norm(x)
