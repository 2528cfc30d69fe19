import pytest

from mistralrs_core.testing.tiny import write_tiny_test_family


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A random model of the test-only TinyTest family (its plugin lives in tests/plugins)."""
    return write_tiny_test_family(tmp_path_factory.mktemp("tiny"), hidden=64, layers=2, heads=4, kv_heads=2)


@pytest.fixture(scope="session")
def tiny_runner(tiny_dir):
    from mistralrs import Runner, Which
    r = Runner(which=Which.Plain(model_id=str(tiny_dir), dtype="F32"), seed=0)
    yield r
    r.shutdown()


@pytest.fixture
def without_tools_distribution(monkeypatch):
    """The plugins as an installation without mistralrs-tools-mcp has them (its entry point
    left out of the allowlist), so tests of the gates keep their meaning once it is installed."""
    from importlib.metadata import entry_points

    from mistralrs_core import plugins
    names = [ep.name for ep in entry_points(group=plugins.ENTRY_POINT_GROUP) if ep.name != "tools_mcp"]
    monkeypatch.setenv(plugins.ENV_ALLOWLIST, ",".join(names) or "none")
    plugins.reset()
    yield plugins
    plugins.reset()
