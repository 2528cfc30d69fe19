"""Starcoder2: Mistral with biased LayerNorms, biases on every projection and a plain
``c_fc`` -> GELU -> ``c_proj`` MLP."""
from __future__ import annotations

from mistralrs_arch_text.mistral import MistralForCausalLM
from mistralrs_core.models.text_config import base_config


class Starcoder2ForCausalLM(MistralForCausalLM):
    @classmethod
    def config_from_hf(cls, hf):
        bias = bool(hf.get("use_bias", True))
        return base_config(
            hf, norm_kind="layer", norm_eps=hf.get("norm_epsilon", 1e-5),
            hidden_act=hf.get("hidden_act", "gelu_pytorch_tanh"),
            mlp_kind="plain", mlp_names=("c_fc", "c_proj"), mlp_bias=bias, qkv_bias=bias, o_bias=bias,
            sliding_window=hf.get("sliding_window"),
            # Unlike Llama, Starcoder2 ties its embeddings unless told otherwise.
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)))
