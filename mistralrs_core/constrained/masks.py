"""Token masks: llguidance's packed bitmask (bit j of int32 word w allows token 32w + j)
turned into a boolean "banned" row the sampler applies with one ``masked_fill_``."""
from __future__ import annotations

import torch

_SHIFTS = torch.arange(8, dtype=torch.uint8)


def new_bitmask(rows: int, vocab_size: int) -> torch.Tensor:
    return torch.zeros(rows, (vocab_size + 31) // 32, dtype=torch.int32)


def fill_bitmask(matcher, bitmask: torch.Tensor, row: int = 0) -> None:
    """One matcher's mask into ``bitmask[row]`` (llguidance drops the GIL meanwhile)."""
    target = bitmask[row]
    matcher.unsafe_compute_mask_ptr(target.data_ptr(), target.numel() * 4)


def banned_tokens(bitmask: torch.Tensor) -> torch.Tensor:
    """Bool [rows, 32 * words]: True where the token is not allowed. The int32 words are
    read as little-endian bytes, whose bits then run in token order."""
    as_bytes = bitmask.contiguous().view(torch.uint8)
    bits = (as_bytes.unsqueeze(-1) >> _SHIFTS) & 1
    return bits.view(bitmask.shape[0], -1).eq(0)


def apply_banned(logits: torch.Tensor, banned: torch.Tensor) -> None:
    """-inf on the banned tokens of a logits row (or [rows, V]); columns past the mask
    (a head wider than the tokenizer) are banned too."""
    width = min(logits.shape[-1], banned.shape[-1])
    logits[..., :width].masked_fill_(banned[..., :width], float("-inf"))
    if logits.shape[-1] > width:
        logits[..., width:] = float("-inf")
