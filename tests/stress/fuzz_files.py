"""A header fuzzer for model files: mutants of GGUF and safetensors headers, each loaded
in a worker child process under RLIMIT_AS, classified by how the load ended.

The parent (``Fuzzer``) writes mutants and feeds their paths to a long-lived worker (``python
fuzz_files.py``), which prints ``BEGIN`` before each load and one JSON result after; a worker
that dies by a signal or stops answering is replaced and the mutant counted as a crash or a
hang. Outcomes: ``ok`` (loaded), ``clean`` (ValueError/OSError naming the file), and the
failures ``unnamed`` (no file name in the message), ``unclean`` (another exception type),
``memory`` (hit the address-space bound), ``crash`` (a signal), ``hang``.
"""
from __future__ import annotations

import json
import os
import random
import select
import signal
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

FAILURES = ("unnamed", "unclean", "memory", "crash", "hang")

# --- GGUF header walking -----------------------------------------------------------------

_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def gguf_fields(data: bytes) -> tuple[dict[str, list[tuple[int, int]]], int]:
    """Mutable header fields by category -> [(offset, size)], and the data section's start."""
    out: dict[str, list[tuple[int, int]]] = {}

    def add(cat, off, size):
        out.setdefault(cat, []).append((off, size))

    pos = 8
    n_tensors, n_kv = struct.unpack_from("<QQ", data, pos)
    add("count", 8, 8)
    add("count", 16, 8)
    pos = 24

    def string(cat_len, cat_str):
        nonlocal pos
        (n,) = struct.unpack_from("<Q", data, pos)
        add(cat_len, pos, 8)
        if n:
            add(cat_str, pos + 8, n)
        pos += 8 + n
        return data[pos - n:pos]

    def value(vtype, depth=0):
        nonlocal pos
        if vtype in _SCALAR_SIZES:
            add("scalar", pos, _SCALAR_SIZES[vtype])
            pos += _SCALAR_SIZES[vtype]
        elif vtype == 8:
            string("value_len", "value_bytes")
        elif vtype == 9:
            (itype,) = struct.unpack_from("<I", data, pos)
            add("array_type", pos, 4)
            (n,) = struct.unpack_from("<Q", data, pos + 4)
            add("array_count", pos + 4, 8)
            pos += 12
            if itype in _SCALAR_SIZES:
                size = _SCALAR_SIZES[itype]
                for k in range(min(n, 64)):
                    add("array_item", pos + k * size, size)
                pos += n * size
            else:
                for _ in range(n):
                    if itype == 8:
                        string("item_len", "item_bytes")
                    else:
                        value(itype, depth + 1)

    for _ in range(n_kv):
        string("key_len", "key_bytes")
        (vtype,) = struct.unpack_from("<I", data, pos)
        add("value_type", pos, 4)
        pos += 4
        value(vtype)
    for _ in range(n_tensors):
        string("name_len", "name_bytes")
        (nd,) = struct.unpack_from("<I", data, pos)
        add("n_dims", pos, 4)
        pos += 4
        for k in range(nd):
            add("dim", pos + 8 * k, 8)
        pos += 8 * nd
        add("tensor_type", pos, 4)
        add("tensor_offset", pos + 4, 8)
        pos += 12
    alignment = 32
    return out, -(-pos // alignment) * alignment


def _interesting(size: int, orig: int, file_size: int, rng: random.Random) -> int:
    top = (1 << (8 * size)) - 1
    picks = [0, 1, 2, 7, 8, 31, 32, 255, orig + 1, orig - 1, orig * 2, orig + 32, top, top >> 1,
             (top >> 1) + 1, file_size, file_size - 1, file_size + 1, rng.getrandbits(8 * size),
             rng.randrange(1 << 20)]
    if size >= 4:
        picks += [2 ** 31 - 1, 2 ** 31, 2 ** 32 - 1]
    if size == 8:
        picks += [2 ** 32, 2 ** 40, 2 ** 63 - 1, 2 ** 63]
    return rng.choice(picks) & top


def mutate_gguf(data: bytearray, fields: dict, header_end: int, rng: random.Random) -> list[str]:
    """Apply 1-3 mutations in place; returns what was done."""
    done = []
    for _ in range(rng.choice((1, 1, 2, 3))):
        cat = rng.choice(sorted(fields) + ["random_byte"])
        if cat == "random_byte":
            off = rng.randrange(8, header_end)
            data[off] = rng.randrange(256)
            done.append(f"byte@{off}")
            continue
        off, size = rng.choice(fields[cat])
        if cat.endswith("_bytes"):
            k = off + rng.randrange(size)
            data[k] = rng.choice((0, 0xFF, 0xC0, 0x80, ord("%"), rng.randrange(256)))
            done.append(f"{cat}@{k}")
            continue
        size = min(size, 8)
        orig = int.from_bytes(data[off:off + size], "little")
        new = _interesting(size, orig, len(data), rng)
        data[off:off + size] = new.to_bytes(size, "little")
        done.append(f"{cat}@{off}={new}")
    return done


# --- safetensors header ------------------------------------------------------------------

def mutate_safetensors(data: bytearray, rng: random.Random) -> tuple[bytearray, list[str]]:
    (n,) = struct.unpack_from("<Q", data, 0)
    header = json.loads(bytes(data[8:8 + n]))
    body = data[8 + n:]
    op = rng.choice(("len", "json_byte", "dtype", "shape", "offsets", "drop", "extra", "truncate"))
    names = [k for k in header if k != "__metadata__"]
    name = rng.choice(names)
    entry = header[name]
    raw_header = None
    if op == "len":
        new_len = _interesting(8, n, len(data), rng)
        return bytearray(struct.pack("<Q", new_len)) + data[8:], [f"len={new_len}"]
    if op == "json_byte":
        raw_header = bytearray(data[8:8 + n])
        k = rng.randrange(n)
        raw_header[k] = rng.choice((0, 0xFF, ord("{"), ord('"'), ord("9"), rng.randrange(256)))
        op = f"json_byte@{k}"
    elif op == "dtype":
        entry["dtype"] = rng.choice(("F64", "I8", "BOOL", "F8_E4M3", "X", "", 5, None))
    elif op == "shape":
        entry["shape"] = rng.choice(([], [0], [-1, 4], [2 ** 40, 2 ** 40], [1] * 40, "x", [1.5],
                                     [s * 2 for s in entry["shape"]], entry["shape"][::-1]))
    elif op == "offsets":
        a, b = entry["data_offsets"]
        entry["data_offsets"] = rng.choice(([b, a], [a, b + 4], [a, 2 ** 63], [-8, b], [a], "x",
                                            [a + 1, b + 1], [0, len(body) + 1]))
    elif op == "drop":
        del header[name]
    elif op == "extra":
        header["__metadata__"] = rng.choice(({"x": 1}, "x", {"format": "pt" * 10}))
    else:
        cut = rng.randrange(len(data))
        return data[:cut], [f"truncate@{cut}"]
    if raw_header is None:
        raw_header = bytearray(json.dumps(header).encode())
    return bytearray(struct.pack("<Q", len(raw_header))) + raw_header + body, [f"{op}:{name}"]


# --- the worker ------------------------------------------------------------------------------

def _classify(exc: BaseException, name: str) -> tuple[str, str]:
    msg = f"{type(exc).__name__}: {exc}"[:500]
    if isinstance(exc, MemoryError) or "can't allocate memory" in str(exc) or "DefaultCPUAllocator" in str(exc):
        return "memory", msg
    if isinstance(exc, (ValueError, OSError)):
        return ("clean" if name in str(exc) else "unnamed"), msg
    return "unclean", msg


def _load(kind: str, path: str, full: bool) -> None:
    if kind == "alloc":   # the control: an allocation past the bound must fail
        bytearray(int(Path(path).name))
        return
    from mistralrs import CompletionRequest, Which
    from mistralrs_core.loading.options import LoadOptions
    opts = LoadOptions(device="cpu", max_seqs=1, pa_ctxt_len=256)
    if kind == "gguf":
        from mistralrs_quant.gguf_loader import GGUFLoader, _family, load_tokenizer
        from mistralrs_quant.gguf_reader import open_gguf
        p = Path(path)
        which = Which.GGUF(quantized_model_id=str(p.parent), quantized_filename=p.name)
        if not full:
            gguf = open_gguf(p)
            _family(gguf.architecture, None, p)
            return
        pipe = GGUFLoader().load(which, opts, "fuzz")
    else:
        from mistralrs_core.loading.model_loader import SafetensorsLoader
        pipe = SafetensorsLoader().load(Which.Plain(model_id=str(Path(path).parent), dtype="F32"), opts, "fuzz")
    try:
        # A completion, not a chat: a file whose chat template was damaged still loads, and
        # the template's errors are the requests' (400s), not the load's.
        pipe.completion(CompletionRequest(model="fuzz", prompt="Hi", max_tokens=2, temperature=0))
    finally:
        pipe.shutdown()


def _vm_bytes() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    return 0


def worker_main() -> None:
    import gc
    import resource
    import traceback
    # Warm up the imports (and their address space) before any limit applies.
    import mistralrs  # noqa: F401
    import mistralrs_core.loading.model_loader  # noqa: F401
    import mistralrs_quant.gguf_loader  # noqa: F401
    print("READY", flush=True)
    for line in sys.stdin:
        job = json.loads(line)
        size = os.path.getsize(job["path"]) if job["kind"] != "alloc" else 0
        # The bound: what is mapped now, plus a few times the file, plus room for threads.
        bound = _vm_bytes() + job["mult"] * size + job["slack"]
        resource.setrlimit(resource.RLIMIT_AS, (bound, resource.RLIM_INFINITY))
        print(f"BEGIN {job['i']}", flush=True)
        try:
            _load(job["kind"], job["path"], job["full"])
            outcome, msg = "ok", ""
        except BaseException as exc:  # classified, never re-raised: the worker moves on
            outcome, msg = _classify(exc, job["name"])
            if outcome == "unclean":
                msg += " | " + " < ".join(f"{Path(f.filename).name}:{f.lineno}"
                                           for f in traceback.extract_tb(exc.__traceback__)[-4:])
        resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        gc.collect()
        print(json.dumps({"i": job["i"], "outcome": outcome, "msg": msg}), flush=True)


# --- the parent ------------------------------------------------------------------------------

@dataclass
class Fuzzer:
    workdir: Path
    timeout: float = 60.0
    mult: int = 8
    slack: int = 3 << 30
    results: list = field(default_factory=list)
    _proc: subprocess.Popen | None = None

    def _start(self) -> None:
        env = {**os.environ, "MALLOC_ARENA_MAX": "2", "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
        self._proc = subprocess.Popen([sys.executable, __file__], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=open(self.workdir / "worker.err", "ab"), env=env, text=True,
                                      bufsize=1)
        line = self._readline(120)
        if line != "READY":
            raise RuntimeError(f"fuzz worker did not start: {line!r}")

    def _readline(self, timeout: float) -> str | None:
        ready, _, _ = select.select([self._proc.stdout], [], [], timeout)
        if not ready:
            return None
        line = self._proc.stdout.readline()
        return line.strip() if line else ""

    def run(self, i: int, kind: str, path: Path, full: bool, what: list[str], name: str | None = None) -> dict:
        """Load ``path`` in the worker; a clean error must mention ``name`` (default: the
        file's name)."""
        if self._proc is None or self._proc.poll() is not None:
            self._start()
        job = {"i": i, "kind": kind, "path": str(path), "full": full, "mult": self.mult, "slack": self.slack,
               "name": name or path.name}
        self._proc.stdin.write(json.dumps(job) + "\n")
        self._proc.stdin.flush()
        result = None
        deadline = time.monotonic() + self.timeout
        while result is None:
            line = self._readline(max(0.0, deadline - time.monotonic()))
            if line is None:   # no answer in time
                self._proc.kill()
                self._proc.wait()
                self._proc = None
                result = {"i": i, "outcome": "hang", "msg": f"no answer in {self.timeout:g} s"}
            elif line == "":   # the worker died
                code = self._proc.wait()
                self._proc = None
                sig = -code if code < 0 else None
                result = {"i": i, "outcome": "crash",
                          "msg": f"signal {signal.Signals(sig).name}" if sig else f"exit {code}"}
            elif line.startswith("{"):
                result = json.loads(line)
        result.update(kind=kind, full=full, mutations=what, file=name or path.name)
        self.results.append(result)
        return result

    def close(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.stdin.close()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
        self._proc = None


def write_sparse_mutant(path: Path, header: bytes, size: int) -> None:
    """The mutated header and a hole for the tensor data (zeros, no disk, no copy)."""
    with open(path, "wb") as f:
        f.write(header)
        f.truncate(size)


if __name__ == "__main__":
    worker_main()
