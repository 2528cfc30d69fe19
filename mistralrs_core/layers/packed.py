"""Dense bf16/f16 weights prepacked for oneDNN on CPU.

oneDNN's bf16/f16 matmul re-lays the weight out for AMX/AVX-512 on every call; doing that
once at load (``mkldnn._reorder_linear_weight``) halves the time for M ≤ 64 on a CPU with
AVX-512 BF16 or AMX and matches it for large M. Unpacked, a 2-row bf16 matmul reads half
the bytes of a float32 one yet takes as long (measured: 9-12 GB/s against float32's 21-34
on the same CPU). float32 gains nothing (MKL's GEMV is already at speed), so float32
weights stay plain tensors.

``DenseWeight`` is the storage (the quant plugin keeps its dense fallbacks in it);
``prepack_linears`` turns a loaded module's bf16/f16 ``Linear`` layers into ``PackedLinear``
quant methods, so a decode step of a few rows streams half the bytes at full speed.
``small_m=True`` (a model of mostly few-row steps opts in) keeps the plain weight instead
and lets a plugin's small-M kernel serve those steps (``layers/dense_kernels.py``).
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn


def can_prepack(dtype: torch.dtype, device: torch.device | str) -> bool:
    """Whether weights of ``dtype`` computed on ``device`` would be prepacked (the setting,
    a CPU, a half-precision dtype and a torch with the oneDNN ops)."""
    return (torch.device(device).type == "cpu" and dtype in (torch.bfloat16, torch.float16)
            and prepack_enabled() and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def _can_prepack(w: torch.Tensor) -> bool:
    return can_prepack(w.dtype, w.device)


#: activations a packed GEMM can apply in its epilogue: name -> (oneDNN attr, algorithm)
ACTIVATIONS = {None: ("none", ""), "gelu_tanh": ("gelu", "tanh")}


class DenseWeight:
    """A dense weight [out, in] and its matmuls. ``prepack``: hold it in oneDNN's packed
    layout where ``can_prepack`` allows. ``small_m``: where a registered small-M kernel
    supports it (``layers/dense_kernels.py``), hold the plain weight instead and let the
    kernel serve calls of up to ``kernel.max_rows`` rows (torch's matmul the larger ones)."""

    def __init__(self, w: torch.Tensor, prepack: bool = True, small_m: bool = False):
        self.shape = tuple(w.shape)
        self.dtype = w.dtype
        self.packed = None
        self.plain = w
        self.kernel = None
        self.kernel_rows = -1          # calls of at most this many rows go to the kernel
        if small_m and prepack and _can_prepack(w):
            from mistralrs_core.layers.dense_kernels import kernel_for
            self.kernel = kernel_for(w.dtype, w.device)
            if self.kernel is not None:
                self.plain = w.contiguous()
                self.kernel_rows = int(self.kernel.max_rows(w.dtype))
                self._small_mm = self.kernel.bind(self.plain)
                return
        if prepack and _can_prepack(w):
            try:
                self.packed = torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), 1)
                self.plain = None
            except RuntimeError:  # a torch built without this oneDNN path: keep the plain weight
                self.packed = None

    @property
    def nbytes(self) -> int:
        return self.shape[0] * self.shape[1] * torch.finfo(self.dtype).bits // 8

    def mm(self, x2d: torch.Tensor, bias: torch.Tensor | None = None, act: str | None = None) -> torch.Tensor:
        """``x2d @ W.T (+ bias)``, then ``act`` (None or ``"gelu_tanh"``). Packed, the bias
        and the activation run inside the GEMM's epilogue (no extra pass over the output)."""
        if x2d.shape[0] <= self.kernel_rows and act in ACTIVATIONS:   # first: a decode step's call
            return self._small_mm(x2d if x2d.dtype == self.dtype else x2d.to(self.dtype), bias, act, None)
        x2d = x2d.to(self.dtype)
        spec = ACTIVATIONS.get(act)
        if spec is None:
            raise ValueError(f"act: {act!r} is not one of {sorted(ACTIVATIONS, key=str)}")
        if self.kernel is not None:
            return self._mm_wide(x2d, bias, act, None)
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x2d.contiguous(), self.packed, bias, spec[0], [], spec[1])
        out = F.linear(x2d, self.plain, bias)
        return F.gelu(out, approximate="tanh") if act == "gelu_tanh" else out

    def mm_add(self, x2d: torch.Tensor, other: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``x2d @ W.T (+ bias) + other`` (other [rows, out], this dtype): packed, the sum is
        the GEMM's epilogue, so a projection of concatenated inputs can run as two GEMMs with
        no concatenation copy."""
        x2d = x2d.to(self.dtype)
        if self.kernel is not None:
            if x2d.shape[0] <= self.kernel_rows:
                return self._small_mm(x2d, bias, None, other)
            return self._mm_wide(x2d, bias, None, other)
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise.binary(x2d.contiguous(), other.contiguous(), self.packed,
                                                             bias, "add")
        return torch.add(F.linear(x2d, self.plain, bias), other)

    def _mm_wide(self, x2d, bias, act, other) -> torch.Tensor:
        """More rows than the small-M kernel serves, on the plain weight. Below 64 rows
        ``W @ x.T`` (oneDNN takes W as it lies; ``x @ W.T`` re-lays it out on every call and
        is 1.5-2x slower there); from 64 rows ``x @ W.T``, whose transposed output needs no
        copy. Measured on 1 core (bench/dense_matmul.py): 15-50% slower than the packed GEMM
        for 5-256 rows, as fast or faster beyond."""
        if x2d.shape[0] >= 64:
            out = F.linear(x2d, self.plain, bias)
        else:
            out = torch.mm(self.plain, x2d.t()).t().contiguous()
            if bias is not None:
                out += bias
        if act == "gelu_tanh":
            out = F.gelu(out, approximate="tanh")
        return out if other is None else out.add_(other)

    def to_dense(self) -> torch.Tensor:
        return self.plain if self.packed is None else self.packed.to_dense()

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        return self.to_dense().index_select(0, ids)


class PackedLinear:
    """A ``QuantMethod`` over a prepacked dense weight: ``Linear`` runs it like a quantized
    layer (and drops its own parameter, so the weight is held once)."""

    def __init__(self, w: torch.Tensor, small_m: bool = False):
        self.out_features, self.in_features = w.shape
        self.weight = DenseWeight(w, small_m=small_m)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None, act: str | None = None) -> torch.Tensor:
        """``x`` [..., in] -> [..., out]; ``bias`` and ``act`` as ``DenseWeight.mm`` (in the
        GEMM's epilogue). ``Linear`` calls it with neither and adds its bias itself."""
        if x.dim() == 2:        # a decode step's rows: no reshapes (~2 us a call)
            return self.weight.mm(x, bias, act)
        lead = x.shape[:-1]
        return self.weight.mm(x.reshape(-1, self.in_features), bias, act).view(*lead, self.out_features)

    def forward_add(self, x: torch.Tensor, other: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``forward(x, bias) + other`` (other [..., out]), the sum in the GEMM's epilogue."""
        lead = x.shape[:-1]
        return self.weight.mm_add(x.reshape(-1, self.in_features), other.reshape(-1, self.out_features),
                                  bias).view(*lead, self.out_features)

    def embedding(self, ids: torch.Tensor) -> torch.Tensor:
        return self.weight.rows(ids.reshape(-1)).view(*ids.shape, self.in_features)

    def dequantize(self) -> torch.Tensor:
        return self.weight.to_dense().float()


def prepack_enabled() -> bool:
    return os.environ.get("MISTRALRS_PREPACK", "1").lower() not in ("0", "false", "off", "no")


def prepack_linears(module: nn.Module, small_m: bool = False) -> int:
    """Prepack every dense bf16/f16 CPU ``Linear`` of ``module`` (call once its weights are
    final: after loading, fusing, merging). Layers already quantized or carrying a LoRA hook
    keep their form; a weight shared with another module (a tied head) stays plain, since
    packing would hold it twice. ``MISTRALRS_PREPACK=0`` turns it off. ``small_m``: the model
    runs mostly steps of a few rows, so a registered small-M kernel serves those on the
    plain weight where one supports it (``layers/dense_kernels.py``; calls of more rows then
    run torch's slower unpacked matmul). Returns the count."""
    from mistralrs_core.layers.linear import Linear
    if not prepack_enabled():
        return 0
    owners: dict[int, int] = {}
    for m in module.modules():
        for p in m.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    n = 0
    for m in module.modules():
        if not isinstance(m, Linear) or m.qmethod is not None or m.lora is not None:
            continue
        w = m.weight
        if w is None or not _can_prepack(w) or owners.get(id(w), 0) > 1:
            continue
        packed = PackedLinear(w.detach(), small_m=small_m)
        if packed.weight.packed is None and packed.weight.kernel is None:  # this torch cannot pack: leave it
            continue
        m.set_quant_method(packed)
        n += 1
    return n
