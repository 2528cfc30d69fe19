"""Phi-3.5-MoE: Mixtral with LayerNorms, biased attention and LM head, the "sparsemixer"
top-2 routing, and LongRoPE whose cos/sin scale switches between ``short_mscale`` and
``long_mscale``."""
from __future__ import annotations

import attrs
import torch

from mistralrs_arch_text.mixtral import MixtralForCausalLM
from mistralrs_core.layers.rope import RotaryEmbedding


class PhiMoERotary(RotaryEmbedding):
    """The reference keeps the short factors at every length and only switches the scale,
    on the length of the sequence being run. Here that length is taken per token (its own
    sequence's context length) so a sequence's numbers do not depend on its batch."""

    seq_lens: torch.Tensor | None = None

    def cos_sin(self, positions, dtype):
        p = self.cfg.params
        if "short_mscale" not in p:
            return super().cos_sin(positions, dtype)
        freqs = positions.to(torch.float32)[:, None] * self._inv.to(positions.device)[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        lens = self.seq_lens if self.seq_lens is not None else positions.max() + 1
        scale = torch.where(lens > p["original_max_position_embeddings"], p["long_mscale"], p["short_mscale"])
        scale = scale.to(torch.float32).reshape(-1, 1)
        return (emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)


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

    def forward_embeds(self, h, positions, meta, caches):
        if self.rope is not None:
            self.rope.seq_lens = torch.repeat_interleave(
                torch.tensor(meta.context_lens), torch.tensor(meta.query_lens)).to(positions.device)
        return super().forward_embeds(h, positions, meta, caches)
