"""The protocol between the shared layers and quantization plugins.

A weight source (GGUF reader, UQFF) may hand the loader an object implementing
``QuantizedWeight`` instead of a tensor. Whether a layer keeps it packed is decided in one
place for every source, ISQ included: the ``mistralrs_quant_method`` hook
(``loading/weights.py`` calls it for each ``Linear``/``Embedding`` weight), whose answer is
a ``QuantMethod`` the layer runs. A packed weight no plugin claims, or one that belongs to
another parameter (a norm), is used through ``dequantize()``. Format-specific code
therefore lives only in the plugin that defines the object.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class QuantMethod(Protocol):
    out_features: int
    in_features: int

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W.T`` for ``x`` of shape [..., in_features] (no bias)."""

    def embedding(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows ``W[ids]``, dequantized (used for token embeddings)."""

    def dequantize(self) -> torch.Tensor:
        """The whole weight as a float32 [out, in] tensor."""


@runtime_checkable
class QuantizedWeight(Protocol):
    shape: tuple[int, ...]

    def dequantize(self) -> torch.Tensor:
        ...

    def quant_method(self, compute_dtype: torch.dtype) -> QuantMethod:
        ...
