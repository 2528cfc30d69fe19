"""Give memory-mapped checkpoint pages back to the kernel's page cache (CPU only).

Safetensors tensors are views of a private mapping of their file, so every page a reader
touches stays in this process's resident set for as long as the mapping lives, even when
nothing will read it again. Two kinds of reader are done with their pages early:

* in-situ quantization reads each dense tensor once and keeps only its quantized copy
  (``release_tensor_pages`` after each slab, called by the quant plugin's quantizer):
  without it, peak RSS is the whole float checkpoint plus the quantized model; at the end
  of the load ``copy_out_of_files`` gives the small dense leftovers (norms) their own
  memory so the mapping can close;
* Flux's components run one after another on the host, so the ones not running need not
  stay resident (``release_pages(module)``, called by the diffusion plugin).

``MADV_DONTNEED`` on a clean page of a private file mapping drops it, and the next use
faults it back in from the page cache (or the disk, if the kernel reclaimed it
meanwhile), so a released tensor still reads the same values. Only whole pages inside a
tensor's bytes are released (``copy_out_of_files``: also the folios around a tensor it
copied), and only pages that are still the file's own: dropping a private page that was
written to (copy-on-write, now anonymous) would throw the write away, so
``/proc/self/pagemap`` is read first and such pages are kept. That check, not the mapping
lookup, is what makes a release safe.
"""
from __future__ import annotations

import ctypes
import mmap
import os
from typing import Iterable

import torch
from torch import nn

_MADV_DONTNEED = 4
_PAGE = mmap.PAGESIZE
# The largest page-cache folio a file fault maps at once (a PMD: 2 MiB on x86-64/arm64 4K).
_FOLIO = 2 << 20
_libc = None
# The safetensors mappings last seen in /proc/self/maps. Reading that file costs ~1 ms in
# a process that has imported torch, once per tensor during ISQ; a tensor outside these
# spans re-reads it. A stale span is harmless: the pagemap check keeps every page that is
# not a file page.
_spans: list[tuple[int, int]] = []


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
                if line.rstrip().endswith(".safetensors"):
                    lo, hi = line.split(maxsplit=1)[0].split("-")
                    spans.append((int(lo, 16), int(hi, 16)))
    except OSError:
        return []
    return spans


def _extent(t: torch.Tensor) -> tuple[int, int] | None:
    """[first byte, last byte + 1) of a CPU tensor's elements (strided views included)."""
    if t is None or t.device.type != "cpu" or t.numel() == 0:
        return None
    last = sum((n - 1) * abs(s) for n, s in zip(t.shape, t.stride()))
    start = t.data_ptr()
    return start, start + (last + 1) * t.element_size()


def _page_ranges(tensors: Iterable[torch.Tensor], fresh: bool) -> list[tuple[int, int]]:
    """Page-aligned [start, end) ranges of ``tensors`` that lie inside a safetensors mapping
    (``fresh``: read the mappings now rather than trusting the last read)."""
    global _spans
    if fresh:
        _spans = _safetensors_mappings()
    seen, out = set(), []
    for t in tensors:
        ext = _extent(t)
        if ext is None or ext[0] in seen:
            continue
        seen.add(ext[0])
        start, end = ext
        inside = any(lo <= start and end <= hi for lo, hi in _spans)
        if not inside and not fresh:
            _spans = _safetensors_mappings()
            inside = any(lo <= start and end <= hi for lo, hi in _spans)
        if not inside:
            continue
        lo = (start + _PAGE - 1) // _PAGE * _PAGE
        hi = end // _PAGE * _PAGE
        if hi > lo:
            out.append((lo, hi))
    return out


def _module_tensors(module: nn.Module) -> list[torch.Tensor]:
    return list(module.parameters()) + list(module.buffers())


def file_backed_ranges(module: nn.Module) -> list[tuple[int, int]]:
    """Page-aligned [start, end) address ranges of ``module``'s CPU tensors that lie inside a
    safetensors file mapping."""
    return _page_ranges(_module_tensors(module), fresh=True)


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


def _release(ranges: list[tuple[int, int]]) -> int:
    if not ranges:
        return 0
    try:
        madvise = _madvise()
    except (OSError, AttributeError):
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


def release_pages(module: nn.Module) -> int:
    """Drop ``module``'s file-backed weight pages from the resident set; returns the bytes
    advised. A no-op where ``madvise`` is unavailable."""
    if os.name != "posix":
        return 0
    return _release(file_backed_ranges(module))


def release_tensor_pages(*tensors: torch.Tensor) -> int:
    """Drop the file-backed pages of checkpoint tensors a reader is done with (they stay
    readable: a later read faults them back in); returns the bytes advised. Tensors that
    are not memory-mapped from a safetensors file (copies, other devices) are skipped."""
    if os.name != "posix":
        return 0
    return _release(_page_ranges(tensors, fresh=False))


def copy_out_of_files(module: nn.Module, max_bytes: int = _FOLIO) -> int:
    """Give each CPU parameter and buffer of ``module`` smaller than ``max_bytes`` that still
    views a safetensors mapping its own memory, then release the mapped pages; returns the
    bytes copied.

    For a model whose large weights were all read into memory anyway (in-situ quantization
    leaves norms and biases dense): once nothing views the checkpoint its mapping goes
    away, and with it any chance of its pages coming back. Kernels that cache file pages
    in large folios map a whole folio when one page of it is touched, so a 2 KiB norm
    between two large tensors would otherwise bring up to megabytes of its neighbours back
    into the resident set on the first forward pass (reading it here does the same, so
    each copy releases the folios around it too: pages of the mapping that this module no
    longer views, clean ones only, as everywhere here). Larger tensors stay mapped: clean
    file pages the kernel can reclaim under pressure, where a copy could only be swapped."""
    spans = _safetensors_mappings()
    if not spans:
        return 0
    copied, done = 0, {}
    for sub in module.modules():
        for store in (sub._parameters, sub._buffers):
            for name, t in store.items():
                ext = _extent(t) if t is not None else None
                span = next(((lo, hi) for lo, hi in spans if lo <= ext[0] and ext[1] <= hi), None) \
                    if ext is not None else None
                if span is None or ext[1] - ext[0] >= max_bytes:
                    continue
                if id(t) not in done:
                    own = t.data.clone()
                    lo = max(span[0], (ext[0] - _FOLIO) // _PAGE * _PAGE)
                    hi = min(span[1], (ext[1] + _FOLIO + _PAGE - 1) // _PAGE * _PAGE)
                    _release([(lo, hi)])
                    if isinstance(t, nn.Parameter):
                        t.data = own          # the same Parameter object: ties stay tied
                        done[id(t)] = t
                    else:
                        done[id(t)] = own
                    copied += own.numel() * own.element_size()
                if not isinstance(t, nn.Parameter):
                    store[name] = done[id(t)]
    return copied
