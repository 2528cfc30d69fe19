"""Mixtral: Mistral whose feed-forward is a sparse mixture of SwiGLU experts (softmax over
all experts, top-k, renormalised). The MoE families start from here."""
from __future__ import annotations

from mistralrs_arch_text.mistral import MistralForCausalLM
from mistralrs_core.layers.moe import MoEConfig, MoEWeightsMixin
from mistralrs_core.models.moe_decoder import MoEDecoderLayer, with_moe


class MixtralForCausalLM(MoEWeightsMixin, MistralForCausalLM):
    layer_cls = MoEDecoderLayer

    @classmethod
    def config_from_hf(cls, hf):
        return with_moe(MistralForCausalLM.config_from_hf(hf), MoEConfig(
            num_experts=hf["num_local_experts"], top_k=hf["num_experts_per_tok"],
            intermediate_size=hf["intermediate_size"], hidden_act=hf.get("hidden_act", "silu"),
            renormalize=True))

    def map_weight_name(self, name):
        # Checkpoints name the sparse block ``block_sparse_moe``; the decoder calls it ``mlp``.
        return super().map_weight_name(name.replace(".block_sparse_moe.", ".mlp."))
