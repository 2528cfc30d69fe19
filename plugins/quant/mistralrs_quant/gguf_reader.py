"""Open GGUF files (single or split) as memory-mapped, validated tensor tables.

Tensor bytes are never copied at open: each ``GGUFTensorInfo.raw`` is a numpy view into
a private (copy-on-write) mapping of the file, so it is writable from numpy/torch's
point of view without ever touching the file on disk.

Pages of the mapping that were read once count in the process's RSS for as long as it
lives: the header (a 262k-token vocabulary is several MB of it) and the bytes of tensors
that the model copied (fused q/k/v, gate/up) or dequantized. ``GGUFFile.release_unused_pages``
hands those back after loading: it knows which tensors handed out by ``raw_tensor`` are
still alive, and drops every page none of them covers.
"""
from __future__ import annotations

import math
import mmap
import os
import re
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence, Union

import numpy as np
import torch

from ._gguf_parse import RawHeader, parse_header
from .formats import GGML_TYPES, FormatSpec, type_name

PathLike = Union[str, os.PathLike]

_MAX_DIM = 1 << 40
_MAX_ELEMENTS = 1 << 50
_SPLIT_NAME = re.compile(r"^(?P<prefix>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")


class _MappedFile:
    """One mapping plus the tensor views handed out over it (weakly held)."""

    def __init__(self, path: Path, buf: mmap.mmap):
        self.path, self.buf = path, buf
        self.views: list[tuple[weakref.ref, int, int]] = []   # (view, first byte, end byte)
        self._compact_at = 1024

    def track(self, view: np.ndarray, start: int, end: int) -> None:
        self.views.append((weakref.ref(view), start, end))
        if len(self.views) >= self._compact_at:  # repeated raw_tensor() calls: drop dead entries
            self.views = [v for v in self.views if v[0]() is not None]
            self._compact_at = max(1024, 2 * len(self.views))

    def release_unused_pages(self) -> int:
        """``madvise(MADV_DONTNEED)`` every whole page no live view touches; bytes released.

        A dropped page of this private mapping is read back from the file if it is touched
        again. Only pages that no live view covers are dropped (the header, rows whose
        tensors were freed or copied), so no tensor's bytes change: a write made through a
        view that has since died is lost, but nothing can read it any more. A tensor keeps
        its view alive through its storage, wherever it is held (Python or C++)."""
        advise = getattr(self.buf, "madvise", None)
        if advise is None or not hasattr(mmap, "MADV_DONTNEED"):
            return 0
        page = mmap.PAGESIZE
        live = sorted((s, e) for ref, s, e in self.views if ref() is not None)
        self.views = [v for v in self.views if v[0]() is not None]
        released, pos, size = 0, 0, len(self.buf)
        for s, e in live + [(size, size)]:
            gap_end = s // page * page              # pages wholly before this live range
            if gap_end > pos:
                try:
                    advise(mmap.MADV_DONTNEED, pos, gap_end - pos)
                    released += gap_end - pos
                except (OSError, ValueError):
                    return released
            pos = max(pos, -(-e // page) * page)    # skip the pages the range touches
        return released


@dataclass(frozen=True)
class GGUFTensorInfo:
    name: str
    ggml_type: int
    shape: tuple[int, ...]   # torch order: reversed ggml ne, rows first
    raw: np.ndarray          # uint8 [*shape[:-1], bytes_per_row], a view of the mapped file
    file: Path
    # Where ``raw`` lies in its mapping, so pages nothing uses can be given back.
    mapped: _MappedFile | None = field(default=None, repr=False, compare=False)
    offset: int = field(default=0, repr=False, compare=False)

    @property
    def format(self) -> FormatSpec:
        return GGML_TYPES[self.ggml_type]

    @property
    def type_name(self) -> str:
        return self.format.name

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        return int(self.raw.nbytes)

    def raw_tensor(self) -> torch.Tensor:
        """The packed bytes as a torch uint8 tensor sharing memory with the mapping."""
        if self.mapped is None:
            return torch.from_numpy(self.raw)
        # A view of its own per tensor: it lives exactly as long as the tensor's storage
        # (torch.from_numpy keeps it), which tells release_unused_pages what is in use.
        view = self.raw.view()
        self.mapped.track(view, self.offset, self.offset + self.raw.nbytes)
        return torch.from_numpy(view)

    def dequantize(self) -> torch.Tensor:
        return self.format.dequantize(self.raw_tensor()).reshape(self.shape)


@dataclass
class GGUFFile:
    paths: list[Path]
    version: int
    metadata: dict[str, Any]
    tensors: dict[str, GGUFTensorInfo]

    @property
    def architecture(self) -> str | None:
        return self.metadata.get("general.architecture")

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    def release_unused_pages(self) -> int:
        """Give back the mapped pages no tensor from ``raw_tensor``/``dequantize`` still
        uses (call once the model is built); returns the bytes released."""
        maps = {id(t.mapped): t.mapped for t in self.tensors.values() if t.mapped is not None}
        return sum(m.release_unused_pages() for m in maps.values())


@dataclass
class _Part:
    path: Path
    header: RawHeader
    buf: mmap.mmap

    def __post_init__(self):
        self.mapped = _MappedFile(self.path, self.buf)


def _map(path: Path) -> mmap.mmap:
    if not path.exists():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    if path.is_dir():
        raise ValueError(f"{path}: is a directory, expected a .gguf file")
    size = path.stat().st_size
    if size < 24:  # magic + version + two counts
        raise ValueError(f"{path}: truncated GGUF file ({size} bytes, the fixed header alone is 24)")
    with open(path, "rb") as f:
        # ACCESS_COPY: private pages, so views are writable yet the file is never modified.
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)


def _open_part(path: Path) -> _Part:
    buf = _map(path)
    return _Part(path, parse_header(path, buf), buf)


def _tensor_infos(part: _Part) -> dict[str, GGUFTensorInfo]:
    h, path = part.header, part.path
    out: dict[str, GGUFTensorInfo] = {}
    for t in h.tensors:
        spec = GGML_TYPES.get(t.ggml_type)
        if spec is None:
            raise ValueError(f"{path}: tensor '{t.name}' has type {type_name(t.ggml_type)}, which is "
                             f"not supported (supported: {', '.join(s.name for s in GGML_TYPES.values())})")
        if t.dims[0] % spec.block_size:
            raise ValueError(f"{path}: tensor '{t.name}' ({spec.name}) has rows of {t.dims[0]} elements, "
                             f"not a multiple of the block size {spec.block_size}")
        if t.offset % h.alignment:
            raise ValueError(f"{path}: tensor '{t.name}' data offset {t.offset} is not aligned to "
                             f"{h.alignment} bytes")
        # Python ints, bounded before numpy sees them: a damaged dimension must not overflow
        # int64 or numpy's dimension limit on its way to the bounds check below.
        if any(d >= _MAX_DIM for d in t.dims) or math.prod(t.dims) >= _MAX_ELEMENTS:
            raise ValueError(f"{path}: tensor '{t.name}' has an impossible shape {list(t.dims)}")
        shape = tuple(int(d) for d in reversed(t.dims))
        row_bytes = spec.row_bytes(shape[-1])
        n_rows = math.prod(shape[:-1])
        start = h.data_start + t.offset
        end = start + n_rows * row_bytes
        if end > h.file_size:
            raise ValueError(f"{path}: tensor '{t.name}' data (bytes {start}..{end}) extends past the end "
                             f"of the file ({h.file_size} bytes): the file is truncated or corrupt")
        raw = np.frombuffer(part.buf, dtype=np.uint8, count=end - start, offset=start)
        out[t.name] = GGUFTensorInfo(t.name, t.ggml_type, shape, raw.reshape(*shape[:-1], row_bytes), path,
                                     part.mapped, start)
    return out


def _split_siblings(given: Path, count: int) -> list[Path]:
    m = _SPLIT_NAME.match(given.name)
    if m is None or int(m["count"]) != count:
        raise ValueError(f"{given}: this GGUF is split into {count} files but its name does not follow "
                         f"'<prefix>-0000i-of-{count:05d}.gguf'; pass all split files explicitly")
    return [given.with_name(f"{m['prefix']}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]


def open_gguf(paths: PathLike | Sequence[PathLike]) -> GGUFFile:
    """Open one GGUF file, or the files of a split model as one model.

    Given one file of a split model (``split.count`` > 1), the others are found next to
    it by the llama.cpp naming scheme ``<prefix>-0000i-of-0000n.gguf``.
    Metadata comes from the first split; tensors from all of them.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    plist = [Path(p) for p in paths]
    if not plist:
        raise ValueError("no GGUF file given")
    parts = [_open_part(p) for p in plist]
    count = int(parts[0].header.metadata.get("split.count", 1))
    if len(parts) == 1 and count > 1:
        given = parts[0]
        parts = [given if p == given.path else _open_part(p) for p in _split_siblings(given.path, count)]
    parts.sort(key=lambda p: int(p.header.metadata.get("split.no", 0)))
    _check_splits(parts, count)

    tensors: dict[str, GGUFTensorInfo] = {}
    for part in parts:
        for name, info in _tensor_infos(part).items():
            if name in tensors:
                raise ValueError(f"tensor '{name}' appears in both {tensors[name].file} and {part.path}")
            tensors[name] = info
    expected = parts[0].header.metadata.get("split.tensors.count")
    if expected is not None and len(parts) > 1 and int(expected) != len(tensors):
        raise ValueError(f"{parts[0].path}: split.tensors.count says {expected} tensors, "
                         f"the {len(parts)} split files hold {len(tensors)}")
    return GGUFFile([p.path for p in parts], parts[0].header.version, dict(parts[0].header.metadata), tensors)


def _check_splits(parts: list[_Part], count: int) -> None:
    if len(parts) == 1 and count <= 1:
        return
    if len(parts) != count:
        raise ValueError(f"{parts[0].path}: model is split into {count} files, {len(parts)} given")
    for i, part in enumerate(parts):
        md = part.header.metadata
        if int(md.get("split.count", -1)) != count or int(md.get("split.no", -1)) != i:
            raise ValueError(f"{part.path}: expected split {i + 1} of {count}, but its split.no / "
                             f"split.count metadata says {md.get('split.no')} / {md.get('split.count')}")
