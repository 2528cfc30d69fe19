"""Rope positions a model supplies for its prompts.

Most models rotate by a token's index in its sequence, which the model runner computes
itself. A model whose positions depend on the prompt's content (Qwen2-VL's M-RoPE gives
an image's tokens (t, h, w) grid coordinates on three axes) returns ``PromptPositions``
from ``CausalLM.prompt_positions``: one column per prompt token, and the offset that
generated tokens (all axes equal) add to their index.
"""
from __future__ import annotations

import attrs
import numpy as np


@attrs.frozen(eq=False)
class PromptPositions:
    positions: np.ndarray      # [axes, prompt_len] int64
    delta: int = 0             # a generated token at index i has position i + delta on every axis

    @property
    def axes(self) -> int:
        return self.positions.shape[0]

    def slice(self, start: int, n: int) -> np.ndarray:
        """Positions [axes, n] of tokens start .. start + n - 1."""
        plen = self.positions.shape[1]
        if start + n <= plen:
            return self.positions[:, start:start + n]
        idx = np.arange(start, start + n, dtype=np.int64)
        out = np.broadcast_to(idx + self.delta, (self.axes, n)).copy()
        inside = idx < plen
        if inside.any():
            out[:, inside] = self.positions[:, idx[inside]]
        return out
