"""DeepSeek-V2: multi-head latent attention (the paged cache holds only the compressed KV
latent and the shared roped key, see ``layers/mla.py``), rope on interleaved pairs, and a
MoE with shared experts from layer ``first_k_dense_replace`` on."""
from __future__ import annotations

import math

import attrs
import torch
from torch import nn

from mistralrs_arch_text.mixtral import MixtralForCausalLM
from mistralrs_core.layers.attention import KVCacheSpec
from mistralrs_core.layers.linear import Linear
from mistralrs_core.layers.mla import mla_attention
from mistralrs_core.layers.moe import MoEConfig
from mistralrs_core.layers.norms import RMSNorm
from mistralrs_core.layers.rope import RopeConfig, apply_rotary
from mistralrs_core.models.moe_decoder import MoEDecoderConfig, MoEDecoderLayer, with_moe
from mistralrs_core.models.text_config import base_config


@attrs.define
class MLAConfig(MoEDecoderConfig):
    q_lora_rank: int | None = None
    kv_lora_rank: int = 512
    nope_dim: int = 128
    v_dim: int = 128
    attention_bias: bool = False


class MLAttention(nn.Module):
    def __init__(self, cfg: MLAConfig, layer: int):
        super().__init__()
        self.cfg = cfg
        h, qk = cfg.num_heads, cfg.nope_dim + cfg.head_dim
        bias = cfg.attention_bias
        if cfg.q_lora_rank is None:
            self.q_proj = Linear(cfg.hidden_size, h * qk)
        else:
            self.q_a_proj = Linear(cfg.hidden_size, cfg.q_lora_rank, bias)
            # The latent norms keep RMSNorm's default eps whatever rms_norm_eps says.
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, 1e-6)
            self.q_b_proj = Linear(cfg.q_lora_rank, h * qk)
        self.kv_a_proj_with_mqa = Linear(cfg.hidden_size, cfg.kv_lora_rank + cfg.head_dim, bias)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, 1e-6)
        self.kv_b_proj = Linear(cfg.kv_lora_rank, h * (cfg.nope_dim + cfg.v_dim))
        self.o_proj = Linear(h * cfg.v_dim, cfg.hidden_size, bias)

    def forward(self, x, rope_cs, meta, cache):
        c, t = self.cfg, x.shape[0]
        q = self.q_proj(x) if c.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q_nope, q_pe = q.view(t, c.num_heads, -1).split([c.nope_dim, c.head_dim], -1)
        latent, k_pe = self.kv_a_proj_with_mqa(x).split([c.kv_lora_rank, c.head_dim], -1)
        cos, sin = rope_cs
        q_pe = apply_rotary(q_pe, cos, sin, interleaved=c.rope_interleaved)
        k_pe = apply_rotary(k_pe[:, None], cos, sin, interleaved=c.rope_interleaved)[:, 0]
        o = mla_attention(q_nope, q_pe, torch.cat((self.kv_a_layernorm(latent), k_pe), -1), meta, cache,
                          self.kv_b_proj, v_dim=c.v_dim, scale=c.attn_scale)
        return self.o_proj(o.reshape(t, -1))


class DeepseekLayer(MoEDecoderLayer):
    def build_attention(self, cfg, layer):
        return MLAttention(cfg, layer)


def mla_config(hf: dict, moe: MoEConfig, rope_interleaved: bool = True) -> MLAConfig:
    rope_dim, nope = hf["qk_rope_head_dim"], hf["qk_nope_head_dim"]
    rope = RopeConfig.from_hf(hf, rope_dim)
    scale = (nope + rope_dim) ** -0.5
    if rope.rope_type != "default" and rope.params.get("mscale_all_dim") and rope.params.get("factor", 1) > 1:
        # Yarn's attention-temperature correction goes into the softmax scale as well (squared).
        m = 0.1 * rope.params["mscale_all_dim"] * math.log(rope.params["factor"]) + 1.0
        scale *= m * m
    cfg = base_config(hf, head_dim=rope_dim, rope=rope, attn_scale=scale, rope_interleaved=rope_interleaved,
                      mlp_bias=bool(hf.get("mlp_bias", False)))
    n_shared = hf.get("n_shared_experts") or 0
    moe = attrs.evolve(moe, num_experts=hf["n_routed_experts"], top_k=hf["num_experts_per_tok"],
                       intermediate_size=hf["moe_intermediate_size"], hidden_act=hf.get("hidden_act", "silu"),
                       routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)), router_fp32=True,
                       shared_intermediate_size=hf["moe_intermediate_size"] * n_shared)
    first_dense = hf.get("first_k_dense_replace") or 0
    base = with_moe(cfg, moe, [i >= first_dense for i in range(cfg.num_layers)])
    return MLAConfig(**attrs.asdict(base, recurse=False), q_lora_rank=hf.get("q_lora_rank"),
                     kv_lora_rank=hf["kv_lora_rank"], nope_dim=nope, v_dim=hf["v_head_dim"],
                     attention_bias=bool(hf.get("attention_bias", False)))


class DeepseekV2ForCausalLM(MixtralForCausalLM):
    layer_cls = DeepseekLayer

    @classmethod
    def config_from_hf(cls, hf):
        grouped = hf.get("topk_method") == "group_limited_greedy"
        # The reference ignores norm_topk_prob for V2: weights are the raw softmax scores.
        moe = MoEConfig(num_experts=0, top_k=0, intermediate_size=0,
                        n_group=hf.get("n_group") if grouped else None,
                        topk_group=hf.get("topk_group") if grouped else None)
        return mla_config(hf, moe)

    def kv_cache_specs(self):
        c = self.cfg
        return [KVCacheSpec(1, c.kv_lora_rank + c.head_dim, 0, latent=True) for _ in range(c.num_layers)]

    def map_weight_name(self, name):
        # DeepSeek-V3 checkpoints carry a multi-token-prediction layer past the last one.
        parts = name.split(".")
        if len(parts) > 2 and parts[1] == "layers" and int(parts[2]) >= self.cfg.num_layers:
            return None
        return super().map_weight_name(name)
