"""One ``execute_python`` call: the code runs in a fresh per-call directory under the
launcher's sandbox (``launcher.py``), killed at the wall-clock timeout; its exit status,
stdout and stderr (truncated) and the files it wrote come back."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid

import attrs

from mistralrs_core.api.enums import NetworkMode
from mistralrs_core.tools import ToolOutput

from mistralrs_tools_mcp.code_exec import files as produced
from mistralrs_tools_mcp.code_exec.launcher import others_can_run

LAUNCHER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "launcher.py")
SETUP_FAILED = 97
NOBODY = 65534
OUTPUT_CHARS = 8000          # of stdout and of stderr, in the tool result
TOOL_NAME = "execute_python"


@attrs.define
class Limits:
    timeout_secs: float
    memory_mb: int
    cpu_secs: int
    procs: int
    open_fds: int
    file_mb: int
    network: str            # "none", "loopback" or "full"
    strict: bool = False
    extra_env: tuple = ()


def _tail_head(text: str, limit: int = OUTPUT_CHARS) -> str:
    if len(text) <= limit:
        return text
    half = limit // 2
    return f"{text[:half]}\n... [{len(text) - limit} characters cut] ...\n{text[-half:]}"


def _read(path: str, limit: int = 4 * OUTPUT_CHARS) -> str:
    with open(path, "rb") as fh:
        fh.seek(0, os.SEEK_END)
        size = fh.tell()
        fh.seek(0)
        if size <= limit:
            data = fh.read()
        else:   # the head and the tail: a flood of output is cut, not read whole
            head = fh.read(limit // 2)
            fh.seek(size - limit // 2)
            data = head + f"\n... [{size - limit} bytes cut] ...\n".encode() + fh.read()
    return data.decode("utf-8", errors="replace")


def _env(cwd: str, extra: tuple) -> dict:
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": cwd, "TMPDIR": cwd, "LANG": "C.UTF-8",
           "PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1", "MPLBACKEND": "Agg"}
    for item in extra:
        key, eq, value = item.partition("=")
        if eq:
            env[key] = value
        elif key in os.environ:
            env[key] = os.environ[key]
    return env


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _ns(pid) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:
        return None


def _count_in(ns: str) -> int:
    n = 0
    for entry in os.listdir("/proc"):
        if entry.isdigit() and _ns(entry) == ns:
            n += 1
    return n


def _supervise(proc: subprocess.Popen, limits: Limits) -> tuple[bool, bool]:
    """Wait for the launcher up to the timeout; meanwhile count the processes of the
    sandbox's PID namespace and kill it all past ``max_procs``. ``RLIMIT_NPROC`` is the
    first bound, but the kernel exempts root from it; this one holds for root too.
    Returns ``(timed_out, over_procs)``."""
    deadline = time.monotonic() + limits.timeout_secs
    own = _ns("self")
    ns = None
    while True:
        try:
            proc.wait(timeout=0.01)
            return False, False
        except subprocess.TimeoutExpired:
            pass
        if ns is None:
            try:
                link = os.readlink(f"/proc/{proc.pid}/ns/pid_for_children")
            except OSError:
                link = None
            ns = link if link is not None and link != own else None
        # The launcher's own namespace is the host's; its children's is the sandbox's.
        if ns is not None and _count_in(ns) > limits.procs:
            _kill(proc)
            return False, True
        if time.monotonic() >= deadline:
            _kill(proc)
            return True, False


def run(code: str, python: str, limits: Limits, workdir_root: str | None) -> ToolOutput:
    keep = workdir_root is not None
    root = workdir_root or tempfile.gettempdir()
    os.makedirs(root, exist_ok=True)
    cwd = os.path.join(root, f"call-{uuid.uuid4().hex[:12]}")
    os.mkdir(cwd)
    private = tempfile.mkdtemp(prefix="mistralrs-exec-")
    try:
        drop_to = NOBODY if os.geteuid() == 0 and others_can_run(python) else None
        if drop_to is not None:
            # The launcher drops root to uid NOBODY: the call's directory must be its own.
            os.chown(cwd, NOBODY, NOBODY)
        else:
            os.chmod(cwd, 0o700)
        os.chmod(private, 0o711)
        script = os.path.join(private, "main.py")
        with open(script, "w", encoding="utf-8") as fh:
            fh.write(code)
        os.chmod(script, 0o644)
        cfg = {"python": python, "script": script, "cwd": cwd, "network": limits.network, "drop_to": drop_to,
               "strict": limits.strict, "env": _env(cwd, limits.extra_env),
               "limits": {"as": limits.memory_mb << 20, "cpu": limits.cpu_secs, "fsize": limits.file_mb << 20,
                          "nproc": limits.procs, "nofile": limits.open_fds}}
        out_path, err_path = os.path.join(private, "stdout"), os.path.join(private, "stderr")
        started = time.monotonic()
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen([sys.executable, "-I", "-S", LAUNCHER, json.dumps(cfg)], stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=err, cwd=private, start_new_session=True, close_fds=True)
            timed_out, over_procs = _supervise(proc, limits)
            status = proc.wait()
            # Whatever the code left behind in the group goes too.
            _kill(proc)
        elapsed = time.monotonic() - started
        stdout, stderr = _read(out_path), _read(err_path)
        if status == SETUP_FAILED and "SANDBOX: " in stderr:
            reason = stderr.rsplit("SANDBOX: ", 1)[1].strip()
            return ToolOutput(f"Error: code execution refused: {reason}")
        files, notes = produced.collect(cwd, TOOL_NAME)
        lines = []
        if over_procs:
            lines.append(f"Error: the code started more than {limits.procs} processes and was killed.")
        elif timed_out:
            lines.append(f"Error: the code ran past the {limits.timeout_secs:g} s timeout and was killed.")
        elif status < 0 or status > 128:
            sig = -status if status < 0 else status - 128
            name = signal.Signals(sig).name if sig in signal.valid_signals() else str(sig)
            why = {"SIGXCPU": " (CPU time limit)", "SIGXFSZ": " (file size limit)",
                   "SIGKILL": " (killed)"}.get(name, "")
            lines.append(f"exit: killed by {name}{why}")
        else:
            lines.append(f"exit code: {status}")
        lines.append(f"elapsed: {elapsed:.2f} s")
        lines.append("stdout:\n" + (_tail_head(stdout) if stdout else "(empty)"))
        if stderr:
            lines.append("stderr:\n" + _tail_head(stderr))
        if files:
            lines.append("files written: " + ", ".join(f"{f.name} ({f.bytes} bytes, id {f.id})" for f in files))
        lines.extend(notes)
        return ToolOutput("\n".join(lines), files=files)
    finally:
        shutil.rmtree(private, ignore_errors=True)
        if not keep:
            shutil.rmtree(cwd, ignore_errors=True)


def limits_from(config) -> Limits:
    policy = config.sandbox_policy
    if policy is None:
        from mistralrs_core.api.tools import SandboxPolicy
        policy = SandboxPolicy()
    network = {NetworkMode.NoNetwork: "none", NetworkMode.Loopback: "loopback",
               NetworkMode.Full: "full"}[policy.network]
    return Limits(timeout_secs=config.timeout_secs, memory_mb=policy.max_memory_mb, cpu_secs=policy.max_cpu_secs,
                  procs=policy.max_procs, open_fds=policy.max_open_fds, file_mb=policy.max_file_sz_mb,
                  network=network, strict=policy.strict, extra_env=tuple(policy.extra_env))
