"""AnyMoE (mistralrs_core/anymoe): a tiny dense model whose MLPs become experts taken from two
models fine-tuned apart, a gate trained on prompts of two kinds, gate save/load, LoRA experts
against peft's merge, serving through the paged-KV engine, and bad configs."""
import csv
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from mistralrs import AnyMoeConfig, AnyMoeExpertType, ChatCompletionRequest, CompletionRequest, Runner, Which
from mistralrs_core.testing.parity import SingleSequence, load_for_test, max_rel_err
from mistralrs_core.testing.tiny import write_random_llama

DIGITS = ["1 2 3 4 5", "7 8 9 10 100", "0 1 0 1 1000", "3 5 7 9", "10 100 1000", "2 4 6 8",
          "9 8 7 6", "1000 100 10 1"]
WORDS = ["the fox jumps over the dog", "once upon a time", "the lazy dog", "a compiler loved borrowing",
         "tell me a story", "the quick brown fox", "what is the capital", "there was a compiler"]
HELD_OUT = {"5 6 7 8 9": 1, "100 3 4": 1, "the dog jumps over": 2, "once upon a fox": 2}
LAYERS = 3


def _copy_meta(src, dst):
    dst.mkdir(exist_ok=True)
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (dst / f).write_bytes((src / f).read_bytes())


def _fine_tuned(base, dst, seed):
    """A model "fine-tuned apart" from base: only its MLP weights moved, each its own way."""
    _copy_meta(base, dst)
    g = torch.Generator().manual_seed(seed)
    w = load_file(str(base / "model.safetensors"))
    save_file({k: v + 0.5 * v.std() * torch.randn(v.shape, generator=g) if ".mlp." in k else v
               for k, v in w.items()}, str(dst / "model.safetensors"))
    return dst


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("anymoe")
    base = write_random_llama(root / "base", hidden=64, layers=LAYERS, heads=4, kv_heads=2, intermediate=128)
    a, b = _fine_tuned(base, root / "a", 1), _fine_tuned(base, root / "b", 2)
    rows = [{"prompt": p, "expert": 1} for p in DIGITS] + [{"prompt": p, "expert": 2} for p in WORDS]
    (root / "ds.json").write_text(json.dumps({"rows": rows}))
    return {"root": root, "base": base, "a": a, "b": b, "ds": root / "ds.json"}


def _config(dirs, **kw):
    args = dict(hidden_size=64, dataset_json=str(dirs["ds"]), prefix="model.layers", mlp="mlp",
                model_ids=[str(dirs["a"]), str(dirs["b"])], expert_type=AnyMoeExpertType.FineTuned(),
                layers=[0, 2], lr=0.05, epochs=15, batch_size=4)
    args.update(kw)
    return AnyMoeConfig(**args)


def _runner(dirs, cfg, **kw):
    return Runner(which=Which.Plain(model_id=str(dirs["base"]), dtype="F32"), anymoe_config=cfg, seed=0, **kw)


@pytest.fixture(scope="module")
def trained(dirs):
    root = dirs["root"]
    cfg = _config(dirs, loss_csv_path=str(root / "loss.csv"), gate_model_id=str(root / "gate"))
    r = _runner(dirs, cfg)
    yield r
    r.shutdown()


def _logits(moe, model, ids, chunk=None):
    """Logits of a prompt through a SingleSequence cache (block size 4), fed whole or in
    chunks, with gate sums laid out for that cache."""
    seq = SingleSequence(model)
    with moe.routing.scratch(len(seq.blocks), seq.block_size):
        step = chunk or len(ids)
        return torch.cat([seq.step(ids[i:i + step]) for i in range(0, len(ids), step)])


def _forced_gate(path, layers, expert, experts=3, hidden=64):
    t = {}
    for n in layers:
        t[f"moe_gate.{n}.weight"] = torch.zeros(experts, hidden)
        t[f"moe_gate.{n}.bias"] = torch.zeros(experts)
        t[f"moe_gate.{n}.bias"][expert] = 50.0
    path.mkdir(parents=True, exist_ok=True)
    save_file(t, str(path / "gate.safetensors"))
    return path


