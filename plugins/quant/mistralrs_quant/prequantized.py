"""Pre-quantized safetensors checkpoints: GPTQ, AWQ, FP8 and (GPT-OSS) MXFP4.

``packed_weights(quant_config, weights)`` answers the core's ``mistralrs_packed_weights``
hook: it regroups the checkpoint stream so that each quantized layer arrives as one
``(prefix + ".weight", PrequantizedWeight)`` (stacked MoE tensors as one
``(prefix, MXFP4Stack)``), which the ``mistralrs_quant_method`` hook then installs as the
layer's method. A layer's parts are held only until the last one arrives; every other
tensor passes straight through. What is incomplete at the end of the stream is a
``ValueError`` naming the layer and the missing parts.

Format parameters come from config.json's ``quantization_config`` (``quant_config.params``),
read the way the producing libraries write them; unsupported variants (3-bit GPTQ, AWQ's
GEMV layout, E5M2 FP8 ...) are refused with a ``ValueError`` naming the field.
"""
from __future__ import annotations

from typing import Iterable, Iterator

import torch


class PrequantizedWeight:
    """One layer's weight from a pre-quantized checkpoint (``QuantizedWeight`` protocol)."""

    def __init__(self, method):
        self.method = method
        self.shape = (method.out_features, method.in_features)

    def dequantize(self) -> torch.Tensor:
        return self.method.dequantize()

    def quant_method(self, compute_dtype: torch.dtype | None = None):
        return self.method


class MXFP4Stack:
    """Stacked expert weights ``[E, out, in]`` in MXFP4 blocks (GPT-OSS). ``expert(e, rows)``
    gives one expert's rows as a ``PrequantizedWeight``, the way a family hands stacked
    experts to the loader one tensor at a time."""

    def __init__(self, blocks: torch.Tensor, scales: torch.Tensor):
        if blocks.dim() != 4 or blocks.shape[-1] != 16 or tuple(scales.shape) != tuple(blocks.shape[:3]):
            raise ValueError(f"MXFP4 expert blocks {tuple(blocks.shape)} / scales {tuple(scales.shape)}: "
                             "expected [E, out, in/32, 16] and [E, out, in/32]")
        self.blocks, self.scales = blocks, scales
        self.shape = (blocks.shape[0], blocks.shape[1], blocks.shape[2] * 32)

    def expert(self, e: int, rows: slice = slice(None)) -> PrequantizedWeight:
        from mistralrs_quant.formats.mxfp4_hf import MXFP4Method
        return PrequantizedWeight(MXFP4Method(self.blocks[e, rows].contiguous(), self.scales[e, rows].contiguous()))

    def dequantize(self) -> torch.Tensor:
        from mistralrs_quant.formats.mxfp4_hf import dequantize_mxfp4
        return dequantize_mxfp4(self.blocks, self.scales)


def packed_weights(quant_config, weights: Iterable) -> Iterator | None:
    kind = quant_config.kind
    params = dict(quant_config.params or {})
    if kind == "gptq":
        return _group_int(weights, _gptq_builder(params), ("qweight", "qzeros", "scales", "g_idx"),
                          ("qweight", "qzeros", "scales"), "GPTQ", wait_g_idx=bool(params.get("desc_act")))
    if kind == "awq":
        return _group_int(weights, _awq_builder(params), ("qweight", "qzeros", "scales"),
                          ("qweight", "qzeros", "scales"), "AWQ", wait_g_idx=False)
    if kind == "fp8":
        return _group_fp8(weights, params)
    if kind == "mxfp4":
        return _group_mxfp4(weights)
    return None


# --- GPTQ / AWQ ----------------------------------------------------------------------
def _gptq_builder(params: dict):
    from mistralrs_quant.formats.gptq import GPTQMethod, _check_bits
    bits = _check_bits(params.get("bits", 4), "GPTQ", (2, 4, 8))
    group = int(params.get("group_size", 128))
    fmt = str(params.get("checkpoint_format", "gptq")).lower()
    if fmt not in ("gptq", "gptq_v2"):
        raise ValueError(f"quantization_config.checkpoint_format: {fmt!r} is not supported (gptq, gptq_v2)")

    def build(parts: dict) -> GPTQMethod:
        return GPTQMethod(parts["qweight"], parts["qzeros"], parts["scales"], parts.get("g_idx"), bits=bits,
                          group_size=group, zeros_minus_one=fmt == "gptq")
    return build


