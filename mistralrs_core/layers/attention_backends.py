"""Attention backends: the ways a layer turns q, k, v into softmax(q k^T * scale + mask) v.

Every backend has the same call shape::

    out = backend(q, k, v, batch, cache, scale=..., **options)

and differs only in which keys each query may see (described by ``batch``) and where keys
live between steps (``cache``):

=========================  ========================  =======================  =====================
backend                    ``batch``                 ``cache``                used by
=========================  ========================  =======================  =====================
``PagedSelfAttention``     ``AttentionMetadata``     ``LayerKVCache``/None    decoder self-attention
                                                                              (causal, sliding, Gemma 3
                                                                              image spans, bidirectional
                                                                              embedding models)
``EncoderAttention``       ``EncoderBatch``          None                     vision towers, T5, CLIP text
``CrossAttention``         ``CrossAttentionBatch``   ``CrossAttentionCache``  Mllama text -> image layers
=========================  ========================  =======================  =====================

Backends hold no state; a layer keeps one (the module-level instances below are enough) and
everything that changes per step travels in ``batch`` and ``cache``.
"""
from __future__ import annotations

import abc
from typing import Any

import attrs
import torch
import torch.nn.functional as F

from mistralrs_core.layers.attention import AttentionMetadata, LayerKVCache, _pad_queries, _unpad, attention


class AttentionBackend(abc.ABC):
    """softmax(q k^T * scale [+ bias], masked) v for one layer.

    Args (all backends):
        q: queries, [T, Hq, D] for the step's flat token batch (``EncoderAttention`` also
            takes a padded [B, S, Hq, D]).
        k, v: the keys/values this call brings, [Tk, Hkv, D] and [Tk, Hkv, Dv] in q's layout,
            Hq a multiple of Hkv (grouped-query attention); rope already applied. A backend
            with a cache stores them there first; ``CrossAttention`` accepts None on steps
            that bring no new encoder states.
        batch: which keys each query may see (the backend's own description type).
        cache: where keys persist across steps, or None.
        scale: the factor on q k^T (usually 1/sqrt(D)).
    Returns:
        [T, Hq, Dv] (or [B, S, Hq, Dv] for a padded encoder input), in q's dtype.
    """

    @abc.abstractmethod
    def forward(self, q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None, batch: Any,
                cache: Any, *, scale: float, **options) -> torch.Tensor:
        ...

    def __call__(self, q, k, v, batch, cache=None, *, scale: float, **options) -> torch.Tensor:
        return self.forward(q, k, v, batch, cache, scale=scale, **options)


# --------------------------------------------------------------------------- paged self-attention

class PagedSelfAttention(AttentionBackend):
    """Self-attention over the paged KV cache: ``layers.attention.attention`` as a backend.

    Causal unless ``meta.causal`` is False; ``meta.bidirectional_spans`` opens spans of a
    causal sequence both ways (Gemma 3 image tokens). Options: ``sliding_window``,
    ``softcap`` (logit soft-capping), ``sinks`` (per-head sink logits), ``chunk`` (chunked
    local attention, Llama 4)."""

    def forward(self, q, k, v, batch: AttentionMetadata, cache: LayerKVCache | None, *, scale: float,
                sliding_window: int | None = None, softcap: float | None = None,
                sinks: torch.Tensor | None = None, chunk: int | None = None) -> torch.Tensor:
        return attention(q, k, v, batch, cache, scale=scale, sliding_window=sliding_window,
                         softcap=softcap, sinks=sinks, chunk=chunk)


def token_spans(token_ids, token_id: int) -> list[tuple[int, int]]:
    """[start, end) runs of ``token_id`` in ``token_ids``: a sequence's entry for
    ``AttentionMetadata.bidirectional_spans`` (Gemma 3: the image soft-token id). Adjacent
    runs merge into one span, as transformers' ``token_type_ids`` blocks do."""
    spans, start = [], None
    for i, t in enumerate(token_ids):
        if t == token_id and start is None:
            start = i
        elif t != token_id and start is not None:
            spans.append((start, i))
            start = None
    if start is not None:
        spans.append((start, len(token_ids)))
    return spans


# --------------------------------------------------------------------------- encoder attention