# --- training -------------------------------------------------------------------------------
def test_training_lowers_the_loss_and_routes_held_out_prompts(trained, dirs):
    with open(dirs["root"] / "loss.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["Step", "Gating layer 0", "Gating layer 1"]
    steps = [[float(x) for x in r[1:]] for r in rows[1:]]
    assert len(steps) == 15 * 4 and rows[1][0] == "Step 0"        # 16 prompts / batch 4, 15 epochs
    first, last = steps[0], [sum(s[i] for s in steps[-4:]) / 4 for i in range(2)]
    for layer in range(2):
        assert last[layer] < 0.5 * first[layer], (first, last)
    moe = trained._pipeline(None).anymoe
    assert moe.layer_indices == [0, 2]
    for prompt, expert in HELD_OUT.items():
        assert trained.anymoe_routes(prompt) == {0: expert, 2: expert}, prompt
    # Only the gates ever learned; nothing keeps gradients afterwards.
    model = trained._pipeline(None).model
    assert not any(p.requires_grad for p in model.parameters())


def test_trained_model_serves_chat_through_the_engine(trained):
    req = ChatCompletionRequest(messages=[{"role": "user", "content": "1 2 3"}], max_tokens=12, temperature=0.0)
    first = trained.send_chat_completion_request(req)
    assert first.usage.completion_tokens > 0
    # The same prompt again hits the prefix cache; routing depends only on each token's prefix,
    # so the answer cannot change.
    again = trained.send_chat_completion_request(req)
    assert again.choices[0].message.content == first.choices[0].message.content
    # Batched with others (several sequences in one step, different experts) = alone.
    import concurrent.futures as cf
    prompts = ["5 6 7", "the dog jumps", "once upon", "100 200"]
    reqs = [CompletionRequest(prompt=p, model="default", max_tokens=10, temperature=0.0, ignore_eos=True)
            for p in prompts]
    alone = [trained.send_completion_request(r).choices[0].text for r in reqs]
    # anymoe_routes runs in the caller's thread on scratch sums while the engine serves.
    with cf.ThreadPoolExecutor(5) as ex:
        routes = ex.submit(lambda: [trained.anymoe_routes(p) for p in list(HELD_OUT) * 3])
        together = list(ex.map(lambda r: trained.send_completion_request(r).choices[0].text, reqs))
        assert routes.result() == [{0: e, 2: e} for e in list(HELD_OUT.values()) * 3]
    assert together == alone


def test_routing_is_independent_of_chunking(trained):
    """A prompt computed in one step or in chunks gives the same logits (the running mean
    reads the sum before each chunk from the pool)."""
    pipe = trained._pipeline(None)
    moe, model = pipe.anymoe, pipe.model
    ids = moe.prompt_ids("the quick brown fox 1 2 3 over the dog")
    whole = _logits(moe, model, ids)
    assert max_rel_err(_logits(moe, model, ids, chunk=5), whole) < 1e-5
    assert max_rel_err(_logits(moe, model, ids, chunk=1), whole) < 1e-5


# --- experts and gates ------------------------------------------------------------------------
def test_forced_gate_equals_the_expert_model_alone(dirs, tmp_path):
    """All layers routed to expert 1 must compute model A exactly (A differs from the base only
    in its MLPs); routed to 0, the base. Checks the experts' weights and the dispatch."""
    for expert, ref_dir in ((1, dirs["a"]), (0, dirs["base"])):
        gate = _forced_gate(tmp_path / f"g{expert}", range(LAYERS), expert)
        r = _runner(dirs, _config(dirs, layers=[], training=False, gate_model_id=str(gate)))
        try:
            moe = r._pipeline(None).anymoe
            assert moe.layer_indices == list(range(LAYERS))
            ids = moe.prompt_ids("the quick brown fox")
            got = _logits(moe, r._pipeline(None).model, ids)
            want = SingleSequence(load_for_test(ref_dir)).step(ids)
            assert max_rel_err(got, want) < 1e-5, expert
        finally:
            r.shutdown()


def test_gate_round_trips_through_gate_model_id(trained, dirs):
    saved = load_file(str(dirs["root"] / "gate" / "gate.safetensors"))
    assert sorted(saved) == ["moe_gate.0.bias", "moe_gate.0.weight", "moe_gate.2.bias", "moe_gate.2.weight"]
    assert saved["moe_gate.2.weight"].shape == (3, 64)
    r = _runner(dirs, _config(dirs, training=False, dataset_json="", gate_model_id=str(dirs["root"] / "gate")))
    try:
        moe, ref = r._pipeline(None).anymoe, trained._pipeline(None).anymoe
        for a, b in zip(moe.layers, ref.layers):
            assert torch.equal(a.moe_gate.weight, b.moe_gate.weight) and torch.equal(a.moe_gate.bias, b.moe_gate.bias)
        for prompt, expert in HELD_OUT.items():
            assert moe.route(prompt) == [expert, expert]
        req = CompletionRequest(prompt="5 6 7", model="default", max_tokens=8, temperature=0.0, ignore_eos=True)
        assert r.send_completion_request(req).choices[0].text == trained.send_completion_request(req).choices[0].text
        # A reload rebuilds the experts and reuses the gate without reading or training again.
        r.unload_model(r.get_default_model_id())
        assert r.send_completion_request(req).choices[0].text == trained.send_completion_request(req).choices[0].text
    finally:
        r.shutdown()


def test_lora_experts_match_peft_merge(dirs, tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import LlamaForCausalLM
    torch.manual_seed(0)
    base = LlamaForCausalLM.from_pretrained(str(dirs["base"]), torch_dtype=torch.float32)
    lcfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["gate_proj", "down_proj"], init_lora_weights=False)
    pm = peft.get_peft_model(base, lcfg)
    pm.save_pretrained(str(tmp_path / "adapter"))
    merged_dir = tmp_path / "merged"
    pm.merge_and_unload().save_pretrained(str(merged_dir), safe_serialization=True)
    gate = _forced_gate(tmp_path / "gate", [1], 1, experts=2)
    lora = AnyMoeExpertType.LoraAdapter(rank=4, alpha=8.0, target_modules=["gate_proj", "down_proj"])
    r = _runner(dirs, _config(dirs, model_ids=[str(tmp_path / "adapter")], expert_type=lora, layers=[1],
                              training=False, gate_model_id=str(gate)))
    try:
        moe = r._pipeline(None).anymoe
        ids = moe.prompt_ids("once upon a time")
        got = _logits(moe, r._pipeline(None).model, ids)
        # Reference: the base with only layer 1's MLP taken from peft's merged model.
        ref_w = load_file(str(dirs["base"] / "model.safetensors"))
        ref_w.update({k: v for k, v in load_file(str(merged_dir / "model.safetensors")).items()
                      if k.startswith("model.layers.1.mlp.")})
        ref_dir = tmp_path / "ref"
        _copy_meta(dirs["base"], ref_dir)
        save_file(ref_w, str(ref_dir / "model.safetensors"))
        want = SingleSequence(load_for_test(ref_dir)).step(ids)
        assert max_rel_err(got, want) < 1e-4
        base_logits = SingleSequence(load_for_test(dirs["base"])).step(ids)
        assert max_rel_err(base_logits, want) > 1e-3          # the adapter did change something
    finally:
        r.shutdown()


# --- bad configs ------------------------------------------------------------------------------
def _raises(dirs, field, **kw):
    with pytest.raises(ValueError, match=rf"^anymoe_config\.{field}"):
        _runner(dirs, _config(dirs, **kw))


def test_bad_configs_name_the_field(dirs, tmp_path):
    _raises(dirs, r"layers: layer 7 is out of range", layers=[0, 7])
    _raises(dirs, "dataset_json", dataset_json=str(tmp_path / "missing.json"))
    _raises(dirs, "hidden_size", hidden_size=32)
    _raises(dirs, "gate_model_id", training=False)
    _raises(dirs, "loss_csv_path", loss_csv_path=str(tmp_path / "loss.txt"))
    _raises(dirs, "lr", lr=0)
    _raises(dirs, r"prefix", prefix="model.blocks")
    bad_rows = tmp_path / "bad.json"
    bad_rows.write_text(json.dumps({"rows": [{"prompt": "x", "expert": 3}]}))
    _raises(dirs, r"dataset_json: rows\[0\]\.expert", dataset_json=str(bad_rows))
    # An expert model of another shape (intermediate 96 instead of 128).
    other = write_random_llama(tmp_path / "other", hidden=64, layers=LAYERS, heads=4, kv_heads=2, intermediate=96)
    _raises(dirs, r"model_ids\[1\].*shape", model_ids=[str(dirs["a"]), str(other)])
    _raises(dirs, r"model_ids\[0\]", model_ids=[str(tmp_path / "nowhere"), str(dirs["b"])])
    # A gate saved for other layers / another number of experts.
    _raises(dirs, "gate_model_id.*moe_gate.2", training=False,
            gate_model_id=str(_forced_gate(tmp_path / "g", [0], 1)))
    _raises(dirs, "gate_model_id.*shape", training=False, layers=[0],
            gate_model_id=str(_forced_gate(tmp_path / "g2", [0], 1, experts=2)))
    with pytest.raises(ValueError, match="^anymoe_config: expected an AnyMoeConfig"):
        _runner(dirs, "hidden_size=64")
    with pytest.raises(ValueError, match="^anymoe_config.dataset_json"):      # a dict lacking fields
        _runner(dirs, {"hidden_size": 64})
    with pytest.raises(ValueError, match="^anymoe_config.hidden_sise: not a field"):
        _runner(dirs, {"hidden_sise": 64})


def test_bad_lora_configs(dirs, tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    g = torch.Generator().manual_seed(0)
    save_file({"base_model.model.model.layers.0.mlp.up_proj.lora_A.weight": torch.randn(4, 64, generator=g),
               "base_model.model.model.layers.0.mlp.up_proj.lora_B.weight": torch.randn(128, 4, generator=g)},
              str(adapter / "adapter_model.safetensors"))
    gate = str(_forced_gate(tmp_path / "g", [0], 1, experts=2))

    def lora(**kw):
        args = dict(rank=4, alpha=8.0, target_modules=["up_proj"])
        args.update(kw)
        return AnyMoeExpertType.LoraAdapter(**args)

    common = dict(model_ids=[str(adapter)], layers=[0], training=False, gate_model_id=gate)
    _raises(dirs, "expert_type.rank", expert_type=lora(rank=8), **common)
    _raises(dirs, "expert_type.target_modules", expert_type=lora(target_modules=["q_proj"]), **common)
    _raises(dirs, r"model_ids\[0\].*down_proj", expert_type=lora(target_modules=["down_proj"]), **common)
    # It loads with the right settings.
    r = _runner(dirs, _config(dirs, expert_type=lora(), **common))
    r.shutdown()


def test_speculation_on_an_anymoe_model_keeps_its_output(trained, dirs):
    """Verified drafts roll the KV (and the gate sums beside it) back; the kept tokens must be
    what the AnyMoE model decodes alone."""
    cfg = _config(dirs, training=False, gate_model_id=str(dirs["root"] / "gate"))
    r = _runner(dirs, cfg, speculative_ngram=2, speculative_gamma=3)
    try:
        for prompt in ("1 2 3 1 2 3 1 2", "the dog the dog the"):
            req = CompletionRequest(prompt=prompt, model="default", max_tokens=24, temperature=0.0, ignore_eos=True)
            got = r.send_completion_request(req)
            assert got.choices[0].text == trained.send_completion_request(req).choices[0].text
    finally:
        r.shutdown()


def test_isq_base_gets_quantized_experts(dirs, tmp_path):
    from mistralrs_core import capabilities
    if not capabilities.available("isq"):
        pytest.skip("no ISQ plugin installed")
    gate = _forced_gate(tmp_path / "g", [0, 2], 1)
    r = _runner(dirs, _config(dirs, training=False, gate_model_id=str(gate)), in_situ_quant="Q8_0")
    try:
        moe = r._pipeline(None).anymoe
        for layer in moe.layers:
            expert = layer.experts[1]
            linears = [m for m in expert.modules() if hasattr(m, "qmethod")]
            assert linears and all(m.qmethod is not None for m in linears)
        req = CompletionRequest(prompt="1 2 3", model="default", max_tokens=6, temperature=0.0, ignore_eos=True)
        assert r.send_completion_request(req).usage.completion_tokens == 6
    finally:
        r.shutdown()


def test_routes_of_a_model_without_anymoe_are_refused(tiny_runner):
    with pytest.raises(ValueError, match="^model_id: .*anymoe_config"):
        tiny_runner.anymoe_routes("hello")


def test_serve_config_makes_one_model_an_anymoe_model(dirs, tmp_path):
    """A serve config's [[models]] entry may carry anymoe_config (upstream's TOML spellings of
    expert_type); the Runner's add_model takes it."""
    from mistralrs_core.server.loading import build_runner
    from mistralrs_core.server.spec import load_config
    cfg = {"models": [{"model_id": str(dirs["base"]), "name": "moe", "dtype": "F32", "anymoe_config": {
        "hidden_size": 64, "dataset_json": "", "prefix": "model.layers", "mlp": "mlp",
        "model_ids": [str(dirs["a"]), str(dirs["b"])], "expert_type": "fine_tuned", "layers": [0, 2],
        "training": False, "gate_model_id": str(dirs["root"] / "gate")}}]}
    path = tmp_path / "serve.json"
    path.write_text(json.dumps(cfg))
    runner = build_runner(*(lambda c: (c.models, c.runtime))(load_config(path)), progress=False)
    try:
        assert runner.anymoe_routes("5 6 7 8 9", model_id="moe") == {0: 1, 2: 1}
    finally:
        runner.shutdown()
    cfg["models"][0]["anymoe_config"]["expert_type"] = "lora"
    path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="^anymoe_config.expert_type"):
        build_runner(*(lambda c: (c.models, c.runtime))(load_config(path)), progress=False)


def test_no_kv_cache_recomputes_the_same_routes(trained, dirs):
    cfg = _config(dirs, training=False, gate_model_id=str(dirs["root"] / "gate"))
    r = _runner(dirs, cfg, no_kv_cache=True)
    try:
        req = CompletionRequest(prompt="the dog 1 2", model="default", max_tokens=10, temperature=0.0, ignore_eos=True)
        assert r.send_completion_request(req).choices[0].text == trained.send_completion_request(req).choices[0].text
    finally:
        r.shutdown()


def test_bf16_model_routes_and_serves(dirs):
    cfg = _config(dirs, training=False, gate_model_id=str(dirs["root"] / "gate"))
    r = Runner(which=Which.Plain(model_id=str(dirs["base"]), dtype="BF16"), anymoe_config=cfg, seed=0)
    try:
        layer = r._pipeline(None).anymoe.layers[0]
        assert layer.experts[1].down_proj.weight.dtype == torch.bfloat16
        assert layer.moe_gate.weight.dtype == torch.float32        # routing decided in float32
        assert r.anymoe_routes("5 6 7 8 9") == {0: 1, 2: 1}
        req = CompletionRequest(prompt="the dog 1 2", model="default", max_tokens=8, temperature=0.0, ignore_eos=True)
        assert r.send_completion_request(req).usage.completion_tokens == 8
    finally:
        r.shutdown()
