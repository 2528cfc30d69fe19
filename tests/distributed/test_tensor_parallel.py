"""Tensor parallelism with 2 ranks on gloo (processes started here) against 1 rank:
the same logits (float32, <= 1e-5 relative) and greedy tokens for a tiny Llama (KV heads
split, uneven vocabulary), Qwen3 (one KV head: replicated; tied embeddings), a
Mixtral-like MoE (expert parallel), a Q8_0 GGUF Llama, the Llama as a Q8_0 UQFF (packed
blocks sharded) and as a UQFF of the AFQ / F8Q8 / FP8 / HQQ families; then
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
    # Every other UQFF family in one model: AFQ (groups of 64), F8Q8 (blocks of 32), FP8
    # (per-tensor scale) sharded by their own rows / columns, HQQ kept whole per rank.
    topology = out.parent / "families.yml"
    topology.write_text("'/self_attn\\.[qkv]_proj\\.weight$/': {isq: AFQ4}\n"
                        "'/self_attn\\.o_proj\\.weight$/': {isq: F8Q8}\n"
                        "'/mlp\\.(gate|up)_proj\\.weight$/': {isq: HQQ4}\n"
                        "'/layers\\.0\\.mlp\\.down_proj\\.weight$/': {isq: AFQ4}\n"
                        "'/layers\\.1\\.mlp\\.down_proj\\.weight$/': {isq: FP8}\n")
    families = out.parent / "llama_uqff_families"
    Runner(which=Which.Plain(model_id=str(llama), topology=str(topology), write_uqff=str(families))).shutdown()
    shard = next(p.name for p in families.iterdir() if p.suffix == ".uqff")
    return [{"name": "uqff", "uqff": str(out), "shard": "q8_0-0.uqff"},
            {"name": "uqff_families", "uqff": str(families), "shard": shard}]


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
    for name in ("uqff", "uqff_families"):
        if name in s:
            assert s[name]["attention"] == 2 and s[name]["mlp"] == 2 and not s[name]["replicated"]
            assert s[name]["vocab"] == ["model.embed_tokens", "lm_head"]


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


def test_torchrun_two_nodes_serve(models, tmp_path):
    """Two torchrun agents, each a "node" of one process, meeting through torchrun's c10d
    rendezvous (as on two machines; here both on 127.0.0.1): the rank that becomes 0 serves
    HTTP and answers as one process does; SIGTERM to the agents stops both."""
    import httpx

    from mistralrs_core.api import ChatCompletionRequest, Which
    from mistralrs_core.runner import Runner
    model = models[0]["dir"]
    question = [{"role": "user", "content": "What is the capital of France?"}]
    runner = Runner(which=Which.Plain(model_id=model), pa_ctxt_len=512)
    want = runner.send_chat_completion_request(ChatCompletionRequest(
        messages=question, max_tokens=8, temperature=0.0)).choices[0].message.content
    runner.shutdown()

    rdzv, http = _port(), _port()
    env = {**os.environ, "PYTHONIOENCODING": "utf-8", "MISTRALRS_API_KEY": "", "OMP_NUM_THREADS": "1"}
    logs = [open(tmp_path / f"node{n}.log", "wb") for n in range(2)]
    agents = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
         "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{rdzv}", "--rdzv-id", "mistralrs-test",
         "--max-restarts", "0", "-m", "mistralrs_core.cli", "serve", "-m", model, "--device", "cpu",
         "--pa-ctxt-len", "512", "-p", str(http), "--log-level", "warning"],
        stdout=logs[n], stderr=subprocess.STDOUT, env=env, start_new_session=True) for n in range(2)]

    def log_text() -> str:
        return "\n".join((tmp_path / f"node{n}.log").read_text(errors="replace") for n in range(2))
    try:
        url = f"http://127.0.0.1:{http}"
        deadline = time.monotonic() + 180
        while True:
            assert all(a.poll() is None for a in agents), log_text()
            assert time.monotonic() < deadline, log_text()
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        r = httpx.post(url + "/v1/chat/completions", timeout=120, json={
            "model": "default", "messages": question, "max_tokens": 8, "temperature": 0.0})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == want
        status = httpx.post(url + "/v1/models/status", json={"model_id": "default"}).json()
        assert status["placement"]["tensor_parallel"]["world"] == 2
        # Stop it as an operator would: SIGTERM to the serving rank, which drains, stops
        # the other rank, and exits; both agents then end with success.
        server = _listening_child(agents, http)
        os.kill(server, signal.SIGTERM)
        for a in agents:
            a.wait(timeout=60)
        assert [a.returncode for a in agents] == [0, 0], log_text()
    finally:
        for a in agents:
            if a.poll() is None:
                os.killpg(a.pid, signal.SIGTERM)
        for a in agents:
            try:
                a.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(a.pid, signal.SIGKILL)
        for f in logs:
            f.close()
    assert "Traceback" not in log_text(), log_text()


def _listening_child(agents, port: int) -> int:
    """The pid of the agents' worker that listens on ``port`` (rank 0, the server)."""
    import psutil
    for a in agents:
        for child in psutil.Process(a.pid).children(recursive=True):
            try:
                if any(c.laddr and c.laddr.port == port and c.status == psutil.CONN_LISTEN
                       for c in child.net_connections("tcp")):
                    return child.pid
            except psutil.Error:
                continue
    raise AssertionError(f"no worker listens on port {port}")
