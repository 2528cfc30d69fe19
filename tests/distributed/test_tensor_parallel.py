"""Tensor parallelism with 2 ranks on gloo (processes started here) against 1 rank:
the same logits (float32, <= 1e-5 relative) and greedy tokens for a tiny Llama (KV heads
split, uneven vocabulary), Qwen3 (one KV head: replicated; tied embeddings), a
Mixtral-like MoE (expert parallel), a Q8_0 GGUF Llama and the Llama as a Q8_0 UQFF
(packed blocks sharded); then
the Runner on rank 0 with 4 concurrent requests, and a rank that dies."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tiny_models import write_llama, write_mixtral, write_q8_gguf, write_qwen3

HERE = Path(__file__).resolve().parent
TOL = 1e-5


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    base = tmp_path_factory.mktemp("tp_models")
    llama = write_llama(base / "llama")
    return [{"name": "llama", "dir": str(llama)},
            {"name": "qwen3", "dir": str(write_qwen3(base / "qwen3"))},
            {"name": "mixtral", "dir": str(write_mixtral(base / "mixtral"))},
            {"name": "q8", "gguf": str(write_q8_gguf(base / "llama_q8.gguf", llama))},
            *_uqff_entries(llama, base / "llama_uqff")]


def _uqff_entries(llama: Path, out: Path) -> list[dict]:
    """The llama ISQ'd to Q8_0 and written as UQFF (GGUF-family layers, sharded as GGUF
    blocks); nothing when the quant plugin is not installed."""
    try:
        import mistralrs_quant  # noqa: F401
    except ImportError:
        return []
    from mistralrs_core.api import Which
    from mistralrs_core.runner import Runner
    Runner(which=Which.Plain(model_id=str(llama), write_uqff=str(out)), in_situ_quant="Q8_0").shutdown()
    return [{"name": "uqff", "uqff": str(out), "shard": "q8_0-0.uqff"}]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(spec: dict, world: int = 2) -> list[subprocess.Popen]:
    port = _port()
    return [subprocess.Popen([sys.executable, str(HERE / "tp_child.py"),
                              json.dumps({**spec, "rank": r, "world": world, "port": port})])
            for r in range(world)]


def _wait(procs, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0] * len(procs)


def test_two_ranks_give_the_logits_and_tokens_of_one(models, tmp_path):
    import tp_child
    from mistralrs_core.testing.parity import max_rel_err
    out = str(tmp_path / "tp2")
    procs = _launch({"mode": "logits", "out": out, "models": models, "timeout": 30})
    # The single-process reference runs here meanwhile.
    ref = {m["name"]: tp_child.logits_run(tp_child.load(m)) for m in models}
    _wait(procs)
    from safetensors.torch import load_file
    got = load_file(out + ".safetensors")
    meta = json.loads(Path(out + ".json").read_text())
    for name, (logits, tokens) in ref.items():
        for step, want in logits.items():
            err = max_rel_err(got[f"{name}.{step}"], want)
            assert err <= TOL, f"{name} {step}: {err:.2e}"
        assert meta["tokens"][name] == tokens, name
    s = meta["summary"]
    assert s["llama"]["attention"] == 2 and s["llama"]["mlp"] == 2
    assert s["llama"]["vocab"] == ["model.embed_tokens", "lm_head"]
    assert s["qwen3"]["vocab"] == ["model.embed_tokens"]          # tied head: the embedding's gather
    assert s["mixtral"]["moe"] == 2 and s["mixtral"]["mlp"] == 0
    assert s["q8"]["attention"] == 2 and not s["q8"]["replicated"]
    if "uqff" in s:
        assert s["uqff"]["attention"] == 2 and s["uqff"]["mlp"] == 2 and not s["uqff"]["replicated"]
        assert s["uqff"]["vocab"] == ["model.embed_tokens", "lm_head"]


def test_runner_on_rank_zero_and_a_hung_rank(models, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from mistralrs_core.api import ChatCompletionRequest, Which
    from mistralrs_core.runner import Runner
    out, flag = str(tmp_path / "runner"), tmp_path / "go"
    procs = _launch({"mode": "runner", "out": out, "model": models[0]["dir"], "timeout": 8,
                     "then_wait_for": str(flag)})
    try:
        runner = Runner(which=Which.Plain(model_id=models[0]["dir"]), max_seqs=8, pa_ctxt_len=1024)
        questions = ["Tell me a story", "What is the capital of France?", "Numbers: 0 1 2", "def main():"]

        def ask(q):
            req = ChatCompletionRequest(messages=[{"role": "user", "content": q}], max_tokens=10, temperature=0.0)
            return runner.send_chat_completion_request(req).choices[0].message.content
        with ThreadPoolExecutor(4) as pool:
            want = list(pool.map(ask, questions))
        runner.shutdown()
        deadline = time.monotonic() + 120
        while not Path(out + ".ready").exists():
            assert time.monotonic() < deadline and procs[0].poll() is None, "rank 0 did not answer"
            time.sleep(0.1)
        # A rank that stops answering (hung: the harder case; a killed rank closes its
        # connections and is seen at once).
        os.kill(procs[1].pid, signal.SIGSTOP)
        flag.write_text("1")
        procs[0].wait(timeout=60)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()      # SIGKILL ends a stopped process too
    result = json.loads(Path(out + ".json").read_text())
    assert result["answers"] == want
    # The request after the hang fails with a clear error, within the collective timeout,
    # and later ones at once.
    assert "tensor parallel" in result["after_death"] and "stopped answering" in result["after_death"]
    assert 7 < result["after_death_s"] < 8 + 10
    assert result["again"] == result["after_death"] and result["again_s"] < 1


def test_serve_tp_starts_its_ranks(models, tmp_path):
    """``mistralrs serve --tp 2``: rank 0 starts rank 1 itself, serves HTTP, reports the
    layout in the model status, and stops its rank on SIGTERM."""
    from mistralrs_core.testing.server import Server
    srv = Server(["-m", models[0]["dir"], "--tp", "2", "--device", "cpu", "--pa-ctxt-len", "512"],
                 tmp_path / "serve.log")
    try:
        srv.wait(timeout=120)
        r = srv.client().chat.completions.create(model="default", max_tokens=6, temperature=0,
                                                 messages=[{"role": "user", "content": "Tell me a story"}])
        assert r.choices[0].finish_reason == "length"
        tp = srv.status()["placement"]["tensor_parallel"]
        assert tp["world"] == 2 and tp["attention"] == 2 and tp["mlp"] == 2
    finally:
        srv.stop()
    assert srv.proc.returncode == 0, srv.log.read_text(errors="replace")
    assert "Traceback" not in srv.log.read_text(errors="replace")
