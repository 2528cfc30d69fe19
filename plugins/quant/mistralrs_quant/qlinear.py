"""A linear layer's weight held in a ggml block format.

``GGMLQuantMethod`` implements ``mistralrs_core.layers.quantized.QuantMethod``. It picks
one of four execution paths per call:

``cpp``     the C++ kernels of ``kernels.cpp`` (CPU, Q4_0/Q4_1/Q5_0/Q5_1/Q8_0/Q4_K/Q5_K/Q6_K,
            M ≤ ``cpp_max_m``): float32 straight from the ggml bytes, exact to float32
            rounding, at memory speed for decode. It always computes and returns float32,
            whatever ``compute_dtype`` says: ``compute_dtype`` is the dtype of the large-M
            paths below. When the kernels are available the weight is kept only as its
            ggml bytes: no int4 or dense copy is made unless asked for (``dense=True``).
``int4``    torch's CPU int4 weight-only kernel (bfloat16 compute, Q4_0/Q4_1/Q4_K, small M):
            the weight stays 4-bit and is streamed once per call.
``dequant`` dequantize tiles of rows, then a dense matmul. Cost is dominated by the
            dequantization, so it pays off for large M (prefill), and is the exact path of
            float32 mode.
``dense``   a dense copy in the compute dtype made at load (bf16 prepacked for oneDNN). In
            bfloat16 mode this is the default for types the int4 kernel cannot express
            (their 16-element sub-blocks or 5/6/8-bit codes): AMX bf16 matmuls are fast at
            every M, and a dense bf16 copy is no larger than the exact alternatives (Q6_K
            as padded int4 planes would take 2 bytes/weight too).

The ggml bytes themselves are kept by default (``keep_raw``): they give the exact
``dequantize()``/``embedding()``, and when they come from ``gguf_reader`` they are a view
of the mapped file, so they cost page cache only if read, not resident memory.

Accuracy contract (``ref = x @ dequantize().T`` in float64):
* cpp path, and float32: ``|y − ref| ≤ 1e-5 · (|x| @ |W|.T)`` — only the summation order
  differs (the cpp kernels decode each weight to its exact float32 value). The opt-in
  integer variant (``cpp_impl="vnni"``) instead rounds activations to int8 per 32:
  ``|y − ref| ≤ Σᵢ amax(block(i))/254 · |Wᵢ − Bᵢ|`` (B: the block offsets of min formats).
* bfloat16: ``|y − ref| ≤ 2⁻⁷ · (|x| @ |W|.T)`` — activations, weights (or the int4
  kernel's scale/zero) and the output are each rounded to bf16 (2⁻⁹ relative each), and
  the kernels accumulate in float32.
"""
from __future__ import annotations

import logging
from typing import Optional, Sequence

import numpy as np
import torch

from .formats import FormatSpec, get_format
from .kernels import cpp as cpp_kernels
from .kernels import int4pack
from mistralrs_core.layers.packed import DenseWeight
from .kernels.dequant_mm import dequant_matmul, tile_rows

# Largest M for which the int4 kernel beats dequantize-then-matmul; its cost grows
# linearly with M while the dequantization is paid once (see bench/quant_matmul.py).
INT4_MAX_M = 48
# Largest M for which the cpp path runs; above it the bf16 (AMX) or float32 dequantize-
# then-matmul path wins (see bench/quant_matmul.py).
CPP_MAX_M = 16

log = logging.getLogger(__name__)
_fallback_logged = False


def _cpp_weight(raw: torch.Tensor, ggml_type: int, requested: Optional[bool], impl: Optional[str]):
    """The kernels bound to ``raw``, or None (logging the first time why not)."""
    global _fallback_logged
    if requested is False or raw.device.type != "cpu" or not cpp_kernels.supports(ggml_type):
        return None
    if cpp_kernels.available():
        return cpp_kernels.CppWeight(raw, ggml_type, cpp_kernels.choose_impl(ggml_type, impl))
    reason = cpp_kernels.unavailable_reason()
    if requested:
        raise RuntimeError(f"cpp=True but the C++ kernels are unavailable: {reason}")
    if not _fallback_logged:
        _fallback_logged = True
        log.info("mistralrs_quant: C++ kernels not used (%s); quantized matmuls use the torch paths", reason)
    return None


def _as_uint8_tensor(raw) -> torch.Tensor:
    if isinstance(raw, np.ndarray):
        raw = torch.from_numpy(raw)
    if not isinstance(raw, torch.Tensor) or raw.dtype != torch.uint8:
        raise TypeError(f"raw weight must be a uint8 tensor or array, got {getattr(raw, 'dtype', type(raw))}")
    return raw


