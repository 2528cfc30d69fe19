"""The distribution's registrations: lazy (listing plugins imports no model code), the
"diffusion" capability, the loader chosen for ``Which.DiffusionPlain`` only, and no import
of another family plugin."""
from __future__ import annotations

import json
import subprocess
import sys

from mistralrs import DiffusionArchitecture, Which
from mistralrs_core import capabilities
from mistralrs_core.plugins import get_plugin_manager


def _modules_after(code: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys, json\nprint(json.dumps(sorted(m for m in "
                          "sys.modules if m.startswith('mistralrs_arch'))))"], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_every_module_loads_without_another_family_plugin():
    mods = _modules_after("import pkgutil, importlib, mistralrs_arch_diffusion\n"
                          "for m in pkgutil.iter_modules(mistralrs_arch_diffusion.__path__):\n"
                          "    importlib.import_module('mistralrs_arch_diffusion.' + m.name)")
    assert mods and all(m.startswith("mistralrs_arch_diffusion") for m in mods)


def test_listing_plugins_imports_no_model_code():
    mods = _modules_after("from mistralrs_core import plugins\nplugins.describe()")
    assert not [m for m in mods if m.startswith("mistralrs_arch_diffusion.") and not m.endswith(".plugin")]


def test_capability_and_loader_selection():
    assert capabilities.available("diffusion")
    pm = get_plugin_manager()
    which = Which.DiffusionPlain(model_id="x", arch=DiffusionArchitecture.FluxOffloaded)
    assert pm.hook.mistralrs_select_loader(which=which, kind="diffusion") == "diffusion"
    assert pm.hook.mistralrs_select_loader(which=Which.Plain(model_id="x"), kind="text") != "diffusion"
