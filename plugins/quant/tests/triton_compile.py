"""Compile the Triton kernels for a CUDA GPU on a machine without one.

triton ships its own LLVM and ptxas, so ``triton.compile`` can lower a kernel all the way to
a cubin for sm_90 here; only running it needs the device. This catches what the CPU
interpreter cannot: constructs the GPU backend rejects, and register pressure (ptxas'
register and spill counts are printed).

    python plugins/quant/tests/triton_compile.py            # every kernel and format (minutes)
    python plugins/quant/tests/triton_compile.py Q4_K AFQ   # a subset (AFQ: every width)
    python plugins/quant/tests/triton_compile.py --quick    # Q4_K GEMV and GEMM, attention (the test)

Must run without ``TRITON_INTERPRET`` (interpreted kernels cannot be compiled).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from mistralrs_quant.formats import GGML_TYPES
from mistralrs_quant.kernels.triton import paged_attention as pa
from mistralrs_quant.kernels.triton import quant_matmul as qm
from mistralrs_quant.kernels.triton.block_decode import AFQ, HQQ

TARGET = GPUTarget("cuda", 90, 32)
_PTXAS = [os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
          for name in ("ptxas-blackwell", "ptxas")]


def _compile(fn, types: dict, consts: dict, fusion: bool):
    sig = {name: "constexpr" if name in consts else types[name] for name in fn.arg_names}
    return triton.compile(ASTSource(fn, sig, consts), target=TARGET, options={"enable_fp_fusion": fusion})


def _usage(kernel) -> str:
    """ptxas' register/spill line for the kernel's PTX (the compile itself already passed)."""
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(kernel.asm["ptx"])
    try:
        for ptxas in _PTXAS:
            r = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", f.name, "-o", os.devnull],
                               capture_output=True, text=True)
            if r.returncode == 0:
                regs = re.findall(r"Used (\d+) registers", r.stderr)
                spills = re.findall(r"(\d+) bytes spill stores", r.stderr)
                return f"registers {regs[0] if regs else '?'}, spill stores {spills[0] if spills else '?'} B"
        return "ptxas -v unavailable"
    finally:
        os.unlink(f.name)


def _mm_types(act: str, weight: str) -> dict:
    return dict(x_ptr=act, w_ptr=weight, a_ptr="*fp32", b_ptr="*fp32", y_ptr=act, out_ptr="*fp32", M="i32",
                N="i32", K="i32", stride_xm="i32", stride_ym="i32", ROW="i32", AUX="i32")


def matmul_jobs(only: list[str] | None = None):
    formats = [(s.name, s.ggml_type, "*u8", 0, 1, s.block_size, s.type_size)
               for s in GGML_TYPES.values() if s.block_size in (32, 256)]
    formats += [(f"AFQ{b}", AFQ, "*i32", b, 64, 1, 1) for b in (2, 3, 4, 6, 8)]
    formats += [(f"HQQ{b}", HQQ, "*u8", b, 64, 1, 1) for b in (4, 8)]
    for name, fmt, wdt, bits, group, qk, ts in formats:
        if only and not any(name.startswith(o) for o in only):
            continue
        meta = dict(FMT=fmt, BITS=bits, GROUP=group, QK=qk, TS=ts)
        yield name, "dequantize", qm._dequant_kernel, _mm_types("*fp32", wdt), dict(meta, BLOCK_N=16, BLOCK_K=64)
        yield name, "gemv M=1", qm._gemv_kernel, _mm_types("*bf16", wdt), dict(meta, BLOCK_M=1, BLOCK_N=16,
                                                                               BLOCK_K=128)
        yield name, "gemv M=8", qm._gemv_kernel, _mm_types("*bf16", wdt), dict(meta, BLOCK_M=8, BLOCK_N=16,
                                                                               BLOCK_K=16)
        yield name, "gemm bf16", qm._gemm_kernel, _mm_types("*bf16", wdt), dict(
            meta, BLOCK_M=32, BLOCK_N=64, BLOCK_K=32, PRECISION=None, UPCAST=False)
        yield name, "gemm f32", qm._gemm_kernel, _mm_types("*fp32", wdt), dict(
            meta, BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, PRECISION="ieee", UPCAST=False)


def attention_jobs():
    types = dict(q_ptr="*bf16", k_ptr="*bf16", v_ptr="*bf16", bt_ptr="*i64", ctx_ptr="*i32", sinks_ptr="*fp32",
                 out_ptr="*bf16", scale="fp32", softcap="fp32", window="i32", chunk="i32")
    types.update({n: "i32" for n in pa._paged_decode_kernel.arg_names if n.startswith("s_")})
    for fp8 in (False, True):
        consts = dict(GROUPS=4, G_PAD=4, D=128, D_PAD=128, DV=128, DV_PAD=128, PAGE=32, TILE=16, HAS_SOFTCAP=True,
                      HAS_WINDOW=True, HAS_CHUNK=True, HAS_SINKS=True, FP8=fp8)
        t = dict(types, k_ptr="*u8", v_ptr="*u8") if fp8 else types
        yield "paged attention", "fp8 cache" if fp8 else "bf16 cache", pa._paged_decode_kernel, t, consts


def main(argv: list[str]) -> int:
    if type(qm._gemm_kernel).__name__ == "InterpretedFunction":
        print("unset TRITON_INTERPRET: interpreted kernels cannot be compiled")
        return 2
    failures = 0
    if argv == ["--quick"]:
        jobs = [j for j in matmul_jobs(["Q4_K"]) if j[1] in ("gemv M=1", "gemm bf16")] + list(attention_jobs())[:1]
    else:
        jobs = list(matmul_jobs(argv or None)) + list(attention_jobs())
    for fmt, what, fn, types, consts in jobs:
        try:
            kernel = _compile(fn, types, consts, fusion=fn is pa._paged_decode_kernel)
            print(f"ok    {fmt:16s} {what:11s} {_usage(kernel)}", flush=True)
        except Exception as e:  # report every kernel, then fail
            failures += 1
            print(f"FAIL  {fmt:16s} {what:11s} {type(e).__name__}: {str(e)[:2000]}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
