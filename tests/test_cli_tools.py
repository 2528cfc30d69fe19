"""The `mistralrs` chores: doctor, bench, from-config, quantize, completion; `--help` for all."""
from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from mistralrs_core import cli
from mistralrs_core.cli_tools import bench, doctor, from_config
from mistralrs_core.testing.tiny import write_random_llama


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_random_llama(tmp_path_factory.mktemp("tools") / "tiny")


def _commands() -> list[str]:
    from mistralrs_core.cli_tools.completion import _commands as commands
    return list(commands(cli.parser()))


def test_every_command_has_help(capsys):
    names = _commands()
    assert {"serve", "run", "from-config", "doctor", "bench", "quantize", "completion"} <= set(names)
    for name in names:
        with pytest.raises(SystemExit) as exit_:
            cli.main([name, "--help"])
        assert exit_.value.code == 0
        out = capsys.readouterr().out
        assert out.startswith(f"usage: mistralrs {name}") and "options:" in out


# --- doctor --------------------------------------------------------------------------

def test_doctor_reports_every_check(capsys):
    rc = cli.main(["doctor", "--json"])
    checks = json.loads(capsys.readouterr().out)
    assert [c["name"] for c in checks] == ["python", "torch", "cpu", "compiler", "kernel cache", "gpu",
                                          "plugins", "capabilities"]
    assert all(c["verdict"] in ("ok", "warn", "fail") and c["detail"] for c in checks)
    assert rc == (1 if any(c["verdict"] == "fail" for c in checks) else 0)
    cpu = next(c for c in checks if c["name"] == "cpu")
    assert "torch kernels:" in cpu["detail"]


def test_doctor_fails_without_the_text_plugin(monkeypatch, capsys):
    monkeypatch.setattr("mistralrs_core.plugins.installed_plugins", lambda: {"core": "mistralrs-core"})
    monkeypatch.setattr("mistralrs_core.plugins.failed_plugins", lambda: {})

    def broken() -> doctor.Check:
        raise RuntimeError("boom")
    monkeypatch.setattr(doctor, "CHECKS", (doctor.check_python, doctor.check_plugins, broken))
    assert cli.main(["doctor"]) == 1
    out = capsys.readouterr().out
    assert "FAIL  plugins" in out and "mistralrs-arch-text is missing" in out
    assert "FAIL  broken" in out and "RuntimeError: boom" in out


# --- bench ---------------------------------------------------------------------------

