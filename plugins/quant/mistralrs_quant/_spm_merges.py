"""SentencePiece merges (every split of a piece into two pieces), found with numpy.

``spm_merges_py`` is the definition: for every distinct piece (first index wins), every
cut into ``left + right`` with both halves pieces is a merge, ordered by
``(rank[piece], piece index, cut)``. For a 262k-piece vocabulary that is ~1.2M cuts, which
take about a second as Python string slices and dict look-ups.

``spm_merges`` gives the same list without touching a string per cut: every piece gets a
64-bit polynomial hash, built one character position at a time across all pieces at once;
the hash of a piece's first ``c`` characters and, from it and the whole piece's hash, that
of the rest, are looked up in a bucketed table of the pieces' hashes. Hashes only propose
merges: each one is then checked character by character, and two distinct pieces with the
same hash (which would hide one of them) send the whole vocabulary to ``spm_merges_py``.
So the result is the definition's, exactly.

``cached_spm_merge_ids`` keeps the result of large vocabularies on disk, keyed by a
sha256 of everything the merges depend on (pieces, which are byte pieces, ranks), as
a small binary file (a header, then the ids as int32 pairs, read with one ``frombuffer``):
``$XDG_CACHE_HOME/mistralrs/gguf_tokenizer`` (default
``~/.cache``). A missing, unreadable, corrupt or unwritable cache only means the merges
are computed; ``MISTRALRS_NO_TOKENIZER_CACHE=1`` turns it off.
"""
from __future__ import annotations

import hashlib
import math
import os
import struct
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np

from ._env import cache_root, env_flag

BYTE = 6  # llama_token_type of <0xNN> byte-fallback pieces: never merge targets

_BASE = np.uint64(0x9E3779B97F4A7C15)  # odd: multiplication by it is a bijection mod 2**64
_MIX = np.uint64(0xD6E8FEB86659FD93)   # odd multiplier spreading small hashes over buckets


def spm_merges_py(pieces: Sequence[str], vocab: dict[str, int], rank: Sequence[float],
                  types: Sequence[int]) -> list[tuple[str, str]]:
    """The reference: ``vocab`` maps each distinct piece to its first index."""
    found = []
    for piece, idx in vocab.items():
        if types[idx] == BYTE or len(piece) < 2:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                found.append((rank[idx], idx, cut, left, right))
    found.sort(key=lambda m: m[:3])
    return [(m[3], m[4]) for m in found]


class _Table:
    """Distinct uint64 keys; ``find`` maps queries to the key's position (or -1), vectorised."""

    def __init__(self, keys: np.ndarray):
        self.bits = max(8, math.ceil(math.log2(max(len(keys), 1))) + 2)  # load factor <= 1/4
        self.shift = np.uint64(64 - self.bits)
        mixed = keys * _MIX
        self.order = np.argsort(mixed)
        self.keys = mixed[self.order]
        self.distinct = not (self.keys[1:] == self.keys[:-1]).any()
        self.start = np.zeros((1 << self.bits) + 1, np.int64)
        np.cumsum(np.bincount((self.keys >> self.shift).astype(np.intp), minlength=1 << self.bits),
                  out=self.start[1:])

    def find(self, q: np.ndarray) -> np.ndarray:
        mq = q * _MIX
        b = (mq >> self.shift).astype(np.intp)
        s = self.start[b]
        occ = self.start[b + 1] - s
        last = len(self.keys) - 1
        p = np.minimum(s, last)
        hit = (occ > 0) & (self.keys[p] == mq)
        out = np.where(hit, self.order[p], -1)
        # Buckets holding more than one key: few, walked one slot at a time.
        rest = np.flatnonzero((occ > 1) & ~hit)
        d = 1
        while len(rest):
            rest = rest[occ[rest] > d]
            p = s[rest] + d
            m = self.keys[p] == mq[rest]
            out[rest[m]] = self.order[p[m]]
            rest = rest[~m]
            d += 1
        return out


