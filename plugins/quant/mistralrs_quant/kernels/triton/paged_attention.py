"""Paged-attention decode on Triton: one new query token per sequence attending its
context straight from the paged KV cache (``mistralrs_core.layers.attention.LayerKVCache``:
k/v ``[blocks, block_size, kv_heads, dim]``, ``AttentionMetadata.block_tables`` [B, max_blocks]).

One program per (sequence, KV head) serves all the query heads of its group (GQA), so each
K/V tile is read once; keys are gathered position by position through the block table
(any block size), and softmax is computed online in float32 (one pass over the context).
Options as the torch backend: ``sliding_window``, ``softcap``, ``sinks``, ``chunk``; an FP8
(E4M3) cache is decoded from its bits in the kernel. The core calls it through
``dispatch.decode_attention`` on pure-decode steps (``mistralrs_core.layers.decode_kernels``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _e4m3_to_f32(bits):
    """float8 E4M3 (fn: no infinities, 0x7F/0xFF NaN) bits -> float32, exactly."""
    b = bits.to(tl.int32)
    sign = b >> 7
    e = (b >> 3) & 15
    m = b & 7
    normal = ((sign << 31) | ((e + 120) << 23) | (m << 20)).to(tl.float32, bitcast=True)
    sub = m.to(tl.float32) * 0.001953125
    sub = tl.where(sign == 1, -sub, sub)
    v = tl.where(e == 0, sub, normal)
    return tl.where((e == 15) & (m == 7), float("nan"), v)


@triton.jit
def _load_kv(ptr, FP8: tl.constexpr):
    x = tl.load(ptr)
    if FP8:
        v = _e4m3_to_f32(x)
    else:
        v = x.to(tl.float32)
    return v


@triton.jit
def _paged_decode_kernel(q_ptr, k_ptr, v_ptr, bt_ptr, ctx_ptr, sinks_ptr, out_ptr,
                         s_qt, s_qh, s_kb, s_ks, s_kh, s_vb, s_vs, s_vh, s_bt, s_ot, s_oh,
                         scale, softcap, window, chunk,
                         GROUPS: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr,
                         DV: tl.constexpr, DV_PAD: tl.constexpr, PAGE: tl.constexpr, TILE: tl.constexpr,
                         HAS_SOFTCAP: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_CHUNK: tl.constexpr,
                         HAS_SINKS: tl.constexpr, FP8: tl.constexpr):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    g = tl.arange(0, G_PAD)
    hq = kvh * GROUPS + g
    gmask = g < GROUPS
    d = tl.arange(0, D_PAD)
    dv = tl.arange(0, DV_PAD)
    q = tl.load(q_ptr + b * s_qt + hq[:, None] * s_qh + d[None, :],
                mask=gmask[:, None] & (d[None, :] < D), other=0.0).to(tl.float32)
    ctx = tl.load(ctx_ptr + b)
    q_pos = ctx - 1
    lo = q_pos * 0
    if HAS_WINDOW:
        lo = tl.maximum(lo, q_pos - window + 1)
    if HAS_CHUNK:
        lo = tl.maximum(lo, (q_pos // chunk) * chunk)

    if HAS_SINKS:
        # The sink logit joins the softmax's denominator only: start the running max at it.
        m_i = tl.load(sinks_ptr + hq, mask=gmask, other=0.0).to(tl.float32)
        l_i = tl.full((G_PAD,), 1.0, tl.float32)
    else:
        m_i = tl.full((G_PAD,), float("-inf"), tl.float32)
        l_i = tl.zeros((G_PAD,), tl.float32)
    acc = tl.zeros((G_PAD, DV_PAD), tl.float32)

    for t0 in range((lo // TILE) * TILE, ctx, TILE):
        pos = t0 + tl.arange(0, TILE)
        valid = (pos >= lo) & (pos < ctx)
        pc = tl.minimum(tl.maximum(pos, lo), ctx - 1)  # in range: loads need no mask
        blk = tl.load(bt_ptr + b * s_bt + pc // PAGE).to(tl.int64)
        row = blk * s_kb + (pc % PAGE).to(tl.int64) * s_ks + kvh * s_kh
        k = _load_kv(k_ptr + row[:, None] + tl.minimum(d, D - 1)[None, :], FP8)
        k = tl.where(d[None, :] < D, k, 0.0)
        s = tl.sum(q[:, None, :] * k[None, :, :], axis=2) * scale           # [G_PAD, TILE]
        if HAS_SOFTCAP:
            # tanh from exp (no tanh in triton.language): odd, with |x| in the exponent so
            # it never overflows.
            x = s / softcap
            e = tl.exp(-2.0 * tl.abs(x))
            t = (1.0 - e) / (1.0 + e)
            s = tl.where(x < 0, -t, t) * softcap
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        vrow = blk * s_vb + (pc % PAGE).to(tl.int64) * s_vs + kvh * s_vh
        v = _load_kv(v_ptr + vrow[:, None] + tl.minimum(dv, DV - 1)[None, :], FP8)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
        m_i = m_new

    out = acc / l_i[:, None]
    tl.store(out_ptr + b * s_ot + hq[:, None] * s_oh + dv[None, :], out.to(out_ptr.dtype.element_ty),
             mask=gmask[:, None] & (dv[None, :] < DV))


def _context_lens(meta, device) -> torch.Tensor:
    # Once per step for all layers: the metadata's memo dict outlives the step's layers.
    key = ("triton_context_lens", device)
    t = meta._masks.get(key)
    if t is None:
        t = meta._masks[key] = torch.tensor(meta.context_lens, dtype=torch.int32, device=device)
    return t


def paged_decode_attention(q: torch.Tensor, cache, meta, *, scale: float, sliding_window: int | None = None,
                           softcap: float | None = None, sinks: torch.Tensor | None = None,
                           chunk: int | None = None, tile: int = 16) -> torch.Tensor:
    """q [B, Hq, D] (one token per sequence, already written to ``cache``) -> [B, Hq, Dv]."""
    q = q if q.stride(-1) == 1 else q.contiguous()
    bsz, hq, d = q.shape
    kc, vc = cache.k, cache.v
    hkv, dv = kc.shape[2], vc.shape[3]
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of KV heads ({hkv})")
    fp8 = getattr(cache, "fp8", False)
    if fp8:
        kc, vc = kc.view(torch.uint8), vc.view(torch.uint8)
    groups = hq // hkv
    out = torch.empty(bsz, hq, dv, dtype=q.dtype, device=q.device)
    bt = meta.block_tables.to(q.device)
    ctx = _context_lens(meta, q.device)
    sinks_t = sinks.reshape(-1).to(device=q.device, dtype=torch.float32) if sinks is not None else q
    _paged_decode_kernel[(bsz, hkv)](
        q, kc, vc, bt, ctx, sinks_t, out,
        q.stride(0), q.stride(1), kc.stride(0), kc.stride(1), kc.stride(2), vc.stride(0), vc.stride(1),
        vc.stride(2), bt.stride(0), out.stride(0), out.stride(1),
        float(scale), float(softcap or 1.0), int(sliding_window or 0), int(chunk or 1),
        GROUPS=groups, G_PAD=triton.next_power_of_2(groups), D=d, D_PAD=triton.next_power_of_2(d),
        DV=dv, DV_PAD=triton.next_power_of_2(dv), PAGE=cache.block_size, TILE=tile,
        HAS_SOFTCAP=softcap is not None, HAS_WINDOW=sliding_window is not None, HAS_CHUNK=chunk is not None,
        HAS_SINKS=sinks is not None, FP8=fp8, enable_fp_fusion=True)
    return out
