"""Phi-3.5-MoE: Mixtral with LayerNorms, biased attention and LM head, the "sparsemixer"
top-2 routing, and LongRoPE whose cos/sin scale switches between ``short_mscale`` and
``long_mscale``."""
from __future__ import annotations

import attrs
import torch

from mistralrs_arch_text.mixtral import MixtralForCausalLM
from mistralrs_core.layers.rope import RotaryEmbedding


class PhiMoERotary(RotaryEmbedding):
    def inv_freq_for(self, positions):
        p = self.cfg.params
        if "short_mscale" not in p or not positions.numel():
            return super().inv_freq_for(positions)
        # The reference keeps the short factors at every length; only the scale switches.
        long = int(positions.max()) + 1 > p["original_max_position_embeddings"]
        return self._inv, float(p["long_mscale" if long else "short_mscale"])


class PhiMoEForCausalLM(MixtralForCausalLM):
    def __init__(self, cfg, dtype=torch.float32):
        super().__init__(cfg, dtype)
        if self.rope is not None:
            self.rope = PhiMoERotary(cfg.rope)

    @classmethod
    def config_from_hf(cls, hf):
        cfg = MixtralForCausalLM.config_from_hf(hf)
        bias = bool(hf.get("attention_bias", False))
        moe = attrs.evolve(cfg.moe, scoring="sparsemixer", jitter_eps=hf.get("router_jitter_noise", 0.01),
                           weights_fp32=False)
        return attrs.evolve(cfg, norm_kind="layer", norm_eps=hf.get("rms_norm_eps", 1e-5), qkv_bias=bias,
                            o_bias=bias, lm_head_bias=bool(hf.get("lm_head_bias", False)), moe=moe)
