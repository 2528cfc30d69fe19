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


def _dequantized_copy(ref, model):
    """``ref`` (transformers) with each of ``model``'s quantized weights replaced by its
    dequantized values (fused layers by their parts' rows)."""
    import copy
    ref = copy.deepcopy(ref)
    n = 0
    for m in model.modules():
        if getattr(m, "qmethod", None) is None:
            continue
        w = m.qmethod.dequantize().float()
        for part, start, stop in getattr(m, "fused_parts", None) or [(m.__dict__.get("hf_name"), 0, len(w))]:
            target = ref.get_submodule(part).weight
            assert target.shape == w[start:stop].shape, part
            target.data.copy_(w[start:stop])
            n += 1
    assert n == 2 * 7 + 2          # every projection, the embeddings and the LM head
    return ref


@pytest.mark.parametrize("cpp", [True, False], ids=["cpp", "torch"])
def test_lora_on_an_isq_base_equals_peft_on_the_dequantized_weights(tiny, cpp, monkeypatch):
    """Which.Lora + Runner(in_situ_quant=...): the base loads through the quant plugin's ISQ
    loader (kept packed), the adapters ride on top; equal to peft on the ISQ'd weights."""
    import torch
    pytest.importorskip("mistralrs_quant")
    import peft
    from mistralrs_core.testing.parity import SingleSequence, max_rel_err, random_prompt
    from mistralrs_quant.qlinear import GGMLQuantMethod
    if not cpp:
        monkeypatch.setenv("MISTRALRS_QUANT_NO_CPP", "1")
    ref, base_dir, adapters, vocab = tiny
    active = ["a", "b"]
    order = ordering(adapters / "isq_order.json", order=active)
    # float32 products: under Auto the torch path runs quantized products in bfloat16 (by design).
    runner = Runner(which=Which.Lora(model_id=str(base_dir), adapter_model_id=str(adapters), order=order,
                                     dtype="F32"), in_situ_quant="Q8_0")
    try:
        model = runner._pipeline(None).model
        attn = model.model.layers[0].self_attn
        # Without the C++ kernels q/k/v are fused into one packed matmul (each part its rows).
        q = attn.q_proj if cpp else attn._qkv_runtime
        assert isinstance(q.qmethod, GGMLQuantMethod) and q.qmethod.spec.name == "Q8_0" and q.lora is not None
        assert not model.adapters.merged
        prompt, decode = random_prompt(9, vocab, seed=3), [5, 17, 33, 60]
        with torch.inference_mode():
            pm = peft.PeftModel.from_pretrained(_dequantized_copy(ref, model), str(adapters / active[0]),
                                                adapter_name=active[0])
            for n in active[1:]:
                pm.load_adapter(str(adapters / n), adapter_name=n)
            pm.base_model.set_adapter(active)
            want = pm.eval()(input_ids=torch.tensor([prompt + decode])).logits[0].float()
            run = SingleSequence(model)
            got = torch.cat([run.step(prompt)] + [run.step([t]) for t in decode])
        assert max_rel_err(got, want) <= 1e-4
    finally:
        runner.shutdown()
