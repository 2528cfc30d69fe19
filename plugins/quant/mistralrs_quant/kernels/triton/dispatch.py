"""When the Triton kernels run, decided in one place.

Quantized weights (``GGMLQuantMethod``, ``AFQMethod``, ``HQQMethod``) ask ``use_triton``:
the kernels run when the tensors live on a device in ``DEVICE_TYPES`` (CUDA), triton
imports, and ``MISTRALRS_TRITON`` is not 0/false/no/off. CPU tensors keep their C++/torch
paths. Nothing here imports triton until a CUDA tensor asks, so CPU-only installs never
need it. Tests run the kernels on CPU under ``TRITON_INTERPRET=1`` by adding "cpu" to
``DEVICE_TYPES``.

Paged attention: ``decode_attention`` is the core's decode-attention kernel
(``mistralrs_core.layers.decode_kernels``), which the core asks on pure-decode steps on
CUDA (or on any device when ``MISTRALRS_DECODE_ATTENTION=triton``); it declines when triton
is missing or ``MISTRALRS_TRITON`` is off, and the core's torch path runs instead.
"""
from __future__ import annotations

import logging
import os
from functools import lru_cache

import torch

ENV = "MISTRALRS_TRITON"
DEVICE_TYPES = {"cuda"}

log = logging.getLogger(__name__)


@lru_cache(maxsize=1)
def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except Exception as e:  # ImportError, or a broken install failing at import
        log.info("mistralrs_quant: triton unavailable (%s); CUDA quantized matmuls use the torch paths", e)
        return False
    return True


def switched_off() -> bool:
    return os.environ.get(ENV, "").strip().lower() in ("0", "false", "no", "off")


def use_triton(t: torch.Tensor) -> bool:
    """Whether a weight held in ``t`` (or an activation on its device) uses the kernels."""
    return t.device.type in DEVICE_TYPES and not switched_off() and triton_importable()


def ggml_supported(ggml_type: int) -> bool:
    from ...formats import GGML_TYPES
    spec = GGML_TYPES.get(int(ggml_type))
    return spec is not None and spec.block_size in (32, 256)


def ggml_view(raw: torch.Tensor, ggml_type: int):
    from ...formats import get_format
    from .quant_matmul import ggml_view as view
    spec = get_format(ggml_type)
    return view(raw.contiguous(), spec.ggml_type, spec.block_size, spec.type_size)


def afq_view(method):
    from .quant_matmul import afq_view as view
    if getattr(method, "_triton_view", None) is None:
        method._triton_view = view(method.w_q, method.scales, method.biases, method.bits, method.group_size)
    return method._triton_view


def hqq_view(method):
    from .quant_matmul import hqq_view as view
    if getattr(method, "_triton_view", None) is None:
        method._triton_view = view(method.w_q, method.scales, method.zeros, method.out_features,
                                   method.in_features, method.bits, method.group_size)
    return method._triton_view


def matmul(x: torch.Tensor, view, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``x`` [..., K] @ W.T -> [..., N] through the kernels."""
    from .quant_matmul import matmul as mm
    lead = x.shape[:-1]
    return mm(x.reshape(-1, x.shape[-1]), view, out_dtype).reshape(*lead, view.n)


def dequantize(view) -> torch.Tensor:
    from .quant_matmul import dequantize as deq
    return deq(view)


class TritonDecodeAttention:
    """The paged-attention decode kernel as the core's decode-attention kernel
    (``mistralrs_core.layers.decode_kernels``; registered for CUDA in ``plugin.py``)."""

    def supports(self, q, cache, meta, *, sliding_window=None, softcap=None, sinks=None, chunk=None) -> bool:
        if switched_off() or not triton_importable():
            return False
        kc, vc = cache.k, cache.v
        if q.dtype not in _FLOAT_TYPES or not (getattr(cache, "fp8", False) or kc.dtype in _FLOAT_TYPES):
            return False
        if q.dim() != 3 or q.shape[-1] != kc.shape[-1] or q.shape[1] % kc.shape[2] or vc.shape[2] != kc.shape[2]:
            return False
        if kc.device != q.device:
            return False
        if sinks is not None and sinks.numel() != q.shape[1]:
            return False
        from . import paged_attention as pa
        # CPU tensors (named through MISTRALRS_DECODE_ATTENTION=triton) run only in the
        # interpreter; a compiled kernel would be handed host pointers.
        return q.device.type == "cuda" or type(pa._paged_decode_kernel).__name__ == "InterpretedFunction"

    def __call__(self, q, cache, meta, *, scale: float, sliding_window=None, softcap=None, sinks=None,
                 chunk=None):
        from . import paged_attention as pa
        return pa.paged_decode_attention(q, cache, meta, scale=scale, sliding_window=sliding_window,
                                         softcap=softcap, sinks=sinks, chunk=chunk)


_FLOAT_TYPES = (torch.float32, torch.float16, torch.bfloat16)
decode_attention = TritonDecodeAttention()
