"""Turns a scheduled batch into tensors, runs the model and returns logits."""
from __future__ import annotations

import numpy as np
import torch

from mistralrs_core.layers.attention import AttentionMetadata, LayerKVCache
from mistralrs_core.layers.recurrent import make_layer_cache
from mistralrs_core.models.base import CausalLM


def build_metadata(chunks: list[tuple[list[int], int, list[int]]], block_size: int, device,
                   causal: bool = True, state_slots: list[int] | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
    """``chunks``: per sequence (new token ids, start position, block ids); ``state_slots``:
    per sequence its recurrent-state slot (models with recurrent layers only).

    Returns (input_ids [T], positions [T], metadata)."""
    q_lens = [len(t) for t, _, _ in chunks]
    ctx = [start + len(t) for t, start, _ in chunks]
    q_max, k_max = max(q_lens), max(ctx)
    ids = np.fromiter((i for t, _, _ in chunks for i in t), dtype=np.int64, count=sum(q_lens))
    pos = np.concatenate([np.arange(s, s + len(t), dtype=np.int64) for t, s, _ in chunks])
    n_blocks = max(len(b) for _, _, b in chunks) if chunks else 0
    table = np.zeros((len(chunks), max(n_blocks, 1)), dtype=np.int64)
    slots = np.empty(len(pos), dtype=np.int64)
    token_index = np.empty(len(pos), dtype=np.int64)
    off = 0
    for i, (t, start, blocks) in enumerate(chunks):
        n = len(t)
        if blocks:
            table[i, :len(blocks)] = blocks
        p = pos[off:off + n]
        slots[off:off + n] = table[i, p // block_size] * block_size + p % block_size
        token_index[off:off + n] = i * q_max + np.arange(n)
        off += n
    fresh = all(start == 0 for _, start, _ in chunks)
    # Gathered contexts span whole blocks; trim the key axis to the longest context.
    meta = AttentionMetadata(
        query_lens=q_lens, context_lens=ctx,
        slot_mapping=torch.from_numpy(slots).to(device),
        block_tables=torch.from_numpy(table).to(device),
        token_index=torch.from_numpy(token_index).to(device),
        q_max=q_max, k_max=k_max, fresh_prefill=fresh, causal=causal,
        state_slots=None if state_slots is None else torch.tensor(state_slots, device=device))
    return torch.from_numpy(ids).to(device), torch.from_numpy(pos).to(device), meta


class ModelRunner:
    def __init__(self, model: CausalLM, num_blocks: int, block_size: int, device, cache_dtype,
                 num_state_slots: int = 1):
        self.model = model
        self.device = torch.device(device)
        self.block_size = block_size
        # Paged K/V per attention layer; a slot pool per recurrent layer (see layers/recurrent.py).
        self.caches: list[LayerKVCache | None] = [
            make_layer_cache(spec, num_blocks, block_size, cache_dtype, self.device, num_state_slots,
                             lazy_zero=True)
            for spec in model.kv_cache_specs()
        ]
        self._zeroed: set[int] = set()

    def _zero_fresh_blocks(self, chunks) -> None:
        """Clear pool blocks the first time any sequence uses them (see LayerKVCache)."""
        fresh = {b for _, _, blocks in chunks for b in blocks if b not in self._zeroed}
        if not fresh:
            return
        self._zeroed.update(fresh)
        idx = torch.tensor(sorted(fresh), device=self.device)
        for c in self.caches:
            if hasattr(c, "zero_blocks"):
                c.zero_blocks(idx)

    @property
    def cache_bytes(self) -> int:
        return sum(c.nbytes for c in self.caches if c is not None)

    @torch.inference_mode()
    def run(self, chunks, want_logits: list[bool], state_slots: list[int] | None = None) -> torch.Tensor:
        """Logits [n, vocab] (float32) for the sequences whose ``want_logits`` is True."""
        self._zero_fresh_blocks(chunks)
        ids, pos, meta = build_metadata(chunks, self.block_size, self.device, state_slots=state_slots)
        hidden = self.model(ids, pos, meta, self.caches)
        ends = np.cumsum(meta.query_lens) - 1
        rows = [int(e) for e, w in zip(ends, want_logits) if w]
        if not rows:
            return hidden.new_empty(0, 0)
        sel = hidden.index_select(0, torch.tensor(rows, device=hidden.device))
        return self.model.compute_logits(sel)
