"""Give an idle component's weight pages back to the kernel's page cache (CPU only).

Weights loaded in the checkpoint's own dtype stay memory-mapped from their safetensors file
(the core loader does not copy them). Flux's components run one after another (CLIP, T5,
the transformer for every step, the VAE), so on the host the pages of the components that
are not running need not stay in this process's resident set: ``MADV_DONTNEED`` on a clean
private file mapping drops them, and the next use faults them back in from the page cache
(or the disk, if the kernel reclaimed them meanwhile). Peak RSS becomes the largest
component instead of the sum of all of them.

Only ranges inside a mapping of a ``.safetensors`` file are released, only whole pages
inside one tensor's bytes, and only pages that are still the file's own: dropping a private
page that was written to (copy-on-write, now anonymous) would throw the write away, so
``/proc/self/pagemap`` is read first and such pages are kept.
"""
from __future__ import annotations

import ctypes
import mmap
import os

from torch import nn

_MADV_DONTNEED = 4
_PAGE = mmap.PAGESIZE
_libc = None


def _madvise():
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        _libc.madvise.restype = ctypes.c_int
    return _libc.madvise


def _safetensors_mappings() -> list[tuple[int, int]]:
    spans = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split(maxsplit=5)
                if len(parts) == 6 and parts[5].rstrip().endswith(".safetensors"):
                    lo, hi = parts[0].split("-")
                    spans.append((int(lo, 16), int(hi, 16)))
    except OSError:
        return []
    return spans


def file_backed_ranges(module: nn.Module) -> list[tuple[int, int]]:
    """Page-aligned [start, end) address ranges of ``module``'s CPU tensors that lie inside a
    safetensors file mapping."""
    spans = _safetensors_mappings()
    if not spans:
        return []
    seen, out = set(), []
    for t in list(module.parameters()) + list(module.buffers()):
        if t is None or t.device.type != "cpu":
            continue
        start = t.data_ptr()
        if start in seen or t.numel() == 0:
            continue
        seen.add(start)
        end = start + t.numel() * t.element_size()
        if not any(lo <= start and end <= hi for lo, hi in spans):
            continue
        lo = (start + _PAGE - 1) // _PAGE * _PAGE
        hi = end // _PAGE * _PAGE
        if hi > lo:
            out.append((lo, hi))
    return out


def _clean_file_runs(lo: int, hi: int, pagemap) -> list[tuple[int, int]]:
    """Sub-ranges of [lo, hi) whose pages are present and still file pages (not written)."""
    import numpy as np

    n = (hi - lo) // _PAGE
    pagemap.seek(lo // _PAGE * 8)
    entries = np.frombuffer(pagemap.read(n * 8), dtype=np.uint64)
    if entries.size != n:
        return []
    # bit 63: present; bit 61: file page or shared anonymous (a written private page is neither)
    keep = ((entries >> np.uint64(63)) & np.uint64(1)).astype(bool) & \
        ((entries >> np.uint64(61)) & np.uint64(1)).astype(bool)
    if not keep.any():
        return []
    edges = np.flatnonzero(np.diff(np.concatenate(([False], keep, [False])).astype(np.int8)))
    return [(lo + int(a) * _PAGE, lo + int(b) * _PAGE) for a, b in zip(edges[0::2], edges[1::2])]


def release_pages(module: nn.Module) -> int:
    """Drop ``module``'s file-backed weight pages from the resident set; returns the bytes
    advised. A no-op where ``madvise`` is unavailable."""
    return release_ranges(file_backed_ranges(module))


def release_ranges(ranges: list[tuple[int, int]]) -> int:
    """Drop the clean file pages of ``ranges`` (from ``file_backed_ranges``, possibly taken
    before the tensors were dropped) from the resident set; returns the bytes advised. Only
    ranges still inside a safetensors mapping are touched."""
    if os.name != "posix" or not ranges:
        return 0
    try:
        madvise = _madvise()
    except (OSError, AttributeError):
        return 0
    spans = _safetensors_mappings()
    ranges = [(lo, hi) for lo, hi in ranges if any(a <= lo and hi <= b for a, b in spans)]
    if not ranges:
        return 0
    try:
        pagemap = open("/proc/self/pagemap", "rb", buffering=0)
    except OSError:
        return 0  # without page flags a written page cannot be told apart: keep everything
    total = 0
    with pagemap:
        for lo, hi in ranges:
            for a, b in _clean_file_runs(lo, hi, pagemap):
                if madvise(a, b - a, _MADV_DONTNEED) == 0:
                    total += b - a
    return total
