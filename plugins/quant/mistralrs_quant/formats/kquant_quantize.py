"""Torch quantizers for Q4_K, Q6_K and Q8_K.

gguf-py has no reference quantizer for these, so they follow ggml's algorithms
(quantize_row_q{4,6,8}_K_ref) in vectorised form: a small grid of candidate scales per
sub-block, each refined by weighted least squares, the best kept; then the sub-block
scales are themselves quantized to 6 or 8 bits against one f16 super-block scale. The
output is a valid block that any ggml reader decodes; it is close to, not bit-identical
with, llama.cpp's output (its search order differs in ties).
"""
from __future__ import annotations

import torch

from ._bits import f16_bytes, f32_bytes, flatten_rows, safe_reciprocal

QK_K = 256


def _nearest(x: torch.Tensor) -> torch.Tensor:
    # ggml's nearest_int rounds half to even, as torch.round does.
    return torch.round(x)


def _fit_symmetric(x: torch.Tensor, nmax: int) -> torch.Tensor:
    """Per row of ``x`` [..., n]: the scale s minimising sum w (x - s·L)², L in [-nmax, nmax-1].

    Mirrors make_qx_quants(rmse_type=1): weights x², candidates -(nmax + 0.1·k)/max.
    """
    w = x * x
    mx = x.gather(-1, x.abs().argmax(-1, keepdim=True))
    steps = torch.arange(-9, 10, dtype=torch.float32) * 0.1
    iscale = -(nmax + steps) * safe_reciprocal(mx)            # [..., 19]
    L = _nearest(iscale.unsqueeze(-1) * x.unsqueeze(-2)).clamp(-nmax, nmax - 1)
    wx = (w * x).unsqueeze(-2)
    sumlx = (wx * L).sum(-1)
    suml2 = (w.unsqueeze(-2) * L * L).sum(-1)
    score = torch.where(suml2 > 0, sumlx * sumlx * safe_reciprocal(suml2), torch.zeros_like(suml2))
    best = score.argmax(-1, keepdim=True)
    scale = (sumlx * safe_reciprocal(suml2)).gather(-1, best)
    return scale.squeeze(-1)


