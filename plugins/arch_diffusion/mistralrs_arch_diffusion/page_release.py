"""Give an idle component's weight pages back to the kernel's page cache (CPU only).

Weights loaded in the checkpoint's own dtype stay memory-mapped from their safetensors file
(the core loader does not copy them). Flux's components run one after another (CLIP, T5,
the transformer for every step, the VAE), so on the host the pages of the components that
are not running need not stay in this process's resident set: ``MADV_DONTNEED`` on a clean
private file mapping drops them, and the next use faults them back in from the page cache
(or the disk, if the kernel reclaimed them meanwhile). Peak RSS becomes the largest
component instead of the sum of all of them.

Only ranges inside a mapping of a ``.safetensors`` file are released, and only whole pages
inside one tensor's bytes. Dropping a private page discards writes to it: nothing in the
pipeline writes weights after loading (they are inference-only parameters).
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


def release_pages(module: nn.Module) -> int:
    """Drop ``module``'s file-backed weight pages from the resident set; returns the bytes
    advised. A no-op where ``madvise`` is unavailable."""
    if os.name != "posix":
        return 0
    try:
        madvise = _madvise()
    except (OSError, AttributeError):
        return 0
    total = 0
    for lo, hi in file_backed_ranges(module):
        if madvise(lo, hi - lo, _MADV_DONTNEED) == 0:
            total += hi - lo
    return total
