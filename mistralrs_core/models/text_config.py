"""Reading a Hugging Face text-decoder config.json into ``DecoderConfig``.

Lives in core so that any family plugin (text, vision language towers, ...) can build its
decoder config without importing another plugin.
"""
from __future__ import annotations

from mistralrs_core.layers.rope import RopeConfig
from mistralrs_core.models.decoder import DecoderConfig


def base_config(hf: dict, **overrides) -> DecoderConfig:
    """The fields every Llama-like config.json spells the same way; ``overrides`` win."""
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
