"""The long form of the stress suite (tests/stress): 200 concurrent streams, the 80+ kinds of
bad input, 2000 file mutants (1400 GGUF, 600 safetensors), malicious chat templates, faults.

    .venv/bin/python bench/stress.py            # or: make stress

Runs pytest on tests/stress with MISTRALRS_STRESS=long and prints the figures each test
recorded: requests, errors, p50/p99 time to first token, mutants tried and their outcomes.
Exit status: pytest's.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str]) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        figures = Path(tmp) / "figures.jsonl"
        env = {**os.environ, "MISTRALRS_STRESS": "long", "MISTRALRS_STRESS_FIGURES": str(figures)}
        code = subprocess.call([sys.executable, "-m", "pytest", "-q", str(ROOT / "tests" / "stress"),
                                "-p", "no:cacheprovider", *argv], cwd=ROOT, env=env)
        rows = [json.loads(line) for line in figures.read_text().splitlines()] if figures.exists() else []
    print("\nstress figures (long form):")
    for row in rows:
        test = row.pop("test")
        row.pop("form", None)
        print(f"  {test:18s} " + ", ".join(f"{k}={v}" for k, v in row.items()))
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
