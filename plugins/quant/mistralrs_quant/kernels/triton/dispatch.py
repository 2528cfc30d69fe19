"""When the Triton kernels run, decided in one place.

Quantized weights (``GGMLQuantMethod``, ``AFQMethod``, ``HQQMethod``) and the paged
attention backend ``triton_paged_self_attention`` ask ``use_triton``: the kernels run when
the tensors live on a device in ``DEVICE_TYPES`` (CUDA), triton imports, and
``MISTRALRS_TRITON`` is not 0/false/no/off. CPU tensors keep their C++/torch paths.
Nothing here imports triton until a CUDA tensor asks, so CPU-only installs never need it.
Tests run the kernels on CPU under ``TRITON_INTERPRET=1`` by adding "cpu" to
``DEVICE_TYPES``.
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


def paged_attention(q, k, v, meta, cache, *, scale: float, **options) -> torch.Tensor:
    """The torch backend's ``attention`` with decode steps on the Triton kernel: q [T, Hq, D],
    k/v [T, Hkv, D] -> [T, Hq, Dv]. Prefill, and anything the kernel does not serve, runs
    the torch path unchanged."""
    from mistralrs_core.layers.attention import attention
    if use_triton(q):
        from .paged_attention import is_decode, paged_decode_attention
        if is_decode(meta, cache):
            cache.write(meta.slot_mapping, k, v)
            return paged_decode_attention(q, cache, meta, scale=scale, **options)
    return attention(q, k, v, meta, cache, scale=scale, **options)


def _backend():
    from mistralrs_core.layers.attention_backends import PagedSelfAttention

    class TritonPagedSelfAttention(PagedSelfAttention):
        """``PagedSelfAttention`` whose decode steps run the Triton paged-attention kernel."""

        def forward(self, q, k, v, batch, cache, *, scale: float, sliding_window=None, softcap=None,
                    sinks=None, chunk=None):
            return paged_attention(q, k, v, batch, cache, scale=scale, sliding_window=sliding_window,
                                   softcap=softcap, sinks=sinks, chunk=chunk)

    return TritonPagedSelfAttention()


def __getattr__(name):
    # Built on first use: importing this module must not import the core's layers.
    if name == "triton_paged_self_attention":
        globals()[name] = backend = _backend()
        return backend
    raise AttributeError(name)
