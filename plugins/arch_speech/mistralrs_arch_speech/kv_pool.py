"""The decoder's self-attention K/V for the requests being generated.

One tensor pair per layer, ``[rows, frames, kv_heads, head_dim]``, two rows per request
(its conditional and its unconditional guidance branch). The engine keeps the running
requests in rows ``0 .. 2n-1`` (a finished request's rows are refilled by moving the last
request down), so a step attends over a plain slice of the pool, never a gathered copy.
The frame axis grows by doubling up to the model's maximum, so memory follows the longest
running request rather than the model's maximum length.

Why not the core's paged cache: a Dia step is one frame of 9 codebook tokens per request
and two attention rows per request (guidance), and its sampling is per frame across
codebooks (CFG, EOS across codebooks, the delay pattern), none of which the text engine's
token-level scheduler, sampler and block tables model; a request's length is also bounded
(the decoder's maximum), so a dense per-row cache wastes little.
"""
from __future__ import annotations

import torch


class DecoderKVPool:
    def __init__(self, layers: int, rows: int, kv_heads: int, head_dim: int, max_frames: int,
                 dtype: torch.dtype, device, initial_frames: int = 256):
        self.layers, self.rows, self.max_frames = layers, rows, max_frames
        self.shape_tail = (kv_heads, head_dim)
        self.dtype, self.device = dtype, device
        self.frames = 0
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self._initial = max(1, min(initial_frames, max_frames))

    def ensure(self, frames: int) -> None:
        """Make room for positions ``< frames``."""
        if frames <= self.frames:
            return
        if frames > self.max_frames:
            raise ValueError(f"decoder position {frames - 1} is past the model's maximum {self.max_frames - 1}")
        new = max(self._initial, self.frames)
        while new < frames:
            new *= 2
        new = min(new, self.max_frames)
        for store in (self.k, self.v):
            for i in range(self.layers):
                t = torch.zeros(self.rows, new, *self.shape_tail, dtype=self.dtype, device=self.device)
                if i < len(store):
                    t[:, :self.frames] = store[i]
                    store[i] = t
                else:
                    store.append(t)
        self.frames = new

    def write_and_view(self, layer: int, rows: torch.Tensor, positions: torch.Tensor, k: torch.Tensor,
                       v: torch.Tensor, kv_len: int, leading: bool,
                       same_position: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k/v [R, Hkv, D] at (rows, positions); return the keys/values those rows
        see, [R, kv_len, Hkv, D] (the caller masks positions past each row's own).
        ``leading``: rows are 0 .. R-1, so the view is a slice, not a copy.
        ``same_position``: every row writes at ``kv_len - 1`` (a plain slice copy)."""
        kt, vt = self.k[layer], self.v[layer]
        if leading:
            n = rows.shape[0]
            if same_position:
                kt[:n, kv_len - 1] = k
                vt[:n, kv_len - 1] = v
            else:
                kt[rows, positions] = k.to(kt.dtype)
                vt[rows, positions] = v.to(vt.dtype)
            return kt[:n, :kv_len], vt[:n, :kv_len]
        kt[rows, positions] = k.to(kt.dtype)
        vt[rows, positions] = v.to(vt.dtype)
        return kt[rows, :kv_len], vt[rows, :kv_len]

    def move(self, src: int, dst: int, frames: int) -> None:
        """Copy row ``src``'s first ``frames`` positions to row ``dst`` (compaction)."""
        for store in (self.k, self.v):
            for t in store:
                t[dst, :frames] = t[src, :frames]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.k + self.v)