@attrs.define(eq=False)
class EncoderBatch:
    """Which keys each query of a non-paged encoder call sees.

    Two layouts, chosen by the rank of q:

    * packed, q/k/v [T, H, D]: ``seq_lens`` splits T into consecutive sequences (the images of
      a ViT batch, each its own length, or Qwen2-VL's ``cu_seqlens`` windows); attention is
      block-diagonal: a token sees only its own sequence.
    * padded, q/k/v [B, S, H, D]: ``key_padding_mask`` [B, S] is True for real tokens
      (None: every token is real).

    ``causal`` additionally hides later keys (CLIP's text encoder).
    """
    seq_lens: list[int] | None = None
    key_padding_mask: torch.Tensor | None = None
    causal: bool = False
    _index: dict = attrs.field(factory=dict)

    @classmethod
    def packed(cls, seq_lens: list[int], causal: bool = False) -> "EncoderBatch":
        return cls(seq_lens=[int(n) for n in seq_lens], causal=causal)

    @classmethod
    def from_cu_seqlens(cls, cu_seqlens, causal: bool = False) -> "EncoderBatch":
        """From cumulative boundaries [0, n0, n0 + n1, ...] (Qwen2-VL's ``cu_seqlens``)."""
        cu = [int(x) for x in (cu_seqlens.tolist() if torch.is_tensor(cu_seqlens) else cu_seqlens)]
        return cls.packed([b - a for a, b in zip(cu, cu[1:])], causal=causal)

    @classmethod
    def padded(cls, key_padding_mask: torch.Tensor | None = None, causal: bool = False) -> "EncoderBatch":
        return cls(key_padding_mask=key_padding_mask, causal=causal)

    def pack_index(self, device) -> tuple[torch.Tensor, list[int], int]:
        """(row of each packed token in the padded [B * s_max] layout, non-empty lengths, s_max)."""
        hit = self._index.get(device)
        if hit is None:
            lens = [n for n in self.seq_lens if n > 0]
            s_max = max(lens)
            idx = torch.cat([torch.arange(n) + i * s_max for i, n in enumerate(lens)]).to(device)
            hit = self._index[device] = (idx, lens, s_max)
        return hit


class EncoderAttention(AttentionBackend):
    """Non-paged attention over whole sequences: nothing is cached, every key is present.

    Option ``bias``: an additive float bias broadcastable to [B, H, S, S] (T5's relative
    position bias, a learned attention bias); in the packed layout S is the longest sequence
    and row/column i of batch b is token i of sequence b."""

    def forward(self, q, k, v, batch: EncoderBatch | None, cache=None, *, scale: float,
                bias: torch.Tensor | None = None) -> torch.Tensor:
        batch = batch if batch is not None else EncoderBatch()
        if q.dim() == 4:
            return self._padded(q, k, v, batch.key_padding_mask, batch.causal, scale, bias)
        if q.dim() != 3:
            raise ValueError(f"encoder attention wants q [T, H, D] or [B, S, H, D], got {tuple(q.shape)}")
        lens = batch.seq_lens if batch.seq_lens is not None else [q.shape[0]]
        if sum(lens) != q.shape[0]:
            raise ValueError(f"seq_lens sum to {sum(lens)} but q has {q.shape[0]} tokens")
        nonempty = [n for n in lens if n > 0]
        if not nonempty:
            return q.new_zeros(*q.shape[:2], v.shape[-1])
        if all(n == nonempty[0] for n in nonempty):
            # Equal lengths (a batch of same-size images): a plain reshape, no mask at all.
            b, s = len(nonempty), nonempty[0]
            out = self._padded(q.view(b, s, *q.shape[1:]), k.view(b, s, *k.shape[1:]),
                               v.view(b, s, *v.shape[1:]), None, batch.causal, scale, bias)
            return out.reshape(q.shape[0], *out.shape[2:])
        idx, nonempty, s_max = batch.pack_index(q.device)
        b = len(nonempty)

        def pad(x):
            out = x.new_zeros(b * s_max, *x.shape[1:])
            out.index_copy_(0, idx, x)
            return out.view(b, s_max, *x.shape[1:])

        lengths = torch.tensor(nonempty, device=q.device)
        key_mask = torch.arange(s_max, device=q.device)[None, :] < lengths[:, None]
        out = self._padded(pad(q), pad(k), pad(v), key_mask, batch.causal, scale, bias)
        return out.reshape(b * s_max, *out.shape[2:]).index_select(0, idx)

    @staticmethod
    def _padded(q, k, v, key_mask, causal, scale, bias):
        """q [B, S, Hq, D], k/v [B, Sk, Hkv, D]; key_mask [B, Sk] True for real keys."""
        qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        gqa = kt.shape[1] != qt.shape[1]
        if key_mask is None and bias is None:
            out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal, scale=scale, enable_gqa=gqa)
            return out.transpose(1, 2)
        s, sk = qt.shape[2], kt.shape[2]
        allowed = None
        if key_mask is not None:
            allowed = key_mask[:, None, None, :].expand(-1, 1, s, sk)
        if causal:
            tri = torch.ones(s, sk, dtype=torch.bool, device=q.device).tril()
            allowed = tri[None, None] if allowed is None else allowed & tri
        empty = None
        if allowed is not None:
            # A query with no visible key (all of its sequence is padding) would get NaN from
            # softmax over -inf; it attends everything instead and its output is zeroed below.
            empty = ~allowed.any(-1, keepdim=True)
            allowed = allowed | empty
        if bias is None:
            mask = allowed
        else:
            mask = bias.to(qt.dtype)
            if allowed is not None:
                mask = mask.masked_fill(~allowed, float("-inf"))
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=scale, enable_gqa=gqa)
        if empty is not None:
            out = out.masked_fill(empty, 0.0)
        return out.transpose(1, 2)


