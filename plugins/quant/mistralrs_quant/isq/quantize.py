"""Dense tensor -> ggml blocks, as llama.cpp's quantizer writes them.

Every type goes through the C++ quantizer (``csrc/ggml_quantize.cpp``, bit-exact with
llama.cpp's and, for Q4_0..Q8_0, gguf-py's, parallel over rows). Without the C++ library
the 32-element formats use the torch quantizers of ``formats`` (bit-exact with gguf-py),
MXFP4 ``quantize_mxfp4`` below, and Q4_K/Q6_K/Q8_K the approximate torch ones. A tensor is
quantized in slabs of rows so that the float32 copy made for the quantizer stays small
whatever the checkpoint dtype.
"""
from __future__ import annotations

from typing import Optional

import torch

from mistralrs_core.loading.page_release import release_tensor_pages

from ..formats import T, get_format
from ..formats._bits import flatten_rows
from ..kernels import cpp as cpp_kernels

# Elements per slab: the float32 staging copy is at most 16 MiB.
SLAB_ELEMENTS = 1 << 22

_K_TYPES = {T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.Q8_K}
# Types whose quantizer takes an importance matrix (llama.cpp ignores it for the others).
IMATRIX_TYPES = {T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1}

# MXFP4's e2m1 code values, doubled (so they are integers): code i -> _E2M1_X2[i] / 2.
_E2M1_X2 = torch.tensor([0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12], dtype=torch.float32)


def quantize_mxfp4(x: torch.Tensor) -> torch.Tensor:
    """llama.cpp's reference MXFP4: an e8m0 exponent e = floor(log2(amax)) - 2 + 127 per 32
    values, each value the nearest code (first on ties) times 2^(e-128)."""
    blocks, lead = flatten_rows(x, 32, "MXFP4")
    amax = blocks.abs().amax(-1)
    e = torch.where(amax > 0, torch.floor(torch.log2(amax)) - 2 + 127, torch.zeros_like(amax))
    e = e.clamp(0, 255).to(torch.int32)
    # Half of the e8m0 value 2^(e-127), built from its bits as ggml does (exact).
    bits = torch.where(e < 2, torch.tensor(0x00200000, dtype=torch.int32) << e.clamp(max=1), (e - 1) << 23)
    d = bits.view(torch.float32).unsqueeze(-1)
    err = (_E2M1_X2 * d.unsqueeze(-1) - blocks.unsqueeze(-1)).abs()      # [n, 32, 16]
    idx = err.argmin(-1).to(torch.uint8)
    qs = idx[:, :16] | (idx[:, 16:] << 4)
    return torch.cat((e.to(torch.uint8).unsqueeze(-1), qs), -1).reshape(*lead, -1)


def quantize_rows(x: torch.Tensor, ggml_type: int, imatrix: Optional[torch.Tensor] = None) -> torch.Tensor:
    """float rows [n, k] -> uint8 [n, row bytes] (no slabbing)."""
    if ggml_type not in IMATRIX_TYPES:
        imatrix = None
    if ggml_type in cpp_kernels.QUANTIZE_BLOCKS and cpp_kernels.available():
        return cpp_kernels.quantize(x, ggml_type, imatrix)
    spec = get_format(ggml_type)
    if ggml_type in _K_TYPES or imatrix is not None:
        if imatrix is not None or spec.quantize is None:
            raise RuntimeError(f"quantizing to {spec.name}{' with an imatrix' if imatrix is not None else ''} "
                               f"needs the C++ kernels: {cpp_kernels.unavailable_reason()}")
        return spec.quantize(x)   # torch fallback (Q4_K/Q6_K/Q8_K): valid blocks, not bit-exact
    if ggml_type == T.MXFP4:
        return quantize_mxfp4(x)
    return spec.quantize(x)       # the gguf-py-exact torch quantizers


def quantize_tensor(weight: torch.Tensor, ggml_type: int, imatrix: Optional[torch.Tensor] = None,
                    release: bool = False) -> torch.Tensor:
    """A 2-D weight [out, in] in any float dtype -> its ggml blocks uint8 [out, row bytes].

    ``release``: the caller reads ``weight`` only here (ISQ's checkpoint tensors), so each
    slab's memory-mapped file pages leave the resident set as soon as it is quantized:
    at most one slab of the checkpoint is resident at a time, however large the tensor."""
    spec = get_format(ggml_type)
    if weight.dim() != 2:
        raise ValueError(f"only 2-D weights are quantized, got shape {tuple(weight.shape)}")
    n, k = weight.shape
    out = torch.empty(n, spec.row_bytes(k), dtype=torch.uint8)
    step = max(1, SLAB_ELEMENTS // max(k, 1))
    for r0 in range(0, n, step):
        slab = weight[r0:r0 + step].to(device="cpu", dtype=torch.float32)
        out[r0:r0 + step] = quantize_rows(slab, ggml_type, imatrix)
        if release:
            release_tensor_pages(weight[r0:r0 + step])
    return out


def can_quantize(ggml_type: int, in_features: int) -> bool:
    """Whether rows of ``in_features`` are whole blocks of the type."""
    return in_features % get_format(ggml_type).block_size == 0
