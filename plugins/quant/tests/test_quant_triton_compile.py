"""The Triton kernels compile for a real GPU (sm_90) on this GPU-less machine: triton's own
LLVM and ptxas lower them to a cubin, which the CPU interpreter of test_quant_triton.py
never does. A subset (Q4_K GEMV and GEMM, paged attention); ``triton_compile.py`` without
arguments compiles every kernel and format."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")


def test_kernels_compile_for_sm90():
    if not (Path(triton.__file__).parent / "backends" / "nvidia").is_dir():
        pytest.skip("triton has no NVIDIA backend here")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, str(Path(__file__).with_name("triton_compile.py")), "--quick"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.count("ok ") == 3, r.stdout
