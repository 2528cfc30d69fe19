"""FP8 (E4M3, ``torch.float8_e4m3fn``) weights: upstream's ISQ form and FP8 checkpoints.

ISQ (upstream's ``FP8Linear::quantize``): one scale per tensor. The weight is rounded to
bfloat16, ``scale = 448 / max|w|`` (computed in bfloat16, as upstream's candle ops do),
``q = fp8(bf16(w · scale))``; upstream stores ``dequant_w_scale = 1 / scale`` (float32),
``quant_scale = scale`` and ``dequant_x_scale`` (equal to ``dequant_w_scale``), so
``w ≈ float(q) · dequant_w_scale``.

Checkpoints (``quantization_config.quant_method == "fp8"``):
* per tensor: ``weight`` (float8) and a scalar ``weight_scale`` (or ``weight_scale_inv``),
  ``w = float(q) · s``;
* DeepSeek-V3 blocks (``weight_block_size: [128, 128]``): ``weight_scale_inv`` is
  ``[ceil(out / 128), ceil(in / 128)]`` and ``w[i, j] = float(q[i, j]) · s[i // 128, j // 128]``
  (the name says "inv", but it multiplies: it is the inverse of the quantization scale).

``forward`` on CPU runs the C++ kernels of ``kernels/qformats.py`` (the codes decoded in
cache tiles, never a whole dense copy); elsewhere, or without them, it dequantizes and
multiplies in the activation dtype (CPU has no FP8 matmul).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..kernels import qformats

FP8_MAX = 448.0
_SERDE_FP8 = 3            # upstream's QuantizedSerdeType::Fp8
_UQFF_DTYPE_F8E4M3 = 9    # upstream's dtype_to_uqff_code(F8E4M3)


def quantize_per_tensor(weight: torch.Tensor):
    """Upstream's per-tensor FP8 quantization: (fp8 codes, quantize scale float32 scalar)."""
    w = weight.detach().to(torch.bfloat16)
    absmax = w.abs().amax()
    scale = (torch.reciprocal(absmax) * FP8_MAX).to(torch.bfloat16)
    scale = scale.clamp(-FP8_MAX, FP8_MAX)
    # bf16 rounding can lift |w·scale| to 450 at most; fp8 rounds that to 448 anyway, and
    # clamping first keeps torch's cast away from its NaN threshold.
    q = (w * scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale.to(torch.float32)


class FP8Method:
    """float8_e4m3fn weight [out, in] with a per-tensor or per-block float32 scale that
    multiplies (``dequant_scale``); ``block`` is ``(rows, cols)`` of a scale block or None."""

    def __init__(self, weight: torch.Tensor, dequant_scale: torch.Tensor, block: tuple[int, int] | None = None):
        if weight.dtype != torch.float8_e4m3fn:
            raise ValueError(f"FP8 weight must be float8_e4m3fn, got {weight.dtype}")
        if weight.dim() != 2:
            raise ValueError(f"FP8 weight must be 2-D, got shape {tuple(weight.shape)}")
        self.weight = weight
        self.dequant_scale = dequant_scale.to(torch.float32)
        self.block = tuple(int(b) for b in block) if block is not None else None
        self.out_features, self.in_features = (int(s) for s in weight.shape)
        if self.block is not None:
            br, bc = self.block
            want = (-(-self.out_features // br), -(-self.in_features // bc))
            if tuple(self.dequant_scale.shape) != want:
                raise ValueError(f"weight_scale_inv has shape {tuple(self.dequant_scale.shape)}, expected "
                                 f"{want} for a {self.out_features}x{self.in_features} weight in "
                                 f"{br}x{bc} blocks")
        elif self.dequant_scale.numel() != 1:
            raise ValueError(f"per-tensor FP8 scale must have one element, got shape "
                             f"{tuple(self.dequant_scale.shape)}")
        # upstream keeps these beside the weight; only its cuBLASLt path reads them
        self.quant_scale = torch.reciprocal(self.dequant_scale) if self.block is None else None

    @classmethod
    def from_float(cls, weight: torch.Tensor, bits: int | None = None, group_size: int | None = None,
                   device=None) -> "FP8Method":
        if bits not in (None, 8):
            raise ValueError(f"FP8 is 8-bit, got bits={bits}")
        if weight.dim() != 2:
            raise ValueError(f"FP8 quantizes 2-D weights, got shape {tuple(weight.shape)}")
        device = torch.device(device) if device is not None else weight.device
        q, scale = quantize_per_tensor(weight)
        return cls(q.to(device), torch.reciprocal(scale).to(device))

    # --- QuantMethod --------------------------------------------------------------
    def _scale_rows(self, rows: torch.Tensor | None) -> torch.Tensor:
        if self.block is None:
            return self.dequant_scale.reshape(())
        br, bc = self.block
        s = self.dequant_scale.repeat_interleave(br, 0)[:self.out_features]
        s = s.repeat_interleave(bc, 1)[:, :self.in_features]
        return s if rows is None else s[rows]

    def dequantize(self) -> torch.Tensor:
        return self.weight.to(torch.float32) * self._scale_rows(None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = qformats.cached(self, lambda: qformats.bind_fp8(self.weight, self.dequant_scale, self.block))
        if k is not None:
            return k.forward(x)
        return self.forward_torch(x)

    def forward_torch(self, x: torch.Tensor) -> torch.Tensor:
        if self.block is None:
            # a per-tensor scale factors out of the product: one conversion pass only
            y = F.linear(x, self.weight.to(x.dtype))
            return y * self.dequant_scale.to(y.dtype)
        w = self.dequantize()
        return F.linear(x, w if x.dtype == torch.float32 else w.to(x.dtype))

    def embedding(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1).long()
        rows = self.weight[flat].to(torch.float32) * self._scale_rows(flat)
        return rows.reshape(*ids.shape, self.in_features)

    @classmethod
    def concat(cls, methods) -> "FP8Method | None":
        # Per-tensor scales differ between q/k/v; a fused layer would need one per part.
        return None

    # Tensor parallelism: a per-tensor scale goes with every shard; block scales are sliced
    # with their blocks, so block-scaled shards must fall on block boundaries.
    def take_rows(self, ranges: list[tuple[int, int]]) -> "FP8Method":
        weight = torch.cat([self.weight[a:b] for a, b in ranges])
        if self.block is None:
            return type(self)(weight, self.dequant_scale.clone())
        br = self.block[0]
        for a, b in ranges:
            if a % br or (b % br and b != self.out_features):
                raise ValueError(f"FP8: rows [{a}, {b}) do not fall on its scale blocks of {br}")
        scale = torch.cat([self.dequant_scale[a // br:-(-b // br)] for a, b in ranges])
        return type(self)(weight, scale, self.block)

    def take_cols(self, start: int, stop: int) -> "FP8Method":
        weight = self.weight[:, start:stop].contiguous()
        if self.block is None:
            return type(self)(weight, self.dequant_scale.clone())
        bc = self.block[1]
        if start % bc or (stop % bc and stop != self.in_features):
            raise ValueError(f"FP8: columns [{start}, {stop}) do not fall on its scale blocks of {bc}")
        return type(self)(weight, self.dequant_scale[:, start // bc:-(-stop // bc)].contiguous(), self.block)

    @property
    def nbytes(self) -> int:
        return self.weight.numel() + self.dequant_scale.numel() * 4

    # --- UQFF (upstream's FP8Linear entries) ------------------------------------------
    def to_uqff_tensors(self) -> dict[str, torch.Tensor]:
        if self.block is not None:
            raise ValueError("block-scaled FP8 layers have no UQFF form upstream (only per-tensor FP8 ISQ)")
        return {
            "weight.format": torch.tensor(_SERDE_FP8, dtype=torch.uint8),
            "weight": self.weight,
            "weight.dequant_w_scale": self.dequant_scale.reshape(()).clone(),
            "weight.dequant_x_scale": self.dequant_scale.reshape(()).clone(),
            "weight.quant_scale": self.quant_scale.reshape(()).clone(),
            "weight.dtype": torch.tensor(_UQFF_DTYPE_F8E4M3, dtype=torch.uint32),
        }

    @classmethod
    def from_uqff_tensors(cls, t: dict) -> "FP8Method":
        if int(t["weight.format"]) != _SERDE_FP8:
            raise ValueError(f"weight.format: expected {_SERDE_FP8} (FP8), got {int(t['weight.format'])}")
        if int(t.get("weight.dtype", _UQFF_DTYPE_F8E4M3)) != _UQFF_DTYPE_F8E4M3:
            raise ValueError(f"weight.dtype: only F8E4M3 ({_UQFF_DTYPE_F8E4M3}) is supported, "
                             f"got {int(t['weight.dtype'])}")
        return cls(t["weight"], t["weight.dequant_w_scale"])

    def __repr__(self) -> str:
        kind = f"blocks {self.block[0]}x{self.block[1]}" if self.block else "per-tensor"
        return f"FP8Method({kind}, out={self.out_features}, in={self.in_features})"