def _fit_affine(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: (scale, m ≥ 0) with x ≈ scale·L − m, L in [0, nmax]; make_qkx2_quants style."""
    av = (x * x).mean(-1, keepdim=True).sqrt()
    w = av + x.abs()
    lo = x.amin(-1, keepdim=True).clamp(max=0)
    hi = x.amax(-1, keepdim=True)
    span = hi - lo
    steps = torch.cat((torch.zeros(1), -1 + 0.1 * torch.arange(21, dtype=torch.float32)))
    iscale = (nmax + steps) * safe_reciprocal(span)            # [..., 22]
    L = _nearest(iscale.unsqueeze(-1) * (x - lo).unsqueeze(-2)).clamp(0, nmax)
    wv = w.unsqueeze(-2)
    xv = x.unsqueeze(-2)
    sw, sl, sl2 = w.sum(-1, keepdim=True), (wv * L).sum(-1), (wv * L * L).sum(-1)
    sx, sxl = (w * x).sum(-1, keepdim=True), (wv * L * xv).sum(-1)
    det = sw * sl2 - sl * sl
    ok = det > 0
    scale = torch.where(ok, (sw * sxl - sx * sl) * safe_reciprocal(det), torch.zeros_like(det))
    mn = torch.where(ok, (sl2 * sx - sl * sxl) * safe_reciprocal(det), torch.zeros_like(det))
    # A positive offset cannot be stored (m is subtracted and unsigned), and with every L
    # equal (det = 0) the two unknowns are not separable: fit the scale alone then.
    pos = (mn > 0) | ~ok
    scale = torch.where(pos, sxl * safe_reciprocal(sl2), scale)
    mn = torch.where(pos, torch.zeros_like(mn), mn)
    err = (wv * (scale.unsqueeze(-1) * L + mn.unsqueeze(-1) - xv) ** 2).sum(-1)
    best = err.argmin(-1, keepdim=True)
    scale = scale.gather(-1, best).squeeze(-1)
    m = (-mn.gather(-1, best)).squeeze(-1)
    flat = (span.squeeze(-1) == 0)
    return torch.where(flat, torch.zeros_like(scale), scale), torch.where(flat, -lo.squeeze(-1), m)


def quantize_q8_k(x: torch.Tensor) -> torch.Tensor:
    blocks, lead = flatten_rows(x, QK_K, "Q8_K")
    mx = blocks.gather(-1, blocks.abs().argmax(-1, keepdim=True))
    iscale = -127.0 * safe_reciprocal(mx)
    q = _nearest(iscale * blocks).clamp(max=127)
    bsums = q.reshape(-1, 16, 16).sum(-1).to(torch.int16)
    d = safe_reciprocal(iscale)
    out = torch.cat((f32_bytes(d), q.to(torch.int8).view(torch.uint8),
                     bsums.contiguous().view(torch.uint8)), -1)
    return out.reshape(*lead, -1)


def quantize_q6_k(x: torch.Tensor) -> torch.Tensor:
    blocks, lead = flatten_rows(x, QK_K, "Q6_K")
    n = blocks.shape[0]
    sub = blocks.reshape(n, 16, 16)
    scales = _fit_symmetric(sub, 32)                                      # [n, 16]
    max_scale = scales.gather(-1, scales.abs().argmax(-1, keepdim=True))  # [n, 1]
    iscale = -128.0 * safe_reciprocal(max_scale)
    ls = _nearest(iscale * scales).clamp(-128, 127)
    d16 = safe_reciprocal(iscale).to(torch.float16)
    step = (d16.float() * ls).unsqueeze(-1)                              # [n, 16, 1]
    L = (_nearest(sub * safe_reciprocal(step)).clamp(-32, 31) + 32).to(torch.uint8)
    L = L.reshape(n, 2, 128)
    low = (L & 0x0F).reshape(n, 2, 2, 64)
    ql = low[:, :, 0] | (low[:, :, 1] << 4)
    high = (L >> 4).reshape(n, 2, 4, 32)
    qh = high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)
    sc = ls.to(torch.int8).view(torch.uint8)
    out = torch.cat((ql.reshape(n, 128), qh.reshape(n, 64), sc,
                     d16.contiguous().view(torch.uint8).reshape(n, 2)), -1)
    return out.reshape(*lead, -1)


def _pack_k_scales(ls: torch.Tensor, lm: torch.Tensor) -> torch.Tensor:
    """Inverse of kquants.k_scale_min: 8 scales + 8 mins (0..63) -> 12 bytes."""
    ls, lm = ls.to(torch.uint8), lm.to(torch.uint8)
    first = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    second = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    third = (ls[:, 4:] & 0x0F) | ((lm[:, 4:] & 0x0F) << 4)
    return torch.cat((first, second, third), -1)


def quantize_q4_k(x: torch.Tensor) -> torch.Tensor:
    blocks, lead = flatten_rows(x, QK_K, "Q4_K")
    n = blocks.shape[0]
    sub = blocks.reshape(n, 8, 32)
    scales, mins = _fit_affine(sub, 15)                          # [n, 8] each, both >= 0
    scales = scales.clamp(min=0)
    max_scale = scales.amax(-1, keepdim=True)
    max_min = mins.amax(-1, keepdim=True)
    ls = _nearest(scales * (63 * safe_reciprocal(max_scale))).clamp(0, 63)
    lm = _nearest(mins * (63 * safe_reciprocal(max_min))).clamp(0, 63)
    d16 = (max_scale / 63).to(torch.float16)
    dmin16 = (max_min / 63).to(torch.float16)
    step = (d16.float() * ls).unsqueeze(-1)
    off = (dmin16.float() * lm).unsqueeze(-1)
    L = _nearest((sub + off) * safe_reciprocal(step)).clamp(0, 15).to(torch.uint8)
    L = L.reshape(n, 4, 2, 32)
    qs = (L[:, :, 0] | (L[:, :, 1] << 4)).reshape(n, 128)
    out = torch.cat((d16.contiguous().view(torch.uint8).reshape(n, 2),
                     dmin16.contiguous().view(torch.uint8).reshape(n, 2),
                     _pack_k_scales(ls, lm), qs), -1)
    return out.reshape(*lead, -1)
