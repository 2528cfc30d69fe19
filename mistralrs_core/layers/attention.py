"""Attention over the paged KV cache (torch path, any device).

The model runner hands every layer one ``AttentionMetadata`` describing the flat token
batch: which sequence each token belongs to, where its K/V goes in the block pool
(``slot_mapping``) and which blocks hold each sequence's context (``block_tables``).
A layer writes its new K/V into the pool, gathers each sequence's context into a padded
[B, K, heads, dim] view and runs one batched attention call.
"""
from __future__ import annotations

import math

import attrs
import torch
import torch.nn.functional as F

from mistralrs_core.layers.decode_kernels import try_decode_kernel


@attrs.define
class KVCacheSpec:
    """What one layer stores per token: ``num_heads`` x (``k_dim`` + ``v_dim``).
    ``latent``: the entry is a compressed latent (MLA), which stays in the model dtype
    when the paged K/V is stored in FP8 (see ``LayerKVCache``)."""
    num_heads: int
    k_dim: int
    v_dim: int
    latent: bool = False


#: dtypes a paged K/V cache may use besides the model's: ``pa_cache_type=F8E4M3``
FP8_CACHE_DTYPE = torch.float8_e4m3fn
_FP8_MAX = 448.0


def layer_cache_dtype(spec, cache_dtype: torch.dtype, model_dtype: torch.dtype) -> torch.dtype:
    """The dtype of one layer's cache: FP8 applies to plain K/V only; MLA latents and
    recurrent state keep the model dtype (as upstream, whose FP8 cache is a K/V cache)."""
    if cache_dtype == FP8_CACHE_DTYPE and not (isinstance(spec, KVCacheSpec) and not spec.latent):
        return model_dtype
    return cache_dtype


class LayerKVCache:
    """One layer's share of the block pool: k [blocks, block_size, heads, k_dim], v likewise."""

    def __init__(self, spec: KVCacheSpec, num_blocks: int, block_size: int, dtype, device,
                 lazy_zero: bool = False):
        self.spec = spec
        self.block_size = block_size
        # With ``lazy_zero`` the pool is left uninitialised: a large CPU allocation is only
        # committed where it is written, so an idle pool costs no resident memory. The owner
        # then calls ``zero_blocks`` before a block's first use (stale NaN bits would survive
        # a 0 weight in softmax(QK)V).
        alloc = torch.empty if lazy_zero else torch.zeros
        self.k = alloc(num_blocks, block_size, spec.num_heads, spec.k_dim, dtype=dtype, device=device)
        self.v = (alloc(num_blocks, block_size, spec.num_heads, spec.v_dim, dtype=dtype, device=device)
                  if spec.v_dim else None)
        # FP8 (pa_cache_type=F8E4M3): values are stored with scale 1.0, as upstream's paged
        # cache does, saturated to ±448 (its kernels convert with SATFINITE). torch has no
        # CPU index_copy_/index_fill_ for float8, so writes go through a uint8 view.
        self.fp8 = dtype == FP8_CACHE_DTYPE

    def _raw(self, t: torch.Tensor) -> torch.Tensor:
        return t.view(torch.uint8) if self.fp8 else t

    def _stored(self, x: torch.Tensor) -> torch.Tensor:
        if self.fp8:
            return x.clamp(-_FP8_MAX, _FP8_MAX).to(FP8_CACHE_DTYPE).view(torch.uint8)
        return x.to(self.k.dtype)

    def zero_blocks(self, blocks: torch.Tensor) -> None:
        self._raw(self.k).index_fill_(0, blocks, 0)
        if self.v is not None:
            self._raw(self.v).index_fill_(0, blocks, 0)

    def write(self, slot_mapping: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None) -> None:
        kr = self._raw(self.k)
        kr.view(-1, *kr.shape[2:]).index_copy_(0, slot_mapping, self._stored(k))
        if self.v is not None and v is not None:
            vr = self._raw(self.v)
            vr.view(-1, *vr.shape[2:]).index_copy_(0, slot_mapping, self._stored(v))

    def gather(self, block_tables: torch.Tensor, max_len: int):
        """Contexts as [B, max_len, heads, dim] (positions beyond a context are junk, masked later)."""
        b = block_tables.shape[0]
        k = self.k[block_tables].reshape(b, -1, *self.k.shape[2:])[:, :max_len]
        v = None if self.v is None else self.v[block_tables].reshape(b, -1, *self.v.shape[2:])[:, :max_len]
        return k, v

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + (self.v.nbytes if self.v is not None else 0)


