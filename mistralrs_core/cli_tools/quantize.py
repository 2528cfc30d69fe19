"""``mistralrs quantize -m MODEL --isq Q4K -o OUT``: in-situ quantization to a UQFF directory.

``OUT`` is a directory (shards named after the type, ``q4k-0.uqff`` ...) or a file name
``dir/name.uqff`` (shards ``dir/name-0.uqff`` ...); either way the directory also gets
``residual.safetensors`` and the model's config/tokenizer files, so it loads by itself:
``Which.Plain(model_id=DIR, from_uqff=FIRST_SHARD)``.

No quantization code lives here: the command loads the model through the Runner with
``in_situ_quant=`` and the variant's ``write_uqff=``, exactly what a Python user would
write, so the quant plugin that implements ISQ and UQFF does the work. Without that
plugin (the ``isq`` and ``uqff`` capabilities) the command stops before loading anything,
naming the distribution to install.
"""
from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path
from typing import Any

NAME = "quantize"

# What the quant plugin writes: <stem>-<N>.uqff shards.
_SHARD = re.compile(r"^.+-\d+\.uqff$")


def add_parser(sub: Any) -> None:
    p = sub.add_parser(NAME, help="quantize a model in situ (ISQ) and write it as a UQFF file",
                       description="Load a safetensors model with in-situ quantization and write the "
                                   "quantized weights to a UQFF file (needs mistralrs-quant's ISQ/UQFF support). "
                                   "Load the result with `--from-uqff` / Which.Plain(from_uqff=...).")
    p.add_argument("-m", "--model-id", required=True, help="model directory or Hugging Face hub id (safetensors)")
    p.add_argument("--isq", required=True, help="quantization type, e.g. Q4K, Q8_0, HQQ4 (one per run)")
    p.add_argument("-o", "--output", required=True,
                   help="a directory, or DIR/NAME.uqff (shards NAME-0.uqff ... beside residual.safetensors)")
    p.add_argument("--kind", default="text", choices=("text", "vision", "embedding"), help="model kind (default text)")
    p.add_argument("--arch", help="architecture (default: detected from config.json)")
    p.add_argument("--dtype", help="auto, bf16, f16 or f32")
    p.add_argument("--tokenizer-json", help="explicit tokenizer.json")
    p.add_argument("--imatrix", help="imatrix file guiding the quantization")
    p.add_argument("--calibration-file", help="text to collect an imatrix from")
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--no-progress", dest="progress", action="store_const", const=False, default=None,
                   help="no progress on stderr")
    p.set_defaults(tool=sys.modules[__name__])


def plan(args: argparse.Namespace) -> tuple[Any, dict]:
    """(Which, Runner keyword arguments) for ``args``; ValueError/NotAvailableYet name the flag."""
    from mistralrs_core import capabilities
    from mistralrs_core.server.spec import build_which
    isq = args.isq.strip()
    if not isq or "," in isq or ";" in isq:
        raise ValueError(f"--isq: one quantization type per run, got {args.isq!r}")
    out = Path(args.output).expanduser()
    if out.suffix.lower() != ".uqff" and out.suffix and not out.is_dir():
        raise ValueError(f"-o/--output: must name a .uqff file or a directory, got {args.output!r}")
    if out.exists() and not out.is_dir() and out.suffix.lower() != ".uqff":
        raise ValueError(f"-o/--output: {args.output!r} exists and is not a directory")
    if not out.parent.is_dir():
        raise ValueError(f"-o/--output: directory {str(out.parent)!r} does not exist")
    if Path(args.model_id).suffix.lower() == ".gguf":
        raise ValueError("-m/--model-id: quantize takes a safetensors model; a GGUF file is already quantized")
    # Refused before any loading: the gate names what to install.
    capabilities.require("isq", "--isq")
    capabilities.require("uqff", "-o/--output")
    fields = dict(arch=args.arch, dtype=args.dtype, tokenizer_json=args.tokenizer_json, imatrix=args.imatrix,
                  calibration_file=args.calibration_file)
    which = build_which(args.kind, args.model_id, write_uqff=str(out), **fields)
    runtime: dict = {"in_situ_quant": isq}
    if args.device:
        runtime["device"] = args.device
    if args.progress is not None:
        runtime["progress"] = args.progress
    return which, runtime


def main(args: argparse.Namespace) -> int:
    from mistralrs_core.cli import error
    from mistralrs_core.errors import NotAvailableYet
    try:
        which, runtime = plan(args)
        from mistralrs_core.runner import Runner
        started = time.time()
        runner = Runner(which=which, **runtime)
    except (ValueError, OSError, NotAvailableYet) as exc:
        return error(exc)
    runner.shutdown()
    out = Path(which.write_uqff)
    directory = out.parent if out.suffix.lower() == ".uqff" else out
    stem = out.stem if out.suffix.lower() == ".uqff" else None
    # This run's shards: earlier runs' shards of other types may share the directory.
    written = sorted((p for p in directory.glob("*.uqff") if _SHARD.match(p.name)
                      and (stem is None or p.name.rsplit("-", 1)[0] == stem) and p.stat().st_mtime >= started - 1),
                     key=lambda p: (p.name.rsplit("-", 1)[0], int(p.stem.rsplit("-", 1)[1])))
    if not written:
        return error(f"-o/--output: the model loaded but no UQFF shard was written to {str(directory)!r} "
                     f"(the installed quant plugin does not write UQFF for this model)")
    size = sum(p.stat().st_size for p in written) / 2**20
    print(f"wrote {', '.join(map(str, written))} ({size:.1f} MiB, {runtime['in_situ_quant']}); load with "
          f"Which.Plain(model_id={str(directory)!r}, from_uqff={written[0].name!r})")
    return 0
