"""The paged KV block pool: allocation, reference counts and prefix caching.

A block holds ``block_size`` consecutive tokens of one sequence. Once a block is full and
computed, its key is recorded; a later sequence whose prompt starts with the same content
reuses the block instead of recomputing it. Blocks nobody references keep their key and
sit in an LRU list until the pool needs them back.

Block keys are shared between users, so they must be impossible to forge: a key is
BLAKE2b (32-byte digest) over the previous block's key, the block's token ids as
little-endian int64 and the block's extra keys (``BlockKeyExtras``: a salt for the first
block -- per-request ``cache_salt``, adapter id -- and the digests of multimodal spans the
block overlaps). Chaining makes equal keys mean equal whole prefixes. 32 bytes rather than
16 because a 128-bit key leaves a birthday collision at 2^64 work, within reach of a
determined attacker who can choose both colliding prompts; 256 bits costs the same
compression rounds and 16 more bytes per cached block.

A hit is verified by comparing the block's stored key with the looked-up key, not by
comparing tokens: with a collision-resistant key, equal keys imply equal content, and a
token comparison would need every block's tokens kept around. (Python's ``hash()`` must
never key anything shared between users: ``hash(-1) == hash(-2)``, int hashes wrap modulo
2^61 - 1 and tuple hashes are unkeyed, so colliding prompts are easy to craft.)
"""
from __future__ import annotations

import hashlib
import struct
import sys
from array import array
from collections import OrderedDict
from collections.abc import Iterable, Sequence

import attrs

KEY_BYTES = 32
_PERSON = b"mistralrs-kvblk"          # domain separation from any other BLAKE2b use
_HEADER = struct.Struct("<QQQ")       # len(prev), len(extra), number of tokens
_U64 = struct.Struct("<Q")
_SPAN = struct.Struct("<qqQ")         # start, end (relative to the block), len(digest)
_BIG_ENDIAN = sys.byteorder == "big"


class NoFreeBlocks(Exception):
    pass


def token_bytes(tokens) -> bytes:
    """Token ids as little-endian int64 bytes (the form block keys hash)."""
    a = array("q", tokens)
    if _BIG_ENDIAN:
        a.byteswap()
    return a.tobytes()


def content_digest(data) -> bytes:
    """A digest of multimodal content (image pixels, audio samples) for a span's key."""
    return hashlib.blake2b(memoryview(data).cast("B"), digest_size=KEY_BYTES,
                           person=b"mistralrs-mmdata").digest()


def _tagged(tag: bytes, data: bytes) -> bytes:
    return tag + _U64.pack(len(data)) + data


def _check_spans(spans) -> tuple[tuple[int, int, bytes], ...]:
    out = []
    for span in spans:
        start, end, digest = span
        if not isinstance(digest, (bytes, bytearray)):
            raise TypeError(f"span digest must be bytes, got {type(digest).__name__}")
        start, end = int(start), int(end)
        if not 0 <= start < end:
            raise ValueError(f"span [{start}, {end}) is empty or negative")
        out.append((start, end, bytes(digest)))
    # Sorted by start so a block's lookup can stop at the first span past its end.
    return tuple(sorted(out))


@attrs.frozen
class BlockKeyExtras:
    """What besides token ids decides whether two blocks hold the same K/V."""

    # Mixed into the first block's key only (the chain carries it): adapter id, cache salt.
    salt: bytes = attrs.field(default=b"", validator=attrs.validators.instance_of(bytes))
    # (start, end, content digest) of multimodal spans, absolute token positions [start, end).
    spans: tuple[tuple[int, int, bytes], ...] = attrs.field(default=(), converter=_check_spans)

    @classmethod
    def make(cls, *, cache_salt: str | None = None, adapter_id: str | None = None,
             spans: Iterable[tuple[int, int, bytes]] = (), spans_key_whole_prompt: bool = False
             ) -> "BlockKeyExtras":
        """``spans_key_whole_prompt``: every span's digest goes into the first block's salt,
        for models whose text before an image depends on it (Mllama's cross-attention rows)."""
        # Tagged and length-prefixed, so ("ab", None) and ("a", "b") differ. Any given value,
        # even "", isolates: a request that asked for a salt never shares with one that did not.
        spans = tuple(spans)
        parts = []
        if cache_salt is not None:
            parts.append(_tagged(b"c", cache_salt.encode("utf-8")))
        if adapter_id is not None:
            parts.append(_tagged(b"a", adapter_id.encode("utf-8")))
        if spans_key_whole_prompt:
            parts += [_tagged(b"i", _SPAN.pack(start, end, len(digest)) + digest) for start, end, digest in spans]
        return cls(salt=b"".join(parts), spans=spans)

    def for_block(self, index: int, block_size: int) -> bytes:
        """The extra bytes of block ``index``: salt (first block) and every overlapping span."""
        parts = []
        if index == 0 and self.salt:
            parts.append(_tagged(b"s", self.salt))
        lo = index * block_size
        hi = lo + block_size
        for start, end, digest in self.spans:
            if start >= hi:
                break
            if end > lo:
                parts.append(b"m" + _SPAN.pack(start - lo, end - lo, len(digest)) + digest)
        return b"".join(parts)


_NO_EXTRAS = BlockKeyExtras()


