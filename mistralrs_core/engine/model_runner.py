"""Turns a step's records into tensors, runs the model and returns logits."""
from __future__ import annotations

import numpy as np
import torch

from mistralrs_core.engine.step import StepRecord
from mistralrs_core.layers.attention import AttentionMetadata, LayerKVCache, layer_cache_dtype
from mistralrs_core.layers.recurrent import make_layer_cache
from mistralrs_core.models.base import CausalLM


def build_metadata(records: list, block_size: int, device, causal: bool = True,
                   state_slots: list[int] | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
    """``records``: ``StepRecord``s (or, for tests and parity helpers, ``(ids, start,
    blocks)`` tuples). Returns (input_ids [T], positions [T] or [axes, T], metadata)."""
    records = [r if isinstance(r, StepRecord) else StepRecord(-1, list(r[0]), r[1], r[2]) for r in records]
    if state_slots is None and records and records[0].state_slot is not None:
        state_slots = [r.state_slot for r in records]
    q_lens = [len(r.token_ids) for r in records]
    ctx = [r.start + n for r, n in zip(records, q_lens)]
    q_max, k_max = max(q_lens), max(ctx)
    total = sum(q_lens)
    ids = np.fromiter((i for r in records for i in r.token_ids), dtype=np.int64, count=total)
    cache_pos = np.concatenate([np.arange(r.start, r.end, dtype=np.int64) for r in records])
    n_blocks = max(len(r.blocks) for r in records) if records else 0
    table = np.zeros((len(records), max(n_blocks, 1)), dtype=np.int64)
    slots = np.empty(total, dtype=np.int64)
    token_index = np.empty(total, dtype=np.int64)
    off = 0
    for i, (r, n) in enumerate(zip(records, q_lens)):
        if r.blocks:
            table[i, :len(r.blocks)] = r.blocks
        p = cache_pos[off:off + n]
        slots[off:off + n] = table[i, p // block_size] * block_size + p % block_size
        token_index[off:off + n] = i * q_max + np.arange(n)
        off += n
    pos = _rope_positions(records, cache_pos, q_lens)
    fresh = all(r.start == 0 for r in records)
    bidi = _bidirectional_spans(records)
    adapters = [r.adapter_id for r in records]
    meta = AttentionMetadata(
        query_lens=q_lens, context_lens=ctx,
        slot_mapping=torch.from_numpy(slots).to(device),
        block_tables=torch.from_numpy(table).to(device),
        token_index=torch.from_numpy(token_index).to(device),
        q_max=q_max, k_max=k_max, fresh_prefill=fresh, causal=causal,
        state_slots=None if state_slots is None else torch.tensor(state_slots, device=device),
        fresh_slots=None if state_slots is None else [r.fresh_slot for r in records],
        adapter_ids=adapters if any(a is not None for a in adapters) else None,
        seq_ids=[r.seq_id for r in records], num_logits=[r.num_logits for r in records],
        bidirectional_spans=bidi)
    return torch.from_numpy(ids).to(device), torch.from_numpy(pos).to(device), meta


def _rope_positions(records: list[StepRecord], cache_pos: np.ndarray, q_lens: list[int]) -> np.ndarray:
    """[T] when every position is a token index; [axes, T] when a model supplied its own."""
    axes = max((r.positions.shape[0] for r in records if r.positions is not None), default=0)
    if axes == 0:
        return cache_pos
    out = np.broadcast_to(cache_pos, (axes, len(cache_pos))).copy()
    off = 0
    for r, n in zip(records, q_lens):
        if r.positions is not None:
            out[:, off:off + n] = r.positions
        off += n
    return out[0] if axes == 1 else out


def _bidirectional_spans(records: list[StepRecord]):
    spans = [[(s.start, s.end) for s in r.spans if s.bidirectional] for r in records]
    return spans if any(spans) else None


class ModelRunner:
    def __init__(self, model: CausalLM, num_blocks: int, block_size: int, device, cache_dtype,
                 num_state_slots: int = 1):
        self.model = model
        self.device = torch.device(device)
        self.block_size = block_size
        # Paged K/V per attention layer; a slot pool per recurrent layer (see layers/recurrent.py).
        # Under a device map each layer's cache lives with its layer (``model.layer_devices``).
        devices = getattr(model, "layer_devices", None) or []
        self.caches: list[LayerKVCache | None] = [
            make_layer_cache(spec, num_blocks, block_size, layer_cache_dtype(spec, cache_dtype, model.dtype),
                             devices[i] if i < len(devices) else self.device, num_state_slots, lazy_zero=True)
            for i, spec in enumerate(model.kv_cache_specs())
        ]
        self._zeroed: set[int] = set()

    def _zero_fresh_blocks(self, records: list[StepRecord]) -> None:
        """Clear pool blocks the first time any sequence uses them (see LayerKVCache)."""
        fresh = {b for r in records for b in r.blocks if b not in self._zeroed}
        if not fresh:
            return
        self._zeroed.update(fresh)
        idx = torch.tensor(sorted(fresh))
        on: dict = {}
        for c in self.caches:
            if hasattr(c, "zero_blocks"):
                dev = getattr(c, "k", idx).device
                if dev not in on:
                    on[dev] = idx.to(dev)
                c.zero_blocks(on[dev])

    @property
    def cache_bytes(self) -> int:
        return sum(c.nbytes for c in self.caches if c is not None)

    def _encode_missing(self, spans) -> None:
        """Run the encoder, batched, for the spans whose features are not there yet."""
        todo, seen = [], set()
        for span in spans:
            if span.features is None and id(span) not in seen:
                seen.add(id(span))
                todo.append(span)
        if todo:
            feats = self.model.encode_features(todo)
            for span, f in zip(todo, feats):
                if f.shape[0] != span.length:
                    raise ValueError(f"encoder gave {f.shape[0]} feature rows for a span of "
                                     f"{span.length} placeholder tokens")
                span.features = f

    def embed(self, ids: torch.Tensor, records: list[StepRecord]) -> torch.Tensor:
        """Token embeddings with encoder features in place of the placeholders they cover."""
        h = self.model.embed(ids)
        if not any(r.spans for r in records):
            return h
        self._encode_missing(span for r in records for _, span, _, _ in r.span_rows())
        rows, feats, off = [], [], 0
        for r in records:
            for at, span, first, n in r.span_rows():
                rows.append(torch.arange(off + at, off + at + n))
                feats.append(span.features[first:first + n])
            off += r.num_tokens
        if not rows:
            return h
        return self.model.merge_features(h, torch.cat(rows).to(h.device), torch.cat(feats))

    def _admit(self, records: list[StepRecord]) -> None:
        """Hand a model that keeps per-sequence state in slots every encoder input of a
        sequence on its first step in a slot (``model.admit_features(index, spans)``), not
        only the spans whose rows the step computes: a prefix-cache hit may start past them,
        and text before an image may depend on it (Mllama's cross-attention)."""
        admit = getattr(self.model, "admit_features", None)
        if admit is None:
            return
        fresh = [(i, r) for i, r in enumerate(records) if r.fresh_slot and r.spans]
        if fresh:
            self._encode_missing(span for _, r in fresh for span in r.spans)
            for i, r in fresh:
                admit(i, r.spans)

    @torch.inference_mode()
    def run(self, records: list[StepRecord]) -> torch.Tensor:
        """Float32 logits for each record's last ``num_logits`` tokens, records in order."""
        self._zero_fresh_blocks(records)
        ids, pos, meta = build_metadata(records, self.block_size, self.device)
        self._admit(records)
        h = self.embed(ids, records)
        hidden = self.model.forward_embeds(h, pos, meta, self.caches)
        rows, off = [], 0
        for r in records:
            off += r.num_tokens
            rows.extend(range(off - r.num_logits, off))
        if not rows:
            return hidden.new_empty(0, 0)
        sel = hidden.index_select(0, torch.tensor(rows, device=hidden.device))
        return self.model.compute_logits(sel)
