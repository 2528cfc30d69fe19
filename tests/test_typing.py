"""The typed API: every example type-checks under ``mypy --strict``, every distribution
ships ``py.typed``, and every ``Which`` variant is visible to type checkers."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from mistralrs_core.api.which import WHICH_VARIANTS

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))


def test_every_distribution_ships_py_typed():
    dists = [(ROOT / "pyproject.toml", [ROOT / "mistralrs", ROOT / "mistralrs_core"])]
    for pyproject in sorted(ROOT.glob("plugins/*/pyproject.toml")):
        dists.append((pyproject, sorted(p for p in pyproject.parent.glob("mistralrs_*") if p.is_dir() and not p.name.endswith(".egg-info"))))
    for pyproject, packages in dists:
        assert packages, pyproject
        text = pyproject.read_text()
        for pkg in packages:
            assert (pkg / "py.typed").is_file(), f"{pkg}/py.typed missing"
            # Package data is what a wheel carries; a marker left out of it types nothing.
            assert re.search(rf'^"?{pkg.name}"?\s*=\s*\[[^\]]*"py\.typed"', text, re.M), \
                f"{pyproject}: py.typed is not in {pkg.name}'s package-data"


def test_which_variants_are_declared_for_type_checkers():
    # `_variant` attaches them at run time; the TYPE_CHECKING block in which.py is what
    # editors and mypy see, so a variant added without it would not complete.
    source = (ROOT / "mistralrs_core" / "api" / "which.py").read_text()
    declared = set(re.findall(r"^\s+(\w+): ClassVar\[type\[_w\.\w+\]\]", source, re.M))
    assert {cls.__name__ for cls in WHICH_VARIANTS} <= declared


def test_examples_pass_mypy_strict():
    pytest.importorskip("mypy")
    assert EXAMPLES
    # The worktree's packages (not whatever an editable install points at); errors are
    # reported for the examples only, imported modules are analysed silently.
    path = os.pathsep.join([str(ROOT), *map(str, sorted(ROOT.glob("plugins/*/"))),
                            *map(str, sorted(ROOT.glob("tests/plugins/*/")))])
    cache = Path(tempfile.gettempdir()) / "mistralrs-mypy-cache"
    env = {**os.environ, "MYPYPATH": path}
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--follow-imports=silent", "--no-error-summary",
         "--cache-dir", str(cache), *map(str, EXAMPLES)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
