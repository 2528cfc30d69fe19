"""Multi-head latent attention (DeepSeek-V2/V3) over the paged cache.

The cache keeps the compressed form only: per token one "head" holding the normalised KV
latent (``kv_lora_rank``) followed by the roped shared key part (``qk_rope_head_dim``),
i.e. ``KVCacheSpec(1, kv_lora_rank + rope_dim, 0)``; that is 576 numbers per token and
layer for DeepSeek-V3 instead of 128 heads x 320.

Two equivalent ways to attend over those latents:

* expand (prefill): ``kv_b_proj`` turns every context latent into per-head K_nope and V,
  exactly as the reference does; cheap when the queries are about as many as the keys.
* absorb (decode): ``kv_b_proj``'s key half is folded into the queries and its value half
  applied after attention, so attention runs directly on the latents (one shared KV head)
  and the per-step cost no longer grows with heads x context.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mistralrs_core.layers.attention import AttentionMetadata, LayerKVCache, _pad_queries, _unpad
from mistralrs_core.layers.linear import Linear


def _dense_weight(lin: Linear, dtype) -> torch.Tensor:
    if lin.qmethod is not None:
        return lin.qmethod.dequantize().to(dtype)
    return lin.weight


def mla_attention(q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor, meta: AttentionMetadata,
                  cache: LayerKVCache | None, kv_b_proj: Linear, *, v_dim: int, scale: float,
                  absorb: bool | None = None) -> torch.Tensor:
    """q_nope [T, H, nope], q_pe [T, H, rope] (roped), latent [T, L + rope] (normalised
    latent, roped key) -> attention output [T, H, v_dim].

    ``absorb=None`` picks absorb for pure decode steps and expand otherwise."""
    heads, nope = q_nope.shape[1], q_nope.shape[2]
    rank = latent.shape[-1] - q_pe.shape[-1]
    if cache is not None:
        cache.write(meta.slot_mapping, latent[:, None], None)
    fresh = meta.fresh_prefill or cache is None
    if fresh:
        ctx = _pad_queries(latent[:, None], meta)                  # [B, 1, q_max, L + R]
    else:
        ctx = cache.gather(meta.block_tables, meta.k_max)[0].transpose(1, 2)   # [B, 1, K, L + R]
    ctx = ctx.to(q_nope.dtype)
    mask = meta.mask(q_nope.device)
    if fresh:
        mask = mask[..., :ctx.shape[2]]
    if absorb is None:
        absorb = meta.q_max == 1
    if absorb:
        w = _dense_weight(kv_b_proj, q_nope.dtype).view(heads, nope + v_dim, rank)
        q_lat = torch.einsum("thn,hnl->thl", q_nope, w[:, :nope])
        queries = _pad_queries(torch.cat((q_lat, q_pe), -1), meta)
        out = F.scaled_dot_product_attention(queries, ctx, ctx[..., :rank], attn_mask=mask, scale=scale,
                                             enable_gqa=True)
        return torch.einsum("thl,hvl->thv", _unpad(out, meta), w[:, nope:])
    b, _, k_len, _ = ctx.shape
    kv = kv_b_proj(ctx[:, 0, :, :rank]).view(b, k_len, heads, nope + v_dim).transpose(1, 2)
    keys = torch.cat((kv[..., :nope], ctx[..., rank:].expand(b, heads, k_len, -1)), -1)
    queries = _pad_queries(torch.cat((q_nope, q_pe), -1), meta)
    out = F.scaled_dot_product_attention(queries, keys, kv[..., nope:], attn_mask=mask, scale=scale)
    return _unpad(out, meta)
