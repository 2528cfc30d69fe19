"""Per-sequence recurrent state (Mamba-style layers) kept next to the paged KV cache.

A layer whose memory is a fixed-size state rather than per-token K/V declares a
``RecurrentStateSpec`` in ``kv_cache_specs()``. The engine then keeps, for that layer, a
pool of states indexed by a per-sequence *slot*: the scheduler gives a sequence a slot
when it is admitted and takes it back when the sequence finishes or is preempted, and the
model runner passes the slots of the batch in ``AttentionMetadata.state_slots``.

A sequence whose step starts at position 0 starts from a zero state, whatever its slot
held before; so a preempted sequence (recomputed from scratch) needs no reset. The state
after a step summarises every token computed so far, which a shared prefix-cache block
cannot restore: the engine disables prefix caching for models with recurrent state.
"""
from __future__ import annotations

import attrs
import torch

from mistralrs_core.layers.attention import AttentionMetadata, LayerKVCache


@attrs.define
class RecurrentStateSpec:
    """Per-sequence state tensors of one layer: name -> shape (without the slot axis)."""
    shapes: dict[str, tuple[int, ...]]
    float32: tuple[str, ...] = ()     # names kept in float32 whatever the cache dtype


class LayerRecurrentState:
    """One layer's state pool: per name a [num_slots, *shape] tensor."""

    def __init__(self, spec: RecurrentStateSpec, num_slots: int, dtype, device):
        self.spec = spec
        self.dtype, self.device = dtype, torch.device(device)
        self.tensors = {name: self._zeros(name, num_slots) for name in spec.shapes}

    def _zeros(self, name: str, n: int) -> torch.Tensor:
        dtype = torch.float32 if name in self.spec.float32 else self.dtype
        return torch.zeros(n, *self.spec.shapes[name], dtype=dtype, device=self.device)

    @property
    def num_slots(self) -> int:
        return next(iter(self.tensors.values())).shape[0]

    def _grow(self, needed: int) -> None:
        # Test harnesses size the pool lazily; the engine allocates max_seqs slots up front.
        if needed > self.num_slots:
            for name, t in self.tensors.items():
                self.tensors[name] = torch.cat((t, self._zeros(name, needed - t.shape[0])))

    def read(self, name: str, slots: torch.Tensor, fresh: torch.Tensor) -> torch.Tensor:
        """States of ``slots`` ([B, *shape]); zero where ``fresh`` (sequence starts at 0)."""
        self._grow(int(slots.max()) + 1)
        s = self.tensors[name].index_select(0, slots)
        return s.masked_fill(fresh.view(-1, *([1] * (s.dim() - 1))), 0)

    def write(self, name: str, slots: torch.Tensor, value: torch.Tensor) -> None:
        t = self.tensors[name]
        t.index_copy_(0, slots, value.to(t.dtype))

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


def make_layer_cache(spec, num_blocks: int, block_size: int, dtype, device, num_slots: int = 1,
                     lazy_zero: bool = False):
    """The cache object for one layer's spec (None, paged K/V or recurrent state).
    ``lazy_zero``: leave K/V blocks uninitialised; the caller zeroes each before first use."""
    if spec is None:
        return None
    if isinstance(spec, RecurrentStateSpec):
        return LayerRecurrentState(spec, num_slots, dtype, device)
    return LayerKVCache(spec, num_blocks, block_size, dtype, device, lazy_zero=lazy_zero)


def has_recurrent_state(specs) -> bool:
    return any(isinstance(s, RecurrentStateSpec) for s in specs)


def batch_slots(meta: AttentionMetadata, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(state slot of each sequence, whether it starts from a zero state)."""
    slots = meta.state_slots
    if slots is None:
        slots = torch.arange(meta.num_seqs, device=device)
    starts = [c - q for c, q in zip(meta.context_lens, meta.query_lens)]
    return slots.to(device), torch.tensor([s == 0 for s in starts], device=device)


def pad_tokens(x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
    """Flat [T, ...] -> right-padded [B, q_max, ...] (zeros after each sequence's tokens)."""
    out = x.new_zeros(meta.num_seqs * meta.q_max, *x.shape[1:])
    out.index_copy_(0, meta.token_index, x)
    return out.view(meta.num_seqs, meta.q_max, *x.shape[1:])


def unpad_tokens(x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
    return x.reshape(-1, *x.shape[2:]).index_select(0, meta.token_index)
