"""Decode steps served by a plugin's paged-attention kernel (the core's decode-attention seam).

On CUDA with triton installed (``pip install mistralrs-quant[cuda]``) every pure-decode step
of a model reads the paged KV cache with the quant plugin's Triton kernel by itself;
``MISTRALRS_DECODE_ATTENTION=torch`` keeps the torch path. Without CUDA this script names the
kernel (``MISTRALRS_DECODE_ATTENTION=triton``) so it runs on CPU in triton's interpreter
(slow: a tiny random model), and checks that the greedy text equals the torch path's.

    python examples/decode_attention.py
"""
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is first imported

from mistralrs import ChatCompletionRequest, ModelDType, Runner, Which  # noqa: E402
from mistralrs_core import plugins  # noqa: E402
from mistralrs_core.layers.decode_kernels import ENV  # noqa: E402
from mistralrs_core.testing.tiny import write_random_llama  # noqa: E402


def generate(model_dir: Path, mode: str) -> tuple[str, int]:
    """Greedy text for a prompt, and how many attention calls the Triton kernel served."""
    from mistralrs_quant.kernels.triton import paged_attention
    os.environ[ENV] = mode
    calls: list[int] = []
    real = paged_attention.paged_decode_attention

    def counted(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls.append(1)
        return real(*args, **kwargs)
    paged_attention.paged_decode_attention = counted
    runner = Runner(which=Which.Plain(model_id=str(model_dir), dtype=ModelDType.F32), seed=0)
    try:
        res = runner.send_chat_completion_request(ChatCompletionRequest(
            messages=[{"role": "user", "content": "hello there"}], max_tokens=6, temperature=0.0,
            ignore_eos=True))
        return res.choices[0].message.content, len(calls)
    finally:
        runner.shutdown()
        paged_attention.paged_decode_attention = real


def main() -> None:
    from mistralrs_quant.kernels.triton import dispatch
    kernels = {n: e.extra["device_types"] for n, e in plugins.get_registry().decode_attention.items()}
    print("registered decode-attention kernels:", kernels or "none")
    if "triton" not in kernels or not dispatch.triton_importable():
        print("the Triton kernel needs mistralrs-quant with triton: pip install mistralrs-quant[cuda]")
        return
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_random_llama(Path(tmp), hidden=32, layers=2, heads=4, kv_heads=2, intermediate=64)
        text_torch, _ = generate(model_dir, "torch")
        text_kernel, calls = generate(model_dir, "triton")
    print(f"torch path : {text_torch!r}")
    print(f"triton     : {text_kernel!r} ({calls} attention calls served by the kernel)")
    assert calls > 0 and text_kernel == text_torch


if __name__ == "__main__":
    main()