@attrs.define(eq=False)
class AttentionMetadata:
    """Per-step description of the flat token batch (shared by every layer)."""
    query_lens: list[int]           # tokens of each sequence in this step
    context_lens: list[int]         # KV length of each sequence after this step
    slot_mapping: torch.Tensor      # [T] pool slot of each new token
    block_tables: torch.Tensor      # [B, max_blocks] block ids (padded with 0)
    token_index: torch.Tensor       # [T] row in the padded [B * q_max] layout
    q_max: int
    k_max: int
    # True when each sequence's context is exactly its new tokens (a fresh prefill).
    fresh_prefill: bool = False
    causal: bool = True
    # [B] recurrent-state slot of each sequence (models with recurrent layers; see layers/recurrent.py)
    state_slots: torch.Tensor | None = None
    # per sequence: its state slot was (re)assigned since its last step, so per-sequence state
    # kept outside the paged cache (cross-attention K/V) belongs to another sequence; a prefix
    # -cache hit means this can happen at a start position > 0
    fresh_slots: list[bool] | None = None
    # per sequence its adapter id (None: base weights); None when no sequence has one
    adapter_ids: list[str | None] | None = None
    # per sequence its engine id and how many logits rows it wants this step (adapters that
    # keep per-sequence state, e.g. X-LoRA's frozen scalings); None in tests and parity helpers
    seq_ids: list[int] | None = None
    num_logits: list[int] | None = None
    # Per sequence, absolute [start, end) position ranges whose tokens attend each other
    # both ways inside a causal sequence (Gemma 3 image tokens); None or all-empty: plain causal.
    bidirectional_spans: list[list[tuple[int, int]]] | None = None
    _masks: dict = attrs.field(factory=dict)

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)

    def mask(self, device, sliding_window: int | None = None, chunk: int | None = None) -> torch.Tensor:
        """Boolean [B, 1, q_max, k_max]: True where a query may attend a key. ``chunk``:
        chunked local attention (Llama 4), keys only in the query's own block of ``chunk``
        absolute positions."""
        key = (sliding_window, self.causal, chunk)
        m = self._masks.get(key)
        if m is None:
            q_lens = torch.tensor(self.query_lens, device=device)
            c_lens = torch.tensor(self.context_lens, device=device)
            qi = torch.arange(self.q_max, device=device)[None, :]
            kj = torch.arange(self.k_max, device=device)[None, None, :]
            q_pos = (c_lens - q_lens)[:, None] + qi                     # [B, q_max] absolute positions
            valid_q = qi < q_lens[:, None]
            m = kj < c_lens[:, None, None]
            if self.causal:
                allowed = kj <= q_pos[:, :, None]
                if self.has_bidirectional_spans:
                    allowed = allowed | self._same_span(q_pos, device)
                m = m & allowed
            if sliding_window is not None:
                m = m & (kj > q_pos[:, :, None] - sliding_window)
                if not self.causal:
                    # Bidirectional models (EmbeddingGemma) window both sides: |q - k| < window.
                    m = m & (kj < q_pos[:, :, None] + sliding_window)
            if chunk is not None:
                m = m & ((kj // chunk) == (q_pos[:, :, None] // chunk))
            # Padding queries attend key 0 so softmax never sees an empty row; their output is dropped.
            m = m | (~valid_q[:, :, None] & (kj == 0))
            m = m[:, None]
            self._masks[key] = m
        return m

    def sequence_mask(self, b: int, device, sliding_window: int | None = None) -> torch.Tensor:
        """Boolean [n, c] for sequence ``b`` alone (its n new queries, its c keys): causal,
        windowed as ``mask``. Built once per step, as ``mask``: every layer asks for it."""
        key = ("sequence", b, sliding_window)
        m = self._masks.get(key)
        if m is None:
            n, c = self.query_lens[b], self.context_lens[b]
            q_pos = torch.arange(c - n, c, device=device)[:, None]
            kj = torch.arange(c, device=device)[None, :]
            m = kj <= q_pos
            if sliding_window is not None:
                m = m & (kj > q_pos - sliding_window)
            self._masks[key] = m
        return m

    @property
    def has_bidirectional_spans(self) -> bool:
        return bool(self.bidirectional_spans) and any(self.bidirectional_spans)

    def _same_span(self, q_pos: torch.Tensor, device) -> torch.Tensor:
        """[B, q_max, k_max]: query and key lie in the same bidirectional span.

        Matches transformers' ``blockwise_overlay`` OR-ed onto the causal mask: within a span
        a query also sees the span's later keys (those already in the context)."""
        span_id = torch.full((self.num_seqs, self.k_max), -1, dtype=torch.long)
        n = 0
        for b, spans in enumerate(self.bidirectional_spans):
            for start, end in spans or ():
                # Parts of a span not yet in the context (a later prefill chunk) have no keys.
                start, end = max(start, 0), min(end, self.k_max)
                if start < end:
                    span_id[b, start:end] = n
                n += 1
        span_id = span_id.to(device)
        # Padding queries may sit past k_max; their rows are dropped, so any id will do.
        q_id = span_id.gather(1, q_pos.clamp(0, self.k_max - 1))
        return (q_id[:, :, None] == span_id[:, None, :]) & (q_id[:, :, None] >= 0)


def _pad_queries(x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
    """[T, H, D] -> [B, H, q_max, D]."""
    b = meta.num_seqs
    if b == 1 and meta.q_max == x.shape[0]:
        return x[None].transpose(1, 2)
    out = x.new_zeros(b * meta.q_max, *x.shape[1:])
    out.index_copy_(0, meta.token_index, x)
    return out.view(b, meta.q_max, *x.shape[1:]).transpose(1, 2)


def _unpad(o: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
    """[B, H, q_max, D] -> [T, H, D]."""
    o = o.transpose(1, 2)
    if meta.num_seqs == 1 and meta.q_max == meta.token_index.shape[0]:
        return o[0]
    return o.reshape(-1, *o.shape[2:]).index_select(0, meta.token_index)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata,
              cache: LayerKVCache | None, *, scale: float, sliding_window: int | None = None,
              softcap: float | None = None, sinks: torch.Tensor | None = None,
              chunk: int | None = None) -> torch.Tensor:
    """q [T, Hq, D], k/v [T, Hkv, D] (rope applied) -> [T, Hq, Dv]; ``chunk``: see
    ``AttentionMetadata.mask``. Pure-decode steps may be served by a kernel a plugin
    registered (``layers/decode_kernels.py``); everything else runs here."""
    if cache is not None and meta.q_max == 1 and not meta.fresh_prefill:
        out = try_decode_kernel(q, k, v, meta, cache, scale=scale, sliding_window=sliding_window,
                                softcap=softcap, sinks=sinks, chunk=chunk)
        if out is not None:
            return out
    if cache is not None:
        cache.write(meta.slot_mapping, k, v)
    if (meta.num_seqs > 1 and meta.q_max >= PER_SEQUENCE_MIN_Q and softcap is None and sinks is None
            and meta.causal and not meta.has_bidirectional_spans and chunk is None
            and (cache is not None or meta.fresh_prefill)):
        return _per_sequence(q, k, v, meta, cache, scale, sliding_window)
    if meta.fresh_prefill or cache is None:
        keys, values = _pad_queries(k, meta), _pad_queries(v, meta)
        k_len = meta.q_max
    else:
        kc, vc = cache.gather(meta.block_tables, meta.k_max)
        keys, values = kc.transpose(1, 2), vc.transpose(1, 2)
        k_len = meta.k_max
    queries = _pad_queries(q, meta)
    if keys.dtype != queries.dtype:
        keys, values = keys.to(queries.dtype), values.to(queries.dtype)
    if (softcap is None and sinks is None and meta.causal and meta.num_seqs == 1
            and (meta.fresh_prefill or cache is None) and (sliding_window is None or sliding_window >= k_len)
            and not meta.has_bidirectional_spans and chunk is None):
        # One fresh sequence with nothing to mask but the future: the causal kernel skips
        # the masked half of the work instead of reading a mask (~2x faster prefill attention).
        # Bidirectional spans let a query see later keys, which the causal kernel cannot.
        out = F.scaled_dot_product_attention(queries, keys, values, is_causal=True, scale=scale,
                                             enable_gqa=keys.shape[1] != queries.shape[1])
        return _unpad(out, meta)
    mask = meta.mask(q.device, sliding_window, chunk)
    if meta.fresh_prefill or cache is None:
        mask = mask[..., :k_len]
    if softcap is None and sinks is None:
        out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask, scale=scale,
                                             enable_gqa=keys.shape[1] != queries.shape[1])
    else:
        out = eager_attention(queries, keys, values, mask, scale, softcap, sinks)
    return _unpad(out, meta)


#: a step whose longest query run is at least this long (a prefill chunk is in it) attends
#: sequence by sequence; below it (decode and speculative steps) one padded call is cheaper
#: than a call per sequence.
PER_SEQUENCE_MIN_Q = 32


def _per_sequence(q, k, v, meta: AttentionMetadata, cache: LayerKVCache | None, scale: float,
                  sliding_window: int | None) -> torch.Tensor:
    """One attention call per sequence of a step that holds a prefill chunk. The padded call
    computes every sequence at the step's [q_max, k_max] through a mask, so a batch of
    prompts of different lengths (or one prompt next to decoding sequences) spent most of it
    on padding: 8 image prompts of ~600 tokens in 2048-token steps, 160 of a step's 470 ms.
    Each sequence here runs what it would run alone: its own new K/V when they are its whole
    context (the causal kernel when no window cuts in), else its context from the cache."""
    outs, off = [], 0
    gqa = q.shape[1] != k.shape[1]
    for b, (n, c) in enumerate(zip(meta.query_lens, meta.context_lens)):
        qb = q[off:off + n].transpose(0, 1)[None]
        if n == c:
            kb, vb = k[off:off + n], v[off:off + n]
        else:
            kc, vc = cache.gather(meta.block_tables[b:b + 1], c)
            kb, vb = kc[0], vc[0]
        kb, vb = kb.transpose(0, 1)[None].to(qb.dtype), vb.transpose(0, 1)[None].to(qb.dtype)
        windowed = sliding_window is not None and sliding_window < c
        if n == c and not windowed:
            o = F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, scale=scale, enable_gqa=gqa)
        elif n == 1 and not windowed:
            o = F.scaled_dot_product_attention(qb, kb, vb, scale=scale, enable_gqa=gqa)
        else:
            m = meta.sequence_mask(b, q.device, sliding_window if windowed else None)
            o = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=m, scale=scale, enable_gqa=gqa)
        outs.append(o[0].transpose(0, 1))
        off += n
    return torch.cat(outs)


def eager_attention(q, k, v, mask, scale, softcap=None, sinks=None):
    """Explicit softmax(QK^T) V for variants SDPA lacks (logit soft-capping, sink logits)."""
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~mask, float("-inf"))
    if sinks is not None:
        # A per-head learned logit joins the softmax and then is dropped.
        sink = sinks.reshape(1, -1, 1, 1).expand(scores.shape[0], -1, scores.shape[2], 1).to(scores.dtype)
        combined = torch.cat([scores, sink], dim=-1)
        combined = combined - combined.amax(dim=-1, keepdim=True)
        probs = torch.softmax(combined, dim=-1)[..., :-1]
    else:
        probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    return torch.matmul(probs.to(v.dtype), v)


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)