# --------------------------------------------------------------------------- cross-attention

class CrossAttentionCache:
    """One cross-attention layer's encoder keys/values per running sequence.

    Written once per sequence (the step its image features are computed) and read on every
    later step, keyed by the sequence's slot (``AttentionMetadata.state_slots``: one slot per
    running sequence, ``max_seqs`` slots). A slot with nothing stored has length 0: the
    sequence has no image and its cross-attention output is zero.

    Each slot holds its own [L, Hkv, D] tensors (image token counts differ per sequence, and a
    dense [max_seqs, L_max] pool would reserve memory for images never sent); the padded
    batch view is rebuilt only when the set of slots or their contents change, so a run of
    decode steps over the same sequences reuses it."""

    def __init__(self, max_seqs: int):
        self.max_seqs = max_seqs
        self._k: list[torch.Tensor | None] = [None] * max_seqs
        self._v: list[torch.Tensor | None] = [None] * max_seqs
        self._version = 0
        self._gathered: tuple | None = None

    def store(self, slot: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Keep ``k`` [L, Hkv, D] and ``v`` [L, Hkv, Dv] for the sequence in ``slot``."""
        self._k[slot], self._v[slot] = k, v
        self._version += 1

    def clear(self, slot: int) -> None:
        """Forget ``slot`` (its sequence finished; the slot may be reused)."""
        if self._k[slot] is not None:
            self._k[slot] = self._v[slot] = None
            self._version += 1

    def length(self, slot: int) -> int:
        k = self._k[slot]
        return 0 if k is None else k.shape[0]

    def gather(self, slots: list[int]):
        """(k [B, L_max, Hkv, D], v [B, L_max, Hkv, Dv], lengths [B]) for ``slots``;
        None for k/v when no slot holds anything. Rows past a slot's length are zero."""
        key = (tuple(slots), self._version)
        if self._gathered is not None and self._gathered[0] == key:
            return self._gathered[1]
        lens = [self.length(s) for s in slots]
        present = [s for s in slots if self._k[s] is not None]
        if not present:
            result = (None, None, lens)
        elif len(slots) == 1:
            result = (self._k[slots[0]][None], self._v[slots[0]][None], lens)
        else:
            ref_k, ref_v = self._k[present[0]], self._v[present[0]]
            l_max = max(lens)
            k = ref_k.new_zeros(len(slots), l_max, *ref_k.shape[1:])
            v = ref_v.new_zeros(len(slots), l_max, *ref_v.shape[1:])
            for i, s in enumerate(slots):
                if self._k[s] is not None:
                    k[i, :lens[i]] = self._k[s]
                    v[i, :lens[i]] = self._v[s]
            result = (k, v, lens)
        self._gathered = (key, result)
        return result

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self._k + self._v if t is not None)


