"""Qwen3-VL-MoE (Qwen3-VL-30B-A3B, 235B-A22B): Qwen3-VL (tower, deepstack, interleaved
M-RoPE, processor: ``qwen3_vl.py``) whose text layers' feed-forward is a sparse mixture of
SwiGLU experts (softmax router, top-k, always renormalised) on every ``decoder_sparse_step``-th
layer outside ``mlp_only_layers``.

Checkpoints store each layer's experts stacked: the hub's ``experts.gate_up_proj`` [E, H, 2I]
(gate columns, then up) and ``experts.down_proj`` [E, I, H]; transformers 5 keeps them
transposed ([E, 2I, H], [E, H, I]) and reads either, telling them apart by shape (an
ambiguous square shape is taken as its own layout, as there). Loading hands them on one
expert tensor at a time under per-expert names, so ``MoEWeightsMixin`` stacks them (or the
quantization hook takes them) as for any MoE checkpoint.
"""
from __future__ import annotations

import torch

from mistralrs_core.layers.moe import MoEConfig, MoEWeightsMixin
from mistralrs_core.models.moe_decoder import MoEDecoderLayer, with_moe

from mistralrs_arch_vision.qwen3_vl import Qwen3VLForConditionalGeneration, text_config_of

# transformers' Qwen3VLMoeTextConfig defaults (Qwen3MoeConfig's, with its own overrides).
QWEN3_VL_MOE_TEXT_DEFAULTS = dict(vocab_size=151_936, hidden_size=2048, intermediate_size=5632, num_hidden_layers=24,
                                  num_attention_heads=16, num_key_value_heads=16, hidden_act="silu",
                                  max_position_embeddings=128_000, rms_norm_eps=1e-6, rope_theta=500_000.0,
                                  attention_bias=False, decoder_sparse_step=1, moe_intermediate_size=1408,
                                  num_experts_per_tok=4, mlp_only_layers=[])
_NUM_EXPERTS = 60


class Qwen3VLMoeForConditionalGeneration(MoEWeightsMixin, Qwen3VLForConditionalGeneration):
    layer_cls = MoEDecoderLayer

    @classmethod
    def text_config_of(cls, hf: dict) -> dict:
        return text_config_of(hf, "qwen3_vl_moe_text", QWEN3_VL_MOE_TEXT_DEFAULTS)

    @classmethod
    def config_from_hf(cls, text: dict):
        cfg = super().config_from_hf(text)
        n, step, dense = cfg.num_layers, int(text["decoder_sparse_step"]), text.get("mlp_only_layers") or []
        # The hub's configs say num_experts, transformers 5 writes num_local_experts.
        experts = int(text.get("num_experts", text.get("num_local_experts", _NUM_EXPERTS)))
        sparse = [i not in dense and experts > 0 and (i + 1) % step == 0 for i in range(n)]
        # The router always renormalises its top-k (Qwen3-MoE's norm_topk_prob is not read)
        # and the weights combine in the activation dtype.
        return with_moe(cfg, MoEConfig(num_experts=experts, top_k=int(text["num_experts_per_tok"]),
                                       intermediate_size=int(text["moe_intermediate_size"]),
                                       hidden_act=text.get("hidden_act", "silu"), renormalize=True,
                                       weights_fp32=False), sparse)

    def route_weights(self, weights, loader):
        h, i = self.cfg.hidden_size, self.cfg.moe.intermediate_size

        def per_expert():
            for name, value in weights:
                base, _, which = name.rpartition(".")
                if not base.endswith(".experts") or which not in ("gate_up_proj", "down_proj") \
                        or not isinstance(value, torch.Tensor):
                    yield name, value
                    continue
                ours = (2 * i, h) if which == "gate_up_proj" else (h, i)
                if tuple(value.shape[1:]) != ours:
                    if tuple(value.shape[1:]) != ours[::-1]:
                        raise ValueError(f"{name}: shape {tuple(value.shape)} is neither [E, {ours[0]}, "
                                         f"{ours[1]}] nor [E, {ours[1]}, {ours[0]}]")
                    value = value.transpose(1, 2)
                for e in range(value.shape[0]):
                    if which == "gate_up_proj":
                        yield f"{base}.{e}.gate_proj.weight", value[e, :i]
                        yield f"{base}.{e}.up_proj.weight", value[e, i:]
                    else:
                        yield f"{base}.{e}.down_proj.weight", value[e]
        return super().route_weights(per_expert(), loader)
