import pytest

from mistralrs_core import plugins


def _ensure_registered():
    # Tests that reset the plugin manager drop in-process plugins: check before every test.
    if "arch_speech" not in plugins.installed_plugins():
        import mistralrs_arch_speech.plugin
        plugins.register_plugin(mistralrs_arch_speech.plugin, "arch_speech")


@pytest.fixture(scope="session", autouse=True)
def arch_speech_registered_session():
    _ensure_registered()


@pytest.fixture(autouse=True)
def arch_speech_registered(arch_speech_registered_session):
    _ensure_registered()
