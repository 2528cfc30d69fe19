"""The Triton kernels for quantized weights: a Q4_K linear layer served straight from its
ggml bytes, checked against dequantize-then-matmul.

On a CUDA machine with triton installed (``pip install mistralrs-quant[cuda]``) a weight
placed on the GPU uses the kernels by itself (``MISTRALRS_TRITON=0`` turns them off).
Without CUDA this script runs the same kernels in triton's CPU interpreter
(``TRITON_INTERPRET=1``, slow: tiny shapes only), which is how the tests check them.

    python examples/triton_kernels.py
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is first imported

from mistralrs_quant.formats import T, quantize  # noqa: E402
from mistralrs_quant.kernels.triton import dispatch  # noqa: E402
from mistralrs_quant.qlinear import GGMLQuantMethod  # noqa: E402


def main() -> None:
    if not dispatch.triton_importable():
        print("triton is not installed: pip install mistralrs-quant[cuda]")
        return
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        dispatch.DEVICE_TYPES.add("cpu")  # interpreted: let CPU tensors reach the kernels
    torch.manual_seed(0)
    weight = torch.randn(48, 512) * 0.02
    raw = quantize(weight, T.Q4_K).to(device)           # uint8 [48, 2 * 144]: two super-blocks a row
    layer = GGMLQuantMethod(raw, T.Q4_K, compute_dtype=torch.float32)
    print(layer)
    for m in (1, 24):                                    # decode (GEMV) and prefill (tiled GEMM)
        x = torch.randn(m, 512, device=device)
        y = layer.forward(x)
        ref = x @ layer.spec.dequantize(raw).T
        print(f"M={m:2d} path={layer.choose_path(m)} max |y - ref| = {float((y - ref).abs().max()):.2e}")


if __name__ == "__main__":
    main()