def test_bench_prints_the_table(model_dir, capsys):
    rc = cli.main(["bench", "-m", str(model_dir), "--dtype", "f32", "--prompt-len", "16", "--gen-len", "4",
                   "--concurrency", "1,2", "--iterations", "1", "--warmup", "0", "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0, out
    lines = [line for line in out.splitlines() if line.startswith("| ")]
    assert [line.split("|")[1].strip() for line in lines] == \
        ["test", "prefill", "decode", "concurrent 1", "concurrent 2"]
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in lines}
    assert rows["concurrent 2"][2] == "8"                  # 2 requests x 4 tokens, EOS ignored
    assert all(float(r[-1]) > 0 for k, r in rows.items() if k != "test")


def test_bench_refuses_bad_arguments(model_dir, capsys):
    assert cli.main(["bench", "-m", str(model_dir), "--concurrency", "2,0"]) == 1
    assert "--concurrency: every level must be >= 1" in capsys.readouterr().err
    assert cli.main(["bench", "-m", str(model_dir), "--gen-len", "1"]) == 1
    assert "--gen-len: must be >= 2" in capsys.readouterr().err
    with pytest.raises(ValueError, match="--concurrency"):
        bench.parse_concurrency("one")


# --- from-config ---------------------------------------------------------------------

UPSTREAM = """
command = "run"
[global]
seed = 7
[runtime]
max_seqs = 4
[paged_attn]
mode = "auto"
context_len = 512
block_size = 16
[[models]]
kind = "text"
model_id = "{model}"
dtype = "f32"
[models.device]
cpu = true
max_seq_len = 4096
[[models]]
model_id = "{model}"
name = "second"
"""


def test_from_config_translates_upstream_toml(tmp_path, model_dir):
    f = tmp_path / "models.toml"
    f.write_text(UPSTREAM.format(model=model_dir))
    command, cfg, chat = from_config.load(f)
    assert command == "run" and chat == {}
    assert cfg.runtime == {"max_seqs": 4, "seed": 7, "pa_ctxt_len": 512, "pa_blk_size": 16}
    first, second = cfg.models
    assert first.which.dtype.name == "F32" and first.options == {"device": "cpu"}
    assert second.model_id == "second"
    g = tmp_path / "gguf.toml"
    g.write_text('command = "serve"\ndefault_model_id = "g"\n[server]\nport = 8123\n[[models]]\nmodel_id = "org/x-GGUF"\n'
                 'name = "g"\n[models.format]\nformat = "gguf"\nquantized_file = "a.gguf;b.gguf"\n'
                 'tok_model_id = "org/x"\n[models.quantization]\nin_situ_quant = "q4k"\n')
    command, cfg, _ = from_config.load(g)
    assert command == "serve" and cfg.server == {"port": 8123}
    (spec,) = cfg.models
    assert spec.default and spec.which.quantized_filename == ["a.gguf", "b.gguf"]
    assert spec.which.tok_model_id == "org/x" and spec.options == {"in_situ_quant": "q4k"}


def test_from_config_runs_the_models(tmp_path, model_dir, capsys):
    f = tmp_path / "models.toml"
    f.write_text(UPSTREAM.format(model=model_dir))
    rc = cli.main(["from-config", "-f", str(f), "-i", "Hello", "--max-tokens", "3", "--temperature", "0",
                   "--no-progress"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert captured.out.strip()


def test_from_config_serves_the_models(tmp_path, model_dir):
    import os
    import sys
    import time

    import httpx

    from mistralrs_core.testing.server import _free_port
    port = _free_port()
    f = tmp_path / "serve.toml"
    f.write_text(f'command = "serve"\ndefault_model_id = "b"\n[server]\nhost = "127.0.0.1"\nport = {port}\n'
                 f'[[models]]\nmodel_id = "{model_dir}"\nname = "a"\n[[models]]\nmodel_id = "{model_dir}"\n'
                 f'name = "b"\n')
    log = open(tmp_path / "server.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "mistralrs_core.cli", "from-config", "-f", str(f),
                             "--log-level", "warning"], stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "MISTRALRS_API_KEY": ""})
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, (tmp_path / "server.log").read_text(errors="replace")
            try:
                models = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2)
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline, (tmp_path / "server.log").read_text(errors="replace")
                time.sleep(0.3)
        assert [m["id"] for m in models.json()["data"]] == ["a", "b"]
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=60,
                       json={"prompt": "hi", "max_tokens": 2, "temperature": 0})
        assert r.status_code == 200 and r.json()["model"] == "b"      # default_model_id
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


@pytest.mark.parametrize("doc, key", [
    ('command = "serve"\n[[models]]\nmodel_id = "m"\n[models.adapter]\nlora = "x"\n', "models[0].adapter"),
    ('command = "serve"\n[[models]]\nmodel_id = "m"\n[models.format]\nformat = "ggml"\n', "models[0].format.format"),
    ('command = "serve"\n[server]\nmcp_port = 3\n[[models]]\nmodel_id = "m"\n', "server.mcp_port"),
    ('command = "talk"\n[[models]]\nmodel_id = "m"\n', "command"),
    ('command = "run"\n[paged_attn]\nmode = "sometimes"\n[[models]]\nmodel_id = "m"\n', "paged_attn.mode"),
    ('command = "run"\n[[models]]\nkind = "text"\n', "models[0].model_id"),
])
def test_from_config_errors_name_the_key(tmp_path, capsys, doc, key):
    f = tmp_path / "bad.toml"
    f.write_text(doc)
    assert cli.main(["from-config", "-f", str(f)]) == 1
    assert f"{key}:" in capsys.readouterr().err


# --- quantize ------------------------------------------------------------------------

def test_quantize_arguments(tmp_path, model_dir, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["quantize", "-m", str(model_dir), "-o", str(tmp_path / "q.uqff")])
    assert exit_.value.code == 2                          # --isq is required
    assert "--isq" in capsys.readouterr().err
    cases = [(["--isq", "q4k,q8_0", "-o", str(tmp_path / "q.uqff")], "--isq: one quantization type"),
             (["--isq", "q4k", "-o", str(tmp_path / "q.bin")], "-o/--output: must name a .uqff file"),
             (["--isq", "q4k", "-o", str(tmp_path / "nowhere" / "q.uqff")], "-o/--output: directory")]
    for extra, message in cases:
        assert cli.main(["quantize", "-m", str(model_dir), *extra]) == 1
        assert message in capsys.readouterr().err


