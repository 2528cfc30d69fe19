"""Gemma 2: Gemma with sandwich norms, logit soft-capping and alternating sliding/full layers."""
from __future__ import annotations

from mistralrs_arch_text.gemma import GemmaForCausalLM, gemma_fields
from mistralrs_core.models.text_config import base_config


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


class Gemma2ForCausalLM(GemmaForCausalLM):
    @classmethod
    def config_from_hf(cls, hf):
        return base_config(hf, **gemma2_fields(hf, sliding_every=2))
