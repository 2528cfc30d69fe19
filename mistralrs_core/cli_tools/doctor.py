"""``mistralrs doctor``: check this machine's setup, one line and one verdict per item.

Verdicts: ``ok``; ``warn`` (works, but slower or with less than it could); ``fail`` (a
model cannot load or run). The exit status is 1 when any check fails. Nothing is built
or downloaded: the checks only look.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
from typing import Callable, NamedTuple

NAME = "doctor"


class Check(NamedTuple):
    name: str
    verdict: str      # ok | warn | fail
    detail: str


def add_parser(sub) -> None:
    p = sub.add_parser(NAME, help="check Python, torch, CPU, compiler, kernel cache, GPU and plugins",
                       description="Check this machine's setup for mistralrs, one verdict per item "
                                   "(ok / warn / fail); exit status 1 when any check fails.")
    p.add_argument("--json", action="store_true", help="print the checks as JSON")
    p.set_defaults(tool=sys.modules[__name__])


def check_python() -> Check:
    v = sys.version_info
    text = f"{platform.python_implementation()} {v.major}.{v.minor}.{v.micro}"
    return Check("python", "ok" if v >= (3, 10) else "fail", text + ("" if v >= (3, 10) else " (needs 3.10+)"))


def check_torch() -> Check:
    try:
        import torch
    except ImportError as exc:
        return Check("torch", "fail", f"cannot import torch: {exc}")
    return Check("torch", "ok", f"{torch.__version__}, {torch.get_num_threads()} threads")


def cpu_flags() -> set[str]:
    """The CPU's feature flags as the kernel reports them (Linux), else empty."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def check_cpu() -> Check:
    try:
        import torch
        isa = torch.backends.cpu.get_cpu_capability()   # what torch's kernels dispatch to, detected at run time
    except (ImportError, AttributeError):
        isa = "unknown"
    flags = cpu_flags()
    extras = [name for flag, name in (("avx512_vnni", "VNNI"), ("avx512_bf16", "AVX512-BF16"),
                                      ("amx_bf16", "AMX-BF16"), ("amx_int8", "AMX-INT8")) if flag in flags]
    detail = f"{platform.machine()}, {os.cpu_count()} cores, torch kernels: {isa}"
    if extras:
        detail += ", " + " ".join(extras)
    slow = isa in ("DEFAULT", "NO AVX", "unknown") and platform.machine() in ("x86_64", "AMD64")
    return Check("cpu", "warn" if slow else "ok", detail + (" (no AVX2: slow matmuls)" if slow else ""))


def check_compiler() -> Check:
    cxx = os.environ.get("CXX") or next((c for c in ("c++", "g++", "clang++") if shutil.which(c)), None)
    path = shutil.which(cxx) if cxx else None
    if path is None:
        return Check("compiler", "warn", "no C++ compiler: quantized (GGUF) matmuls and vision-tower compiles "
                                         "fall back to slower paths; install g++ or set CXX")
    return Check("compiler", "ok", path)


def check_kernel_cache() -> Check:
    try:
        from mistralrs_quant.kernels import cpp
    except ImportError:
        return Check("kernel cache", "warn", "mistralrs-quant not installed: no C++ kernels to cache")
    if cpp._disabled_by_env():
        return Check("kernel cache", "warn", f"C++ kernels switched off by {cpp.ENV_DISABLE}")
    where = cpp.cache_dir()
    if (where / f"{cpp._LIB_NAME}.so").exists():
        return Check("kernel cache", "ok", f"built: {where}")
    return Check("kernel cache", "ok", f"not built yet; the first GGUF load compiles it into {where}")


def check_gpu() -> Check:
    try:
        import torch
    except ImportError:
        return Check("gpu", "warn", "torch missing")
    if not torch.cuda.is_available():
        return Check("gpu", "ok", "none (CPU only)")
    names = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        names.append(f"cuda:{i} {props.name} {props.total_memory / 2**30:.0f} GiB "
                     f"(sm {props.major}{props.minor})")
    return Check("gpu", "ok", "; ".join(names))


def check_plugins() -> Check:
    from mistralrs_core.plugins import failed_plugins, installed_plugins
    loaded, failed = installed_plugins(), failed_plugins()
    if failed:
        return Check("plugins", "fail", "failed to load: " + "; ".join(f"{k} ({v})" for k, v in failed.items()))
    names = sorted(loaded)
    if "arch_text" not in loaded:
        return Check("plugins", "fail", f"mistralrs-arch-text is missing: no text model can load "
                                        f"(installed: {', '.join(names) or 'none'})")
    return Check("plugins", "ok", ", ".join(names))


def check_capabilities() -> Check:
    from mistralrs_core import capabilities
    missing: dict[str, list[str]] = {}
    for cap in capabilities.KNOWN.values():
        if not capabilities.available(cap.name) and cap.distribution.startswith("mistralrs-") \
                and cap.distribution != "mistralrs-core":
            missing.setdefault(cap.distribution, []).append(cap.what)
    if not missing:
        return Check("capabilities", "ok", "every optional capability is installed")
    return Check("capabilities", "warn", "not installed: " + "; ".join(
        f"{dist} ({', '.join(whats)})" for dist, whats in sorted(missing.items())))


CHECKS: tuple[Callable[[], Check], ...] = (check_python, check_torch, check_cpu, check_compiler,
                                           check_kernel_cache, check_gpu, check_plugins, check_capabilities)


def run_checks() -> list[Check]:
    out = []
    for check in CHECKS:
        try:
            out.append(check())
        except Exception as exc:  # noqa: BLE001 - a broken check is itself a finding
            out.append(Check(check.__name__.removeprefix("check_"), "fail", f"{type(exc).__name__}: {exc}"))
    return out


def main(args: argparse.Namespace) -> int:
    checks = run_checks()
    if args.json:
        print(json.dumps([c._asdict() for c in checks], indent=2))
    else:
        width = max(len(c.name) for c in checks)
        for c in checks:
            print(f"{c.verdict.upper():4}  {c.name:<{width}}  {c.detail}")
    return 1 if any(c.verdict == "fail" for c in checks) else 0
