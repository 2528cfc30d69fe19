"""Every script in examples/ runs to completion, offline, in its own process.

Examples are found by glob, so a new one is covered the day it lands; they run two at a
time (``JOBS``), each test reporting its own example's outcome. One that needs
arguments gets them from ``ARGS``; one that needs more than ``TIMEOUT`` seconds (on two
busy cores) is listed in ``SLOW`` with its own limit; one that would be too slow runs
with a smaller setting from ``ENV`` rather than being skipped.
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, NamedTuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))
# Generous: the limit is for a hung example, and a shared 2-core machine under load runs
# everything several times slower (measured: 10-120 s each at load average 12).
TIMEOUT = 240
# Examples run at once (MISTRALRS_EXAMPLE_JOBS overrides).
JOBS = int(os.environ.get("MISTRALRS_EXAMPLE_JOBS") or 2)

# Examples above 30 s even on an idle machine: they start a server process (a second
# interpreter and model load) and make several requests, or build a model with transformers.
SLOW = {"anthropic_api.py": 480, "responses_api.py": 480, "vision_chat.py": 360, "vision_minicpmo.py": 360,
        "audio_chat.py": 360, "vision_isq.py": 360}


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


def _tiny_minicpmo(tmp: Path) -> list[str]:
    """vision_minicpmo.py: a tiny random MiniCPM-o (openbmb's layout), a wide and a tall PNG."""
    pytest.importorskip("transformers")
    from PIL import Image
    sys.path.insert(0, str(ROOT / "plugins" / "arch_vision" / "tests"))
    try:
        from tiny_minicpmo import write_tiny_minicpmo
    finally:
        sys.path.pop(0)
    model, _, _ = write_tiny_minicpmo(tmp / "minicpmo")
    Image.new("RGB", (48, 20), (200, 30, 30)).save(tmp / "wide.png")
    Image.new("RGB", (14, 30), (30, 30, 200)).save(tmp / "tall.png")
    return [str(model), str(tmp / "wide.png"), str(tmp / "tall.png")]


def _tiny_gemma3n(tmp: Path) -> list[str]:
    """audio_chat.py takes a model folder, a clip and an image: a tiny random Gemma 3n (its
    image tower needs timm, a test extra), a 1 s WAV at 22.05 kHz and a PNG."""
    pytest.importorskip("transformers")
    import numpy as np
    import soundfile
    from PIL import Image
    sys.path.insert(0, str(ROOT / "plugins" / "arch_vision" / "tests"))
    try:
        from timm_reference import import_timm
        try:
            import_timm()
        except ImportError:
            pytest.skip("timm is not installed")
        from tiny_gemma3n import write_tiny_gemma3n
        model, _, _ = write_tiny_gemma3n(tmp / "gemma3n")
    finally:
        sys.path.pop(0)
    clip, image = tmp / "tone.wav", tmp / "red.png"
    t = np.arange(22050) / 22050
    soundfile.write(clip, (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 22050)
    Image.new("RGB", (40, 30), (200, 30, 30)).save(image)
    return [str(model), str(clip), str(image), "Gemma3n"]


ARGS: dict[str, Callable[[Path], list[str]]] = {"vision_chat.py": _tiny_llava, "vision_minicpmo.py": _tiny_minicpmo,
                                                 "audio_chat.py": _tiny_gemma3n, "vision_isq.py": _tiny_llava}
# Smaller settings for examples whose defaults would be too slow here.
ENV: dict[str, dict[str, str]] = {"vision_chat.py": {"MISTRALRS_VISION_COMPILE": "0"},
                                  "vision_isq.py": {"MISTRALRS_VISION_COMPILE": "0"}}


def test_examples_found():
    assert len(EXAMPLES) >= 10


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_has_a_docstring(path: Path):
    doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
    assert doc, f"{path.name}: say in a docstring what it shows and what it needs"


class Outcome(NamedTuple):
    returncode: int | None      # None: ran past its limit
    stdout: str
    stderr: str
    seconds: float
    skipped: str = ""           # why the example could not be set up here (a missing test extra)


def _run(path: Path, tmp: Path) -> Outcome:
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        args = ARGS[path.name](tmp) if path.name in ARGS else []
    except pytest.skip.Exception as exc:
        return Outcome(None, "", "", 0.0, skipped=str(exc))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONIOENCODING": "utf-8", "MISTRALRS_PROGRESS": "0",
           **ENV.get(path.name, {})}
    start = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, str(path), *args], cwd=tmp, env=env, capture_output=True,
                              text=True, encoding="utf-8", errors="replace", timeout=SLOW.get(path.name, TIMEOUT))
    except subprocess.TimeoutExpired as exc:
        return Outcome(None, str(exc.stdout or ""), str(exc.stderr or ""), time.perf_counter() - start)
    return Outcome(proc.returncode, proc.stdout, proc.stderr, time.perf_counter() - start)


@pytest.fixture(scope="module")
def outcomes(request, tmp_path_factory) -> dict[str, Outcome]:
    """Every selected example, run JOBS at a time: most of an example's time is one
    interpreter starting and one model loading, single-threaded work that two cores overlap."""
    selected = [item.callspec.params["path"] for item in request.session.items
                if item.originalname == "test_example_runs" and hasattr(item, "callspec")]
    # Longest first, so that the long ones do not end up running alone at the end.
    selected.sort(key=lambda p: -SLOW.get(p.name, 0))
    base = tmp_path_factory.mktemp("examples")
    with ThreadPoolExecutor(JOBS) as pool:
        futures = {p.name: pool.submit(_run, p, base / p.stem) for p in selected}
        return {name: f.result() for name, f in futures.items()}


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_runs(path: Path, outcomes: dict[str, Outcome]):
    out = outcomes[path.name]
    if out.skipped:
        pytest.skip(out.skipped)
    limit = SLOW.get(path.name, TIMEOUT)
    if out.returncode is None:
        pytest.fail(f"{path.name} ran past {limit} s; list it in SLOW or give it a smaller ENV setting")
    assert out.returncode == 0, f"{path.name} exited {out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    assert out.stdout.strip(), f"{path.name} printed nothing"
