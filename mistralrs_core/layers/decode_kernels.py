"""Decode-attention kernels that plugins register for pure-decode steps.

``attention()`` (``layers/attention.py``) runs every paged self-attention call on the torch
path (gather the context, pad, SDPA). On a pure-decode step (one causal query per sequence,
the context already in a ``LayerKVCache``) a plugin may serve the call with its own kernel
that reads the paged blocks in place: the quant plugin registers its Triton kernel for CUDA.

A plugin registers a kernel through the hook ``mistralrs_register_decode_attention``::

    register("triton", "mistralrs_quant.kernels.triton.dispatch:decode_attention",
             device_types=("cuda",))

The target is an object (see ``DecodeAttentionKernel``) with ``supports(q, cache, meta,
**options) -> bool`` (checked per layer call: dtypes, head sizes, whatever the kernel lacks)
and ``__call__(q, cache, meta, *, scale, **options) -> [B, Hq, Dv]``, called after the core
has written the step's K/V into ``cache``. ``options`` are the torch path's: ``sliding_window``,
``softcap``, ``sinks``, ``chunk``. A kernel that declines leaves the call to the next kernel
and finally to the torch path, so a model never depends on a plugin (or triton) being there.

Which kernels are asked is decided once per step and setting (memoised on the step's
metadata) from ``MISTRALRS_DECODE_ATTENTION``:

* unset or ``auto``: the registered kernels whose ``device_types`` hold the tensors' device,
  in registration order;
* ``torch`` (or ``off``/``0``/``none``): none, the torch path always;
* a kernel name (``triton``): that kernel only, on any device, CPU included. This is how tests
  run the Triton kernel on CPU under ``TRITON_INTERPRET=1`` (its ``supports`` refuses CPU
  tensors when triton is not interpreting); an unknown name is a ``ValueError``.
"""
from __future__ import annotations

import os
from typing import Protocol

import torch

ENV = "MISTRALRS_DECODE_ATTENTION"


class DecodeAttentionKernel(Protocol):
    def supports(self, q: torch.Tensor, cache, meta, *, sliding_window: int | None = None,
                 softcap: float | None = None, sinks: torch.Tensor | None = None,
                 chunk: int | None = None) -> bool:
        ...

    def __call__(self, q: torch.Tensor, cache, meta, *, scale: float, sliding_window: int | None = None,
                 softcap: float | None = None, sinks: torch.Tensor | None = None,
                 chunk: int | None = None) -> torch.Tensor:
        ...


def is_pure_decode(meta, cache) -> bool:
    """One causal query per sequence whose keys all live in a core ``LayerKVCache`` (the
    layout kernels read): no prefill, no verified drafts, no bidirectional spans, no
    wrapped caches (Gemma 3n's read-only shared K/V) and no key-only latent caches."""
    from mistralrs_core.layers.attention import LayerKVCache
    return (type(cache) is LayerKVCache and cache.v is not None and meta.causal and not meta.fresh_prefill
            and meta.q_max == 1 and all(n == 1 for n in meta.query_lens)
            and not meta.has_bidirectional_spans)


def kernels_for(meta, device: torch.device) -> tuple:
    """The kernels to ask this step (the first that supports a call serves it)."""
    mode = os.environ.get(ENV, "")
    key = ("decode_kernels", device.type, mode)
    hit = meta._masks.get(key)
    if hit is None:
        from mistralrs_core.plugins import select_kernels
        hit = meta._masks[key] = select_kernels("decode_attention", ENV, device.type)
    return hit


def try_decode_kernel(q, k, v, meta, cache, *, scale: float, **options) -> torch.Tensor | None:
    """Serve a pure-decode call with a registered kernel (K/V written first), or None for
    the torch path."""
    kernels = kernels_for(meta, q.device)
    if not kernels or not is_pure_decode(meta, cache):
        return None
    for kernel in kernels:
        if kernel.supports(q, cache, meta, **options):
            cache.write(meta.slot_mapping, k, v)
            return kernel(q, cache, meta, scale=scale, **options)
    return None
