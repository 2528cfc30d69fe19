"""Qwen2: Llama with q/k/v biases; layers from ``max_window_layers`` on may slide."""
from __future__ import annotations

from mistralrs_arch_text.llama import LlamaForCausalLM
from mistralrs_core.models.text_config import base_config


def qwen_sliding(hf: dict) -> dict:
    """``sliding_window`` counts only with ``use_sliding_window``: released Qwen configs carry a
    window they never use."""
    window = hf.get("sliding_window") if hf.get("use_sliding_window") else None
    types = hf.get("layer_types")
    if types is None:
        start = hf.get("max_window_layers", 28)
        types = ["sliding_attention" if window is not None and i >= start else "full_attention"
                 for i in range(hf["num_hidden_layers"])]
    return dict(sliding_window=window, layer_types=types)


class Qwen2ForCausalLM(LlamaForCausalLM):
    @classmethod
    def config_from_hf(cls, hf):
        return base_config(hf, qkv_bias=True, **qwen_sliding(hf))
