"""SmolLM3: Llama where every ``no_rope_layer_interval``-th layer has no rotary embedding
(NoPE); when ``use_sliding_window`` is set, those NoPE layers are the sliding ones."""
from __future__ import annotations

from mistralrs_arch_text.llama import LlamaForCausalLM
from mistralrs_core.models.text_config import base_config


class SmolLM3ForCausalLM(LlamaForCausalLM):
    @classmethod
    def config_from_hf(cls, hf):
        n = hf["num_hidden_layers"]
        use_rope = hf.get("no_rope_layers")
        if use_rope is None:
            every = hf.get("no_rope_layer_interval", 4)
            use_rope = [int((i + 1) % every != 0) for i in range(n)]
        window = hf.get("sliding_window") if hf.get("use_sliding_window") else None
        types = hf.get("layer_types")
        if types is None:
            types = ["sliding_attention" if window is not None and not use_rope[i] else "full_attention"
                     for i in range(n)]
        bias = bool(hf.get("attention_bias", False))
        return base_config(hf, qkv_bias=bias, o_bias=bias, mlp_bias=bool(hf.get("mlp_bias", False)),
                           no_rope_layers=list(use_rope), sliding_window=window, layer_types=types)
