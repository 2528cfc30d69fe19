"""Small-M dense matmul kernels that plugins register for bf16/f16 linears on CPU.

A decode step of a few rows only streams the weight, and oneDNN's packed bf16 GEMM reads
it well below the memory bandwidth at M = 1-2 (measured 15-17 GB/s against 26-28 for a
plain float32 read on the same core). A plugin may register a kernel for those steps; the
quant plugin registers its C++ one (``mistralrs_quant.kernels.dense``).

A kernel works on the plain row-major weight, which oneDNN cannot use in its packed form
and which makes torch's own bf16 matmul 1.3-2x slower than the packed one for 16-256 rows
(measured; it re-lays the weight out on every call). Since a weight is held once, a layer
uses a kernel only where its model asks for it: ``prepack_linears(module, small_m=True)``
(``DenseWeight(w, small_m=True)``), for models that run many steps of a few rows and few
of many (Dia's decoder: 2 rows per request and frame; its encoder runs once per request).

A plugin registers a kernel through the hook ``mistralrs_register_dense_kernels``::

    register("cpp", "mistralrs_quant.kernels.dense:kernel", device_types=("cpu",))

The target is an object (see ``DenseKernel``) with

* ``supports(dtype, device) -> bool``: asked once per layer when it is built (weights of
  this dtype on this device, on this CPU);
* ``max_rows(dtype) -> int``: the kernel serves calls of at most this many rows (beyond,
  the layer runs torch's matmul on the plain weight);
* ``bind(w) -> mm``: called once per layer with its plain weight ``w`` [N, K] (contiguous);
  ``mm(x2d, bias, act, other) -> Tensor`` computes ``act(x2d @ w.T + bias) + other`` in
  ``w.dtype`` for ``x2d`` [M, K] in ``w.dtype``, ``bias`` [N] or None, ``act`` None or
  ``"gelu_tanh"``, ``other`` [M, N] or None (then ``act`` is None), the sum kept in float32
  and rounded once (as oneDNN's epilogue does).

Which kernel a layer gets is decided when it is built, from ``MISTRALRS_DENSE_KERNEL``:

* unset or ``auto``: the first registered kernel whose ``device_types`` hold the device
  and that supports the dtype;
* ``torch`` (or ``off``/``0``/``none``): none; the layer is prepacked for oneDNN as without
  ``small_m`` (exactly the behaviour without a plugin);
* a kernel name: that kernel only (if it declines, none); an unknown name is a ``ValueError``.
"""
from __future__ import annotations

from typing import Callable, Protocol

import torch

ENV = "MISTRALRS_DENSE_KERNEL"


class DenseKernel(Protocol):
    def supports(self, dtype: torch.dtype, device: torch.device) -> bool:
        ...

    def max_rows(self, dtype: torch.dtype) -> int:
        ...

    def bind(self, w: torch.Tensor) -> Callable[..., torch.Tensor]:
        ...


def kernel_for(dtype: torch.dtype, device: torch.device | str):
    """The registered kernel that would serve small-M calls on weights of ``dtype`` on
    ``device``, or None (the torch path)."""
    from mistralrs_core.plugins import select_kernels
    device = torch.device(device)
    for kernel in select_kernels("dense_kernels", ENV, device.type):
        if kernel.supports(dtype, device):
            return kernel
    return None
