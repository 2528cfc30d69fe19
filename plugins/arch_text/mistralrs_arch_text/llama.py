"""Llama: the plain pre-norm decoder that most other families start from."""
from __future__ import annotations

from mistralrs_core.models.decoder import DecoderLM
from mistralrs_core.models.text_config import base_config


class LlamaForCausalLM(DecoderLM):
    @classmethod
    def config_from_hf(cls, hf):
        bias = bool(hf.get("attention_bias", False))
        return base_config(hf, qkv_bias=bias, o_bias=bias, mlp_bias=bool(hf.get("mlp_bias", False)))
