"""The paged KV block pool: allocation, reference counts and prefix caching.

A block holds ``block_size`` consecutive tokens of one sequence. Once a block is full,
its content hash (chained with the previous block's hash, so equal hashes mean equal
whole prefixes) is recorded; a later sequence whose prompt starts with the same tokens
reuses the block instead of recomputing it. Blocks nobody references keep their hash
and sit in an LRU list until the pool needs them back.
"""
from __future__ import annotations

from collections import OrderedDict

import attrs


class NoFreeBlocks(Exception):
    pass


@attrs.frozen
class BlockKeyExtras:
    salt: bytes = b""
    spans: tuple = ()

    @classmethod
    def make(cls, *, cache_salt=None, adapter_id=None, spans=()):
        return cls(repr((cache_salt, adapter_id)).encode(), tuple(spans))


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_cache: bool = True):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_cache = enable_prefix_cache
        self.ref = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self.free: list[int] = list(range(num_blocks - 1, -1, -1))   # never-hashed free blocks
        self.cached: OrderedDict[int, None] = OrderedDict()          # ref 0 but hashed (LRU order)
        self.by_hash: dict[int, int] = {}
        self.hits = 0          # prefix-cache statistics, in tokens
        self.queries = 0

    # --- capacity -------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self.free) + len(self.cached)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # --- allocation -----------------------------------------------------
    def _take(self) -> int:
        if self.free:
            b = self.free.pop()
        elif self.cached:
            b, _ = self.cached.popitem(last=False)
            h = self.block_hash[b]
            if h is not None and self.by_hash.get(h) == b:
                del self.by_hash[h]
            self.block_hash[b] = None
        else:
            raise NoFreeBlocks
        self.ref[b] = 1
        return b

    def grow(self, blocks: list[int], total_tokens: int) -> None:
        """Extend a block list so it can hold ``total_tokens`` tokens (all or nothing)."""
        need = self.blocks_for(total_tokens) - len(blocks)
        if need <= 0:
            return
        if need > self.num_free:
            raise NoFreeBlocks
        for _ in range(need):
            blocks.append(self._take())

    def release(self, blocks: list[int]) -> None:
        for b in reversed(blocks):
            self.ref[b] -= 1
            if self.ref[b] == 0:
                if self.block_hash[b] is not None and self.enable_prefix_cache:
                    self.cached[b] = None
                else:
                    self.block_hash[b] = None
                    self.free.append(b)
        blocks.clear()

    # --- prefix cache ---------------------------------------------------
    @staticmethod
    def chain_hash(prev: int | None, tokens, extra=None) -> int:
        return hash((prev, tuple(tokens), extra))

    def shrink(self, blocks: list[int], hashes: list, num_tokens: int) -> None:
        """Roll a sequence back to its first ``num_tokens`` tokens (rejected draft tokens)."""
        keep = self.blocks_for(num_tokens)
        if len(blocks) > keep:
            tail = blocks[keep:]
            del blocks[keep:]
            self.release(tail)
        del hashes[num_tokens // self.block_size:]

    def match_prefix(self, token_ids: list[int], extras=None) -> tuple[list[int], list[int]]:
        """Cached blocks covering a prefix of ``token_ids`` (at least one token is left to
        compute, so the step still yields logits). Returns (blocks, their hashes)."""
        if not self.enable_prefix_cache:
            return [], []
        bs = self.block_size
        usable = (len(token_ids) - 1) // bs
        blocks, hashes, h = [], [], None
        for i in range(usable):
            h = self.chain_hash(h, token_ids[i * bs:(i + 1) * bs], extras)
            b = self.by_hash.get(h)
            if b is None:
                break
            blocks.append(b)
            hashes.append(h)
        self.queries += len(token_ids)
        self.hits += len(blocks) * bs
        for b in blocks:
            if self.ref[b] == 0:
                self.cached.pop(b, None)
            self.ref[b] += 1
        return blocks, hashes

    def register_full_blocks(self, blocks: list[int], hashes: list[int], token_ids: list[int],
                             num_computed: int, extras=None) -> None:
        """Record hashes of blocks that became full and computed (``hashes`` grows in place)."""
        if not self.enable_prefix_cache:
            return
        bs = self.block_size
        full = min(num_computed // bs, len(blocks))
        while len(hashes) < full:
            i = len(hashes)
            h = self.chain_hash(hashes[-1] if hashes else None, token_ids[i * bs:(i + 1) * bs], extras)
            hashes.append(h)
            b = blocks[i]
            if self.block_hash[b] is None and h not in self.by_hash:
                self.block_hash[b] = h
                self.by_hash[h] = b
