"""How many KV blocks to allocate, from the ``pa_*`` Runner arguments."""
from __future__ import annotations

import logging
import os

import torch

from mistralrs_core.layers.attention import FP8_CACHE_DTYPE, KVCacheSpec, layer_cache_dtype

log = logging.getLogger(__name__)

DEFAULT_BLOCK_SIZE = 32
# Without explicit sizing, the CPU pool gets at most this much memory.
CPU_DEFAULT_BUDGET = 2 << 30


def cache_dtype(pa_cache_type, model_dtype: torch.dtype, specs=()) -> torch.dtype:
    """The paged K/V dtype for ``Runner(pa_cache_type=...)``: ``Auto`` (or None) keeps the
    model dtype, ``F8E4M3`` stores K/V as float8 E4M3 with scale 1.0, as upstream does."""
    name = getattr(pa_cache_type, "name", pa_cache_type)
    if name is None or str(name).lower() == "auto":
        return model_dtype
    if str(name).lower() != "f8e4m3":
        raise ValueError(f"pa_cache_type: expected Auto or F8E4M3, got {pa_cache_type!r}")
    if any(isinstance(s, KVCacheSpec) and s.latent for s in specs):
        log.info("pa_cache_type=F8E4M3: this model's MLA latent cache stays in %s (FP8 applies to "
                 "per-head K/V only, as upstream)", model_dtype)
    return FP8_CACHE_DTYPE


def bytes_per_token(specs, dtype: torch.dtype, model_dtype: torch.dtype | None = None) -> int:
    """K/V bytes per token over all layers; with an FP8 ``dtype``, MLA latents count in
    ``model_dtype`` (they are kept there)."""
    total = 0
    for s in specs:
        # Recurrent-state specs hold per-sequence state, not per-token K/V: not counted here.
        if isinstance(s, KVCacheSpec):
            d = layer_cache_dtype(s, dtype, model_dtype or dtype)
            total += s.num_heads * (s.k_dim + s.v_dim) * torch.empty(0, dtype=d).element_size()
    return total


def _available_memory(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 8 << 30


def pool_tokens(opts, specs, dtype, device: torch.device, max_context: int,
                model_dtype: torch.dtype | None = None) -> int:
    """Priority (as upstream): pa_ctxt_len > pa_gpu_mem_usage > pa_gpu_mem > default."""
    per_tok = max(1, bytes_per_token(specs, dtype, model_dtype))
    if opts.pa_ctxt_len is not None:
        if opts.pa_ctxt_len < 1:
            raise ValueError("pa_ctxt_len: must be >= 1")
        return opts.pa_ctxt_len
    if opts.pa_gpu_mem_usage is not None:
        if not 0 < opts.pa_gpu_mem_usage <= 1:
            raise ValueError("pa_gpu_mem_usage: must be in (0, 1]")
        return int(_available_memory(device) * opts.pa_gpu_mem_usage) // per_tok
    if opts.pa_gpu_mem is not None:
        if opts.pa_gpu_mem < 1:
            raise ValueError("pa_gpu_mem: must be >= 1 (MB)")
        return (opts.pa_gpu_mem << 20) // per_tok
    if device.type == "cuda":
        return int(_available_memory(device) * 0.9) // per_tok
    want = opts.max_seqs * max_context
    budget = min(CPU_DEFAULT_BUDGET, _available_memory(device) // 4)
    return max(min(want, budget // per_tok), min(max_context, 8 * budget // per_tok))


def block_size(opts) -> int:
    bs = opts.pa_blk_size or DEFAULT_BLOCK_SIZE
    if bs < 1:
        raise ValueError("pa_blk_size: must be >= 1")
    return bs
