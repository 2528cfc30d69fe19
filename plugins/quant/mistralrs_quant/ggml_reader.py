"""Read llama.cpp's pre-GGUF model files ('ggml', 'ggmf' v1, 'ggjt' v1-v3), memory-mapped.

Layout (every integer little-endian uint32)::

    magic                       'ggml' | 'ggmf' | 'ggjt', written as a uint32 (bytes reversed)
    version                     absent for 'ggml'
    n_vocab n_embd n_mult n_head n_layer n_rot ftype
    n_vocab x (len, bytes[len], float32 score)     no score for 'ggml'
    until EOF, per tensor:
        n_dims, name_len, type, ne[n_dims] (ne[0] = row length), name,
        padding to a multiple of 32 bytes from the file start ('ggjt' only), data

Quantized block layouts changed twice before GGUF: ggjt v2 reordered the nibbles of
every legacy type and ggjt v3 stored the Q4_0/Q4_1/Q8_0 scales as float16. Only layouts
that equal today's are accepted (as llama.cpp did at v3): any type in v3, float and
Q5_0/Q5_1 tensors in v2, float tensors before that.
"""
from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np

from .formats import GGML_TYPES, type_name
from .gguf_reader import GGUFTensorInfo

PathLike = Union[str, os.PathLike]

_MAGICS = {0x67676D6C: "ggml", 0x67676D66: "ggmf", 0x67676A74: "ggjt"}
_OTHER_MAGICS = {
    0x67676C61: "a LoRA adapter ('ggla'), not a model",
    0x6767736E: "a llama.cpp session file ('ggsn'), not a model",
}
_VERSIONS = {"ggml": (0,), "ggmf": (1,), "ggjt": (1, 2, 3)}
_FLOAT = ("F32", "F16")
_HPARAMS = ("n_vocab", "n_embd", "n_mult", "n_head", "n_layer", "n_rot", "ftype")
_MAX_NAME = 4096


@dataclass(frozen=True)
class GGMLHParams:
    n_vocab: int
    n_embd: int
    n_mult: int
    n_head: int
    n_layer: int
    n_rot: int
    ftype: int

    @property
    def n_ff(self) -> int:
        """The feed-forward width llama.cpp derived from n_mult."""
        return (2 * (4 * self.n_embd) // 3 + self.n_mult - 1) // self.n_mult * self.n_mult


@dataclass
class GGMLFile:
    path: Path
    magic: str            # 'ggml' | 'ggmf' | 'ggjt'
    version: int          # 0 for the unversioned 'ggml'
    hparams: GGMLHParams
    tokens: list[bytes]
    scores: list[float] | None   # None for 'ggml', which stores none
    tensors: dict[str, GGUFTensorInfo]


def _allowed_types(magic: str, version: int) -> tuple[str, ...]:
    if magic == "ggjt" and version >= 3:
        return tuple(s.name for s in GGML_TYPES.values())
    if magic == "ggjt" and version == 2:
        return _FLOAT + ("Q5_0", "Q5_1")
    return _FLOAT


class _Cursor:
    def __init__(self, buf, path: Path):
        self.buf, self.path, self.pos, self.size = buf, path, 0, len(buf)

    def need(self, n: int, what: str) -> None:
        if self.pos + n > self.size:
            raise ValueError(f"{self.path}: truncated GGML file: {what} needs {n} bytes at offset "
                             f"{self.pos} but the file has {self.size} bytes")

    def u32(self, what: str) -> int:
        self.need(4, what)
        (v,) = struct.unpack_from("<I", self.buf, self.pos)
        self.pos += 4
        return v

    def f32(self, what: str) -> float:
        self.need(4, what)
        (v,) = struct.unpack_from("<f", self.buf, self.pos)
        self.pos += 4
        return v

    def raw(self, n: int, what: str) -> bytes:
        self.need(n, what)
        out = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return out


def _map(path: Path) -> mmap.mmap:
    if not path.exists():
        raise FileNotFoundError(f"GGML file not found: {path}")
    if path.is_dir():
        raise ValueError(f"{path}: is a directory, expected a GGML model file")
    if path.stat().st_size < 4:
        raise ValueError(f"{path}: truncated GGML file ({path.stat().st_size} bytes)")
    with open(path, "rb") as f:
        # ACCESS_COPY: private pages, so views are writable yet the file is never modified.
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)


