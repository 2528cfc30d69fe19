"""One rank of a tensor-parallel test run (started by the tests, one process per rank).

    python tp_child.py '<json spec>'

spec: rank, world, port, timeout, mode ("logits" | "runner"), out (rank 0 writes its
results there), models (logits mode: [{"name", "dir" | "gguf" | "uqff" + "shard"}]), model (runner mode),
which + requests (chat mode: a Runner of any kind answering message lists, images included).
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

PROMPTS = [[5, 17, 33, 2, 90, 41, 7], [100, 3, 250, 12, 9, 64, 31, 8, 77, 19, 4, 200]]
DECODE_STEPS = 6


def load(entry: dict):
    from mistralrs_core.distributed import placement
    if "uqff" in entry:
        from pathlib import Path

        from mistralrs_core.api import Which
        from mistralrs_core.loading.options import LoadOptions
        from mistralrs_quant.isq.loader import load_uqff_model
        d = Path(entry["uqff"])
        which = Which.Plain(model_id=str(d), from_uqff=entry["shard"])
        model = load_uqff_model(d, which, LoadOptions(), torch.device("cpu"), torch.float32, torch.float32)[0]
    elif "gguf" in entry:
        from mistralrs_quant.gguf_loader import load_gguf_model
        model = load_gguf_model([entry["gguf"]], torch.float32, "cpu", quant_compute_dtype=torch.float32)[0]
    else:
        from mistralrs_core.testing.parity import load_for_test
        model = load_for_test(entry["dir"])
    placement.finish_model(model)
    return model


@torch.inference_mode()
def logits_run(model) -> tuple[dict[str, torch.Tensor], list[list[int]]]:
    """Two sequences batched: a prefill with every row's logits, then greedy decode steps."""
    from mistralrs_core.engine.model_runner import ModelRunner
    from mistralrs_core.engine.step import StepRecord
    runner = ModelRunner(model, num_blocks=32, block_size=4, device="cpu", cache_dtype=torch.float32)
    blocks = [list(range(0, 16)), list(range(16, 32))]
    seqs = [list(p) for p in PROMPTS]
    recs = [StepRecord(i, list(p), 0, blocks[i], num_logits=len(p)) for i, p in enumerate(PROMPTS)]
    out, tokens = {}, [[], []]
    for step in range(DECODE_STEPS + 1):
        logits = runner.run(recs)
        out[f"step{step}"] = logits.clone()
        rows = torch.tensor([sum(r.num_tokens for r in recs[:i + 1]) - 1 for i in range(2)])
        nxt = logits.index_select(0, rows).max(-1).indices.tolist()
        recs = []
        for i, t in enumerate(nxt):
            tokens[i].append(t)
            recs.append(StepRecord(i, [t], len(seqs[i]), blocks[i], num_logits=1))
            seqs[i].append(t)
    return out, tokens


def runner_mode(spec, tp) -> dict:
    from concurrent.futures import ThreadPoolExecutor

    from mistralrs_core.api import ChatCompletionRequest, Which
    from mistralrs_core.distributed import serve_workers, stop_workers
    from mistralrs_core.runner import Runner
    runner = Runner(which=Which.Plain(model_id=spec["model"]), max_seqs=8, pa_ctxt_len=1024)
    if tp is not None and not tp.is_driver:
        serve_workers()
        return {}
    questions = ["Tell me a story", "What is the capital of France?", "Numbers: 0 1 2", "def main():"]

    def ask(q):
        req = ChatCompletionRequest(messages=[{"role": "user", "content": q}], max_tokens=10, temperature=0.0)
        return runner.send_chat_completion_request(req).choices[0].message.content

    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(ask, questions))
    result = {"answers": answers}
    if spec.get("then_wait_for") and tp is not None:
        Path(spec["out"] + ".ready").write_text("1")
        flag = Path(spec["then_wait_for"])
        while not flag.exists():
            time.sleep(0.05)
        for attempt in ("after_death", "again"):
            t0 = time.perf_counter()
            try:
                ask("Once upon a time")
                result[attempt] = "answered"
            except Exception as exc:   # noqa: BLE001 - the test reads the type and message
                result[attempt] = f"{type(exc).__name__}: {exc}"
            result[attempt + "_s"] = time.perf_counter() - t0
    elif tp is not None:
        stop_workers()
    runner.shutdown()
    return result


def chat_answers(runner, requests: list[list[dict]]) -> list[dict]:
    """Greedy answers (text, token logprobs) to ``requests`` (message lists), sent at once."""
    from concurrent.futures import ThreadPoolExecutor

    from mistralrs_core.api import ChatCompletionRequest

    def ask(messages):
        req = ChatCompletionRequest(messages=messages, max_tokens=8, temperature=0.0, logprobs=True,
                                    ignore_eos=True)
        choice = runner.send_chat_completion_request(req).choices[0]
        return {"text": choice.message.content, "logprobs": [t.logprob for t in choice.logprobs.content]}
    with ThreadPoolExecutor(len(requests)) as pool:
        return list(pool.map(ask, requests))


def make_runner(which: dict):
    """A Runner for ``which``: {"kind": "VisionPlain" | "Plain", "model_id", "arch"?}."""
    from mistralrs_core.api import Which
    from mistralrs_core.runner import Runner
    kind = which.pop("kind", "Plain")
    return Runner(which=getattr(Which, kind)(**which), max_seqs=8, pa_ctxt_len=1024)


def chat_mode(spec, tp) -> dict:
    """Rank 0 answers ``spec["requests"]`` (image parts included) while the others serve."""
    from mistralrs_core.distributed import serve_workers, stop_workers
    runner = make_runner(dict(spec["which"]))
    if tp is not None and not tp.is_driver:
        serve_workers()
        return {}
    result = {"answers": chat_answers(runner, spec["requests"])}
    if tp is not None:
        stop_workers()
    runner.shutdown()
    return result


def main() -> None:
    spec = json.loads(sys.argv[1])
    tp = None
    if spec["world"] > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(spec["port"]))
        from mistralrs_core.distributed import init_tensor_parallel
        tp = init_tensor_parallel(spec["rank"], spec["world"], timeout_s=spec.get("timeout", 20))
    if spec["mode"] == "logits":
        from safetensors.torch import save_file
        tensors, tokens, summaries = {}, {}, {}
        for entry in spec["models"]:
            model = load(entry)
            logits, toks = logits_run(model)
            tensors.update({f"{entry['name']}.{k}": v for k, v in logits.items()})
            tokens[entry["name"]] = toks
            summaries[entry["name"]] = getattr(model, "tp_summary", None)
        if spec["rank"] == 0:
            save_file(tensors, spec["out"] + ".safetensors")
            Path(spec["out"] + ".json").write_text(json.dumps({"tokens": tokens, "summary": summaries}))
    else:
        result = chat_mode(spec, tp) if spec["mode"] == "chat" else runner_mode(spec, tp)
        if spec["rank"] == 0:
            Path(spec["out"] + ".json").write_text(json.dumps(result))
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter teardown: a process group whose peer is gone can block in its destructor.
    os._exit(0)


if __name__ == "__main__":
    main()
