"""GPT-OSS: Mixtral-like MoE with attention sinks, alternating sliding/full layers, biased
attention, YaRN, a biased router (top-k on logits, softmax over the k) and experts with
biases and a clamped SwiGLU, ``(up + 1) * gate * sigmoid(alpha * gate)``.

Checkpoints store the experts fused and transposed, ``gate_up_proj`` [E, H, 2I] with gate
and up interleaved column by column; loading hands them on as per-expert gate/up/down
tensors (``experts.N.gate_proj`` ...), which ``MoEWeightsMixin`` stacks into the [E, 2I, H]
layout of ``MoEExperts`` or gives to the quantization hook."""
from __future__ import annotations

import torch

from mistralrs_arch_text.mixtral import MixtralForCausalLM
from mistralrs_core.errors import NotAvailableYet
from mistralrs_core.layers.moe import MoEConfig
from mistralrs_core.layers.norms import RMSNorm
from mistralrs_core.models.moe_decoder import with_moe
from mistralrs_core.models.text_config import base_config


def _deinterleave(t: torch.Tensor) -> torch.Tensor:
    """[..., 2I] with (g0, u0, g1, u1, ...) -> [..., 2I] with (g0..g_{I-1}, u0..u_{I-1})."""
    return torch.cat((t[..., 0::2], t[..., 1::2]), -1)


class GptOssForCausalLM(MixtralForCausalLM):
    def __init__(self, cfg, dtype=torch.float32):
        super().__init__(cfg, dtype)
        for m in self.modules():
            if isinstance(m, RMSNorm):
                m.cast_before_scale = False     # the reference scales in float32, then casts

    @classmethod
    def config_from_hf(cls, hf):
        bias = bool(hf.get("attention_bias", True))
        cfg = base_config(hf, qkv_bias=bias, o_bias=bias, attn_sinks=True, sliding_window=hf.get("sliding_window"),
                          layer_types=hf.get("layer_types"))
        return with_moe(cfg, MoEConfig(
            num_experts=hf["num_local_experts"], top_k=hf.get("num_experts_per_tok") or hf["experts_per_token"],
            intermediate_size=hf["intermediate_size"], softmax_after_topk=True, router_bias=True,
            router_name="router", weights_fp32=False, expert_bias=True, activation="clamped_swiglu",
            swiglu_alpha=float(hf.get("swiglu_alpha", 1.702)), swiglu_limit=float(hf.get("swiglu_limit", 7.0))))

    def route_weights(self, weights, loader):
        def converted():
            for name, value in weights:
                if name.endswith(("_blocks", "_scales")):
                    raise NotAvailableYet("GPT-OSS MXFP4 expert weights without quantization_config",
                                          "config.json must say quant_method \"mxfp4\" (mistralrs-quant reads it)")
                # Stacked experts are handed on one expert tensor at a time, under per-expert
                # names, so that they reach the quantization hook like any other checkpoint's.
                if not isinstance(value, torch.Tensor) and name.endswith(("experts.gate_up_proj",
                                                                           "experts.down_proj")):
                    # Packed stacks (MXFP4) are stored [E, out, in] with gate/up rows
                    # interleaved; `expert(e, rows)` hands on one expert's rows still packed.
                    base, _, which = name.rpartition(".")
                    for e in range(value.shape[0]):
                        if which == "gate_up_proj":
                            yield f"{base}.{e}.gate_proj.weight", value.expert(e, slice(0, None, 2))
                            yield f"{base}.{e}.up_proj.weight", value.expert(e, slice(1, None, 2))
                        else:
                            yield f"{base}.{e}.down_proj.weight", value.expert(e)
                    continue
                if name.endswith("experts.gate_up_proj"):
                    stacked = _deinterleave(value).transpose(1, 2)          # [E, 2I, H]
                    i = stacked.shape[1] // 2
                    for e in range(stacked.shape[0]):
                        yield f"{name[:-len('gate_up_proj')]}{e}.gate_proj.weight", stacked[e, :i]
                        yield f"{name[:-len('gate_up_proj')]}{e}.up_proj.weight", stacked[e, i:]
                    continue
                if name.endswith("experts.down_proj"):
                    stacked = value.transpose(1, 2)                          # [E, H, I]
                    for e in range(stacked.shape[0]):
                        yield f"{name[:-len('down_proj')]}{e}.down_proj.weight", stacked[e]
                    continue
                if name.endswith("experts.gate_up_proj_bias"):
                    value = _deinterleave(value)
                yield name, value
        return super().route_weights(converted(), loader)