def _key(prev: bytes | None, toks: bytes, extra: bytes) -> bytes:
    prev = prev or b""
    h = hashlib.blake2b(_HEADER.pack(len(prev), len(extra), len(toks) >> 3) + prev + extra,
                        digest_size=KEY_BYTES, person=_PERSON)
    h.update(toks)
    return h.digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_cache: bool = True):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_cache = enable_prefix_cache
        self.ref = [0] * num_blocks
        self.block_hash: list[bytes | None] = [None] * num_blocks   # the key a block is registered under
        self.free: list[int] = list(range(num_blocks - 1, -1, -1))   # never-hashed free blocks
        self.cached: OrderedDict[int, None] = OrderedDict()          # ref 0 but hashed (LRU order)
        self.by_hash: dict[bytes, int] = {}
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

    def forget_prefixes(self) -> None:
        """Drop every prefix-cache registration: the model's weights changed (re-quantized),
        so K/V cached under a token prefix no longer match it. Blocks in use stay with
        their sequences and go back to the free list when released."""
        for b in self.cached:
            self.free.append(b)
        self.cached.clear()
        self.by_hash.clear()
        self.block_hash = [None] * self.num_blocks

    # --- allocation -----------------------------------------------------
    def _unregister(self, b: int) -> None:
        h = self.block_hash[b]
        if h is not None and self.by_hash.get(h) == b:
            del self.by_hash[h]
        self.block_hash[b] = None

    def _take(self) -> int:
        if self.free:
            b = self.free.pop()
        elif self.cached:
            b, _ = self.cached.popitem(last=False)
            self._unregister(b)
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

    def _drop_ref(self, b: int) -> None:
        self.ref[b] -= 1
        if self.ref[b] == 0:
            if self.block_hash[b] is not None and self.enable_prefix_cache:
                self.cached[b] = None
            else:
                self.block_hash[b] = None
                self.free.append(b)

    def release(self, blocks: list[int]) -> None:
        # Tail first, so a sequence's last blocks are the first the LRU evicts.
        for b in reversed(blocks):
            self._drop_ref(b)
        blocks.clear()

    def shrink(self, blocks: list[int], hashes: list[bytes], num_tokens: int) -> None:
        """Roll a sequence's KV tail back to ``num_tokens`` tokens (rejected draft tokens).

        Blocks past the new end are released (a full hashed one stays cached: its K/V still
        match its key). The block the new end falls inside will be overwritten, so its key
        must go: un-registered if this sequence was its only holder, else only dropped from
        this sequence's ``hashes``. The caller must not then write into a block another
        sequence still holds; registering only verified tokens (never drafts) guarantees a
        rollback never lands inside a shared block.
        """
        if num_tokens < 0:
            raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
        keep = self.blocks_for(num_tokens)
        if keep < len(blocks):
            for b in reversed(blocks[keep:]):
                self._drop_ref(b)
            del blocks[keep:]
        full = num_tokens // self.block_size
        if len(hashes) > full:
            if full < len(blocks):
                b = blocks[full]   # kept, now partial
                if self.ref[b] == 1 and self.block_hash[b] == hashes[full]:
                    self._unregister(b)
            del hashes[full:]

    # --- prefix cache ---------------------------------------------------
    @staticmethod
    def chain_hash(prev: bytes | None, tokens, extra: bytes = b"") -> bytes:
        """The key of a block holding ``tokens`` after the block keyed ``prev`` (None: first)."""
        return _key(prev, token_bytes(tokens), extra)

    def match_prefix(self, token_ids: list[int], extras: BlockKeyExtras | None = None
                     ) -> tuple[list[int], list[bytes]]:
        """Cached blocks covering a prefix of ``token_ids`` (at least one token is left to
        compute, so the step still yields logits). Returns (blocks, their keys)."""
        if not self.enable_prefix_cache:
            return [], []
        extras = extras or _NO_EXTRAS
        bs = self.block_size
        usable = (len(token_ids) - 1) // bs
        blocks: list[int] = []
        hashes: list[bytes] = []
        h = None
        if usable > 0:
            data = memoryview(token_bytes(token_ids[:usable * bs]))
            step = bs * 8
            for i in range(usable):
                h = _key(h, data[i * step:(i + 1) * step], extras.for_block(i, bs))
                b = self.by_hash.get(h)
                if b is None or self.block_hash[b] != h:
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

    def register_full_blocks(self, blocks: list[int], hashes: list[bytes], token_ids: Sequence[int],
                             num_computed: int, extras: BlockKeyExtras | None = None) -> None:
        """Record keys of blocks that became full and computed (``hashes`` grows in place)."""
        if not self.enable_prefix_cache:
            return
        bs = self.block_size
        full = min(num_computed // bs, len(blocks))
        if len(hashes) >= full:
            return
        extras = extras or _NO_EXTRAS
        first = len(hashes)
        data = memoryview(token_bytes(token_ids[first * bs:full * bs]))
        step = bs * 8
        h = hashes[-1] if hashes else None
        for j, i in enumerate(range(first, full)):
            h = _key(h, data[j * step:(j + 1) * step], extras.for_block(i, bs))
            hashes.append(h)
            b = blocks[i]
            if self.block_hash[b] is None and h not in self.by_hash:
                self.block_hash[b] = h
                self.by_hash[h] = b
