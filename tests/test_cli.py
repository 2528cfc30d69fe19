"""The `mistralrs` command: model flags and config files -> Which, `run` one-shot and chat."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

from mistralrs import Which
from mistralrs_core import cli
from mistralrs_core.server.interactive import chat_loop
from mistralrs_core.server.spec import build_which, load_config
from mistralrs_core.testing.tiny import write_random_llama


def _cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    return subprocess.run([sys.executable, "-m", "mistralrs_core.cli", *args], input=stdin, text=True,
                          capture_output=True, env=env, timeout=120, encoding="utf-8")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_random_llama(tmp_path_factory.mktemp("cli") / "tiny")


# --- flags -> Which ----------------------------------------------------------------

def test_kinds_map_to_which_variants(tmp_path):
    assert isinstance(build_which("auto", "org/m"), Which.Plain)
    g = build_which("auto", "org/m-GGUF", quantized_filename=["q4.gguf"], tok_model_id="org/m")
    assert isinstance(g, Which.GGUF) and g.quantized_filename == "q4.gguf" and g.tok_model_id == "org/m"
    split = build_which("text", "org/m-GGUF", quantized_filename=["a.gguf", "b.gguf"])
    assert split.quantized_filename == ["a.gguf", "b.gguf"]
    assert isinstance(build_which("embedding", "org/e"), Which.Embedding)
    v = build_which("vision", "org/v", arch="qwen2vl")
    assert isinstance(v, Which.VisionPlain) and v.arch.name == "Qwen2VL"
    p = build_which("text", "org/m", arch="llama", dtype="bf16")
    assert p.arch.name == "Llama" and p.dtype.name == "BF16"
    f = tmp_path / "model.Q4_K_M.gguf"
    f.write_bytes(b"GGUF")
    direct = build_which("auto", str(f))
    assert isinstance(direct, Which.GGUF) and direct.quantized_model_id == str(tmp_path)
    assert direct.quantized_filename == f.name


@pytest.mark.parametrize("kwargs, field", [
    (dict(kind="vision", model_id="m"), "arch"),
    (dict(kind="text", model_id="m", tok_model_id="t"), "tok_model_id"),
    (dict(kind="auto", model_id="m", quantized_filename="x.gguf", arch="llama"), "arch"),
    (dict(kind="embedding", model_id="m", quantized_filename="x.gguf"), "quantized_filename"),
    (dict(kind="text", model_id="m", arch="nonsense"), "arch"),
    (dict(kind="nope", model_id="m"), "kind"),
    (dict(kind="text", model_id="m", bogus=1), "bogus"),
])
def test_flag_errors_name_the_field(kwargs, field):
    kind, model_id = kwargs.pop("kind"), kwargs.pop("model_id")
    with pytest.raises(ValueError, match=rf"^{field}:"):
        build_which(kind, model_id, **kwargs)


def test_cli_errors_exit_1_with_message(capsys):
    assert cli.main(["serve"]) == 1
    assert "-m/--model-id: required" in capsys.readouterr().err
    assert cli.main(["run", "-m", "m", "--kind", "vision"]) == 1
    assert "arch: required" in capsys.readouterr().err
    assert cli.main([]) == 2


# --- config files ------------------------------------------------------------------

def test_config_json_and_toml(tmp_path, model_dir):
    (tmp_path / "local").mkdir()
    doc = {"default_model_id": "emb", "runtime": {"max_seqs": 8}, "server": {"port": 9000},
           "models": [{"model_id": str(model_dir), "arch": "llama", "prefix_cache_n": 0},
                      {"model_id": "org/m-GGUF", "quantized_filename": "q.gguf", "tok_model_id": "org/m"},
                      {"model_id": "local", "name": "emb", "kind": "embedding"}]}
    (tmp_path / "m.json").write_text(json.dumps(doc))
    cfg = load_config(tmp_path / "m.json")
    assert [type(s.which).__name__ for s in cfg.models] == ["Plain", "GGUF", "Embedding"]
    assert cfg.models[0].options == {"prefix_cache_n": 0} and cfg.runtime == {"max_seqs": 8}
    assert [s.default for s in cfg.models] == [False, False, True] and cfg.server == {"port": 9000}
    assert cfg.models[2].which.model_id == str(tmp_path / "local")   # relative to the file
    (tmp_path / "m.toml").write_text(
        'default_model_id = "x"\n[[models]]\nmodel_id = "org/a"\nname = "x"\ndtype = "f16"\n')
    cfg = load_config(tmp_path / "m.toml")
    assert cfg.models[0].model_id == "x" and cfg.models[0].default and cfg.models[0].which.dtype.name == "F16"


@pytest.mark.parametrize("doc, field", [
    ({"models": []}, "models"),
    ({"models": [{"model_id": "a"}, {"model_id": "b", "colour": 1}]}, r"models\[1\]\.colour"),
    ({"models": [{"model_id": "a", "kind": "wat"}]}, r"models\[0\]\.kind"),
    ({"models": [{"model_id": "a"}], "default_model_id": "zz"}, "default_model_id"),
    ({"models": [{"model_id": "a"}], "runtime": {"warp": 9}}, r"runtime\.warp"),
    ({"models": [{"model_id": "a"}], "extra": 1}, "extra"),
])
def test_config_errors_name_the_key(tmp_path, doc, field):
    (tmp_path / "c.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=rf"^{field}"):
        load_config(tmp_path / "c.json")


# --- chat loop (stub runner) ---------------------------------------------------------

class _StubRunner:
    def __init__(self):
        self.seen = []

    def send_chat_completion_request(self, req):
        self.seen.append([m["content"] for m in req.messages])
        word = f"reply{len(self.seen)}"
        delta = SimpleNamespace(choices=[SimpleNamespace(delta=SimpleNamespace(content=word))])
        return iter([delta])


def test_chat_loop_history_clear_exit():
    runner, out, err = _StubRunner(), io.StringIO(), io.StringIO()
    rc = chat_loop(runner, {}, system="be brief", inp=io.StringIO("hi\nmore\n/clear\nagain\n/exit\nignored\n"),
                   out=out, err=err)
    assert rc == 0
    assert runner.seen == [["be brief", "hi"], ["be brief", "hi", "reply1", "more"], ["be brief", "again"]]
    assert "reply1\n" in out.getvalue() and "reply3\n" in out.getvalue()
    assert "cleared" in err.getvalue()


# --- the real command ------------------------------------------------------------------

def test_run_one_shot_prints_answer(model_dir, monkeypatch):
    # Loading progress shows on a terminal or when asked (stderr is a pipe here: asked).
    monkeypatch.setenv("MISTRALRS_PROGRESS", "1")
    r = _cli("run", "-m", str(model_dir), "-i", "hello", "--max-tokens", "8", "--temperature", "0")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() and r.stdout.endswith("\n")
    assert "Loading" in r.stderr


def test_run_interactive_over_stdin(model_dir):
    r = _cli("run", "-m", str(model_dir), "--max-tokens", "4", stdin="hello\n/clear\nhi\n/exit\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("> ") >= 3 and "cleared" in r.stderr
