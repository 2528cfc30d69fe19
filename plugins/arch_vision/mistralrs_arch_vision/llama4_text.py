"""The Llama 4 text decoder: the core's decoder with Llama 4's own attention and feed-forward.

What differs from a Llama decoder, all kept here rather than as core options:

* feed-forward: on MoE layers a top-k router whose sigmoid scores scale each expert's INPUT
  (not its output), plus an always-on shared expert; on the other layers a dense gated MLP
  of ``intermediate_size_mlp``. Experts are stored stacked (``gate_up_proj`` [E, H, 2I],
  ``down_proj`` [E, I, H]). The reference runs every expert on every token with the
  unselected ones' input scaled to 0; a bias-free gated expert maps 0 to 0, so running only
  the selected (token, expert) pairs is the same sum.
* rope layers (``no_rope_layers[i] == 1``): rope in the interleaved (complex-pair) layout,
  then a weightless L2/RMS norm on q and k (``use_qk_norm``), and attention restricted to
  the query's own ``attention_chunk_size`` block of absolute positions.
* NoPE layers: no rope, full causal attention, and (``attn_temperature_tuning``) queries
  scaled by ``1 + attn_scale * log1p(floor((pos + 1) / floor_scale))``.
"""
from __future__ import annotations

import attrs
import torch
from torch import nn

from mistralrs_core.layers.activations import get_activation
from mistralrs_core.layers.attention import attention
from mistralrs_core.layers.linear import Linear
from mistralrs_core.layers.mlp import GatedMLP
from mistralrs_core.layers.rope import apply_rotary
from mistralrs_core.models.decoder import DecoderAttention, DecoderConfig, DecoderLayer, DecoderLM
from mistralrs_core.models.text_config import base_config

# transformers' Llama4TextConfig defaults: a text_config lists only what differs from them.
LLAMA4_TEXT_DEFAULTS = dict(vocab_size=202048, hidden_size=5120, intermediate_size=8192, intermediate_size_mlp=16384,
                            num_hidden_layers=48, num_attention_heads=40, num_key_value_heads=8, head_dim=128,
                            hidden_act="silu", max_position_embeddings=4096 * 32, rms_norm_eps=1e-5,
                            tie_word_embeddings=False, num_experts_per_tok=1, num_local_experts=16,
                            interleave_moe_layer_step=1, use_qk_norm=True, no_rope_layer_interval=4,
                            attention_chunk_size=8192, attn_temperature_tuning=True, floor_scale=8192,
                            attn_scale=0.1, attention_bias=False, rope_theta=500000.0)


@attrs.define
class Llama4TextConfig(DecoderConfig):
    expert_size: int = 0                     # intermediate size of one routed / the shared expert
    num_experts: int = 0
    top_k: int = 1
    moe_layers: list[bool] = attrs.Factory(list)
    chunk_size: int | None = None            # on rope layers
    l2_qk_norm: bool = True                  # on rope layers
    temperature_tuning: bool = True          # on NoPE layers
    floor_scale: float = 8192.0
    temperature_scale: float = 0.1


def llama4_text_config(text: dict) -> Llama4TextConfig:
    t = {**LLAMA4_TEXT_DEFAULTS, **text}
    n = int(t["num_hidden_layers"])
    rope_layers = t.get("no_rope_layers") or [int((i + 1) % t["no_rope_layer_interval"] != 0) for i in range(n)]
    moe = t.get("moe_layers")
    if moe is None:
        step = int(t["interleave_moe_layer_step"])
        moe = list(range(step - 1, n, step))
    types = t.get("layer_types") or ["chunked_attention" if r and t["attention_chunk_size"] is not None
                                     else "full_attention" for r in rope_layers]
    if any(lt == "chunked_attention" for lt in types) and t["attention_chunk_size"] is None:
        raise ValueError("layer_types: chunked_attention layers need attention_chunk_size")
    base = attrs.asdict(base_config(t, intermediate_size=int(t["intermediate_size_mlp"]),
                                    rope_interleaved=True, no_rope_layers=[int(r) for r in rope_layers],
                                    qkv_bias=bool(t["attention_bias"]), o_bias=bool(t["attention_bias"]),
                                    layer_types=list(types)),
                        recurse=False)
    return Llama4TextConfig(**base, expert_size=int(t["intermediate_size"]), num_experts=int(t["num_local_experts"]),
                            top_k=int(t["num_experts_per_tok"]), moe_layers=[i in set(moe) for i in range(n)],
                            chunk_size=t["attention_chunk_size"], l2_qk_norm=bool(t["use_qk_norm"]),
                            temperature_tuning=bool(t["attn_temperature_tuning"]),
                            floor_scale=float(t["floor_scale"]), temperature_scale=float(t["attn_scale"]))


