"""The plugin's registrations: lazy, complete, covered by tests, and independent of the
other family plugins."""
import json
import os
import subprocess
import sys
from pathlib import Path

from mistralrs_core import capabilities, plugins

HERE = Path(__file__).parent


def _run(code: str) -> str:
    # The child gets our sys.path: the plugin may not be installed (its entry point then
    # is not discovered), so it registers it in-process like the conftest does.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().splitlines()[-1]


def test_listing_imports_no_model_code_and_families_import_no_other_plugin():
    out = json.loads(_run(
        "import sys, json\n"
        "from mistralrs_core import plugins\n"
        "import mistralrs_arch_vision.plugin as p\n"
        "plugins.register_plugin(p, 'arch_vision')\n"
        "plugins.describe()\n"
        "listed = sorted(m for m in sys.modules if m.startswith('mistralrs_arch_vision.'))\n"
        "import mistralrs_arch_vision.llava, mistralrs_arch_vision.loader, mistralrs_arch_vision.pipeline\n"
        "others = sorted(m for m in sys.modules if m.startswith('mistralrs_arch')\n"
        "                and not m.startswith('mistralrs_arch_vision'))\n"
        "print(json.dumps([listed, others]))"))
    listed, others = out
    assert listed == ["mistralrs_arch_vision.plugin"]
    # Family code uses core blocks only, never another family plugin's modules (every other
    # installed plugin's package and registration module are imported by its own
    # registration: that is not ours).
    assert not [m for m in others if m.count(".") > 1 or (m.count(".") == 1 and not m.endswith(".plugin"))]


def test_vision_kind_loader_and_capability_are_registered():
    reg = plugins.get_registry()
    assert reg.architecture("LLaVa", "vision").plugin == "arch_vision"
    assert reg.architecture("LLaVA", "vision") is reg.architecture("llava", "vision") is not None
    assert reg.loaders["vision"].plugin == "arch_vision"
    assert capabilities.available("vision")
    assert plugins.failed_plugins() == {}


def test_every_registered_family_has_a_parity_test():
    import importlib
    covered = set()
    for path in HERE.glob("test_*.py"):
        covered.update(getattr(importlib.import_module(path.stem), "COVERS", ()))
    ours = {e.name for e in plugins.get_registry().architectures.values() if e.plugin == "arch_vision"}
    assert ours and ours <= covered, f"families without a parity test: {sorted(ours - covered)}"
