"""Tensor parallelism and device mapping, offline on a tiny random Llama.

Two ranks on gloo (CPU): this script starts rank 1 itself (as ``mistralrs serve --tp 2``
does), both load their shard of the model (heads, MLP columns and vocabulary split), rank 0
runs the Runner and broadcasts each engine step, rank 1 serves those steps. The answers
equal a single-process run's. Then the same model with its layers mapped onto two (logical)
devices. On GPUs the same code runs on NCCL; across machines start it with torchrun
(docs/distributed.md).

    python examples/tensor_parallel.py
"""
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from mistralrs import ChatCompletionRequest, Runner, Which
from mistralrs_core import distributed
from mistralrs_core.distributed import launch
from mistralrs_core.testing.tiny import write_random_llama

QUESTIONS = ["Tell me a story", "What is the capital of France?"]


def answers(runner: Runner) -> list[str | None]:
    return [runner.send_chat_completion_request(ChatCompletionRequest(
        messages=[{"role": "user", "content": q}], max_tokens=12, temperature=0.0)).choices[0].message.content
        for q in QUESTIONS]


if os.environ.get("RANK") is None:
    model_dir = write_random_llama(Path(tempfile.mkdtemp()) / "llama", hidden=128, layers=4, heads=4,
                                   kv_heads=2, intermediate=256)
    alone = Runner(which=Which.Plain(model_id=str(model_dir)), device="cpu")
    expected = answers(alone)
    alone.shutdown()

    mapped = Runner(which=Which.Plain(model_id=str(model_dir)), device="cpu", num_device_layers=["0:2", "1:2"])
    placement = mapped.model_placement(mapped.list_models()[0])
    assert placement is not None
    print("device map:", placement["device_map"]["layers"])
    assert answers(mapped) == expected
    mapped.shutdown()

    # Become rank 0 of 2 and start rank 1 running this same script.
    port = str(launch.free_port())
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "WORLD_SIZE": "2"}
    worker = subprocess.Popen([sys.executable, __file__, str(model_dir)], env={**env, "RANK": "1"})
    os.environ.update(env, RANK="0")
else:
    model_dir = Path(sys.argv[1])

tp = distributed.init_tensor_parallel(int(os.environ["RANK"]), 2, device="cpu")
runner = Runner(which=Which.Plain(model_id=str(model_dir)), device="cpu")
assert tp is not None
if not tp.is_driver:
    distributed.serve_workers()          # until rank 0 stops it
    sys.exit(0)
got = answers(runner)
layout = runner.model_placement(runner.list_models()[0])
assert layout is not None
print("tensor parallel, 2 ranks:", layout["tensor_parallel"])
for q, a in zip(QUESTIONS, got):
    print(f"  {q!r} -> {a!r}")
assert got == expected, (got, expected)
print("same answers as one process")
distributed.stop_workers()
runner.shutdown()
worker.wait()
