"""Gemma generations' config.json -> ``DecoderConfig``, shared by every plugin with a Gemma
text model (arch_text's Gemma/Gemma2/Gemma3 and EmbeddingGemma, arch_vision's Gemma 3)."""
from __future__ import annotations

import math

from mistralrs_core.layers.rope import RopeConfig
from mistralrs_core.models.decoder import DecoderConfig
from mistralrs_core.models.text_config import base_config

_DEFAULT_THETA = {"full_attention": 1_000_000.0, "sliding_attention": 10_000.0}


def gemma_activation(hf: dict) -> str:
    act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
    # Early Gemma configs say "gelu" but were trained with the tanh approximation.
    return "gelu_pytorch_tanh" if act == "gelu" else act


def gemma_fields(hf: dict) -> dict:
    """What every Gemma generation shares: (1 + w) norms, embeddings scaled by sqrt(hidden)."""
    bias = bool(hf.get("attention_bias", False))
    return dict(norm_offset=1.0, embed_scale=math.sqrt(hf["hidden_size"]), hidden_act=gemma_activation(hf),
                tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)), qkv_bias=bias, o_bias=bias)


def gemma2_fields(hf: dict, sliding_every: int) -> dict:
    """Fields Gemma 2 and 3 share; ``sliding_every`` is the pattern length used when the
    config predates ``layer_types`` (every ``sliding_every``-th layer is global)."""
    n = hf["num_hidden_layers"]
    layer_types = hf.get("layer_types") or [
        "sliding_attention" if (i + 1) % sliding_every else "full_attention" for i in range(n)]
    scalar = hf.get("query_pre_attn_scalar")
    fields = gemma_fields(hf)
    fields.update(
        sandwich_norms=True,
        attn_scale=scalar ** -0.5 if scalar else None,
        attn_softcap=hf.get("attn_logit_softcapping"),
        final_softcap=hf.get("final_logit_softcapping"),
        sliding_window=hf.get("sliding_window") or hf.get("sliding_window_size"),
        layer_types=list(layer_types),
    )
    return fields


def layer_type_rope(hf: dict, layer_type: str, head_dim: int) -> RopeConfig:
    """Rope of one Gemma 3 layer type, from either config layout: transformers 5 writes
    ``rope_parameters`` keyed by layer type; older configs give ``rope_theta`` +
    ``rope_scaling`` for global layers and ``rope_local_base_freq`` for local ones."""
    max_pos = hf.get("max_position_embeddings", 131072)
    per_type = hf.get("rope_parameters") or {}
    if layer_type in per_type:
        params = dict(per_type[layer_type] or {})
        params.setdefault("rope_theta", _DEFAULT_THETA[layer_type])
        return RopeConfig.from_hf({"rope_parameters": params, "max_position_embeddings": max_pos}, head_dim)
    if layer_type == "full_attention":
        legacy = {"rope_theta": hf.get("rope_theta", _DEFAULT_THETA[layer_type]),
                  "rope_scaling": hf.get("rope_scaling"), "max_position_embeddings": max_pos}
        return RopeConfig.from_hf(legacy, head_dim)
    theta = hf.get("rope_local_base_freq", _DEFAULT_THETA[layer_type])
    return RopeConfig(head_dim=head_dim, theta=float(theta), max_position_embeddings=max_pos)


def gemma3_config(hf: dict) -> DecoderConfig:
    """Gemma 3 text: Gemma 2 plus per-head q/k norms and a 5:1 local/global layer pattern
    whose local layers have their own rope base; ``use_bidirectional_attention``
    (EmbeddingGemma) makes it non-causal."""
    fields = gemma2_fields(hf, sliding_every=hf.get("sliding_window_pattern") or 6)
    head_dim = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
    bidirectional = bool(hf.get("use_bidirectional_attention"))
    if bidirectional and fields["sliding_window"]:
        # The reference turns the configured window into a symmetric one of
        # half the size: |q - k| < window // 2 + 1.
        fields["sliding_window"] = fields["sliding_window"] // 2 + 1
    return base_config(hf, **fields, qk_norm=True, causal=not bidirectional,
                       rope=layer_type_rope(hf, "full_attention", head_dim),
                       local_rope=layer_type_rope(hf, "sliding_attention", head_dim))
