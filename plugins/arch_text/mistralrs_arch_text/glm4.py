"""GLM-4 (model_type ``glm4``): the attention and MLP outputs are each RMS-normed again
before their residual add; fused ``gate_up_proj``; rotary on half of each head in the
interleaved (even, odd) layout."""
from __future__ import annotations

from mistralrs_arch_text.llama import LlamaForCausalLM
from mistralrs_core.layers.rope import RopeConfig
from mistralrs_core.models.decoder import DecoderLayer, make_norm
from mistralrs_core.models.text_config import base_config


class Glm4DecoderLayer(DecoderLayer):
    def __init__(self, cfg, layer):
        super().__init__(cfg, layer)
        self.post_self_attn_layernorm = make_norm(cfg)
        self.post_mlp_layernorm = make_norm(cfg)

    def forward(self, h, rope_cs, meta, cache):
        a = self.self_attn(self.input_layernorm(h), rope_cs, meta, cache)
        h = h + self.post_self_attn_layernorm(a)
        return h + self.post_mlp_layernorm(self.mlp(self.post_attention_layernorm(h)))


class Glm4ForCausalLM(LlamaForCausalLM):
    layer_cls = Glm4DecoderLayer

    @classmethod
    def config_from_hf(cls, hf):
        head_dim = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
        return base_config(hf, rope=RopeConfig.from_hf(hf, head_dim, default_partial=0.5),
                           rope_interleaved=True, qkv_bias=bool(hf.get("attention_bias", True)),
                           mlp_fused=True)
