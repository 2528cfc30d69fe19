"""HQQ: half-quadratic quantization (Badri & Shaji, 2023), 4 and 8 bits, as upstream's ISQ.

Layout (upstream's ``HqqLayer`` with ``axis = 0``, ``channel_wise``): the weight is
flattened and viewed as ``[group_size, numel / group_size]``; each *column* of that view
is one group, with its own ``scale``/``zero`` (``[1, numel / group_size]`` float32).
Quantization is ``q = clamp(round(w * s + z), 0, 2^bits - 1)`` with ``s`` the inverse
step; the stored ``scales`` are ``1 / s``, so ``w ≈ (q - zero) * scales``.

The zero points come from HQQ's proximal solver ("legacy" variant, lp-norm 0.7,
beta 10, kappa 1.01): alternately round, shrink the error with the generalised soft
threshold and refit the zeros, while the mean absolute error keeps falling (at most
``steps`` iterations; upstream's ISQ uses 10). Upstream multiplies beta by kappa every
step, as the hqq paper and hqq's own code at the commit upstream follows do; the pip
package's current ``optimize_weights_proximal_legacy`` keeps beta fixed, so the tests use
its step and shrink functions with upstream's beta schedule as the reference.

4-bit codes are packed two per byte down the group axis: byte row ``i`` holds row ``i``
in its high nibble and row ``i + group_size / 2`` in its low nibble (hqq's bitpack).

``forward`` on CPU runs the C++ kernels of ``kernels/qformats.py``: a weight row is a run
of consecutive groups (columns of the grouped view), so each row is decoded from its
codes, scales and ``-zero·scale`` in cache tiles and multiplied in, streaming the codes
once; without them it dequantizes the whole weight and multiplies.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..kernels import qformats
from ..kernels.triton import dispatch as triton_dispatch

GROUP_SIZE = 64          # upstream's ISQ_HQQ_GROUP_SIZE
ISQ_STEPS = 10           # upstream's ISQ_HQQ_DEFAULT_OPT_STEPS
BITS = (4, 8)
_SERDE_HQQ = 2           # upstream's QuantizedSerdeType::Hqq


def _shrink_lp(x: torch.Tensor, beta: float, lp_norm: float) -> torch.Tensor:
    mag = x.abs()
    return torch.sign(x) * (mag - (1.0 / beta) * mag.pow(lp_norm - 1.0)).clamp_min(0.0)


def optimize_zeros(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, qmax: float, steps: int,
                   lp_norm: float = 0.7, beta: float = 10.0, kappa: float = 1.01):
    """HQQ's proximal solver on the grouped view ``w`` [group, n] (groups along dim 0).
    Returns the codes (float), ``scale`` (inverse step) and the fitted ``zero``."""
    best = float("inf")
    for _ in range(steps):
        wq = torch.round(w * scale + zero).clamp(0.0, qmax)
        wr = (wq - zero) / scale
        we = _shrink_lp(w - wr, beta, lp_norm)
        zero = torch.mean(wq - (w - we) * scale, dim=0, keepdim=True)
        beta *= kappa
        err = float((w - wr).abs().mean())
        if err < best:
            best = err
        else:
            break
    wq = torch.round(w * scale + zero).clamp(0.0, qmax)
    return wq, scale, zero


class HQQMethod:
    """A weight [out, in] in HQQ form; ``forward`` runs the C++ kernels on CPU, else
    ``forward_torch`` (dequantize, then multiply)."""

    def __init__(self, w_q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, shape, bits: int,
                 group_size: int = GROUP_SIZE, steps: int = ISQ_STEPS):
        if bits not in BITS:
            raise ValueError(f"HQQ bits must be one of {BITS}, got {bits}")
        self.w_q, self.scales, self.zeros = w_q, scales, zeros
        self.out_features, self.in_features = (int(s) for s in shape)
        self.bits, self.group_size, self.steps = int(bits), int(group_size), int(steps)
        self._neg_zs = None
        self._triton_view = None

    @classmethod
    def from_float(cls, weight: torch.Tensor, bits: int | None = 4, group_size: int | None = None,
                   device=None, steps: int = ISQ_STEPS) -> "HQQMethod":
        bits = 4 if bits is None else int(bits)
        group_size = group_size or GROUP_SIZE
        if bits not in BITS:
            raise ValueError(f"HQQ bits must be one of {BITS}, got {bits}")
        if weight.dim() != 2:
            raise ValueError(f"HQQ quantizes 2-D weights, got shape {tuple(weight.shape)}")
        if weight.numel() % group_size:
            raise ValueError(f"HQQ: the weight's {weight.numel()} elements are not a multiple of "
                             f"the group size {group_size}")
        device = torch.device(device) if device is not None else weight.device
        w = weight.detach().to(torch.float32).reshape(group_size, -1)
        qmax = float(2 ** bits - 1)
        lo, hi = w.amin(0, keepdim=True), w.amax(0, keepdim=True)
        scale = (qmax / (hi - lo)).clamp(0.0, 2e4)
        zero = -lo * scale
        wq, scale, zero = optimize_zeros(w, scale, zero, qmax, steps)
        codes = wq.to(torch.uint8)
        if bits == 4:
            half = group_size // 2
            codes = (codes[:half] << 4) | codes[half:]
        return cls(codes.contiguous().to(device), (1.0 / scale).to(device), zero.to(device),
                   weight.shape, bits, group_size, steps)

    # --- QuantMethod --------------------------------------------------------------
    def _codes(self) -> torch.Tensor:
        if self.bits == 8:
            return self.w_q
        return torch.cat([self.w_q >> 4, self.w_q & 0x0F], 0)

    def dequantize(self) -> torch.Tensor:
        w = (self._codes().to(torch.float32) - self.zeros) * self.scales
        return w.reshape(self.out_features, self.in_features)

    def _neg_zero_scales(self) -> torch.Tensor:
        if self._neg_zs is None:
            self._neg_zs = -(self.zeros * self.scales)
        return self._neg_zs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if triton_dispatch.use_triton(self.w_q):          # CUDA weights (a no-op import on CPU)
            return triton_dispatch.matmul(x, triton_dispatch.hqq_view(self))
        k = qformats.cached(self, lambda: qformats.bind_hqq(
            self.w_q, self.scales, self._neg_zero_scales(), self.out_features, self.in_features, self.bits,
            self.group_size))
        if k is not None:
            return k.forward(x)
        return self.forward_torch(x)

    def forward_torch(self, x: torch.Tensor) -> torch.Tensor:
        # q·s − z·s in one fused pass (within an ulp of (q − z)·s, which dequantize() keeps)
        w = torch.addcmul(self._neg_zero_scales(), self._codes().to(torch.float32), self.scales)
        w = w.reshape(self.out_features, self.in_features)
        return F.linear(x, w if x.dtype == torch.float32 else w.to(x.dtype))

    def embedding(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.dequantize())

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.w_q, self.scales, self.zeros))

    # --- tensor parallelism ----------------------------------------------------------
    # HQQ's groups run down the flattened weight (axis 0 of ``w.reshape(group, -1)``), so a
    # group holds one element of each of ``group`` bands of rows. A shard is a smaller HQQ
    # layer where its range keeps every element with its own group (see ``HQQShard``), else
    # the whole packed layer run by the kernel and sliced.
    def take_rows(self, ranges: list[tuple[int, int]]) -> "HQQShard":
        return HQQShard(self, rows=ranges)

    def take_cols(self, start: int, stop: int) -> "HQQShard":
        return HQQShard(self, cols=(start, stop))

    def _code_rows(self, r0: int, r1: int) -> torch.Tensor:
        """Rows [r0, r1) of the unpacked codes [group, numel / group] (uint8)."""
        if self.bits == 8:
            return self.w_q[r0:r1]
        half = self.group_size // 2
        parts = []
        if r0 < half:
            parts.append(self.w_q[r0:min(r1, half)] >> 4)
        if r1 > half:
            parts.append(self.w_q[max(r0, half) - half:r1 - half] & 0x0F)
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    # --- UQFF (upstream's per-tensor entries for an HQQ layer) -----------------------
    def to_uqff_tensors(self) -> dict[str, torch.Tensor]:
        return {
            "weight.format": torch.tensor(_SERDE_HQQ, dtype=torch.uint8),
            "weight": self.w_q,
            "weight.scales": self.scales,
            "weight.zeros": self.zeros,
            "weight.shape": torch.tensor([self.out_features, self.in_features], dtype=torch.uint32),
            "weight.bits": torch.tensor(self.bits, dtype=torch.uint8),
            "weight.group_size": torch.tensor(self.group_size, dtype=torch.uint32),
            "weight.axis": torch.tensor(0, dtype=torch.uint8),
            "weight.optimization_steps": torch.tensor(self.steps, dtype=torch.uint32),
            "weight.round_zeros": torch.tensor(0, dtype=torch.uint8),
            "weight.channel_wise": torch.tensor(1, dtype=torch.uint8),
        }

    @classmethod
    def from_uqff_tensors(cls, t: dict) -> "HQQMethod":
        if int(t["weight.format"]) != _SERDE_HQQ:
            raise ValueError(f"weight.format: expected {_SERDE_HQQ} (HQQ), got {int(t['weight.format'])}")
        if int(t.get("weight.axis", 0)) != 0 or int(t.get("weight.channel_wise", 1)) != 1:
            raise ValueError("HQQ: only axis 0, channel-wise layers are supported")
        shape = [int(s) for s in t["weight.shape"].reshape(-1).tolist()]
        return cls(t["weight"], t["weight.scales"], t["weight.zeros"], shape, int(t["weight.bits"]),
                   int(t["weight.group_size"]), int(t.get("weight.optimization_steps", ISQ_STEPS)))

    def __repr__(self) -> str:
        return f"HQQMethod({self.bits} bit, out={self.out_features}, in={self.in_features}, group={self.group_size})"


def _bands(full: HQQMethod) -> int | None:
    """Rows per band (``out / group``) when every weight row lies in one row of the grouped
    view; None otherwise (then no range of rows or columns is an HQQ layer of its own)."""
    return full.out_features // full.group_size if full.out_features % full.group_size == 0 else None


def _row_shard(full: HQQMethod, ranges: list[tuple[int, int]]) -> HQQMethod | None:
    """Rows ``ranges`` as an HQQ layer of their own, when each range is whole bands.

    With ``R = out / group`` rows per band, weight row ``n`` is row ``n // R`` of the grouped
    view and its element ``k`` lies in group (column) ``(n % R) * in + k``. Stacking whole
    bands keeps ``n % R`` and so every element's group: the shard is the same scales and
    zeros over the chosen view rows, i.e. an HQQ layer whose group size is its band count."""
    R = _bands(full)
    ranges = [(a, b) for a, b in ranges if b > a]
    if R is None or not ranges or any(a % R or b % R for a, b in ranges):
        return None
    codes = torch.cat([full._code_rows(a // R, b // R) for a, b in ranges])
    group = codes.shape[0]
    if full.bits == 4:
        if group % 2:
            return None
        codes = (codes[:group // 2] << 4) | codes[group // 2:]
    return HQQMethod(codes.contiguous(), full.scales, full.zeros, (group * R, full.in_features), full.bits, group,
                     full.steps)


def _col_shard(full: HQQMethod, start: int, stop: int) -> HQQMethod | None:
    """Columns [start, stop) as an HQQ layer of their own (whole groups: a group is one
    column of one band of rows), when the rows fall in whole bands."""
    R = _bands(full)
    if R is None:
        return None
    k = full.in_features

    def cols(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(t.shape[0], R, k)[:, :, start:stop].reshape(t.shape[0], -1).contiguous()

    return HQQMethod(cols(full.w_q), cols(full.scales.reshape(1, -1)), cols(full.zeros.reshape(1, -1)),
                     (full.out_features, stop - start), full.bits, full.group_size, full.steps)


class HQQShard:
    """Rows or columns of an HQQ layer for one tensor-parallel rank (``take_rows`` /
    ``take_cols``).

    Where the range is whole bands of rows (rows) or the layer's rows are (columns), the
    shard is a smaller ``HQQMethod`` (``local``): its own codes, the C++ kernel over just
    its part, and about half the layer's memory on 2 ranks (row shards keep all scales and
    zeros, a quarter of a 4-bit layer). Otherwise (a fused q/k/v whose parts are not whole
    bands, rows not a multiple of the group) it keeps the whole packed layer, runs the
    kernel over all of it and takes its outputs (rows) or feeds zeros for the other
    columns (columns): exact either way, one full layer of work per rank."""

    def __init__(self, full: HQQMethod, rows: list[tuple[int, int]] | None = None,
                 cols: tuple[int, int] | None = None, local: HQQMethod | None = None):
        self.rows, self.cols = rows, cols
        base = full if full is not None else local
        self.out_features = sum(b - a for a, b in rows) if rows else base.out_features
        self.in_features = cols[1] - cols[0] if cols else base.in_features
        if local is None and full is not None:
            local = _row_shard(full, rows) if rows else _col_shard(full, *cols) if cols else None
        self.local = local
        # A local layer needs nothing of the whole one: keep it only for the fallback.
        self.full = None if local is not None else full
        self._index = None
        if self.full is not None and rows:
            self._index = torch.cat([torch.arange(a, b) for a, b in rows]).to(full.w_q.device)

    def to(self, device) -> "HQQShard":
        def moved(f: HQQMethod) -> HQQMethod:
            return HQQMethod(f.w_q.to(device), f.scales.to(device), f.zeros.to(device),
                             (f.out_features, f.in_features), f.bits, f.group_size, f.steps)
        if self.local is not None:
            return HQQShard(None, self.rows, self.cols, local=moved(self.local))
        return HQQShard(moved(self.full), self.rows, self.cols)

    def _part(self, w: torch.Tensor) -> torch.Tensor:
        if self.rows:
            w = torch.cat([w[a:b] for a, b in self.rows])
        if self.cols:
            w = w[:, self.cols[0]:self.cols[1]]
        return w

    def dequantize(self) -> torch.Tensor:
        if self.local is not None:
            return self.local.dequantize()
        return self._part(self.full.dequantize())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.local is not None:
            return self.local.forward(x)
        if self.cols:
            # The other columns' inputs as zeros: their products add exact zeros.
            wide = x.new_zeros(*x.shape[:-1], self.full.in_features)
            wide[..., self.cols[0]:self.cols[1]] = x
            return self.full.forward(wide)
        y = self.full.forward(x)
        return y if self._index is None else y.index_select(-1, self._index)

    def embedding(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.dequantize())

    @property
    def nbytes(self) -> int:
        return (self.local or self.full).nbytes

    def __repr__(self) -> str:
        kept = f"local={self.local!r}" if self.local is not None else f"whole={self.full!r}"
        return f"HQQShard({kept}, rows={self.rows}, cols={self.cols})"
