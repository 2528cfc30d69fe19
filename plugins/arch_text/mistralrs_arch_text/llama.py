"""Llama: the plain pre-norm decoder that most other families start from."""
from __future__ import annotations

from mistralrs_core.layers.rope import RopeConfig
from mistralrs_core.models.decoder import DecoderConfig, DecoderLM


def base_config(hf: dict, **overrides) -> DecoderConfig:
    """The fields every Llama-like config.json spells the same way."""
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    fields = dict(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=head_dim,
        rope=RopeConfig.from_hf(hf, head_dim),
        max_position_embeddings=hf.get("max_position_embeddings", 4096),
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        hidden_act=hf.get("hidden_act", "silu"),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )
    fields.update(overrides)
    return DecoderConfig(**fields)


class LlamaForCausalLM(DecoderLM):
    @classmethod
    def config_from_hf(cls, hf):
        bias = bool(hf.get("attention_bias", False))
        return base_config(hf, qkv_bias=bias, o_bias=bias, mlp_bias=bool(hf.get("mlp_bias", False)))
