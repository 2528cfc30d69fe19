"""Every script in examples/ runs to completion, offline, in its own process.

Examples are found by glob, so a new one is covered the day it lands. One that needs
arguments gets them from ``ARGS``; one that needs more than ``TIMEOUT`` seconds (on two
busy cores) is listed in ``SLOW`` with its own limit; one that would be too slow runs
with a smaller setting from ``ENV`` rather than being skipped.
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))
# Generous: the limit is for a hung example, and a shared 2-core machine under load runs
# everything several times slower (measured: 10-120 s each at load average 12).
TIMEOUT = 240

# Examples above 30 s even on an idle machine: they start a server process (a second
# interpreter and model load) and make several requests, or build a model with transformers.
SLOW = {"anthropic_api.py": 480, "responses_api.py": 480, "vision_chat.py": 360}


def _tiny_llava(tmp: Path) -> list[str]:
    """vision_chat.py takes a model folder and an image: a tiny random LLaVa and a PNG."""
    pytest.importorskip("transformers")
    from PIL import Image
    sys.path.insert(0, str(ROOT / "plugins" / "arch_vision" / "tests"))
    try:
        from tiny_llava import write_tiny_llava
    finally:
        sys.path.pop(0)
    model, _, _ = write_tiny_llava(tmp / "llava")
    image = tmp / "red.png"
    Image.new("RGB", (40, 30), (200, 30, 30)).save(image)
    return [str(model), str(image), "LLaVa"]


ARGS: dict[str, Callable[[Path], list[str]]] = {"vision_chat.py": _tiny_llava}
# Smaller settings for examples whose defaults would be too slow here.
ENV: dict[str, dict[str, str]] = {"vision_chat.py": {"MISTRALRS_VISION_COMPILE": "0"}}


def test_examples_found():
    assert len(EXAMPLES) >= 10


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_has_a_docstring(path: Path):
    doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
    assert doc, f"{path.name}: say in a docstring what it shows and what it needs"


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_runs(path: Path, tmp_path: Path):
    args = ARGS[path.name](tmp_path) if path.name in ARGS else []
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONIOENCODING": "utf-8", "MISTRALRS_PROGRESS": "0",
           **ENV.get(path.name, {})}
    try:
        proc = subprocess.run([sys.executable, str(path), *args], cwd=tmp_path, env=env, capture_output=True,
                              text=True, encoding="utf-8", errors="replace", timeout=SLOW.get(path.name, TIMEOUT))
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{path.name} ran past {exc.timeout} s; list it in SLOW or give it a smaller ENV setting")
    assert proc.returncode == 0, f"{path.name} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert proc.stdout.strip(), f"{path.name} printed nothing"
