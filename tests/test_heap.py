"""mistralrs_core.heap: freed malloc memory really leaves the resident set."""
import ctypes
import platform

import pytest

from mistralrs_core.heap import release_free_heap


def _rss_anon_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    raise AssertionError("no RssAnon in /proc/self/status")


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                    reason="malloc_trim is glibc's")
def test_release_free_heap_returns_freed_chunks():
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
    n, size = 64 * 1024, 1024  # 64 MiB in chunks below the mmap threshold: heap, not mmap
    chunks = [libc.malloc(size) for _ in range(n)]
    for c in chunks:
        libc.memset(c, 1, size)
    fence = libc.malloc(size)  # keeps the freed run off the top of the heap (no auto-trim)
    before = _rss_anon_kib()
    for c in chunks:
        libc.free(c)
    after_free = _rss_anon_kib()
    assert release_free_heap()
    after_trim = _rss_anon_kib()
    libc.free(fence)
    # Freeing alone keeps the pages; the trim gives back most of the 64 MiB.
    assert before - after_free < 16 * 1024
    assert after_free - after_trim > 48 * 1024