@attrs.define(eq=False)
class CrossAttentionBatch:
    """What a cross-attention layer needs beyond the step's ``AttentionMetadata``.

    ``slots``: per sequence of the step, its cache slot (its state slot).
    ``new_slots``/``new_lens``: the sequences whose encoder K/V arrive in this call (packed
    in that order along k/v's first axis); empty on steps without new images.
    ``key_mask``: optional [T, K] bool, per text token the encoder keys it may see (Mllama's
    ``cross_attention_mask`` expanded over each tile's vision tokens); None: all of its
    sequence's keys. Columns past a sequence's stored length are ignored; keys past the
    mask's width are hidden.

    A text token that may see no key follows transformers' Mllama: its mask row is dropped
    (it attends uniformly to all of its sequence's keys) and ``text_row_mask`` is 0 for it,
    which the layer multiplies into its feed-forward branch. A sequence with no stored
    keys gets a zero attention output and a 0 row mask: with Mllama's bias-free o_proj the
    whole cross layer is then the identity, as transformers skips the layer without images.
    """
    meta: AttentionMetadata
    slots: list[int]
    new_slots: list[int] = attrs.field(factory=list)
    new_lens: list[int] = attrs.field(factory=list)
    key_mask: torch.Tensor | None = None
    _memo: dict = attrs.field(factory=dict)

    @classmethod
    def from_meta(cls, meta: AttentionMetadata, **kw) -> "CrossAttentionBatch":
        """Slots from ``meta.state_slots`` (one device->host copy per step; build this once per
        step and hand it to every cross layer)."""
        if meta.state_slots is None:
            raise ValueError("cross-attention needs AttentionMetadata.state_slots (one slot per sequence)")
        return cls(meta=meta, slots=[int(s) for s in meta.state_slots.tolist()], **kw)

    def _masks(self, lens: list[int], device):
        """(allowed [B, 1, q_max, L_max] bool, row_ok [B, q_max] bool, has_keys [B] bool)."""
        key = (tuple(lens), device)
        hit = self._memo.get(key)
        if hit is not None:
            return hit
        meta = self.meta
        l_max = max(lens)
        lengths = torch.tensor(lens, device=device)
        has_keys = lengths > 0
        in_seq = torch.arange(l_max, device=device)[None, None, :] < lengths[:, None, None]  # [B, 1, L]
        if self.key_mask is None:
            allowed = in_seq.expand(-1, meta.q_max, -1)
            row_ok = has_keys[:, None].expand(-1, meta.q_max)
        else:
            km = self.key_mask.to(device=device, dtype=torch.bool)
            cols = min(km.shape[1], l_max)
            padded = torch.zeros(meta.num_seqs * meta.q_max, l_max, dtype=torch.bool, device=device)
            padded[:, :cols].index_copy_(0, meta.token_index, km[:, :cols])
            allowed = padded.view(meta.num_seqs, meta.q_max, l_max) & in_seq
            row_ok = allowed.any(-1)
            # transformers: a row with no visible key has its mask zeroed -> all keys visible.
            allowed = torch.where(row_ok[:, :, None], allowed, in_seq)
        # Sequences without keys attend key 0 (a zero-filled row) so softmax stays finite.
        allowed = allowed | (~has_keys[:, None, None] & (torch.arange(l_max, device=device) == 0))
        hit = self._memo[key] = (allowed[:, None], row_ok, has_keys)
        return hit

    def text_row_mask(self, cache: CrossAttentionCache, device=None) -> torch.Tensor:
        """[T] 1.0 where a text token sees at least one encoder key, else 0.0 (transformers'
        ``full_text_row_masked_out_mask``), in the flat token order."""
        lens = [cache.length(s) for s in self.slots]
        device = device if device is not None else self.meta.token_index.device
        if max(lens) == 0:
            return torch.zeros(self.meta.token_index.shape[0], device=device)
        _, row_ok, _ = self._masks(lens, device)
        return row_ok.reshape(-1).index_select(0, self.meta.token_index.to(device)).float()


class CrossAttention(AttentionBackend):
    """Text queries attend to per-sequence encoder states kept in a ``CrossAttentionCache``.

    ``k``/``v``: packed encoder K/V for ``batch.new_slots`` (stored before attending), or None.
    Returns [T, Hq, Dv]; multiply the layer's feed-forward branch by
    ``batch.text_row_mask(cache)`` where the reference does (Mllama)."""

    def forward(self, q, k, v, batch: CrossAttentionBatch, cache: CrossAttentionCache, *,
                scale: float) -> torch.Tensor:
        if k is not None:
            off = 0
            alone = len(batch.new_slots) == 1
            for slot, n in zip(batch.new_slots, batch.new_lens):
                # A slice of a shared batch is copied so one finished sequence's slot does
                # not keep the other sequences' encoder states alive.
                ks, vs = k[off:off + n], v[off:off + n]
                cache.store(slot, ks if alone else ks.clone(), vs if alone else vs.clone())
                off += n
            if off != k.shape[0]:
                raise ValueError(f"new_lens cover {off} encoder tokens but k has {k.shape[0]}")
        keys, values, lens = cache.gather(batch.slots)
        if keys is None:
            # No sequence of the step has encoder states: the layer contributes nothing
            # (cross-attention value width equals the query's head width in every user).
            return torch.zeros_like(q)
        meta = batch.meta
        queries = _pad_queries(q, meta)
        keys = keys.transpose(1, 2).to(queries.dtype)
        values = values.transpose(1, 2).to(queries.dtype)
        gqa = keys.shape[1] != queries.shape[1]
        if batch.key_mask is None and all(n == lens[0] for n in lens):
            out = F.scaled_dot_product_attention(queries, keys, values, scale=scale, enable_gqa=gqa)
        else:
            allowed, _, _ = batch._masks(lens, q.device)
            # A sequence without keys attends only its key 0, a zero row of the gathered
            # values (``gather`` zero-fills), so its output is exactly zero.
            out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=allowed, scale=scale,
                                                 enable_gqa=gqa)
        return _unpad(out, meta)


paged_self_attention = PagedSelfAttention()
encoder_attention = EncoderAttention()
cross_attention = CrossAttention()
