"""GraniteMoeHybrid (Granite 4.0-H): Mamba-2 layers interleaved with attention layers, each
followed by a MoE (when the config has experts) plus an always-on shared MLP; Granite's
embedding, residual, attention and logit multipliers; rope only when
``position_embedding_type == "rope"``. Mamba layers keep per-sequence recurrent state
(``layers/recurrent.py``), so the engine serves this family without prefix caching."""
from __future__ import annotations

import attrs
from torch import nn

from mistralrs_arch_text.mixtral import MixtralForCausalLM
from mistralrs_core.layers.attention import KVCacheSpec
from mistralrs_core.layers.mamba2 import Mamba2Config, Mamba2Mixer
from mistralrs_core.layers.mlp import GatedMLP
from mistralrs_core.layers.moe import MoEConfig, SparseMoE
from mistralrs_core.layers.rope import RopeConfig
from mistralrs_core.models.decoder import DecoderAttention, make_norm
from mistralrs_core.models.moe_decoder import MoEDecoderConfig, with_moe
from mistralrs_core.models.text_config import base_config


@attrs.define
class HybridConfig(MoEDecoderConfig):
    mamba: Mamba2Config | None = None
    mamba_layers: list[bool] = attrs.field(factory=list)
    shared_intermediate_size: int = 0
    residual_multiplier: float = 1.0
    logits_scaling: float = 1.0


class GraniteHybridLayer(nn.Module):
    def __init__(self, cfg: HybridConfig, layer: int):
        super().__init__()
        self.cfg = cfg
        self.input_layernorm, self.post_attention_layernorm = make_norm(cfg), make_norm(cfg)
        if cfg.mamba_layers[layer]:
            self.mamba = Mamba2Mixer(cfg.mamba)
        else:
            self.self_attn = DecoderAttention(cfg, layer)
        if cfg.moe is not None:
            self.mlp = SparseMoE(cfg.moe, cfg.hidden_size)
        self.shared_mlp = GatedMLP(cfg.hidden_size, cfg.shared_intermediate_size, cfg.hidden_act, fused=True)

    def forward(self, h, rope_cs, meta, cache):
        x = self.input_layernorm(h)
        x = self.mamba(x, meta, cache) if hasattr(self, "mamba") else self.self_attn(x, rope_cs, meta, cache)
        h = h + x * self.cfg.residual_multiplier
        x = self.post_attention_layernorm(h)
        y = self.mlp(x) + self.shared_mlp(x) if self.cfg.moe is not None else self.shared_mlp(x)
        return h + y * self.cfg.residual_multiplier


def _float(v) -> float:
    # transformers writes infinity into config.json as {"__float__": "Infinity"}.
    return float(v["__float__"]) if isinstance(v, dict) else float(v)


# checkpoint -> module names (after Mixtral's block_sparse_moe -> mlp)
_RENAMES = [(".mlp.input_linear.weight", ".mlp.experts.gate_up_proj"),
            (".mlp.output_linear.weight", ".mlp.experts.down_proj"),
            (".mlp.router.layer.", ".mlp.router."),
            (".shared_mlp.input_linear.", ".shared_mlp.gate_up_proj."),
            (".shared_mlp.output_linear.", ".shared_mlp.down_proj.")]


class GraniteMoeHybridForCausalLM(MixtralForCausalLM):
    layer_cls = GraniteHybridLayer

    @classmethod
    def config_from_hf(cls, hf):
        bias = bool(hf.get("attention_bias", False))
        heads = hf["num_attention_heads"]
        head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
        rope = RopeConfig.from_hf(hf, head_dim) if hf.get("position_embedding_type") == "rope" else None
        cfg = base_config(hf, rope=rope, qkv_bias=bias, o_bias=bias, attn_scale=hf.get("attention_multiplier", 1.0),
                          embed_scale=hf.get("embedding_multiplier", 1.0))
        experts = hf.get("num_local_experts") or 0
        moe = MoEConfig(num_experts=experts, top_k=hf.get("num_experts_per_tok", 1),
                        intermediate_size=hf["intermediate_size"], hidden_act=hf.get("hidden_act", "silu"),
                        softmax_after_topk=True, router_name="router", weights_fp32=False) if experts else None
        types = hf.get("layer_types") or hf.get("layers_block_type") or ["mamba"] * cfg.num_layers
        d_head = hf.get("mamba_d_head", "auto")
        if d_head == "auto":
            d_head = int(hf.get("mamba_expand", 2) * hf["hidden_size"]) // hf["mamba_n_heads"]
        mamba = Mamba2Config(
            hidden_size=hf["hidden_size"], num_heads=hf["mamba_n_heads"], head_dim=d_head,
            state_size=hf["mamba_d_state"], n_groups=hf.get("mamba_n_groups", 1),
            conv_kernel=hf.get("mamba_d_conv", 4), chunk_size=hf.get("mamba_chunk_size", 256),
            conv_bias=bool(hf.get("mamba_conv_bias", True)), proj_bias=bool(hf.get("mamba_proj_bias", False)),
            time_step_limit=tuple(_float(v) for v in hf.get("time_step_limit") or (0.0, float("inf"))),
            norm_eps=hf.get("rms_norm_eps", 1e-6), hidden_act=hf.get("hidden_act", "silu"))
        base = with_moe(cfg, moe) if moe is not None else with_moe(cfg, None)
        return HybridConfig(**attrs.asdict(base, recurse=False), mamba=mamba,
                            mamba_layers=[t in ("mamba", "linear_attention") for t in types],
                            shared_intermediate_size=hf["shared_intermediate_size"],
                            residual_multiplier=hf.get("residual_multiplier", 1.0),
                            logits_scaling=hf.get("logits_scaling", 1.0))

    def kv_cache_specs(self):
        c = self.cfg
        return [c.mamba.state_spec() if m else KVCacheSpec(c.num_kv_heads, c.head_dim, c.head_dim)
                for m in c.mamba_layers]

    def map_weight_name(self, name):
        name = super().map_weight_name(name)
        for a, b in _RENAMES if name is not None else ():
            name = name.replace(a, b)
        return name

    def compute_logits(self, hidden):
        return super().compute_logits(hidden) / self.cfg.logits_scaling
