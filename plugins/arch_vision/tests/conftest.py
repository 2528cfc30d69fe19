import pytest

from mistralrs_core import plugins


def _ensure_registered():
    # Until the distribution is installed its entry point is not discovered; tests that
    # reset the plugin manager drop in-process plugins, so check before every test.
    if "arch_vision" not in plugins.installed_plugins():
        import mistralrs_arch_vision.plugin
        plugins.register_plugin(mistralrs_arch_vision.plugin, "arch_vision")


@pytest.fixture(scope="session", autouse=True)
def arch_vision_registered_session():
    # Session-scoped so it runs before the module-scoped fixtures that load models.
    _ensure_registered()


@pytest.fixture(autouse=True)
def arch_vision_registered(arch_vision_registered_session):
    _ensure_registered()


@pytest.fixture(scope="session")
def tiny_llava(tmp_path_factory):
    """A perturbed random transformers LLaVa saved as a hub-style directory, plus the
    reference model itself."""
    from tiny_llava import write_tiny_llava
    return write_tiny_llava(tmp_path_factory.mktemp("tiny_llava"))