def _awq_builder(params: dict):
    from mistralrs_quant.formats.gptq import AWQMethod, _check_bits
    bits = _check_bits(params.get("bits", params.get("w_bit", 4)), "AWQ", (4,))
    group = int(params.get("group_size", params.get("q_group_size", 128)))
    version = str(params.get("version", "gemm")).lower()
    if version != "gemm":
        raise ValueError(f"quantization_config.version: AWQ {version!r} layout is not supported (gemm)")
    if params.get("zero_point", True) is False:
        raise ValueError("quantization_config.zero_point: AWQ without zero points is not supported")

    def build(parts: dict) -> AWQMethod:
        return AWQMethod(parts["qweight"], parts["qzeros"], parts["scales"], bits=bits, group_size=group)
    return build


def _default_g_idx(n: int, group: int) -> torch.Tensor:
    return torch.arange(n, dtype=torch.int64) // group


def _group_int(weights, build, parts_all, required, label: str, wait_g_idx: bool):
    pending: dict[str, dict[str, torch.Tensor]] = {}
    done: dict[str, object] = {}
    for name, value in weights:
        prefix, _, part = name.rpartition(".")
        if part not in parts_all:
            yield name, value
            continue
        if prefix in done:
            # a g_idx after its layer was built (shard order): it must be the default order
            method = done[prefix]
            if part == "g_idx" and torch.equal(value.to(torch.int64), method.g_idx):
                continue
            raise ValueError(f"{name}: arrived after its {label} layer was assembled and disagrees with it "
                             "(quantization_config.desc_act should be true for a reordered g_idx)")
        group = pending.setdefault(prefix, {})
        group[part] = value
        del value
        if all(p in group for p in required) and (not wait_g_idx or "g_idx" in group):
            method = build(pending.pop(prefix))
            if label == "GPTQ":
                done[prefix] = method
            yield prefix + ".weight", PrequantizedWeight(method)
    for prefix, group in pending.items():
        if "qweight" not in group:
            # tensors that merely share a part's name (e.g. a module's own `scales`)
            yield from ((f"{prefix}.{p}", t) for p, t in group.items())
            continue
        missing = [p for p in required if p not in group] + (["g_idx"] if wait_g_idx and "g_idx" not in group else [])
        raise ValueError(f"{label} layer {prefix!r} is missing {', '.join(missing)} in the checkpoint")


# --- FP8 -----------------------------------------------------------------------------
def _group_fp8(weights, params: dict):
    from mistralrs_quant.formats.fp8 import FP8Method
    fmt = str(params.get("fmt", "e4m3")).lower()
    if fmt != "e4m3":
        raise ValueError(f"quantization_config.fmt: FP8 {fmt!r} is not supported (e4m3)")
    block = params.get("weight_block_size")
    if block is not None:
        if len(block) != 2:
            raise ValueError(f"quantization_config.weight_block_size: expected [rows, cols], got {block!r}")
        block = (int(block[0]), int(block[1]))
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for name, value in weights:
        prefix, _, part = name.rpartition(".")
        if part == "input_scale":
            # static activation scales: activations stay in the model dtype here, so the
            # product is the dequantized weight's (the dequantize-then-matmul reference)
            continue
        is_fp8_weight = part == "weight" and isinstance(value, torch.Tensor) and value.dtype == torch.float8_e4m3fn
        if not (is_fp8_weight or part in ("weight_scale_inv", "weight_scale")):
            yield name, value
            continue
        group = pending.setdefault(prefix, {})
        group[part] = value
        del value
        scale = group.get("weight_scale_inv", group.get("weight_scale"))
        if "weight" in group and scale is not None:
            pending.pop(prefix)
            yield prefix + ".weight", PrequantizedWeight(FP8Method(group["weight"], scale.to(torch.float32),
                                                                   block if scale.numel() > 1 else None))
    for prefix, group in pending.items():
        have = "weight" if "weight" in group else "scale"
        need = "weight_scale_inv" if have == "weight" else "float8 weight"
        raise ValueError(f"FP8 layer {prefix!r} has a {have} but no {need} in the checkpoint")


# --- MXFP4 (GPT-OSS experts) -------------------------------------------------------------
def _group_mxfp4(weights):
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for name, value in weights:
        if not name.endswith(("_blocks", "_scales")):
            yield name, value
            continue
        prefix, part = name[:-7], name[-6:]
        group = pending.setdefault(prefix, {})
        group[part] = value
        del value
        if len(group) == 2:
            pending.pop(prefix)
            yield prefix, MXFP4Stack(group["blocks"], group["scales"])
    for prefix, group in pending.items():
        missing = "scales" if "blocks" in group else "blocks"
        raise ValueError(f"MXFP4 tensor {prefix!r} has no {prefix}_{missing} in the checkpoint")


def prequantized_quant_method(weight):
    """The ``mistralrs_quant_method`` answer for a grouped pre-quantized weight."""
    if isinstance(weight, PrequantizedWeight):
        return weight.quant_method()
    return None
