"""Faults: a forward that raises mid-batch, an unload under load, SIGTERM with requests
in flight."""
from __future__ import annotations

import signal
import threading
import time

import httpx
import pytest

from mistralrs import ChatCompletionRequest, Runner, Which
from mistralrs_core.errors import EngineStopped, ModelError
from mistralrs_core.testing.server import Server

PROMPT = [{"role": "user", "content": "Tell me a story."}]


def _req(max_tokens: int, stream: bool = False) -> ChatCompletionRequest:
    return ChatCompletionRequest(model="default", messages=PROMPT, max_tokens=max_tokens, temperature=0,
                                 ignore_eos=True, stream=stream)


def _in_threads(fn, n: int) -> tuple[list[threading.Thread], list]:
    out: list = []

    def run():
        try:
            out.append(fn())
        except Exception as exc:  # collected and asserted on by the test
            out.append(exc)
    threads = [threading.Thread(target=run) for _ in range(n)]
    for t in threads:
        t.start()
    return threads, out


def _wait_running(engine, n: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while engine.num_running < n and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.num_running >= n


@pytest.fixture()
def runner(tiny_dir):
    r = Runner(which=Which.Plain(model_id=str(tiny_dir), dtype="F32"), seed=0, max_seqs=2)
    yield r
    r.shutdown()


def test_a_forward_that_raises_fails_only_its_batch(runner):
    pipe = runner._pipeline(None)
    engine, model = pipe.engine, pipe.model
    baseline = runner.send_chat_completion_request(_req(8)).choices[0].message.content
    real = model.forward_embeds
    armed = threading.Event()

    def faulty(*args, **kwargs):
        if armed.is_set():
            armed.clear()
            raise RuntimeError("injected fault")
        return real(*args, **kwargs)

    model.forward_embeds = faulty
    try:
        # Two in the batch (max_seqs=2), a third waiting for a slot.
        threads, results = _in_threads(lambda: runner.send_chat_completion_request(_req(1500)), 2)
        _wait_running(engine, 2)
        waiting_threads, waiting = _in_threads(lambda: runner.send_chat_completion_request(_req(6)), 1)
        deadline = time.monotonic() + 5
        while engine.num_waiting < 1 and time.monotonic() < deadline:
            time.sleep(0.005)
        armed.set()
        for t in threads + waiting_threads:
            t.join(60)
    finally:
        model.forward_embeds = real
    assert len(results) == 2 and all(isinstance(r, ModelError) for r in results), results
    assert all("injected fault" in str(r) for r in results)
    assert len(waiting) == 1 and not isinstance(waiting[0], Exception), waiting
    # The engine keeps serving, with the same answers as before the fault.
    assert runner.send_chat_completion_request(_req(8)).choices[0].message.content == baseline
    assert engine.blocks.num_used == 0 and engine._thread.is_alive()


def test_unload_with_requests_in_flight_ends_them_cleanly(tiny_dir):
    runner = Runner(which=Which.Plain(model_id=str(tiny_dir), dtype="F32"), seed=0, max_seqs=4)
    engine = runner._pipeline(None).engine
    threads, results = _in_threads(lambda: runner.send_chat_completion_request(_req(1500)), 3)
    stream = runner.send_chat_completion_request(_req(1500, stream=True))
    first = next(stream)
    _wait_running(engine, 4)
    mid = runner.get_default_model_id()
    runner.unload_model(mid)
    for t in threads:
        t.join(30)
    with pytest.raises(EngineStopped, match="unloaded"):
        for _ in stream:
            pass
    assert first.choices and len(results) == 3
    for r in results:   # finished before the unload, or failed with a clear error
        assert isinstance(r, EngineStopped) or r.choices[0].finish_reason == "length", r
    assert not engine._thread.is_alive()
    with pytest.raises(EngineStopped):
        engine.submit(_group())
    # A request after the unload reloads the model.
    assert runner.send_chat_completion_request(_req(4)).choices[0].finish_reason == "length"
    runner.shutdown()


def _group():
    from mistralrs_core.engine.engine import RequestGroup
    from mistralrs_core.sampling.params import SamplingParams
    return RequestGroup([1, 2, 3], SamplingParams(max_tokens=2), 1, False, 2)


def test_sigterm_drains_in_flight_requests_and_exits_0(tiny_dir, tmp_path):
    srv = Server(["-m", str(tiny_dir), "--seed", "0", "--dtype", "f32", "--drain-timeout", "30"],
                 tmp_path / "log.txt").wait()
    try:
        body = {"messages": PROMPT, "max_tokens": 64, "ignore_eos": True, "temperature": 0}
        got: dict = {}

        def streamed():
            with httpx.stream("POST", srv.url + "/v1/chat/completions", json={**body, "stream": True},
                              timeout=60) as r:
                got["stream"] = []
                try:
                    for line in r.iter_lines():
                        if line.startswith("data: "):
                            got["stream"].append(line)
                except httpx.HTTPError as exc:
                    got["stream"].append(repr(exc))

        def plain():
            got["plain"] = httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=60)

        threads = [threading.Thread(target=streamed), threading.Thread(target=plain)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 10
        while srv.status()["engine"]["running"] < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        srv.proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        code = srv.proc.wait(60)
        drained = time.monotonic() - t0
        for t in threads:
            t.join(10)
    finally:
        if srv.proc.poll() is None:
            srv.proc.kill()
    log = srv.log.read_text()
    assert code == 0, log
    assert got["plain"].status_code == 200
    assert got["plain"].json()["usage"]["completion_tokens"] == 64
    assert got["stream"][-1] == "data: [DONE]", (got["stream"][-3:], log)
    assert not any('"error"' in e for e in got["stream"])
    assert drained < 30
    with pytest.raises(httpx.ConnectError):
        httpx.get(srv.url + "/health", timeout=2)
