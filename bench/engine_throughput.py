"""Prefill and decode throughput through the Runner on a random ~100M-parameter Llama,
and aggregate decode throughput with 1, 4 and 16 concurrent requests.

    .venv/bin/python bench/engine_throughput.py [--dtype BF16|F32] [--threads 2]

Prints a markdown table. The machine is shared and noisy: compare ratios from one run.
"""
from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

import torch

from mistralrs import CompletionRequest, Runner, Which
from mistralrs_core.testing.tiny import write_random_llama


def make_model(dirpath: Path) -> Path:
    # ~100M parameters: SmolLM2-135M-like shape with a small vocabulary (the tiny tokenizer's).
    return write_random_llama(dirpath, hidden=576, layers=24, heads=9, kv_heads=3, intermediate=1536,
                              vocab=None, max_pos=4096, tie=True, dtype="float32")


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="Auto")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--decode-tokens", type=int, default=128)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    d = make_model(Path(tempfile.mkdtemp()))
    runner, load_s = timed(lambda: Runner(which=Which.Plain(model_id=str(d), dtype=args.dtype), seed=0))
    pipe = runner._pipeline(None)
    n_params = sum(p.numel() for p in pipe.model.parameters())
    words = "the quick brown fox jumps over the lazy dog ".split()
    prompt = " ".join(words[i % len(words)] for i in range(args.prompt_tokens))
    ids = pipe.tokenizer.encode(prompt)[: args.prompt_tokens]
    prompt = pipe.tokenizer.decode(ids)

    def req(p, n):
        return CompletionRequest(prompt=p, model="default", max_tokens=n, temperature=0, ignore_eos=True)

    runner.send_completion_request(req("warm up", 4))
    # prefill: a single-token completion of a fresh prompt (prefix cache defeated by a salt)
    res, _ = timed(lambda: runner.send_completion_request(req("1 " + prompt, 1)))
    prefill_tps = res.usage.prompt_tokens / res.usage.total_prompt_time_sec
    res, _ = timed(lambda: runner.send_completion_request(req("2 hello", args.decode_tokens)))
    decode_tps = res.usage.avg_compl_tok_per_sec

    rows = []
    for conc in (1, 4, 16):
        results = []

        def work(i):
            results.append(runner.send_completion_request(req(f"{i} hello there", args.decode_tokens)))
        threads = [threading.Thread(target=work, args=(i,)) for i in range(conc)]
        t0 = time.perf_counter()
        [t.start() for t in threads]
        [t.join() for t in threads]
        wall = time.perf_counter() - t0
        toks = sum(r.usage.completion_tokens for r in results)
        rows.append((conc, toks / wall))
    runner.shutdown()
    print(f"model: random Llama, {n_params / 1e6:.0f}M params, dtype {pipe.model.dtype}, "
          f"{args.threads} threads, load {load_s:.2f}s")
    print("| measure | tokens/s |\n|---|---|")
    print(f"| prefill ({len(ids)}-token prompt) | {prefill_tps:.0f} |")
    print(f"| decode, batch 1 ({args.decode_tokens} tokens) | {decode_tps:.1f} |")
    for conc, tps in rows:
        print(f"| aggregate decode, {conc} concurrent | {tps:.1f} |")


if __name__ == "__main__":
    main()
