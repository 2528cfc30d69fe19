"""Plugin discovery: entry points, the allow-list switch, broken plugins reported by name."""
import subprocess
import sys
import textwrap

from mistralrs import ChatCompletionRequest, Runner, Which
from mistralrs_core import plugins


def run_py(code: str, env_extra: dict | None = None) -> str:
    import os
    env = dict(os.environ)
    env.update(env_extra or {})
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                         env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_out_of_tree_family_discovered_through_entry_point(tiny_dir):
    reg = plugins.get_registry()
    entry = reg.architecture("TinyTest")
    assert entry is not None and entry.plugin == "tiny_family"
    assert "tiny_family" in plugins.installed_plugins()
    r = Runner(which=Which.Plain(model_id=str(tiny_dir), dtype="F32"))
    try:
        model = r._pipeline(None).model
        assert type(model).__module__ == "mistralrs_tiny_family.model"
        res = r.send_chat_completion_request(ChatCompletionRequest(
            model="default", messages=[{"role": "user", "content": "hi"}], max_tokens=3))
        assert res.usage.completion_tokens >= 1
    finally:
        r.shutdown()


def test_listing_imports_no_model_code():
    out = run_py("""
        import sys
        from mistralrs_core import plugins
        plugins.describe()
        print(sorted(m for m in sys.modules if m.startswith(("mistralrs_arch_text.", "mistralrs_tiny_family.model"))))
    """)
    # only the plugin modules themselves, never a family module
    assert "llama" not in out and "model'" not in out


def test_allowlist_env_disables_plugins():
    out = run_py("""
        from mistralrs_core import plugins
        print(sorted(plugins.installed_plugins()), plugins.get_registry().names())
    """, {"MISTRALRS_PLUGINS": "tiny_family"})
    assert "['core', 'tiny_family'] ['TinyTest']" in out
    out = run_py("""
        from mistralrs_core import plugins
        print(sorted(plugins.installed_plugins()))
    """, {"MISTRALRS_PLUGINS": "none"})
    assert "['core']" in out


def test_broken_plugin_reported_and_others_keep_working(monkeypatch):
    import types
    from mistralrs_core.hookspecs import hookimpl

    @hookimpl
    def mistralrs_register_architectures(register):
        raise RuntimeError("boom")
    broken = types.SimpleNamespace(mistralrs_register_architectures=mistralrs_register_architectures)
    plugins.register_plugin(broken, "broken_test_plugin")
    try:
        failed = plugins.failed_plugins()
        assert "broken_test_plugin" in failed and "boom" in failed["broken_test_plugin"]
        assert plugins.get_registry().architecture("TinyTest") is not None
        assert "FAILED" in plugins.describe()
    finally:
        plugins.reset()


def test_unknown_family_error_lists_known_and_plugins(tmp_path, tiny_dir):
    import json
    import shutil
    d = tmp_path / "m"
    shutil.copytree(tiny_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"], cfg["architectures"] = "martian", ["MartianForCausalLM"]
    (d / "config.json").write_text(json.dumps(cfg))
    import pytest
    with pytest.raises(ValueError, match=r"unknown model family.*TinyTest.*installed plugins"):
        Runner(which=Which.Plain(model_id=str(d)))


def test_missing_kind_names_the_distribution_and_listing_shows_capabilities():
    out = run_py("""
        from mistralrs import NotAvailableYet, Runner, Which
        try:
            Runner(which=Which.VisionPlain(model_id="/nonexistent", arch="Gemma3"))
        except NotAvailableYet as exc:
            print("refused:", exc)
    """, {"MISTRALRS_PLUGINS": "none"})
    assert "refused: Which.VisionPlain" in out and "install mistralrs-arch-vision" in out
    out = subprocess.run([sys.executable, "-m", "mistralrs_core.plugins"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "capabilities:\n" in out.stdout and "matformer: not installed" in out.stdout
    assert "logits processors:" in out.stdout
