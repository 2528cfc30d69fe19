"""Qwen3-MoE: Qwen3 attention (q/k norms) with sparse layers every ``decoder_sparse_step``
layers except ``mlp_only_layers``; routing weights are renormalised only with
``norm_topk_prob`` and combine in the activation dtype."""
from __future__ import annotations

from mistralrs_arch_text.mixtral import MixtralForCausalLM
from mistralrs_core.layers.moe import MoEConfig
from mistralrs_core.models.moe_decoder import with_moe
from mistralrs_core.models.text_config import base_config


class Qwen3MoeForCausalLM(MixtralForCausalLM):
    @classmethod
    def config_from_hf(cls, hf):
        bias = bool(hf.get("attention_bias", False))
        # Every layer slides when enabled (no max_window_layers split, unlike dense Qwen).
        window = hf.get("sliding_window") if hf.get("use_sliding_window") else None
        cfg = base_config(hf, qkv_bias=bias, o_bias=bias, qk_norm=True, sliding_window=window)
        n, step, dense = hf["num_hidden_layers"], hf.get("decoder_sparse_step", 1), hf.get("mlp_only_layers") or []
        experts = hf.get("num_experts", hf.get("num_local_experts", 0))
        sparse = [i not in dense and experts > 0 and (i + 1) % step == 0 for i in range(n)]
        return with_moe(cfg, MoEConfig(
            num_experts=experts, top_k=hf["num_experts_per_tok"], intermediate_size=hf["moe_intermediate_size"],
            hidden_act=hf.get("hidden_act", "silu"), renormalize=bool(hf.get("norm_topk_prob", False)),
            weights_fp32=False), sparse)
