"""Decode throughput through the Runner of a random Mixtral-style MoE model against a dense
Llama with the same *active* parameter count (the dense intermediate size is top_k times
the expert's), alone and with concurrent requests.

    .venv/bin/python bench/moe_vs_dense.py [--dtype F32|BF16] [--threads 2] [--experts 8 --top-k 2]

A ratio near 1 means routing and the per-expert dispatch cost little beyond the matmuls
both models share. The machine is shared and noisy: compare ratios from one run.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mistralrs import CompletionRequest, Runner, Which
from mistralrs_core.testing.tiny import write_random_llama


def write_random_mixtral(out: Path, *, experts: int, top_k: int, intermediate: int, **shape) -> Path:
    """A random Llama turned into Mixtral: each layer's MLP becomes ``experts`` random experts."""
    write_random_llama(out, intermediate=intermediate, **shape)
    w = load_file(str(out / "model.safetensors"))
    g = torch.Generator().manual_seed(1)
    hidden = shape["hidden"]
    for i in range(shape["layers"]):
        p = f"model.layers.{i}."
        for name in ("gate_proj", "up_proj", "down_proj"):
            del w[p + f"mlp.{name}.weight"]
        moe = p + "block_sparse_moe."
        w[moe + "gate.weight"] = torch.randn(experts, hidden, generator=g) * hidden ** -0.5
        for e in range(experts):
            for part, (o, n) in (("w1", (intermediate, hidden)), ("w3", (intermediate, hidden)),
                                 ("w2", (hidden, intermediate))):
                w[moe + f"experts.{e}.{part}.weight"] = torch.randn(o, n, generator=g) * n ** -0.5
    save_file(w, str(out / "model.safetensors"))
    cfg = json.loads((out / "config.json").read_text())
    cfg.update(architectures=["MixtralForCausalLM"], model_type="mixtral", num_local_experts=experts,
               num_experts_per_tok=top_k)
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    return out


def decode_rates(model_dir: Path, dtype: str, tokens: int, concurrency: int) -> tuple[float, float, int]:
    runner = Runner(which=Which.Plain(model_id=str(model_dir), dtype=dtype), seed=0, prefix_cache_n=0)
    try:
        model = runner._pipeline(None).model

        def req(i):
            return CompletionRequest(prompt=f"{i} the quick brown fox", model="default", max_tokens=tokens,
                                     temperature=0, ignore_eos=True)

        runner.send_completion_request(req(-1))      # warm up
        single = runner.send_completion_request(req(0)).usage.avg_compl_tok_per_sec
        done = []
        threads = [threading.Thread(target=lambda i=i: done.append(runner.send_completion_request(req(i))))
                   for i in range(concurrency)]
        t0 = time.perf_counter()
        [t.start() for t in threads]
        [t.join() for t in threads]
        batched = sum(r.usage.completion_tokens for r in done) / (time.perf_counter() - t0)
        return single, batched, sum(p.numel() for p in model.parameters())
    finally:
        runner.shutdown()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="F32")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=8)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    shape = dict(hidden=512, layers=8, heads=8, kv_heads=4, max_pos=4096, tie=True)
    expert_inter = 768
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        moe = write_random_mixtral(root / "moe", experts=args.experts, top_k=args.top_k,
                                   intermediate=expert_inter, **shape)
        dense = write_random_llama(root / "dense", intermediate=args.top_k * expert_inter, **shape)
        m1, mb, m_params = decode_rates(moe, args.dtype, args.tokens, args.concurrency)
        d1, db, d_params = decode_rates(dense, args.dtype, args.tokens, args.concurrency)
    print(f"MoE: {m_params / 1e6:.0f}M params ({args.experts} experts, top-{args.top_k}); dense: "
          f"{d_params / 1e6:.0f}M params = MoE active params; dtype {args.dtype}, {args.threads} threads")
    print("| decode tokens/s | MoE | dense | MoE / dense |\n|---|---|---|---|")
    print(f"| batch 1 | {m1:.1f} | {d1:.1f} | {m1 / d1:.2f} |")
    print(f"| {args.concurrency} concurrent | {mb:.1f} | {db:.1f} | {mb / db:.2f} |")


if __name__ == "__main__":
    main()