class GGMLQuantMethod:
    """Weight [out_features, in_features] stored as ggml blocks; ``forward`` is ``x @ W.T``."""

    def __init__(self, raw, ggml_type: int, shape: Optional[Sequence[int]] = None, *,
                 compute_dtype: torch.dtype = torch.bfloat16, dense: Optional[bool] = None,
                 keep_raw: bool = True, int4_max_m: int = INT4_MAX_M, prepack: bool = True,
                 cpp: Optional[bool] = None, cpp_max_m: int = CPP_MAX_M, cpp_impl: Optional[str] = None):
        """``cpp``: None uses the C++ kernels when they are available, False never, True
        insists (raising if they are not). ``dense``/``int4`` copies are then made only on
        request; without the kernels the defaults are as before. ``cpp_impl``: the kernels'
        variant (``kernels.cpp.choose_impl``; default exact, "vnni" for ggml's int8 dots)."""
        raw = _as_uint8_tensor(raw)
        spec: FormatSpec = get_format(ggml_type)
        if raw.dim() != 2:
            raise ValueError(f"{spec.name} weight must be 2-D [out, bytes_per_row], got shape {tuple(raw.shape)}")
        in_features = spec.row_elements(raw.shape[1])
        if shape is not None and tuple(shape) != (raw.shape[0], in_features):
            raise ValueError(f"{spec.name} weight: raw bytes {tuple(raw.shape)} hold shape "
                             f"{(raw.shape[0], in_features)}, not {tuple(shape)}")
        if compute_dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"compute_dtype must be float32, bfloat16 or float16, got {compute_dtype}")
        self.spec = spec
        self.ggml_type = spec.ggml_type
        self.out_features, self.in_features = raw.shape[0], in_features
        self.compute_dtype = compute_dtype
        self.int4_max_m = int4_max_m
        self.cpp_max_m = cpp_max_m
        self._options = dict(compute_dtype=compute_dtype, int4_max_m=int4_max_m, prepack=prepack,
                             cpp=cpp, cpp_max_m=cpp_max_m, cpp_impl=cpp_impl)

        on_cpu = raw.device.type == "cpu"
        self.cpp = _cpp_weight(raw, spec.ggml_type, cpp, cpp_impl) if keep_raw else None
        use_int4 = (compute_dtype == torch.bfloat16 and on_cpu and int4pack.supported(spec.ggml_type)
                    and int4pack.kernel_available() and self.cpp is None)
        if dense is None:
            dense = compute_dtype != torch.float32 and not use_int4 and self.cpp is None
        self.int4 = int4pack.Int4Packed(raw, spec.ggml_type, compute_dtype) if use_int4 and not dense else None
        self.dense = DenseWeight(self._densify(raw), prepack) if dense else None
        if not keep_raw and self.int4 is None and self.dense is None:
            raise ValueError("keep_raw=False needs another representation: pass dense=True")
        self.raw = raw if keep_raw else None

    def _dequantize_rows(self, raw: torch.Tensor) -> torch.Tensor:
        """float32 values of ``raw``'s rows (C++ when bound: same bits, far faster)."""
        if self.cpp is not None:
            return cpp_kernels.dequantize(raw, self.ggml_type)
        return self.spec.dequantize(raw)

    def _densify(self, raw: torch.Tensor) -> torch.Tensor:
        out = torch.empty(self.out_features, self.in_features, dtype=self.compute_dtype, device=raw.device)
        step = tile_rows(self.out_features, self.in_features)
        for r0 in range(0, self.out_features, step):
            out[r0:r0 + step] = self._dequantize_rows(raw[r0:r0 + step])
        return out

    @classmethod
    def concat(cls, methods: Sequence["GGMLQuantMethod"]) -> Optional["GGMLQuantMethod"]:
        """One method for the weights stacked along the output dimension (so q/k/v or
        gate/up run as one call), or None when they cannot share one: different types,
        input sizes or options, or no ggml bytes kept."""
        first = methods[0]
        if all(m.cpp is not None for m in methods):
            # The C++ kernels serve these rows where they lie (the decoder step takes q/k/v
            # and gate/up as separate row ranges): a concatenated copy would only add load
            # time and resident memory, and the matmuls it saves run once per prefill.
            return None
        if any(type(m) is not cls or m.ggml_type != first.ggml_type or m.in_features != first.in_features
               or m.raw is None or m._options != first._options or (m.dense is None) != (first.dense is None)
               for m in methods):
            return None
        raw = torch.cat([m.raw for m in methods])
        return cls(raw, first.ggml_type, dense=first.dense is not None, **first._options)

    # ------------------------------------------------------------------ QuantMethod

    @property
    def nbytes(self) -> int:
        total = 0
        if self.raw is not None:
            total += self.raw.nbytes
        if self.dense is not None:
            total += self.dense.nbytes
        if self.int4 is not None:
            total += self.int4.nbytes
        return total

    def available_paths(self) -> list[str]:
        return [p for p, ok in (("cpp", self.cpp is not None), ("int4", self.int4 is not None),
                                ("dequant", self.raw is not None), ("dense", self.dense is not None)) if ok]

    def choose_path(self, m: int) -> str:
        if self.cpp is not None and m <= self.cpp_max_m:
            return "cpp"
        if self.dense is not None:
            return "dense"
        if self.int4 is not None and (m <= self.int4_max_m or self.raw is None):
            return "int4"
        return "dequant"

    def forward(self, x: torch.Tensor, path: Optional[str] = None) -> torch.Tensor:
        """``x`` [..., in_features] -> [..., out_features]: float32 on the cpp path, else
        the compute dtype."""
        if path is None and self.cpp is not None and x.dim() == 2 and x.shape[0] <= self.cpp_max_m \
                and x.shape[1] == self.in_features:
            return self.cpp.mm(x)  # the decode step: no reshapes or path bookkeeping
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input has {x.shape[-1]} features, weight expects {self.in_features}")
        lead = x.shape[:-1]
        x2d = x.reshape(-1, self.in_features)
        path = path or self.choose_path(x2d.shape[0])
        if path not in self.available_paths():
            raise ValueError(f"path {path!r} is not available for this weight (have {self.available_paths()})")
        if path == "cpp":
            y = self.cpp.mm(x2d)
        elif path == "int4":
            y = self.int4.mm(x2d)
        elif path == "dense":
            y = self.dense.mm(x2d)
        else:
            if self.cpp is not None and self.compute_dtype != torch.float16:
                y = self.cpp.dequant_mm(x2d, self.compute_dtype)
            else:
                y = dequant_matmul(x2d.to(self.compute_dtype), self.raw, self._dequantize_rows, self.compute_dtype)
        return y.reshape(*lead, self.out_features)

    __call__ = forward

    def dequantize(self) -> torch.Tensor:
        """The weight as float32 [out, in]: exact from the ggml bytes when they are kept,
        else the values the compute path uses (bf16-rounded in bfloat16 mode)."""
        if self.raw is not None:
            return self._dequantize_rows(self.raw)
        if self.dense is not None:
            return self.dense.to_dense().float()
        return self.int4.dequantize()

    def embedding(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows ``W[ids]`` as float32 [*ids.shape, in_features]; only those rows are decoded."""
        flat = ids.reshape(-1).long()
        if self.cpp is not None:
            rows = cpp_kernels.dequantize(self.raw, self.ggml_type, flat)
        elif self.raw is not None:
            rows = self.spec.dequantize(self.raw.index_select(0, flat.to(self.raw.device)))
        elif self.dense is not None:
            rows = self.dense.rows(flat).float()
        else:
            rows = self.int4.dequantize().index_select(0, flat)
        return rows.reshape(*ids.shape, self.in_features)

    def __repr__(self) -> str:
        cpp = f", cpp={self.cpp.impl_name}" if self.cpp is not None else ""
        return (f"GGMLQuantMethod({self.spec.name}, out={self.out_features}, in={self.in_features}, "
                f"compute={self.compute_dtype}, paths={self.available_paths()}{cpp}, nbytes={self.nbytes})")


class GGUFQuantizedWeight:
    """A GGUF tensor implementing ``mistralrs_core.layers.quantized.QuantizedWeight``."""

    def __init__(self, raw, ggml_type: int, shape: Sequence[int], cpp_impl: Optional[str] = None):
        """``cpp_impl``: the C++ kernel variant its quant method uses (the loader passes
        the Runner's ``quant_kernel`` load option)."""
        self.raw = _as_uint8_tensor(raw)
        self.ggml_type = int(ggml_type)
        self.shape = tuple(int(s) for s in shape)
        self.cpp_impl = cpp_impl

    @classmethod
    def from_info(cls, info) -> "GGUFQuantizedWeight":
        """From a ``gguf_reader.GGUFTensorInfo`` (zero-copy over the mapped file)."""
        return cls(info.raw_tensor(), info.ggml_type, info.shape)

    def dequantize(self) -> torch.Tensor:
        return get_format(self.ggml_type).dequantize(self.raw).reshape(self.shape)

    def quant_method(self, compute_dtype: torch.dtype = torch.bfloat16, **kwargs) -> GGMLQuantMethod:
        if len(self.shape) != 2:
            raise ValueError(f"only 2-D weights can be used as a linear layer, shape is {self.shape}")
        kwargs.setdefault("cpp_impl", self.cpp_impl)
        return GGMLQuantMethod(self.raw.reshape(self.shape[0], -1), self.ggml_type, self.shape,
                               compute_dtype=compute_dtype, **kwargs)


def gguf_quant_method(quant_config, hf_name: str, module, weight) -> Optional[GGMLQuantMethod]:
    """The ``mistralrs_quant_method`` answer for ggml blocks: a pre-quantized GGUF/GGML
    weight stays packed, in the load's quantized-product dtype. The blocks decide it, not
    ``quant_config.kind``: a packed weight is never worth dequantizing to a dense layer."""
    if not isinstance(weight, GGUFQuantizedWeight):
        return None
    return weight.quant_method(quant_config.compute_dtype or torch.bfloat16)
