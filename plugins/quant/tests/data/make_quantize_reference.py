"""Writes quantize_reference.npz: llama.cpp's quantizer output for fixed inputs.

Run once with llama.cpp's ggml library (e.g. the one llama-cpp-python ships):

    python make_quantize_reference.py /path/to/libggml-base.so

The tests compare ``mistralrs_quant``'s quantizers with these bytes. Inputs are generated
here from a fixed seed and stored too, so the test does not depend on numpy's generator.
"""
from __future__ import annotations

import ctypes
import sys
from pathlib import Path

import numpy as np

# ggml type ids: Q2_K .. Q6_K (with and without an imatrix); Q4_0, Q4_1, Q5_0, Q5_1 (with
# and without: without one, gguf-py's quantizer is also a reference); Q8_0 and MXFP4
# (llama.cpp ignores an imatrix for them).
K_TYPES = (10, 11, 12, 13, 14)
LEGACY_TYPES = (2, 3, 6, 7)
PLAIN_TYPES = (8, 39)
ROWS, COLS = 40, 512


def inputs() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1234)
    x = rng.standard_normal((ROWS, COLS)).astype(np.float32)
    x[1] *= 1e-3                                   # small magnitudes
    x[2, ::37] *= 40                               # outliers
    x[3, :256] = 0                                 # an all-zero super-block
    x[4] = np.abs(x[4])                            # all positive (min clamps to 0)
    x[5] = -np.abs(x[5]) - 0.5                     # all negative
    x[6] = np.round(x[6] * 4) / 4                  # exact grid values: ties in the searches
    x[7, :32] = 1.0                                # a constant sub-block
    x[8] = rng.standard_t(3, COLS).astype(np.float32) * 0.05
    x[9] = rng.uniform(-1, 1, COLS).astype(np.float32)
    x[10] = (rng.standard_normal(COLS) * 0.02).astype(np.float32)
    x[11, 100:400] = 0
    for r in range(12, ROWS):                      # plain random rows of varied scale and shape
        scale = 10.0 ** rng.uniform(-3, 1)
        x[r] = (rng.standard_t(2 + r % 5, COLS) if r % 2 else rng.standard_normal(COLS)) * scale
        if r % 3 == 0:
            x[r, rng.random(COLS) < 0.3] = 0       # sparse
    imatrix = (rng.gamma(0.5, 2.0, COLS) + 1e-4).astype(np.float32)
    return x, imatrix


def main(lib_path: str) -> None:
    lib = ctypes.CDLL(lib_path)
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.ggml_row_size.restype = ctypes.c_size_t
    lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    x, imatrix = inputs()
    out = {"x": x, "imatrix": imatrix}
    for t in K_TYPES + LEGACY_TYPES + PLAIN_TYPES:
        for use_im in ((False,) if t in PLAIN_TYPES else (False, True)):
            dst = np.zeros((ROWS, lib.ggml_row_size(t, COLS)), np.uint8)
            lib.ggml_quantize_chunk(t, x.ctypes.data, dst.ctypes.data, 0, ROWS, COLS,
                                    imatrix.ctypes.data if use_im else None)
            out[f"t{t}{'_im' if use_im else ''}"] = dst
    path = Path(__file__).with_name("quantize_reference.npz")
    np.savez_compressed(path, **out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "libggml-base.so")
