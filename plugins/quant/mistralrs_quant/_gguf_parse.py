"""Low-level GGUF header parsing over a memory map.

gguf-py's ``GGUFReader`` builds one numpy view per array element, which takes ~11 s for
a 262k-token vocabulary; this parser reads numeric arrays in one ``frombuffer`` and
strings with ``struct``, so opening a model header costs a fraction of a second. Every
read is bounds-checked so a damaged file gives one readable ``ValueError``.
"""
from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4

# GGUFValueType ids -> (struct code, numpy dtype); 8 = string, 9 = array.
_SCALARS: dict[int, tuple[str, np.dtype]] = {
    0: ("<B", np.dtype("<u1")), 1: ("<b", np.dtype("<i1")),
    2: ("<H", np.dtype("<u2")), 3: ("<h", np.dtype("<i2")),
    4: ("<I", np.dtype("<u4")), 5: ("<i", np.dtype("<i4")),
    6: ("<f", np.dtype("<f4")), 7: ("<?", np.dtype("?")),
    10: ("<Q", np.dtype("<u8")), 11: ("<q", np.dtype("<i8")),
    12: ("<d", np.dtype("<f8")),
}
STRING, ARRAY = 8, 9
_U64 = struct.Struct("<Q")
# String arrays at least this long (vocabularies, merges) are read by the C helper.
FAST_STRINGS_MIN = 4096


@dataclass(frozen=True)
class RawTensorInfo:
    name: str
    dims: tuple[int, ...]   # ggml order: ne[0] (the contiguous row length) first
    ggml_type: int
    offset: int             # relative to the start of the data section


@dataclass(frozen=True)
class RawHeader:
    version: int
    metadata: dict[str, Any]
    tensors: list[RawTensorInfo]
    alignment: int
    data_start: int
    file_size: int


class _Cursor:
    def __init__(self, buf: mmap.mmap, path: Path):
        self.buf, self.path, self.pos, self.size = buf, path, 0, len(buf)

    def fail(self, what: str) -> ValueError:
        return ValueError(f"{self.path}: malformed GGUF file: {what} (at byte offset {self.pos})")

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise ValueError(f"{self.path}: truncated GGUF file: {what} needs {n} bytes at offset "
                             f"{self.pos} but the file has {self.size} bytes")

    def scalar(self, code: str, what: str) -> Any:
        n = struct.calcsize(code)
        self.need(n, what)
        (v,) = struct.unpack_from(code, self.buf, self.pos)
        self.pos += n
        return v

    def string(self, what: str) -> str:
        n = self.scalar("<Q", what)
        self.need(n, what)
        raw = self.buf[self.pos:self.pos + n]
        self.pos += n
        # Invalid UTF-8 would make the whole file unreadable; one odd token should not.
        return raw.decode("utf-8", errors="replace")

    def value(self, vtype: int, what: str) -> Any:
        if vtype in _SCALARS:
            v = self.scalar(_SCALARS[vtype][0], what)
            return bool(v) if vtype == 7 else v
        if vtype == STRING:
            return self.string(what)
        if vtype == ARRAY:
            return self.array(what)
        raise self.fail(f"{what} has unknown value type {vtype}")

    def array(self, what: str) -> list:
        itype = self.scalar("<I", what)
        n = self.scalar("<Q", what)
        if itype in _SCALARS:
            dt = _SCALARS[itype][1]
            self.need(n * dt.itemsize, what)
            arr = np.frombuffer(self.buf, dtype=dt, count=n, offset=self.pos)
            self.pos += n * dt.itemsize
            return arr.tolist()
        if itype not in (STRING, ARRAY):
            raise self.fail(f"{what} is an array of unknown value type {itype}")
        # Each element takes at least 8 bytes; a count beyond that is damage, not data.
        self.need(n * 8, what)
        if itype == STRING:
            return self.strings(n, what)
        return [self.value(itype, what) for _ in range(n)]

    def strings(self, n: int, what: str) -> list[str]:
        """``n`` length-prefixed strings: a vocabulary's worth (262k) in one tight loop,
        or in C (~6x faster) when the quant kernels' library is already built."""
        if n >= FAST_STRINGS_MIN:
            from .kernels import cpp
            got = cpp.gguf_strings(self.buf, self.pos, n)
            if got is not None:
                out, self.pos = got
                return out
        buf, pos, size, unpack = self.buf, self.pos, self.size, _U64.unpack_from
        out: list = [None] * n
        for i in range(n):
            if pos + 8 > size:
                break
            (length,) = unpack(buf, pos)
            pos += 8
            end = pos + length
            if end > size:
                break
            out[i] = buf[pos:end].decode("utf-8", errors="replace")
            pos = end
        else:
            self.pos = pos
            return out
        self.pos = pos
        self.need(8 if pos + 8 > size else length, what)  # raises: the file ends inside a string
        raise AssertionError("unreachable")


def parse_header(path: Path, buf: mmap.mmap) -> RawHeader:
    cur = _Cursor(buf, path)
    cur.need(4, "the magic number")
    magic = bytes(buf[0:4])
    if magic != GGUF_MAGIC:
        raise ValueError(f"{path}: not a GGUF file (magic bytes {magic!r}, expected {GGUF_MAGIC!r})")
    cur.pos = 4
    version = cur.scalar("<I", "the version")
    if version & 0xFFFF == 0 and version != 0:
        raise ValueError(f"{path}: big-endian GGUF file (version field reads {version:#010x}); "
                         "only little-endian GGUF files are supported")
    if version not in SUPPORTED_VERSIONS:
        raise ValueError(f"{path}: unsupported GGUF version {version} (supported: "
                         f"{', '.join(map(str, SUPPORTED_VERSIONS))})")
    n_tensors = cur.scalar("<Q", "the tensor count")
    n_kv = cur.scalar("<Q", "the metadata count")
    # Each KV pair and tensor record takes well over 8 bytes: larger counts are corrupt.
    cur.need(8 * (n_tensors + n_kv), "the metadata and tensor records")

    metadata: dict[str, Any] = {}
    for i in range(n_kv):
        key = cur.string(f"metadata key #{i}")
        vtype = cur.scalar("<I", f"the type of metadata '{key}'")
        if key in metadata:
            raise cur.fail(f"duplicate metadata key '{key}'")
        metadata[key] = cur.value(vtype, f"metadata '{key}'")

    tensors: list[RawTensorInfo] = []
    seen: set[str] = set()
    for i in range(n_tensors):
        name = cur.string(f"tensor name #{i}")
        n_dims = cur.scalar("<I", f"tensor '{name}' dimension count")
        if not 1 <= n_dims <= MAX_DIMS:
            raise cur.fail(f"tensor '{name}' has {n_dims} dimensions (1..{MAX_DIMS} allowed)")
        dims = tuple(cur.scalar("<Q", f"tensor '{name}' shape") for _ in range(n_dims))
        ggml_type = cur.scalar("<I", f"tensor '{name}' type")
        offset = cur.scalar("<Q", f"tensor '{name}' data offset")
        if name in seen:
            raise cur.fail(f"duplicate tensor name '{name}'")
        seen.add(name)
        tensors.append(RawTensorInfo(name, dims, ggml_type, offset))

    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise ValueError(f"{path}: general.alignment must be a power of two, got {alignment!r}")
    data_start = -(-cur.pos // alignment) * alignment
    return RawHeader(version, metadata, tensors, alignment, data_start, cur.size)