def _magic(cur: _Cursor) -> tuple[str, int]:
    path = cur.path
    head = bytes(cur.buf[0:4])
    if head == b"GGUF":
        raise ValueError(f"{path}: this is a GGUF file, not a legacy GGML file; load it with Which.GGUF")
    value = cur.u32("the magic number")
    if value in _OTHER_MAGICS:
        raise ValueError(f"{path}: this is {_OTHER_MAGICS[value]}")
    magic = _MAGICS.get(value)
    if magic is None:
        raise ValueError(f"{path}: not a GGML file (magic bytes {head!r}; expected 'ggml', 'ggmf' or 'ggjt' "
                         "as written by llama.cpp before GGUF)")
    version = 0 if magic == "ggml" else cur.u32("the version")
    if version not in _VERSIONS[magic]:
        raise ValueError(f"{path}: unsupported {magic!r} version {version} (supported: "
                         f"{', '.join(map(str, _VERSIONS[magic]))})")
    return magic, version


def open_ggml(path: PathLike) -> GGMLFile:
    path = Path(path)
    buf = _map(path)
    cur = _Cursor(buf, path)
    magic, version = _magic(cur)
    hp = GGMLHParams(*(cur.u32(f"hyperparameter {n}") for n in _HPARAMS))
    if min(hp.n_embd, hp.n_head, hp.n_layer, hp.n_vocab, hp.n_mult) == 0:
        raise ValueError(f"{path}: malformed GGML header: {hp}")
    # Each vocabulary entry takes at least 4 bytes: a larger count is damage, not data.
    cur.need(4 * hp.n_vocab, "the vocabulary")
    tokens: list[bytes] = []
    scores: list[float] | None = [] if magic != "ggml" else None
    for i in range(hp.n_vocab):
        n = cur.u32(f"vocabulary entry {i}")
        tokens.append(cur.raw(n, f"vocabulary entry {i}"))
        if scores is not None:
            scores.append(cur.f32(f"the score of vocabulary entry {i}"))

    allowed = _allowed_types(magic, version)
    tensors: dict[str, GGUFTensorInfo] = {}
    while cur.pos < cur.size:
        n_dims = cur.u32("a tensor record")
        name_len = cur.u32("a tensor record")
        ggml_type = cur.u32("a tensor record")
        if not 1 <= n_dims <= 4 or not 0 < name_len <= _MAX_NAME:
            raise ValueError(f"{path}: malformed GGML tensor record at byte offset {cur.pos - 12} "
                             f"({n_dims} dimensions, name of {name_len} bytes)")
        dims = [cur.u32("a tensor shape") for _ in range(n_dims)]
        name = cur.raw(name_len, "a tensor name").decode("utf-8", errors="replace")
        spec = GGML_TYPES.get(ggml_type)
        if spec is None or spec.name not in allowed:
            why = "not supported" if spec is None else (
                f"stored with the block layout of {magic} v{version}, which predates today's; "
                "re-convert the model (to GGUF)")
            raise ValueError(f"{path}: tensor '{name}' has type {type_name(ggml_type)}, {why} "
                             f"(supported in {magic} v{version}: {', '.join(allowed)})")
        if dims[0] % spec.block_size:
            raise ValueError(f"{path}: tensor '{name}' ({spec.name}) has rows of {dims[0]} elements, "
                             f"not a multiple of the block size {spec.block_size}")
        if magic == "ggjt":
            cur.pos += -cur.pos % 32
        shape = tuple(int(d) for d in reversed(dims))
        row_bytes = spec.row_bytes(shape[-1])
        n_rows = int(np.prod(shape[:-1], dtype=np.int64))
        cur.need(n_rows * row_bytes, f"the data of tensor '{name}'")
        if name in tensors:
            raise ValueError(f"{path}: duplicate tensor name '{name}'")
        raw = np.frombuffer(buf, dtype=np.uint8, count=n_rows * row_bytes, offset=cur.pos)
        tensors[name] = GGUFTensorInfo(name, ggml_type, shape, raw.reshape(*shape[:-1], row_bytes), path)
        cur.pos += n_rows * row_bytes
    if not tensors:
        raise ValueError(f"{path}: GGML file holds no tensors (truncated after the vocabulary?)")
    return GGMLFile(path, magic, version, hp, tokens, scores, tensors)
