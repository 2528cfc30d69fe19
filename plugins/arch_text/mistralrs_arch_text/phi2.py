"""Phi-2 (model_type ``phi``): attention and a GELU MLP run in parallel from one LayerNorm,
rotary on part of each head, biases everywhere including the LM head."""
from __future__ import annotations

from mistralrs_arch_text.llama import LlamaForCausalLM
from mistralrs_core.layers.rope import RopeConfig
from mistralrs_core.models.text_config import base_config


class Phi2ForCausalLM(LlamaForCausalLM):
    @classmethod
    def config_from_hf(cls, hf):
        head_dim = hf["hidden_size"] // hf["num_attention_heads"]
        return base_config(
            hf, head_dim=head_dim, rope=RopeConfig.from_hf(hf, head_dim, default_partial=0.5),
            norm_kind="layer", norm_eps=hf.get("layer_norm_eps", 1e-5),
            hidden_act=hf.get("hidden_act", "gelu_new"), parallel_block=True,
            mlp_kind="plain", mlp_bias=True, qkv_bias=True, o_bias=True, o_name="dense",
            qk_norm=bool(hf.get("qk_layernorm", False)), qk_norm_kind="layer",
            qk_norm_names=("q_layernorm", "k_layernorm"),
            final_norm_name="final_layernorm", lm_head_bias=True)
