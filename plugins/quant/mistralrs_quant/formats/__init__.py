"""GGML tensor element formats: sizes, torch dequantizers and quantizers.

``GGML_TYPES`` maps a ggml type id (gguf-py's ``GGMLQuantizationType``) to its
``FormatSpec``. Every
dequantizer takes uint8 ``[..., bytes_per_row]`` and returns float32
``[..., elements_per_row]``, bit-identical to gguf-py's numpy reference.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from . import floats, kquant_quantize, kquants, legacy

Dequantizer = Callable[[torch.Tensor], torch.Tensor]
Quantizer = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class FormatSpec:
    ggml_type: int
    name: str
    block_size: int      # elements per block
    type_size: int       # bytes per block
    dequantize: Dequantizer
    quantize: Optional[Quantizer] = None

    def row_bytes(self, n_elements: int) -> int:
        """Bytes holding one row of ``n_elements``; raises if not a whole number of blocks."""
        if n_elements % self.block_size:
            raise ValueError(f"{self.name}: row length {n_elements} is not a multiple of "
                             f"the block size {self.block_size}")
        return n_elements // self.block_size * self.type_size

    def row_elements(self, n_bytes: int) -> int:
        if n_bytes % self.type_size:
            raise ValueError(f"{self.name}: {n_bytes} bytes is not a whole number of "
                             f"{self.type_size}-byte blocks")
        return n_bytes // self.type_size * self.block_size


class T:
    """The ggml type ids served here (fixed by the GGUF format; tests compare them with
    gguf-py's enum). Not imported from gguf-py: that package takes ~30 ms to import,
    which every model load would pay."""
    F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q8_1 = 0, 1, 2, 3, 6, 7, 8, 9
    Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q8_K = 10, 11, 12, 13, 14, 15
    BF16, MXFP4 = 30, 39


_NAMES = {v: k for k, v in vars(T).items() if not k.startswith("_")}


def _spec(t: int, bs: int, ts: int, deq: Dequantizer, q: Optional[Quantizer] = None) -> FormatSpec:
    return FormatSpec(t, _NAMES[t], bs, ts, deq, q)


# Q8_1 is 36 bytes as in ggml's block_q8_1 {f16 d, f16 s, int8 qs[32]}; gguf-py's size
# table still says 40 (the pre-2024 float d/float s layout), so sizes come from here.
GGML_TYPES: dict[int, FormatSpec] = {s.ggml_type: s for s in (
    _spec(T.F32, 1, 4, floats.dequantize_f32, floats.quantize_f32),
    _spec(T.F16, 1, 2, floats.dequantize_f16, floats.quantize_f16),
    _spec(T.BF16, 1, 2, floats.dequantize_bf16, floats.quantize_bf16),
    _spec(T.Q4_0, 32, 18, legacy.dequantize_q4_0, legacy.quantize_q4_0),
    _spec(T.Q4_1, 32, 20, legacy.dequantize_q4_1, legacy.quantize_q4_1),
    _spec(T.Q5_0, 32, 22, legacy.dequantize_q5_0, legacy.quantize_q5_0),
    _spec(T.Q5_1, 32, 24, legacy.dequantize_q5_1, legacy.quantize_q5_1),
    _spec(T.Q8_0, 32, 34, legacy.dequantize_q8_0, legacy.quantize_q8_0),
    _spec(T.Q8_1, 32, 36, legacy.dequantize_q8_1, legacy.quantize_q8_1),
    _spec(T.Q2_K, 256, 84, kquants.dequantize_q2_k),
    _spec(T.Q3_K, 256, 110, kquants.dequantize_q3_k),
    _spec(T.Q4_K, 256, 144, kquants.dequantize_q4_k, kquant_quantize.quantize_q4_k),
    _spec(T.Q5_K, 256, 176, kquants.dequantize_q5_k),
    _spec(T.Q6_K, 256, 210, kquants.dequantize_q6_k, kquant_quantize.quantize_q6_k),
    _spec(T.Q8_K, 256, 292, kquants.dequantize_q8_k, kquant_quantize.quantize_q8_k),
    _spec(T.MXFP4, 32, 17, kquants.dequantize_mxfp4),
)}


def type_name(ggml_type: int) -> str:
    if ggml_type in _NAMES:
        return _NAMES[ggml_type]
    from gguf import GGMLQuantizationType  # only to name a type that is not served
    try:
        return GGMLQuantizationType(ggml_type).name
    except ValueError:
        return f"unknown type {ggml_type}"


def get_format(ggml_type: int) -> FormatSpec:
    spec = GGML_TYPES.get(int(ggml_type))
    if spec is None:
        raise ValueError(f"GGML type {type_name(ggml_type)} is not supported "
                         f"(supported: {', '.join(s.name for s in GGML_TYPES.values())})")
    return spec


def dequantize(raw: torch.Tensor, ggml_type: int) -> torch.Tensor:
    return get_format(ggml_type).dequantize(raw)


def quantize(x: torch.Tensor, ggml_type: int) -> torch.Tensor:
    spec = get_format(ggml_type)
    if spec.quantize is None:
        raise NotImplementedError(f"quantizing to {spec.name} is not implemented")
    return spec.quantize(x)


__all__ = ["FormatSpec", "GGML_TYPES", "get_format", "dequantize", "quantize", "type_name"]
