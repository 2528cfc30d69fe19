"""Every family the arch_text plugin registers must be named in some test module's
``COVERS`` list (the module holding its parity test against the reference)."""
import importlib.util
from pathlib import Path

import pytest

from mistralrs_core.plugins import get_plugin_manager, get_registry

HERE = Path(__file__).parent


def covered_names() -> dict[str, str]:
    """Family name (lower case) -> test module declaring it."""
    covered = {}
    for path in sorted(HERE.glob("test_*.py")):
        if path.name == Path(__file__).name:
            continue
        # A private module name: pytest may import the same file under its own name.
        spec = importlib.util.spec_from_file_location(f"_arch_text_coverage_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        for name in getattr(module, "COVERS", ()):
            covered[name.lower()] = path.name
    return covered


def arch_text_families() -> list[str]:
    import mistralrs_arch_text.plugin as plugin
    plugin_name = get_plugin_manager().get_name(plugin)
    if plugin_name is None:
        pytest.skip("the arch_text plugin is not loaded (MISTRALRS_PLUGINS)")
    return sorted(e.name for e in get_registry().architectures.values() if e.plugin == plugin_name)


def test_every_registered_family_has_a_parity_test():
    covered = covered_names()
    missing = [name for name in arch_text_families() if name.lower() not in covered]
    assert not missing, (f"families registered by arch_text without a parity test (add the name to a "
                         f"test module's COVERS in {HERE}): {', '.join(missing)}")


def test_covers_names_are_registered():
    registered = {name.lower() for name in arch_text_families()}
    stale = sorted(f"{name} ({module})" for name, module in covered_names().items() if name not in registered)
    assert not stale, f"COVERS names no registered family: {', '.join(stale)}"
