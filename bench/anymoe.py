"""What AnyMoE routing costs at decode time: a random Llama (8 x 512, intermediate 1408)
alone, against the same model with every MLP turned into 3 experts (the base + 2 fine-tuned
copies), once with a gate that sends everything to one expert (the gate, the running sums
and the dispatch are the whole overhead) and once with 4 concurrent requests routed to
different experts (rows split per expert in each step).

    .venv/bin/python bench/anymoe.py [--tokens 64]
"""
import argparse
import concurrent.futures as cf
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mistralrs import AnyMoeConfig, AnyMoeExpertType, CompletionRequest, Runner, Which
from mistralrs_core.testing.tiny import write_random_llama

LAYERS, HIDDEN = 8, 512
PROMPTS = ["1 2 3 4", "the quick brown fox", "10 100 1000", "once upon a time"]


def fine_tuned(base: Path, out: Path, seed: int) -> Path:
    out.mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (out / f).write_bytes((base / f).read_bytes())
    g = torch.Generator().manual_seed(seed)
    save_file({k: v + 0.3 * v.std() * torch.randn(v.shape, generator=g) if ".mlp." in k else v
               for k, v in load_file(str(base / "model.safetensors")).items()}, str(out / "model.safetensors"))
    return out


def gate(path: Path, bias: list[float], weight_scale: float = 0.0) -> Path:
    g = torch.Generator().manual_seed(0)
    t = {}
    for n in range(LAYERS):
        t[f"moe_gate.{n}.weight"] = weight_scale * torch.randn(3, HIDDEN, generator=g)
        t[f"moe_gate.{n}.bias"] = torch.tensor(bias)
    path.mkdir()
    save_file(t, str(path / "gate.safetensors"))
    return path


def run(runner: Runner, prompts: list[str], tokens: int) -> tuple[float, float]:
    reqs = [CompletionRequest(prompt=p, model="default", max_tokens=tokens, temperature=0.0, ignore_eos=True)
            for p in prompts]
    runner.send_completion_request(reqs[0])            # warm-up
    wall, cpu = time.perf_counter(), time.process_time()
    with cf.ThreadPoolExecutor(len(reqs)) as ex:
        n = sum(r.usage.completion_tokens for r in ex.map(runner.send_completion_request, reqs))
    return n / (time.perf_counter() - wall), n / (time.process_time() - cpu)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=64)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp())
    base = write_random_llama(root / "base", hidden=HIDDEN, layers=LAYERS, heads=8, kv_heads=4, intermediate=1408)
    experts = [str(fine_tuned(base, root / f"e{i}", i)) for i in (1, 2)]
    which = Which.Plain(model_id=str(base), dtype="F32")

    def anymoe(g):
        return AnyMoeConfig(hidden_size=HIDDEN, dataset_json="", prefix="model.layers", mlp="mlp", model_ids=experts,
                            expert_type=AnyMoeExpertType.FineTuned(), training=False, gate_model_id=str(g))

    setups = [("dense", {}),
              ("anymoe, one expert", {"anymoe_config": anymoe(gate(root / "g1", [0.0, 50.0, 0.0]))}),
              ("anymoe, random gate", {"anymoe_config": anymoe(gate(root / "g2", [0.0, 0.0, 0.0], 1.0))})]
    for label, kw in setups:
        r = Runner(which=which, seed=0, **kw)
        if kw:
            print(f"  routes: {[r.anymoe_routes(p)[LAYERS - 1] for p in PROMPTS]} (last layer)")
        for prompts in (PROMPTS[:1], PROMPTS):
            wall, cpu = run(r, prompts, args.tokens)
            print(f"{label:24s} {len(prompts)} request(s): {wall:7.1f} tok/s wall, {cpu:7.1f} tok/CPU-s")
        r.shutdown()


if __name__ == "__main__":
    main()
