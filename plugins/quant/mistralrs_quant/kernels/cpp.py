"""C++ CPU kernels for ggml block formats, compiled on first use.

``matmul(x, raw, type)`` computes ``x @ dequantize(raw).T`` in float32 straight from the
ggml bytes (no repacking, no dense copy): each block is decoded in registers to exactly
the float32 values of the reference dequantizer and multiplied in with float32 FMAs, so
the result differs from the float64 reference only by float32 summation error.
``dequantize(raw, type, ids)`` decodes selected rows, bit-identical to ``formats``.

Build: ``torch.utils.cpp_extension.load`` on the sources in ``../csrc`` into
``$XDG_CACHE_HOME/mistralrs_quant/cpp/<torch>-<python>-<machine>-<hash of sources+flags>``
(``~/.cache`` by default); a later process with the same sources loads the cached library
without compiling. The library is portable: the AVX-512 kernels are a separate translation
unit under a target pragma, chosen at run time by a CPU check, with scalar kernels
everywhere else. It is called through ctypes (a plain C ABI), which keeps the first
compile to seconds instead of the ~45 s that torch/extension.h costs.

Two variants (``impl``):

``auto``/``avx512`` (default; ``scalar`` elsewhere): exact, as above. On the development
    machine (Sapphire Rapids class) it decodes 4-bit formats at ~20 G weights/s per core
    from L2 (a table lookup per 16 codes replaces the int->float conversion): at M = 1 as
    fast as torch's bf16 int4 kernel (Q4_K ~10% slower), faster than a dense bf16 matmul.
``vnni`` (opt-in, CPUs with AVX-512 VNNI; Q4_0/Q4_1/Q5_0/Q8_0/Q4_K): ggml's approach,
    activations quantized to int8 per 32 once per call, integer dot products. Error
    ~1e-3 of sum |x||w| (bounded by amax/254 per activation, see ggml_vnni.cpp); about as
    fast as the exact kernel for 4-bit codes, up to ~1.8x faster for Q8_0/Q5_0.
    ``Runner(quant_kernel="vnni")`` (a load option: it changes the numbers) selects it for
    the qlinear path where supported. ``MISTRALRS_QUANT_CPP_IMPL`` is a deprecated fallback
    read only when no variant was passed.

``MISTRALRS_QUANT_NO_CPP=1`` disables the kernels; a build failure (no compiler, no ninja)
does too. Either way ``available()`` is False, ``unavailable_reason()`` says why (logged
once), and ``qlinear`` falls back to its torch paths.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import sys
import threading
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from mistralrs_core import progress

from .._env import cache_root, env_flag

log = logging.getLogger(__name__)

ENV_DISABLE = "MISTRALRS_QUANT_NO_CPP"
ENV_IMPL = "MISTRALRS_QUANT_CPP_IMPL"
_CSRC = Path(__file__).resolve().parent.parent / "csrc"
_LIB_NAME = "mistralrs_quant_ggml"
_SOURCES = ("ggml_cpu.cpp", "ggml_avx512.cpp", "ggml_vnni.cpp", "decoder_step.cpp", "gguf_strings.cpp",
            "ggml_quantize.cpp", "qformats_cpu.cpp", "qformats_avx512.cpp", "qformats_avx2.cpp",
            "dense_small_m.cpp", "dense_small_m_avx512.cpp", "dense_small_m_bf16.cpp",  # kernels/dense.py
            "dense_small_m_amx.cpp")
_HEADERS = ("ggml_kernels.h", "mq_parallel.h", "qformats.h", "qformats_generic.h", "dense_small_m.h",
            "dense_small_m_avx512.h")
# -ffp-contract=off: a fused a*b+c in the scalar decoders would round differently from the
# reference dequantizer (the AVX-512 code uses explicit FMAs only where they are exact).
# -fopenmp makes at::parallel_for (an inline template) use torch's OpenMP pool; Apple's
# clang has no -fopenmp, and there the kernels run on the calling thread.
_OMP = [] if sys.platform == "darwin" else ["-fopenmp"]
_CFLAGS = ["-O3", "-ffp-contract=off", "-fno-math-errno"] + _OMP
_LDFLAGS = list(_OMP)

# ggml type id -> (elements, bytes) per block; must match block_shape() in ggml_cpu.cpp.
BLOCKS = {2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24), 8: (32, 34),
          12: (256, 144), 13: (256, 176), 14: (256, 210)}
IMPLS = {"auto": 0, "scalar": 1, "avx512": 2, "vnni": 3}
# Types with an integer-dot (VNNI) kernel.
VNNI_TYPES = {2, 3, 6, 8, 12}
_ERRORS = {1: "unsupported ggml type", 2: "unknown implementation", 3: "this CPU lacks the instructions",
           4: "row index out of range", 5: "kernel raised an exception"}


class _Bound(ctypes.Structure):
    """``MqWeight`` in ggml_cpu.cpp."""
    _fields_ = [("type", ctypes.c_int32), ("impl", ctypes.c_int32), ("w", ctypes.c_void_p),
                ("w_stride", ctypes.c_int64), ("n", ctypes.c_int64), ("k", ctypes.c_int64)]


class _State:
    lib: Optional[ctypes.CDLL] = None
    reason: Optional[str] = None
    info: dict = {}
    tried = False
    strings = None   # mq_gguf_strings through ctypes.PyDLL (GIL held), once looked up


_state = _State()
_lock = threading.Lock()


def _disabled_by_env() -> bool:
    return env_flag(ENV_DISABLE)


def cache_dir() -> Path:
    """Where the library for these sources, this torch and this Python is built."""
    h = hashlib.sha256()
    for name in _SOURCES + _HEADERS:
        h.update(name.encode())
        h.update((_CSRC / name).read_bytes())
    h.update(" ".join(_CFLAGS + _LDFLAGS).encode())
    tag = (f"torch{torch.__version__.split('+')[0]}-py{sys.version_info[0]}{sys.version_info[1]}-"
           f"{platform.machine()}-{h.hexdigest()[:16]}")
    return cache_root() / "mistralrs_quant" / "cpp" / tag


def _compile(build: Path, name: str) -> None:
    from torch.utils import cpp_extension  # ~0.07 s of imports (setuptools): only to compile
    build.mkdir(parents=True, exist_ok=True)
    # Copies: load() appends to the flag lists it is given.
    cpp_extension.load(name, [str(_CSRC / s) for s in _SOURCES], extra_cflags=list(_CFLAGS),
                       extra_ldflags=list(_LDFLAGS), extra_include_paths=[str(_CSRC)], build_directory=str(build),
                       is_python_module=False, verbose=False)


def _build() -> ctypes.CDLL:
    build = cache_dir()
    so = build / f"{_LIB_NAME}.so"
    t0 = time.perf_counter()
    lib = None
    cached = so.exists()
    if cached:
        # The directory name hashes the sources and flags, so an existing library is
        # current; one that does not load (a build killed mid-link) is rebuilt.
        try:
            lib = ctypes.CDLL(str(so))
        except OSError:
            cached = False
    if lib is None:
        progress.notice(f"compiling the quantized-matmul C++ kernels (first use, takes a while; "
                        f"cached in {build})")
        _compile(build, _LIB_NAME)
        lib = ctypes.CDLL(str(so))
    seconds = time.perf_counter() - t0
    i64, vp, cint = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
    lib.mq_isa.restype = cint
    lib.mq_isa.argtypes = []
    lib.mq_matmul.restype = cint
    lib.mq_matmul.argtypes = [cint, cint, vp, i64, i64, vp, i64, i64, vp]
    lib.mq_matmul_bound.restype = cint
    lib.mq_matmul_bound.argtypes = [ctypes.POINTER(_Bound), vp, i64, vp]
    lib.mq_dequantize.restype = cint
    lib.mq_dequantize.argtypes = [cint, cint, vp, i64, i64, i64, vp, i64, vp, cint]
    lib.mq_decoder_step.restype = cint
    lib.mq_decoder_step.argtypes = [vp, vp]
    lib.mq_quantize.restype = cint
    lib.mq_quantize.argtypes = [cint, vp, vp, i64, i64, vp]
    # F8Q8 / FP8 / HQQ (kernels/qformats.py binds the weights)
    lib.mq_fmt_isa.restype = cint
    lib.mq_fmt_isa.argtypes = []
    lib.mq_fmt_matmul.restype = cint
    lib.mq_fmt_matmul.argtypes = [vp, vp, i64, vp]
    lib.mq_fmt_dequantize.restype = cint
    lib.mq_fmt_dequantize.argtypes = [vp, i64, i64, vp, cint]
    lib.mq_set_thread_cap.restype = None
    lib.mq_set_thread_cap.argtypes = [cint]
    # The same library again, for the one function that builds Python objects: PyDLL keeps
    # the GIL during the call, which CDLL releases.
    strings = ctypes.PyDLL(str(so)).mq_gguf_strings
    strings.restype = ctypes.py_object
    strings.argtypes = [vp, i64, i64, i64, ctypes.POINTER(i64)]
    _state.strings = strings
    bits = lib.mq_isa()
    isa = "avx512" if bits & 1 else "scalar"
    _state.info = {"path": str(so), "cached": cached, "seconds": round(seconds, 2), "isa": isa,
                   "vnni": bool(bits & 2)}
    if cached:
        log.info("mistralrs_quant C++ kernels loaded from %s (%s, %.2f s)", so, isa, seconds)
    else:
        log.info("mistralrs_quant C++ kernels compiled in %.1f s into %s (%s)", seconds, so, isa)
    return lib


def _load() -> Optional[ctypes.CDLL]:
    if _state.tried:
        return _state.lib
    with _lock:
        if not _state.tried:
            try:
                _state.lib = _build()
            except Exception as e:  # no compiler, no ninja, a compile error: fall back to torch
                first = str(e).strip().splitlines()
                _state.reason = f"C++ kernels failed to build ({type(e).__name__}: {first[0] if first else ''})"
                log.warning("mistralrs_quant: %s; quantized matmuls use the torch paths", _state.reason)
            _state.tried = True
    return _state.lib


def available() -> bool:
    """Whether the kernels can be used now (compiling them on the first call)."""
    if _disabled_by_env():
        return False
    return _load() is not None


def unavailable_reason() -> Optional[str]:
    if _disabled_by_env():
        return f"disabled by {ENV_DISABLE}"
    return None if _load() is not None else _state.reason


def build_info() -> dict:
    """Library path, whether it came from the cache, load/compile seconds, ISA in use."""
    _load()
    return dict(_state.info)


def gguf_strings(buf, pos: int, n: int):
    """``(list of n str, end position)`` for the GGUF string array at ``pos`` of ``buf``
    (bytes-like), or None: when the library is not built yet (a header read never starts a
    compile), is disabled or failed, or when the data ends inside the array (the caller's
    own reader then names the place)."""
    if _disabled_by_env():
        return None
    if not _state.tried and not (cache_dir() / f"{_LIB_NAME}.so").exists():
        return None
    if _load() is None or _state.strings is None:
        return None
    view = np.frombuffer(buf, dtype=np.uint8)
    end = ctypes.c_int64(0)
    out = _state.strings(view.ctypes.data, view.size, int(pos), int(n), ctypes.byref(end))
    return None if out is None else (out, end.value)


def supports(ggml_type: int) -> bool:
    return int(ggml_type) in BLOCKS


_env_impl_warned = False


def _impl_from_env() -> Optional[str]:
    """Deprecated: the variant changes numerics, so it is a load option
    (``Runner(quant_kernel=)``); the variable is still read when nothing was passed."""
    global _env_impl_warned
    value = os.environ.get(ENV_IMPL)
    if value and not _env_impl_warned:
        _env_impl_warned = True
        log.warning("%s is deprecated; pass Runner(quant_kernel=%r) instead", ENV_IMPL, value)
    return value


def choose_impl(ggml_type: int, impl: Optional[str] = None) -> str:
    """``impl`` (default: the deprecated $MISTRALRS_QUANT_CPP_IMPL, else "auto") where this
    CPU and type support it, else "auto" (the exact variant)."""
    impl = (impl or _impl_from_env() or "auto").strip().lower()
    if impl not in IMPLS:
        raise ValueError(f"unknown C++ kernel implementation {impl!r} (one of {', '.join(IMPLS)})")
    if impl == "vnni" and not (build_info().get("vnni") and int(ggml_type) in VNNI_TYPES):
        return "auto"
    if impl == "avx512" and build_info().get("isa") != "avx512":
        return "auto"
    return impl


def _check(rc: int) -> None:
    if rc:
        raise RuntimeError(f"mistralrs_quant C++ kernel: {_ERRORS.get(rc, f'error {rc}')}")


def _lib() -> ctypes.CDLL:
    lib = _load() if not _disabled_by_env() else None
    if lib is None:
        raise RuntimeError(f"mistralrs_quant C++ kernels are unavailable: {unavailable_reason()}")
    return lib


def _check_raw(raw: torch.Tensor, ggml_type: int) -> int:
    if int(ggml_type) not in BLOCKS:
        raise ValueError(f"ggml type {ggml_type} has no C++ kernel")
    bs, ts = BLOCKS[int(ggml_type)]
    if raw.dtype != torch.uint8 or raw.dim() != 2 or raw.device.type != "cpu":
        raise ValueError("raw weight must be a 2-D uint8 CPU tensor")
    if raw.shape[1] % ts or (raw.shape[1] > 1 and raw.stride(1) != 1):
        raise ValueError(f"raw rows must be contiguous whole {ts}-byte blocks")
    return raw.shape[1] // ts * bs


class CppWeight:
    """A ggml weight [N, bytes] bound to the kernels; holds a reference to ``raw``."""

    def __init__(self, raw: torch.Tensor, ggml_type: int, impl: str = "auto"):
        self.lib = _lib()
        self.k = _check_raw(raw, ggml_type)
        self.raw = raw
        self.n = raw.shape[0]
        self.type = int(ggml_type)
        self.impl_name = impl
        self.impl = IMPLS[impl]
        self._args = (raw.data_ptr(), raw.stride(0), self.n)
        self._bound = ctypes.pointer(_Bound(self.type, self.impl, raw.data_ptr(), raw.stride(0), self.n, self.k))
        self._call = self.lib.mq_matmul_bound

    def mm(self, x2d: torch.Tensor) -> torch.Tensor:
        """``x2d`` [M, K] (any float dtype) -> float32 [M, N]. Kept lean: it runs once per
        linear layer per decoded token."""
        if x2d.dtype != torch.float32 or not x2d.is_contiguous():
            x2d = x2d.to(torch.float32).contiguous()
        m = x2d.shape[0]
        y = torch.empty(m, self.n, dtype=torch.float32)
        if m and self.n:
            rc = self._call(self._bound, x2d.data_ptr(), m, y.data_ptr())
            if rc:
                _check(rc)
        return y

    def rows(self, ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        return dequantize(self.raw, self.type, ids, impl=self.impl)

    def dequant_mm(self, x2d: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``x2d @ W.T`` in ``dtype`` (float32 or bfloat16) through dense tiles of W: the
        large-M path, where a BLAS/AMX matmul amortises decoding each weight once. Tiles
        go into one reused scratch buffer, so no call pays for fresh pages."""
        if dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"dequant_mm computes in float32 or bfloat16, not {dtype}")
        x2d = x2d.to(dtype).contiguous()
        step = max(1, min(self.n, _TILE_ELEMS // max(1, self.k)))
        buf = _scratch(step * self.k, dtype)
        out = torch.empty(x2d.shape[0], self.n, dtype=dtype)
        ptr, stride, _ = self._args
        bf16 = int(dtype == torch.bfloat16)
        for r0 in range(0, self.n, step):
            rows = min(step, self.n - r0)
            w = buf[:rows * self.k].view(rows, self.k)
            _check(self.lib.mq_dequantize(self.type, self.impl, ptr + r0 * stride, stride, rows, self.k, None, rows,
                                          w.data_ptr(), bf16))
            if rows == self.n:
                return torch.mm(x2d, w.t(), out=out)
            torch.mm(x2d, w.t(), out=out[:, r0:r0 + rows])
        return out


# Dense tiles of at most this many weights: large enough to keep the matmul efficient,
# small enough to stay in L2/L3 while the matmul reads them back.
_TILE_ELEMS = 1 << 20
_scratch_local = threading.local()


def _scratch(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """A per-thread buffer of at least ``numel`` elements of ``dtype``."""
    bufs = getattr(_scratch_local, "bufs", None)
    if bufs is None:
        bufs = _scratch_local.bufs = {}
    buf = bufs.get(dtype)
    if buf is None or buf.numel() < numel:
        buf = bufs[dtype] = torch.empty(numel, dtype=dtype)
    return buf


def matmul(x2d: torch.Tensor, raw: torch.Tensor, ggml_type: int, impl: str = "auto") -> torch.Tensor:
    """float32 ``x2d @ dequantize(raw).T`` for x2d [M, K] and raw [N, bytes]."""
    k = _check_raw(raw, ggml_type)
    if x2d.dim() != 2 or x2d.shape[1] != k:
        raise ValueError(f"x must be [M, {k}], got {tuple(x2d.shape)}")
    return CppWeight(raw, ggml_type, impl).mm(x2d)


def dequantize(raw: torch.Tensor, ggml_type: int, ids: Optional[torch.Tensor] = None,
               impl="auto", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Rows ``ids`` (every row when None) of ``raw`` as [len(ids), K] float32 (the
    reference values bit for bit) or bfloat16 (those rounded to nearest even)."""
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"dequantize produces float32 or bfloat16, not {dtype}")
    lib = _lib()
    k = _check_raw(raw, ggml_type)
    impl = IMPLS[impl] if isinstance(impl, str) else int(impl)
    if ids is None:
        r, ids_ptr = raw.shape[0], None
    else:
        ids = ids.reshape(-1).to(torch.int64).contiguous()
        r, ids_ptr = ids.numel(), ids.data_ptr()
    out = torch.empty(r, k, dtype=dtype)
    if r and k:
        _check(lib.mq_dequantize(int(ggml_type), impl, raw.data_ptr(), raw.stride(0), raw.shape[0], k,
                                 ids_ptr, r, out.data_ptr(), int(dtype == torch.bfloat16)))
    return out


# ggml type id -> (elements, bytes) per block of the types mq_quantize writes.
QUANTIZE_BLOCKS = {10: (256, 84), 11: (256, 110), 12: (256, 144), 13: (256, 176), 14: (256, 210),
                   15: (256, 292), 2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24), 8: (32, 34),
                   9: (32, 36), 39: (32, 17)}
# Types whose quantizer takes an importance matrix (the others ignore one, as llama.cpp).
QUANTIZE_IMATRIX = {2, 3, 6, 7, 10, 11, 12, 13, 14}


def quantize(x: torch.Tensor, ggml_type: int, imatrix: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x [N, K] -> uint8 [N, bytes per row] as llama.cpp's quantizer writes it (with an
    ``imatrix`` of K importance weights for the types that use one), rows in parallel."""
    lib = _lib()
    if ggml_type not in QUANTIZE_BLOCKS:
        raise ValueError(f"mq_quantize does not write ggml type {ggml_type}")
    if ggml_type not in QUANTIZE_IMATRIX:
        imatrix = None
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D, got shape {tuple(x.shape)}")
    x = x.to(device="cpu", dtype=torch.float32).contiguous()
    n, k = x.shape
    elems, nbytes = QUANTIZE_BLOCKS[ggml_type]
    if k % elems:
        raise ValueError(f"row length {k} is not a multiple of the block size {elems}")
    qw = None
    if imatrix is not None:
        qw = imatrix.to(device="cpu", dtype=torch.float32).contiguous().reshape(-1)
        if qw.numel() != k:
            raise ValueError(f"imatrix has {qw.numel()} weights, the rows have {k} columns")
    out = torch.empty(n, k // elems * nbytes, dtype=torch.uint8)
    if n:
        _check(lib.mq_quantize(int(ggml_type), x.data_ptr(), None if qw is None else qw.data_ptr(), n, k,
                               out.data_ptr()))
    return out