def _rows_by_length(lens: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``idx`` sorted by length, longest first, and for c = 1.. the count with length >= c."""
    idx = idx[np.argsort(-lens[idx], kind="stable")]
    top = int(lens[idx[0]]) if len(idx) else 0
    counts = np.searchsorted(-lens[idx], -np.arange(1, top + 1), side="right")
    return idx, counts


def spm_merges(pieces: Sequence[str], vocab: dict[str, int], rank: Sequence[float] | None,
               types: Sequence[int]) -> list[tuple[str, str]]:
    """``spm_merges_py``'s list; ``rank=None`` means rank by position (piece index)."""
    return merge_pairs(pieces, *spm_merge_ids(pieces, vocab, rank, types))


def merge_pairs(pieces: Sequence[str], left: np.ndarray, right: np.ndarray) -> list[tuple[str, str]]:
    """``[(pieces[l], pieces[r]), ...]``, sharing the piece strings."""
    # Gathering from an object array beats per-index Python look-ups (0.10 vs 0.15 s
    # for Gemma 3's 515k merges).
    table = np.empty(len(pieces), dtype=object)
    table[:] = pieces
    return list(zip(table[left].tolist(), table[right].tolist()))


def _ids_of(pairs: list[tuple[str, str]], vocab: dict[str, int]) -> tuple[np.ndarray, np.ndarray]:
    left = np.fromiter((vocab[a] for a, _ in pairs), np.int64, len(pairs))
    right = np.fromiter((vocab[b] for _, b in pairs), np.int64, len(pairs))
    return left, right


def spm_merge_ids(pieces: Sequence[str], vocab: dict[str, int], rank: Sequence[float] | None,
                  types: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """The merges as (left piece ids, right piece ids), in merge order."""
    n = len(pieces)
    if not vocab:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)

    def reference():
        pairs = spm_merges_py(pieces, vocab, list(range(n)) if rank is None else rank, types)
        return _ids_of(pairs, vocab)

    rank_arr = None
    if rank is not None:
        rank_arr = np.asarray(rank, dtype=np.float64)
        if rank_arr.shape != (n,) or np.isnan(rank_arr).any():  # NaN sorts differently in numpy
            return reference()
    try:
        text = "".join(pieces).encode("utf-32-le", "surrogatepass")
    except UnicodeEncodeError:
        return reference()
    cp = np.frombuffer(text, dtype="<u4")
    del text
    lens = np.fromiter(map(len, pieces), np.int64, n)
    offs = np.zeros(n + 1, np.int64)
    np.cumsum(lens, out=offs[1:])
    with np.errstate(over="ignore"):
        # Hash of every distinct piece, one character position at a time (longest first,
        # so the pieces still growing at position c are a prefix of the order).
        uniq, counts = _rows_by_length(lens, np.fromiter(vocab.values(), np.int64, len(vocab)))
        h = np.zeros(len(uniq), np.uint64)
        for c, k in enumerate(counts):
            hk = h[:k]
            hk *= _BASE
            hk += cp[offs[uniq[:k]] + c]
            hk += np.uint64(1)  # characters hash as code point + 1: "\0" is not empty
        table = _Table(h)
        if not table.distinct:
            return reference()
        full = np.zeros(n, np.uint64)
        full[uniq] = h
        del h
        powers = np.ones(len(counts) + 1, np.uint64)
        for i in range(1, len(powers)):
            powers[i] = powers[i - 1] * _BASE

        # Every cut of every splittable piece, a cut position at a time.
        types_arr = np.asarray(types)
        cand = uniq[(lens[uniq] >= 2) & (types_arr[uniq] != BYTE)]
        cand, ccounts = _rows_by_length(lens, cand)
        c_len, c_off, c_full = lens[cand], offs[cand], full[cand]
        prefix = np.zeros(len(cand), np.uint64)
        parts: list[tuple[np.ndarray, ...]] = []
        for c in range(1, len(ccounts)):
            k = ccounts[c]  # pieces longer than c
            pk = prefix[:k]
            pk *= _BASE
            pk += cp[c_off[:k] + (c - 1)]
            pk += np.uint64(1)
            left = table.find(pk)
            at = np.flatnonzero(left >= 0)
            right = table.find(c_full[at] - pk[at] * powers[c_len[at] - c])
            ok = right >= 0
            at = at[ok]
            parts.append((cand[at], np.full(len(at), c, np.int64), uniq[left[at]], uniq[right[ok]]))
    if not parts:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    idx, cut, li, ri = (np.concatenate(p) for p in zip(*parts))
    del parts, prefix
    idx, cut, li, ri = _verified(cp, lens, offs, idx, cut, li, ri)
    order = np.lexsort((cut, idx) if rank_arr is None else (cut, idx, rank_arr[idx]))
    return li[order], ri[order]


def _verified(cp, lens, offs, idx, cut, li, ri):
    """Drop proposed merges whose halves are not, character for character, the piece."""
    total = lens[idx]
    good = (lens[li] == cut) & (lens[ri] == total - cut)
    order, counts = _rows_by_length(total, np.arange(len(idx)))
    src = offs[idx[order]]
    lsrc = offs[li[order]]
    rsrc = offs[ri[order]] - cut[order]
    ocut = cut[order]
    bad = np.zeros(len(order), bool)
    for k, m in enumerate(counts):
        ref = np.where(k < ocut[:m], lsrc[:m], rsrc[:m])
        ref += k
        np.minimum(ref, len(cp) - 1, out=ref)  # a length mismatch is already caught by `good`
        bad[:m] |= cp[src[:m] + k] != cp[ref]
    good[order[bad]] = False
    if good.all():
        return idx, cut, li, ri
    return idx[good], cut[good], li[good], ri[good]


# ------------------------------------------------------------------------------ disk cache

CACHE_ENV_DISABLE = "MISTRALRS_NO_TOKENIZER_CACHE"
CACHE_MIN_PIECES = 32768  # smaller vocabularies compute their merges in a few ms
_CACHE_FORMAT = "mistralrs-spm-merges/2"
# magic, format version, piece count, merge count; then int32 (left, right) per merge.
_HEADER = struct.Struct("<8sIQQ")
_MAGIC = b"MRSPMMRG"
_VERSION = 2


def cache_dir() -> Path:
    return cache_root() / "mistralrs" / "gguf_tokenizer"


def cache_path(pieces: Sequence[str], rank: Sequence[float] | None, types: Sequence[int]) -> Path:
    h = hashlib.sha256(_CACHE_FORMAT.encode())
    h.update(np.fromiter(map(len, pieces), np.int64, len(pieces)).tobytes())
    h.update("".join(pieces).encode("utf-32-le", "surrogatepass"))
    h.update((np.asarray(types) == BYTE).tobytes())
    h.update(b"by-position" if rank is None else np.asarray(rank, dtype=np.float64).tobytes())
    return cache_dir() / f"spm-merges-{h.hexdigest()[:40]}.bin"


def _read_cache(path: Path, pieces: Sequence[str], vocab: dict[str, int]):
    try:
        data = path.read_bytes()
        magic, version, n, m = _HEADER.unpack_from(data)
        if magic != _MAGIC or version != _VERSION or n != len(pieces) or len(data) != _HEADER.size + 8 * m:
            return None
        ids = np.frombuffer(data, dtype="<i4", offset=_HEADER.size).reshape(m, 2).astype(np.int64)
        if m and (ids.min() < 0 or ids.max() >= len(pieces)):
            return None
        # Spot checks: each sampled merge joins two pieces into a piece.
        for i in np.linspace(0, m - 1, min(m, 257)).astype(np.int64).tolist():
            a, b = ids[i].tolist()
            if vocab.get(pieces[a]) != a or vocab.get(pieces[b]) != b or pieces[a] + pieces[b] not in vocab:
                return None
        return ids[:, 0], ids[:, 1]
    except Exception:  # missing, unreadable or damaged: compute instead
        return None


def _write_cache(path: Path, n: int, left: np.ndarray, right: np.ndarray) -> None:
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        ids = np.stack([left, right], axis=1).astype("<i4")
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            f.write(_HEADER.pack(_MAGIC, _VERSION, n, len(left)))
            f.write(ids.tobytes())
        os.replace(tmp, path)  # atomic: a reader sees the old file or the whole new one
        tmp = None
        for stale in path.parent.glob("spm-merges-*.json"):  # format 1, never read again
            stale.unlink(missing_ok=True)
    except Exception:  # read-only or full disk, no home: the cache is an optimisation only
        pass
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


def cached_spm_merge_ids(pieces: Sequence[str], vocab: dict[str, int], rank: Sequence[float] | None,
                         types: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """``spm_merge_ids``, through the disk cache for large vocabularies."""
    if len(pieces) < CACHE_MIN_PIECES or env_flag(CACHE_ENV_DISABLE):
        return spm_merge_ids(pieces, vocab, rank, types)
    try:
        path = cache_path(pieces, rank, types)
    except Exception:
        return spm_merge_ids(pieces, vocab, rank, types)
    got = _read_cache(path, pieces, vocab)
    if got is not None:
        return got
    ids = spm_merge_ids(pieces, vocab, rank, types)
    _write_cache(path, len(pieces), *ids)
    return ids
