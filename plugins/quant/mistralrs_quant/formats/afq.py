"""AFQ: MLX's affine group quantization (``mx.quantize``), 2, 3, 4, 6 and 8 bits.

Per group of ``group_size`` (default 64) consecutive inputs of a row, ``w ≈ scale·q +
bias`` with ``q`` in ``[0, 2^bits - 1]``. MLX's definition (``affine_quantize``): with
``n = 2^bits - 1``, ``step = max((max - min) / n, 1e-7)``; the end of the group with the
larger magnitude (``edge``: ``min`` if ``|min| > |max|`` else ``max``, the step negated in
the second case) is made exactly representable: ``q0 = round(edge / step)``, and if
``q0 != 0`` the step becomes ``edge / q0`` and the bias ``edge``, else the bias is 0. Codes
are ``clip(round((w - bias) / scale), 0, n)``. (Upstream's CPU fallback uses the plain
``min`` / ``(max - min) / n`` affine; we follow MLX, whose files AFQ is named after.)

Codes are packed as a little-endian bit stream along the row into uint32 words
(``in * bits / 32`` per row), which is MLX's layout for every width, 3 and 6 bits included.
Scales and biases keep the weight's float dtype (float32 here: quantization starts from
float32), shape ``[out, in / group_size]``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

BITS = (2, 3, 4, 6, 8)
GROUP_SIZES = (32, 64, 128)
GROUP_SIZE = 64
_SERDE_AFQ = 4           # upstream's QuantizedSerdeType::Afq


def affine_quantize(w: torch.Tensor, bits: int, group_size: int):
    """MLX's ``affine_quantize`` on float32 rows: (codes int64 [out, in], scales, biases)."""
    out, inn = w.shape
    g = w.to(torch.float32).reshape(out, inn // group_size, group_size)
    n_bins = float(2 ** bits - 1)
    w_max, w_min = g.amax(-1, keepdim=True), g.amin(-1, keepdim=True)
    mask = w_min.abs() > w_max.abs()
    scales = torch.clamp_min((w_max - w_min) / n_bins, 1e-7)
    scales = torch.where(mask, scales, -scales)
    edge = torch.where(mask, w_min, w_max)
    q0 = torch.round(edge / scales)
    scales = torch.where(q0 != 0, edge / q0, scales)
    biases = torch.where(q0 == 0, torch.zeros_like(edge), edge)
    codes = torch.clamp(torch.round((g - biases) / scales), 0.0, n_bins).to(torch.int64)
    return codes.reshape(out, inn), scales.reshape(out, -1), biases.reshape(out, -1)


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """[rows, n] codes < 2^bits -> [rows, n * bits / 32] uint32 words (as int32 storage)."""
    rows, n = codes.shape
    if (n * bits) % 32:
        raise ValueError(f"AFQ: a row of {n} {bits}-bit codes does not fill whole 32-bit words")
    shifts = torch.arange(bits, dtype=torch.int64)
    stream = ((codes.unsqueeze(-1) >> shifts) & 1).reshape(rows, -1, 32)      # bit stream, LSB first
    words = (stream << torch.arange(32, dtype=torch.int64)).sum(-1)
    return words.to(torch.uint32) if hasattr(torch, "uint32") else words.to(torch.int32)


def unpack_bits(words: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of ``pack_bits``: [rows, W] words -> [rows, W * 32 / bits] codes (uint8 for
    2/4/8 bits, int64 otherwise)."""
    rows = words.shape[0]
    if bits in (2, 4, 8):
        # Codes never straddle a byte, and the words are little-endian: work on bytes,
        # which is several times cheaper than 64-bit shifts over the whole weight.
        b = words.contiguous().view(torch.uint8)
        if bits == 8:
            return b
        fields = [(b >> s) & (2 ** bits - 1) for s in range(0, 8, bits)]
        return torch.stack(fields, -1).reshape(rows, -1)
    w = words.to(torch.int64) & 0xFFFFFFFF
    stream = ((w.unsqueeze(-1) >> torch.arange(32, dtype=torch.int64)) & 1).reshape(rows, -1, bits)
    return (stream << torch.arange(bits, dtype=torch.int64)).sum(-1)


def _int4_kernel() -> bool:
    from mistralrs_quant.kernels.int4pack import kernel_available
    return kernel_available()


class AFQMethod:
    """A weight [out, in] as MLX affine groups; ``forward`` dequantizes then multiplies."""

    def __init__(self, w_q: torch.Tensor, scales: torch.Tensor, biases: torch.Tensor, bits: int,
                 group_size: int = GROUP_SIZE):
        if bits not in BITS:
            raise ValueError(f"AFQ bits must be one of {BITS}, got {bits}")
        if group_size not in GROUP_SIZES:
            raise ValueError(f"AFQ group size must be one of {GROUP_SIZES}, got {group_size}")
        self.w_q, self.scales, self.biases = w_q, scales, biases
        self.bits, self.group_size = int(bits), int(group_size)
        self._int4_packed = None
        self.out_features = int(w_q.shape[0])
        self.in_features = int(w_q.shape[1]) * 32 // self.bits

    @classmethod
    def from_float(cls, weight: torch.Tensor, bits: int | None = 4, group_size: int | None = None,
                   device=None) -> "AFQMethod":
        bits = 4 if bits is None else int(bits)
        group_size = group_size or GROUP_SIZE
        if bits not in BITS:
            raise ValueError(f"AFQ bits must be one of {BITS}, got {bits}")
        if weight.dim() != 2 or weight.shape[1] % group_size:
            raise ValueError(f"AFQ: the weight's last dimension must be a multiple of the group size "
                             f"{group_size}, got shape {tuple(weight.shape)}")
        device = torch.device(device) if device is not None else weight.device
        codes, scales, biases = affine_quantize(weight.detach(), bits, group_size)
        return cls(pack_bits(codes, bits).to(device), scales.to(device), biases.to(device), bits, group_size)

    def _rows(self, w_q: torch.Tensor, scales: torch.Tensor, biases: torch.Tensor) -> torch.Tensor:
        q = unpack_bits(w_q, self.bits).to(torch.float32)
        q = q.reshape(q.shape[0], -1, self.group_size)
        # one fused pass: bias + q * scale (the same rounding as q * scale + bias)
        w = torch.addcmul(biases.to(torch.float32).unsqueeze(-1), q, scales.to(torch.float32).unsqueeze(-1))
        return w.reshape(q.shape[0], -1)

    def dequantize(self) -> torch.Tensor:
        return self._rows(self.w_q, self.scales, self.biases)

    def _int4(self):
        """4-bit codes on torch's CPU int4 kernel (bf16 activations): ``c·s + b`` is its
        ``(c − 8)·s + zero`` with ``zero = b + 8s``, rounded to bf16 like the activations."""
        if self._int4_packed is None:
            from mistralrs_quant.kernels.int4pack import Int4Packed
            s, b = self.scales.to(torch.float32), self.biases.to(torch.float32)

            def split(rows):
                return unpack_bits(self.w_q[rows], 4).to(torch.int32), s[rows], b[rows] + 8 * s[rows]
            self._int4_packed = Int4Packed(torch.arange(self.out_features), None, torch.bfloat16, split=split,
                                           group=self.group_size)
        return self._int4_packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.bfloat16 and self.bits == 4 and x.device.type == "cpu" and _int4_kernel():
            lead = x.shape[:-1]
            return self._int4().mm(x.reshape(-1, self.in_features)).reshape(*lead, self.out_features)
        w = self.dequantize()
        return F.linear(x, w if x.dtype == torch.float32 else w.to(x.dtype))

    def embedding(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1).long()
        rows = self._rows(self.w_q[flat], self.scales[flat], self.biases[flat])
        return rows.reshape(*ids.shape, self.in_features)

    @classmethod
    def concat(cls, methods) -> "AFQMethod | None":
        first = methods[0]
        if any(type(m) is not cls or m.bits != first.bits or m.group_size != first.group_size
               or m.in_features != first.in_features for m in methods):
            return None
        return cls(torch.cat([m.w_q for m in methods]), torch.cat([m.scales for m in methods]),
                   torch.cat([m.biases for m in methods]), first.bits, first.group_size)

    def slice_rows(self, start: int, stop: int) -> "AFQMethod":
        """Output rows ``start:stop`` (a fused layer's part, for UQFF): groups run along a row."""
        return type(self)(self.w_q[start:stop], self.scales[start:stop], self.biases[start:stop],
                          self.bits, self.group_size)

    # Tensor parallelism (``mistralrs_core.distributed.packed``): groups run along a row, so
    # rows are a plain slice and columns split exactly at group boundaries.
    def take_rows(self, ranges: list[tuple[int, int]]) -> "AFQMethod":
        parts = [self.slice_rows(a, b) for a, b in ranges]
        return parts[0] if len(parts) == 1 else type(self).concat(parts)

    def take_cols(self, start: int, stop: int) -> "AFQMethod":
        g = self.group_size
        if start % g or stop % g:
            raise ValueError(f"AFQ: columns [{start}, {stop}) do not fall on its groups of {g}; use a "
                             f"tensor-parallel size whose shards are multiples of {g} wide")
        per_word = 32 // math.gcd(32, self.bits)       # columns whose codes fill whole 32-bit words
        words = self.bits * per_word // 32
        if start % per_word or stop % per_word:
            raise ValueError(f"AFQ: columns [{start}, {stop}) split a packed word")
        ws, we = start // per_word * words, stop // per_word * words
        return type(self)(self.w_q[:, ws:we].contiguous(), self.scales[:, start // g:stop // g].contiguous(),
                          self.biases[:, start // g:stop // g].contiguous(), self.bits, self.group_size)

    @property
    def nbytes(self) -> int:
        extra = self._int4_packed.nbytes if self._int4_packed is not None else 0
        return sum(t.numel() * t.element_size() for t in (self.w_q, self.scales, self.biases)) + extra

    # --- UQFF (upstream's per-tensor entries for an AFQ layer) -----------------------
    def to_uqff_tensors(self) -> dict[str, torch.Tensor]:
        return {
            "weight.format": torch.tensor(_SERDE_AFQ, dtype=torch.uint8),
            "weight.bits": torch.tensor(self.bits, dtype=torch.uint8),
            "weight.group_size": torch.tensor(self.group_size, dtype=torch.uint8),
            "weight": self.w_q,
            "weight.scales": self.scales,
            "weight.biases": self.biases,
        }

    @classmethod
    def from_uqff_tensors(cls, t: dict) -> "AFQMethod":
        if int(t["weight.format"]) != _SERDE_AFQ:
            raise ValueError(f"weight.format: expected {_SERDE_AFQ} (AFQ), got {int(t['weight.format'])}")
        return cls(t["weight"], t["weight.scales"], t["weight.biases"], int(t["weight.bits"]),
                   int(t["weight.group_size"]))

    def __repr__(self) -> str:
        return f"AFQMethod({self.bits} bit, out={self.out_features}, in={self.in_features}, group={self.group_size})"
