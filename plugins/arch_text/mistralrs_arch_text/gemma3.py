"""Gemma 3 (text): Gemma 2 plus per-head q/k norms, a 5:1 local/global layer pattern whose
local layers use their own rope base, and optional bidirectional attention (EmbeddingGemma)."""
from __future__ import annotations

from mistralrs_arch_text.gemma2 import Gemma2ForCausalLM, gemma2_fields
from mistralrs_core.layers.rope import RopeConfig
from mistralrs_core.models.text_config import base_config

_DEFAULT_THETA = {"full_attention": 1_000_000.0, "sliding_attention": 10_000.0}


def layer_type_rope(hf: dict, layer_type: str, head_dim: int) -> RopeConfig:
    """Rope of one layer type, from either config layout: transformers 5 writes
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


class Gemma3ForCausalLM(Gemma2ForCausalLM):
    @classmethod
    def config_from_hf(cls, hf):
        fields = gemma2_fields(hf, sliding_every=hf.get("sliding_window_pattern", 6))
        head_dim = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
        bidirectional = bool(hf.get("use_bidirectional_attention"))
        if bidirectional and fields["sliding_window"]:
            # The reference turns the configured window into a symmetric one of
            # half the size: |q - k| < window // 2 + 1.
            fields["sliding_window"] = fields["sliding_window"] // 2 + 1
        return base_config(hf, **fields, qk_norm=True, causal=not bidirectional,
                           rope=layer_type_rope(hf, "full_attention", head_dim),
                           local_rope=layer_type_rope(hf, "sliding_attention", head_dim))
