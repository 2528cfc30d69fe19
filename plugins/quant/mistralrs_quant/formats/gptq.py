"""GPTQ and AWQ checkpoints: integer codes packed in int32 words, per-group scales and zeros.

GPTQ (AutoGPTQ / GPTQModel / optimum, ``checkpoint_format`` "gptq"):
* ``qweight`` int32 ``[in / p, out]`` with ``p = 32 / bits``: input row ``i·p + j`` is the
  ``bits``-wide field at bit ``j·bits`` of word ``qweight[i, col]``;
* ``qzeros`` int32 ``[groups, out / p]``, packed the same way along the output axis, each
  stored minus one (the v1 format; ``checkpoint_format: "gptq_v2"`` stores them as is);
* ``scales`` float16 ``[groups, out]``; ``g_idx`` int32 ``[in]``: the group of each input
  (``i // group_size`` unless ``desc_act`` reordered them);
* ``W[o, i] = scales[g_idx[i], o] · (q[i, o] − zeros[g_idx[i], o])``.

AWQ (AutoAWQ ``version: "gemm"``): ``qweight`` int32 ``[in, out / 8]`` and ``qzeros`` int32
``[groups, out / 8]`` pack eight 4-bit values along the output axis in the interleaved
order ``0, 2, 4, 6, 1, 3, 5, 7`` (nibble ``k`` holds output column ``order[k]``); zeros are
stored as is; ``scales`` ``[groups, out]``; ``W[o, i] = scales[g, o] · (q[i, o] − z[g, o])``
with ``g = i // group_size``.

Both keep the packed tensors and run dequantize-then-matmul.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)       # nibble k holds column AWQ_ORDER[k]
# column c sits in nibble AWQ_NIBBLE_OF[c]
AWQ_NIBBLE_OF = tuple(AWQ_ORDER.index(c) for c in range(8))


def unpack_int32(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """Split each int32 of ``packed`` into ``32 / bits`` fields (lowest first) laid out
    along ``dim``: ``[a, b]`` -> ``[a·p, b]`` (dim 0) or ``[a, b·p]`` (dim 1), uint8."""
    p = 32 // bits
    a, b = packed.shape
    # Little-endian words: byte j holds fields j·(8/bits) ...; byte-wide ops on uint8 are
    # several times cheaper than 64-bit shifts over the whole weight.
    by = packed.contiguous().view(torch.uint8).reshape(a, b, 4)
    fields = torch.stack([(by >> s) & ((1 << bits) - 1) for s in range(0, 8, bits)], -1).reshape(a, b, p)
    if dim == 0:
        return fields.permute(0, 2, 1).reshape(a * p, b)
    return fields.reshape(a, b * p)


def _check_bits(bits: int, name: str, allowed) -> int:
    bits = int(bits)
    if bits not in allowed:
        raise ValueError(f"quantization_config.bits: {name} with {bits} bits is not supported "
                         f"(supported: {', '.join(map(str, allowed))})")
    return bits


class _IntGroupMethod:
    """Shared forward/embedding for weights that dequantize from int codes."""

    out_features: int
    in_features: int
    bits: int
    group_size: int
    _int4_packed = None

    def _affine(self):
        """(codes [out, in], scales [out, groups], zeros [out, groups]) with contiguous groups
        of ``group_size`` inputs, ``w = s·(q − z)``; None when the layout has no such form."""
        return None

    def _int4(self):
        """4-bit codes on torch's CPU int4 kernel (bf16 activations): ``s·(q − z)`` is its
        ``(q − 8)·s + zero`` with ``zero = (8 − z)·s``, rounded to bf16 like the activations."""
        if self._int4_packed is None:
            from mistralrs_quant.kernels.int4pack import Int4Packed
            q, sc, z = self._affine()
            zero = (8 - z.to(torch.float32)) * sc
            self._int4_packed = Int4Packed(torch.arange(self.out_features), None, torch.bfloat16,
                                           split=lambda rows: (q[rows].to(torch.int32), sc[rows], zero[rows]),
                                           group=self.group_size)
        return self._int4_packed

    def _int4_ok(self, x: torch.Tensor) -> bool:
        if x.dtype != torch.bfloat16 or self.bits != 4 or x.device.type != "cpu":
            return False
        if self.group_size not in (32, 64, 128, 256) or self.in_features % self.group_size:
            return False
        from mistralrs_quant.kernels.int4pack import kernel_available
        return kernel_available() and (self._int4_packed is not None or self._affine_possible())

    def _affine_possible(self) -> bool:
        return True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._int4_ok(x):
            lead = x.shape[:-1]
            return self._int4().mm(x.reshape(-1, self.in_features)).reshape(*lead, self.out_features)
        w = self.dequantize()
        return F.linear(x, w if x.dtype == torch.float32 else w.to(x.dtype))

    def embedding(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.dequantize())


class GPTQMethod(_IntGroupMethod):
    def __init__(self, qweight, qzeros, scales, g_idx=None, *, bits: int, group_size: int,
                 zeros_minus_one: bool = True):
        self.bits = _check_bits(bits, "GPTQ", (2, 4, 8))
        p = 32 // self.bits
        self.qweight, self.qzeros, self.scales = qweight, qzeros, scales
        self.in_features = qweight.shape[0] * p
        self.out_features = qweight.shape[1]
        self.group_size = int(group_size) if group_size and int(group_size) > 0 else self.in_features
        if g_idx is None:
            g_idx = torch.arange(self.in_features, dtype=torch.int32) // self.group_size
        self.g_idx = g_idx.to(torch.int64)
        self.zeros_minus_one = zeros_minus_one
        self._contiguous = None
        groups = scales.shape[0]
        if tuple(scales.shape) != (groups, self.out_features) or qzeros.shape[0] != groups \
                or qzeros.shape[1] * p != self.out_features:
            raise ValueError(f"GPTQ tensors disagree: qweight {tuple(qweight.shape)}, qzeros "
                             f"{tuple(qzeros.shape)}, scales {tuple(scales.shape)} at {self.bits} bits")
        if self.g_idx.numel() != self.in_features or int(self.g_idx.max()) >= groups or int(self.g_idx.min()) < 0:
            raise ValueError(f"GPTQ g_idx must give each of the {self.in_features} inputs a group "
                             f"below {groups}")

    def _zeros(self) -> torch.Tensor:
        z = unpack_int32(self.qzeros, self.bits, 1).to(torch.int64)     # [groups, out]
        # v1 stores zero - 1; the reference kernels add the 1 back without wrapping
        return z + 1 if self.zeros_minus_one else z

    def _affine_possible(self) -> bool:
        # act-order checkpoints give inputs scattered groups: no contiguous-group form
        if self._contiguous is None:
            default = torch.arange(self.in_features) // self.group_size
            self._contiguous = (self.in_features % self.group_size == 0
                                and torch.equal(self.g_idx, default.to(self.g_idx.device)))
        return self._contiguous

    def _affine(self):
        q = unpack_int32(self.qweight, self.bits, 0).t()               # [out, in]
        return q, self.scales.to(torch.float32).t().contiguous(), self._zeros().t().contiguous()

    def dequantize(self) -> torch.Tensor:
        q = unpack_int32(self.qweight, self.bits, 0).to(torch.float32)  # [in, out]
        z = self._zeros().to(torch.float32)
        s = self.scales.to(torch.float32)
        if self._affine_possible():
            # contiguous groups: broadcast instead of gathering a per-input row
            g = self.in_features // self.group_size
            w = (q.view(g, self.group_size, -1) - z[:, None]) * s[:, None]
            return w.reshape(self.in_features, -1).t().contiguous()
        return ((q - z[self.g_idx]) * s[self.g_idx]).t().contiguous()   # [out, in]


class AWQMethod(_IntGroupMethod):
    def __init__(self, qweight, qzeros, scales, *, bits: int = 4, group_size: int):
        self.bits = _check_bits(bits, "AWQ", (4,))
        self.qweight, self.qzeros, self.scales = qweight, qzeros, scales
        self.in_features = qweight.shape[0]
        self.out_features = qweight.shape[1] * 8
        self.group_size = int(group_size) if group_size and int(group_size) > 0 else self.in_features
        groups = -(-self.in_features // self.group_size)
        if tuple(scales.shape) != (groups, self.out_features) or tuple(qzeros.shape) != (groups, qweight.shape[1]):
            raise ValueError(f"AWQ tensors disagree: qweight {tuple(qweight.shape)}, qzeros "
                             f"{tuple(qzeros.shape)}, scales {tuple(scales.shape)} at group size {self.group_size}")

    @staticmethod
    def unpack(packed: torch.Tensor) -> torch.Tensor:
        """[r, c] int32 -> [r, 8c] codes in column order."""
        fields = unpack_int32(packed, 4, 1).reshape(packed.shape[0], -1, 8)   # nibble order
        return fields[..., list(AWQ_NIBBLE_OF)].reshape(packed.shape[0], -1)

    def _affine(self):
        return (self.unpack(self.qweight).t(), self.scales.to(torch.float32).t().contiguous(),
                self.unpack(self.qzeros).t().contiguous())

    def dequantize(self) -> torch.Tensor:
        q = self.unpack(self.qweight).to(torch.float32)                 # [in, out]
        z = self.unpack(self.qzeros).to(torch.float32)                  # [groups, out]
        g = torch.arange(self.in_features) // self.group_size
        w = (q - z[g]) * self.scales.to(torch.float32)[g]
        return w.t().contiguous()
