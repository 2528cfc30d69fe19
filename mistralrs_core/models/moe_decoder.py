"""The decoder whose feed-forward is (on some or all layers) a sparse mixture of experts.

Shared by every MoE family in any plugin (Mixtral, Qwen3-MoE, DeepSeek, GPT-OSS, Granite
hybrid, and the language towers of MoE vision models)."""
from __future__ import annotations

import attrs

from mistralrs_core.layers.moe import MoEConfig, SparseMoE
from mistralrs_core.models.decoder import DecoderConfig, DecoderLayer


@attrs.define
class MoEDecoderConfig(DecoderConfig):
    moe: MoEConfig | None = None
    moe_layers: list[bool] | None = None    # None: every layer is sparse

    def is_moe(self, layer: int) -> bool:
        return self.moe is not None and (self.moe_layers is None or self.moe_layers[layer])


def with_moe(cfg: DecoderConfig, moe: MoEConfig, moe_layers: list[bool] | None = None) -> MoEDecoderConfig:
    """``cfg`` with its feed-forward made sparse on ``moe_layers`` (all layers when None)."""
    return MoEDecoderConfig(**attrs.asdict(cfg, recurse=False), moe=moe, moe_layers=moe_layers)


class MoEDecoderLayer(DecoderLayer):
    def build_mlp(self, cfg, layer):
        if cfg.is_moe(layer):
            return SparseMoE(cfg.moe, cfg.hidden_size)
        return super().build_mlp(cfg, layer)
