"""Loading progress (mistralrs_core.progress): when it shows, the off switches, and the
bars a real load draws."""
from __future__ import annotations

import io
import threading

import pytest

from mistralrs import Runner, Which
from mistralrs_core import progress


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    monkeypatch.delenv(progress.ENV, raising=False)


def test_shown_on_a_terminal_or_when_asked(monkeypatch):
    monkeypatch.setattr("sys.stderr", io.StringIO())
    assert not progress.enabled()                  # a pipe or a log: quiet
    monkeypatch.setattr("sys.stderr", _Tty())
    assert progress.enabled()                      # a terminal: shown
    monkeypatch.setenv(progress.ENV, "0")
    assert not progress.enabled()                  # the environment's off switch
    with progress.scope(True):
        assert progress.enabled()                  # an explicit setting beats the environment
    assert not progress.enabled()
    monkeypatch.setattr("sys.stderr", io.StringIO())
    monkeypatch.setenv(progress.ENV, "yes")
    assert progress.enabled()
    with progress.scope(False):
        assert not progress.enabled()


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="progress"):
        progress.check_setting("yes")
    with pytest.raises(ValueError, match="progress"):
        Runner(which=Which.Plain(model_id="unused"), progress="on")  # type: ignore[arg-type]


def test_bad_environment_value_is_named(monkeypatch):
    monkeypatch.setenv(progress.ENV, "sometimes")
    with pytest.raises(ValueError, match=progress.ENV):
        progress.enabled()


def test_quiet_bar_and_notice(capsys):
    with progress.scope(False):
        with progress.bar(total=3, desc="x") as b:
            b.update(3)
        assert list(progress.bar(iter([1, 2]), desc="x")) == [1, 2]
        progress.notice("compiling")
    with progress.scope(True):
        progress.notice("compiling kernels")
        assert list(progress.bar([1, 2, 3], desc="counting", unit="thing")) == [1, 2, 3]
    err = capsys.readouterr().err
    assert err.count("compiling") == 1 and "mistralrs: compiling kernels" in err
    assert "counting" in err and "3/3" in err


def test_setting_follows_threads_started_in_context():
    seen = {}
    with progress.scope(True):
        t = threading.Thread(target=progress.in_context(lambda: seen.setdefault("in", progress.enabled())))
        plain = threading.Thread(target=lambda: seen.setdefault("plain", progress._setting.get()))
        t.start(), plain.start()
        t.join(), plain.join()
    assert seen == {"in": True, "plain": None}


def test_hub_bars_hidden_while_quiet_and_restored():
    hub = pytest.importorskip("huggingface_hub.utils")
    if hub.are_progress_bars_disabled():
        pytest.skip("huggingface_hub bars are off in this environment")
    with progress.scope(False):
        assert hub.are_progress_bars_disabled()
        with progress.scope(False):
            pass
        assert hub.are_progress_bars_disabled()    # the outer load still wants them off
    assert not hub.are_progress_bars_disabled()
    with progress.scope(True):
        assert not hub.are_progress_bars_disabled()


def test_runner_load_draws_the_tensor_bar(tiny_dir, capsys, monkeypatch):
    monkeypatch.setenv(progress.ENV, "1")
    r = Runner(which=Which.Plain(model_id=str(tiny_dir), dtype="F32"), progress=False)
    r.shutdown()
    assert "tensor" not in capsys.readouterr().err      # Runner(progress=False) beats the env
    monkeypatch.delenv(progress.ENV)
    r = Runner(which=Which.Plain(model_id=str(tiny_dir), dtype="F32"), progress=True)
    r.shutdown()
    err = capsys.readouterr().err
    assert "loading" in err and "tensor" in err
    r = Runner(which=Which.Plain(model_id=str(tiny_dir), dtype="F32"))
    r.shutdown()
    assert "tensor" not in capsys.readouterr().err      # not a terminal, not asked: quiet


def test_kernel_build_announces_itself(tmp_path, monkeypatch, capsys):
    cpp = pytest.importorskip("mistralrs_quant.kernels.cpp")
    built = []
    monkeypatch.setattr(cpp, "cache_dir", lambda: tmp_path / "kernels")

    def fake_compile(build, name):
        built.append(name)
        raise RuntimeError("no compiler in this test")
    monkeypatch.setattr(cpp, "_compile", fake_compile)
    with progress.scope(True), pytest.raises(RuntimeError, match="no compiler"):
        cpp._build()
    assert built and "compiling the quantized-matmul C++ kernels" in capsys.readouterr().err
    with progress.scope(False), pytest.raises(RuntimeError):
        cpp._build()
    assert capsys.readouterr().err == ""