def test_quantize_without_the_quant_capability_says_what_to_install(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("mistralrs_core.capabilities.available", lambda name: False)
    # A model id that could not load: the refusal must come before any loading.
    rc = cli.main(["quantize", "-m", str(tmp_path / "no-such-model"), "--isq", "q4k",
                   "-o", str(tmp_path / "out.uqff")])
    err = capsys.readouterr().err
    assert rc == 1
    assert "--isq" in err and "install mistralrs-quant" in err and "no-such-model" not in err


def _greedy(which, **kw):
    from mistralrs_core.api import ChatCompletionRequest
    from mistralrs_core.runner import Runner
    r = Runner(which=which, max_seqs=2, **kw)
    try:
        out = r.send_chat_completion_request(ChatCompletionRequest(
            messages=[{"role": "user", "content": "Tell me a story"}], max_tokens=8, temperature=0.0,
            logprobs=True))
        choice = out.choices[0]
        return choice.message.content, [t.logprob for t in choice.logprobs.content]
    finally:
        r.shutdown()


@pytest.mark.parametrize("target", ["dir", "file"])
def test_quantize_writes_a_uqff_that_loads_and_answers_as_the_isq_model(tmp_path, model_dir, capsys, target):
    pytest.importorskip("mistralrs_quant")
    from mistralrs_core.api import Which
    out = tmp_path / "out"
    if target == "file":
        out.mkdir()
    dest = out if target == "dir" else out / "tiny.uqff"
    assert cli.main(["quantize", "-m", str(model_dir), "--isq", "Q8_0", "-o", str(dest), "--no-progress"]) == 0
    shard = "q8_0-0.uqff" if target == "dir" else "tiny-0.uqff"
    printed = capsys.readouterr().out
    assert str(out / shard) in printed and f"from_uqff={shard!r}" in printed
    assert {shard, "residual.safetensors", "config.json"} <= {p.name for p in out.iterdir()}
    want = _greedy(Which.Plain(model_id=str(model_dir)), in_situ_quant="Q8_0")
    got = _greedy(Which.Plain(model_id=str(out), from_uqff=shard))
    assert got[0] == want[0] and got[1] == want[1]


# --- completion ----------------------------------------------------------------------

@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_bash_completion_completes_commands_flags_and_choices(tmp_path, capsys):
    assert cli.main(["completion", "bash"]) == 0
    script = tmp_path / "c.sh"
    script.write_text(capsys.readouterr().out)

    def complete(*words: str) -> list[str]:
        line = " ".join(f'"{w}"' for w in words)
        out = subprocess.run(["bash", "-c", f'source "{script}"; COMP_WORDS=(mistralrs {line}); '
                              f'COMP_CWORD={len(words)}; _mistralrs; printf "%s\\n" "${{COMPREPLY[@]}}"'],
                             capture_output=True, text=True, timeout=30, check=True).stdout
        return out.split()
    assert complete("d") == ["doctor"]
    assert set(complete("")) >= {"serve", "run", "from-config", "doctor", "bench", "quantize", "completion"}
    assert complete("bench", "--prompt") == ["--prompt-len"]
    from mistralrs_core.server.spec import KINDS
    assert complete("serve", "--kind", "") == list(KINDS)   # the parser's choices, in order
    assert complete("completion", "") == ["bash", "zsh", "fish"]


def test_zsh_and_fish_completion(capsys):
    assert cli.main(["completion", "zsh"]) == 0
    zsh = capsys.readouterr().out
    assert "bashcompinit" in zsh and "complete -o default -F _mistralrs mistralrs" in zsh
    assert cli.main(["completion", "fish"]) == 0
    fish = capsys.readouterr().out
    assert "complete -c mistralrs -n __fish_use_subcommand -a quantize" in fish
    assert "-l isq" in fish
    with pytest.raises(SystemExit):
        cli.main(["completion", "tcsh"])
