"""Mixtral: Mistral whose feed-forward is a sparse mixture of SwiGLU experts (softmax over
all experts, top-k, renormalised). The MoE families start from here."""
from __future__ import annotations

import attrs

from mistralrs_arch_text.mistral import MistralForCausalLM
from mistralrs_core.layers.moe import MoEConfig, MoEWeightsMixin, SparseMoE
from mistralrs_core.models.decoder import DecoderConfig, DecoderLayer


@attrs.define
class MoEDecoderConfig(DecoderConfig):
    moe: MoEConfig | None = None
    moe_layers: list[bool] | None = None    # None: every layer is sparse

    def is_moe(self, layer: int) -> bool:
        return self.moe is not None and (self.moe_layers is None or self.moe_layers[layer])


def with_moe(cfg: DecoderConfig, moe: MoEConfig, moe_layers: list[bool] | None = None) -> MoEDecoderConfig:
    return MoEDecoderConfig(**attrs.asdict(cfg, recurse=False), moe=moe, moe_layers=moe_layers)


class MoEDecoderLayer(DecoderLayer):
    def build_mlp(self, cfg, layer):
        if cfg.is_moe(layer):
            return SparseMoE(cfg.moe, cfg.hidden_size)
        return super().build_mlp(cfg, layer)


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
