"""LoRA through the Runner, the server config and HTTP: per-request adapters batched
together, a merged single adapter, upstream's newer ``adapters=[LoraAdapter]`` form."""
import concurrent.futures as cf
import json

import pytest

from lora_testing import make_tiny, ordering
from mistralrs import ChatCompletionRequest, CompletionRequest, Runner, Which

pytest.importorskip("peft")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("lora_runner"))


def test_runner_per_request_adapters_batch_together(tiny, tmp_path):
    _, base_dir, adapters, _ = tiny
    order = ordering(tmp_path / "order.json", order=[], base_model_id=str(base_dir),
                      preload_adapters=[{"name": "a", "adapter_model_id": str(adapters)},
                                        {"name": "b", "adapter_model_id": str(adapters / "b")}])
    runner = Runner(which=Which.Lora(model_id=str(base_dir), adapter_model_id=str(adapters), order=order))
    try:
        def req(adapter=None):
            return CompletionRequest(prompt="def main", max_tokens=8, temperature=0.0, adapter=adapter)
        alone = {a: runner.send_completion_request(req(a)).choices[0].text for a in (None, "a", "b")}
        assert len(set(alone.values())) == 3       # the adapters change the greedy text
        with cf.ThreadPoolExecutor(6) as ex:
            futs = {ex.submit(runner.send_completion_request, req(a)): a for a in (None, "a", "b", "a")}
            for f, a in futs.items():
                assert f.result().choices[0].text == alone[a]
        with pytest.raises(ValueError, match=r"^adapter: 'c' is not loaded"):
            runner.send_completion_request(req("c"))
    finally:
        runner.shutdown()


def test_runner_single_adapter_dir_merges(tiny):
    ref, base_dir, adapters, _ = tiny
    runner = Runner(which=Which.Lora(adapter_model_id=str(adapters / "a"), model_id=str(base_dir)))
    try:
        pipe = runner._pipeline(None)
        assert pipe.model.adapters.merged
        out = runner.send_chat_completion_request(ChatCompletionRequest(
            messages=[{"role": "user", "content": "hi"}], max_tokens=4, temperature=0.0))
        assert out.choices[0].message.content is not None
    finally:
        runner.shutdown()


def test_adapter_on_a_plain_model_is_a_clear_error(tiny):
    _, base_dir, _, _ = tiny
    runner = Runner(which=Which.Plain(model_id=str(base_dir)))
    try:
        with pytest.raises(ValueError, match=r"^adapter: this model was loaded without LoRA adapters"):
            runner.send_completion_request(CompletionRequest(prompt="x", max_tokens=2, adapter="a"))
    finally:
        runner.shutdown()


def test_runner_with_lora_adapter_objects(tiny):
    """Upstream's newer form: Which.Lora(adapters=[LoraAdapter(alias, source)]); the base by default."""
    from mistralrs import LoraAdapter
    _, base_dir, adapters, _ = tiny
    runner = Runner(which=Which.Lora(model_id=str(base_dir), adapters=[LoraAdapter("x", str(adapters / "b"))]))
    try:
        base = Runner(which=Which.Plain(model_id=str(base_dir)))
        req = CompletionRequest(prompt="def", max_tokens=8, temperature=0.0)
        assert runner.send_completion_request(req).choices[0].text == base.send_completion_request(req).choices[0].text
        base.shutdown()
        x = CompletionRequest(prompt="def", max_tokens=8, temperature=0.0, adapter="x")
        assert runner.send_completion_request(x).choices[0].text != runner.send_completion_request(req).choices[0].text
    finally:
        runner.shutdown()
    with pytest.raises(ValueError, match="^max_adapters: 2 adapters exceed the limit of 1"):
        Runner(which=Which.Lora(model_id=str(base_dir), adapters=[LoraAdapter("x", str(adapters / "b")),
                                                                  LoraAdapter("y", str(adapters / "a"))],
                                max_adapters=1))


def test_server_config_adapter_kinds():
    from mistralrs_core.server.spec import build_which
    w = build_which("lora", "/base", adapter_model_id="/ad", order="o.json")
    assert type(w).__name__ == "Lora" and w.model_id == "/base" and w.order == "o.json"
    w = build_which("xlora", "/q", quantized_filename="m.gguf", xlora_model_id="/x", order="o.json",
                    tgt_non_granular_index=2)
    assert type(w).__name__ == "XLoraGGUF" and w.quantized_model_id == "/q" and w.tgt_non_granular_index == 2
    with pytest.raises(ValueError, match="^models\\[0\\].order: required for kind 'xlora'"):
        build_which("xlora", "/base", xlora_model_id="/x", where="models[0].")


def test_served_over_http_with_a_config_file(tiny, tmp_path):
    """`mistralrs serve --config` with kind "lora"; the request body's `adapter` picks one."""
    import httpx
    from mistralrs_core.testing.server import Server
    _, base_dir, adapters, _ = tiny
    order = ordering(tmp_path / "order.json", order=[], preload_adapters=[
        {"name": "a", "adapter_model_id": str(adapters)}])
    cfg = tmp_path / "serve.json"
    cfg.write_text(json.dumps({"models": [{"kind": "lora", "model_id": str(base_dir), "adapter_model_id": str(adapters),
                                           "order": order, "dtype": "F32"}]}))
    srv = Server(["--config", str(cfg)], tmp_path / "log.txt").wait()
    try:
        def post(**kw):
            return httpx.post(srv.url + "/v1/completions", timeout=60,
                              json={"model": "default", "prompt": "def", "max_tokens": 6, "temperature": 0, **kw})
        base, adapted = post(), post(adapter="a")
        assert base.status_code == adapted.status_code == 200
        assert base.json()["choices"][0]["text"] != adapted.json()["choices"][0]["text"]
        bad = post(adapter="zzz")
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "adapter"
    finally:
        srv.stop()
