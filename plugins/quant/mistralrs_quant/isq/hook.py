"""The ``mistralrs_quant_method`` answer under ``QuantConfig(kind="isq")``: quantize one
checkpoint tensor as it streams in and return the layer's method.

The loader hands each weight over before it is cast or moved and drops it right after,
so at most one dense tensor (plus this module's float32 slab, see ``quantize``) is alive.
GGML types become a ``GGMLQuantMethod`` (the C++ kernels and the fused decoder step serve
them exactly as a GGUF file's); the other families' classes come from the registry.
A row length that is not a whole number of blocks falls back as upstream does (Q4K ->
Q4_1, Q6K -> Q5_1, ...; Q4_0/Q5_0/Q8_0 and the rest: kept dense).
"""
from __future__ import annotations

import logging
from typing import Optional

import torch

from mistralrs_core.loading.page_release import release_tensor_pages

from ..formats import T
from .quantize import can_quantize, quantize_tensor
from .types import IsqType, parse_isq_type

log = logging.getLogger(__name__)

# Upstream's get_fallback: a K-quant whose rows are not whole 256-blocks -> a 32-block type.
_FALLBACK = {T.Q2_K: T.Q4_0, T.Q3_K: T.Q4_0, T.Q4_K: T.Q4_1, T.Q5_K: T.Q5_0, T.Q6_K: T.Q5_1, T.Q8_K: T.Q8_1}


def ggml_type_for(ggml_type: int, in_features: int) -> Optional[int]:
    """The type a row of ``in_features`` is stored in (after fallbacks), None to keep it dense."""
    t = ggml_type
    while t is not None and not can_quantize(t, in_features):
        t = _FALLBACK.get(t)
    return t


def quantize_weight(weight: torch.Tensor, isq: IsqType, compute_dtype: torch.dtype = torch.float32,
                    device=None, imatrix: Optional[torch.Tensor] = None, cpp_impl: Optional[str] = None,
                    release: bool = False):
    """One dense weight [out, in] -> a quant method of type ``isq`` (None: stays dense).
    ``release``: ``weight`` is a checkpoint tensor nobody reads again once quantized, so its
    memory-mapped pages are given back (``mistralrs_core.loading.page_release``)."""
    if isq.is_ggml:
        from ..qlinear import GGMLQuantMethod
        t = ggml_type_for(isq.ggml_type, weight.shape[1])
        if t is None:
            log.warning("ISQ %s: rows of %d values are not whole blocks; layer kept dense", isq.name, weight.shape[1])
            return None
        raw = quantize_tensor(weight, t, imatrix, release=release)
        if device is not None and torch.device(device).type != "cpu":
            raw = raw.to(device)
        return GGMLQuantMethod(raw, t, compute_dtype=compute_dtype, cpp_impl=cpp_impl)
    cls = isq.load_class()
    method = cls.from_float(weight, isq.kwargs.get("bits"), isq.kwargs.get("group_size"), device)
    if release:
        release_tensor_pages(weight)
    return method


def isq_quant_method(quant_config, hf_name: str, module, weight):
    if quant_config.kind != "isq" or not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        return None
    name = quant_config.for_layer(hf_name, module)
    if name is None:
        return None
    try:
        isq = parse_isq_type(name)
    except ValueError:
        return None   # a type another plugin serves (names are checked when the load starts)
    plan = quant_config.plan
    imatrix = plan.imatrix_for(hf_name) if plan is not None else None
    # The loader drops the dense tensor once quantized, but its pages would stay resident
    # for as long as the checkpoint is mapped: without the release, peak RSS during ISQ
    # is the whole float checkpoint plus the quantized model.
    method = quantize_weight(weight, isq, quant_config.compute_dtype or torch.float32, quant_config.device,
                             imatrix, getattr(plan, "cpp_impl", None), release=True)
    tick = getattr(plan, "tick", None)
    if tick is not None:
        tick()
    return method