def l2_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Weightless RMS norm over the head dim, computed in float32 as the reference does."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


class Llama4Attention(DecoderAttention):
    def __init__(self, cfg: Llama4TextConfig, layer: int):
        super().__init__(cfg, layer)
        self.chunk = cfg.chunk_size if cfg.layer_types[layer] == "chunked_attention" else None

    def forward(self, x, rope_cs, meta, cache, positions=None):
        t, c = x.shape[0], self.cfg
        q, k, v = self.project_qkv(x)
        q, k, v = q.view(t, self.nh, self.hd), k.view(t, self.nkv, self.hd), v.view(t, self.nkv, self.hd)
        if self.use_rope:
            cos, sin = rope_cs
            q, k = apply_rotary(q, cos, sin, interleaved=True), apply_rotary(k, cos, sin, interleaved=True)
            if c.l2_qk_norm:
                q, k = l2_norm(q, c.norm_eps), l2_norm(k, c.norm_eps)
        elif c.temperature_tuning:
            scales = torch.log1p(torch.floor((positions.float() + 1.0) / c.floor_scale)) * c.temperature_scale + 1.0
            q = (q * scales[:, None, None]).to(q.dtype)
        o = attention(q, k, v, meta, cache, scale=self.scale, chunk=self.chunk)
        return self.o_proj(o.reshape(t, self.nh * self.hd))


class Llama4Experts(nn.Module):
    """Stacked gated experts: ``gate_up_proj`` [E, H, 2I] (gate first), ``down_proj`` [E, I, H]."""

    def __init__(self, num: int, hidden: int, inter: int, act: str):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(num, hidden, 2 * inter, device="meta"), requires_grad=False)
        self.down_proj = nn.Parameter(torch.empty(num, inter, hidden, device="meta"), requires_grad=False)
        self.act = get_activation(act)

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        gate, up = (x @ self.gate_up_proj[e]).chunk(2, dim=-1)
        return (up * self.act(gate)) @ self.down_proj[e]


class Llama4MoE(nn.Module):
    def __init__(self, cfg: Llama4TextConfig):
        super().__init__()
        self.top_k = cfg.top_k
        self.experts = Llama4Experts(cfg.num_experts, cfg.hidden_size, cfg.expert_size, cfg.hidden_act)
        self.router = Linear(cfg.hidden_size, cfg.num_experts)
        self.shared_expert = GatedMLP(cfg.hidden_size, cfg.expert_size, cfg.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.router(x)
        top, idx = torch.topk(logits, self.top_k, dim=-1)
        scores = torch.sigmoid(top.float()).to(x.dtype)
        out = self.shared_expert(x)
        routed = torch.zeros_like(out)
        for e in idx.unique().tolist():
            tok, slot = (idx == e).nonzero(as_tuple=True)
            routed.index_add_(0, tok, self.experts.expert(e, x[tok] * scores[tok, slot, None]))
        return out + routed


class Llama4DecoderLayer(DecoderLayer):
    def build_attention(self, cfg, layer):
        return Llama4Attention(cfg, layer)

    def build_mlp(self, cfg, layer):
        return Llama4MoE(cfg) if cfg.moe_layers[layer] else super().build_mlp(cfg, layer)

    def forward(self, h, rope_cs, meta, cache, positions=None):
        h = h + self.self_attn(self.input_layernorm(h), rope_cs, meta, cache, positions)
        return h + self.mlp(self.post_attention_layernorm(h))


class Llama4TextLM(DecoderLM):
    """The text decoder; checkpoints name the feed-forward ``feed_forward``."""
    layer_cls = Llama4DecoderLayer
    ignored_weight_suffixes = ("rotary_emb.inv_freq", "position_ids")

    @classmethod
    def config_from_hf(cls, hf: dict) -> Llama4TextConfig:
        return llama4_text_config(hf)

    def map_weight_name(self, name):
        name = super().map_weight_name(name)
        return None if name is None else name.replace(".feed_forward.", ".mlp.")

    def forward_embeds(self, h, positions, meta, caches):
        # Own loop (no fused decoder step): the layers also need the absolute positions.
        cs = self.rope.cos_sin(positions, h.dtype)
        for i, layer in enumerate(self.model.layers):
            h = layer(h, cs, meta, caches[i] if caches is not None else None, positions)
        return self.model.norm(h)
