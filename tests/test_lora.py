"""LoRA adapters against peft (the math reference) on a tiny random Llama.

Two adapters: ``a`` (q/v/gate/down by name, alpha/r, a per-module rank/alpha override) and
``b`` (k/o/up by regex, rsLoRA); checked alone, summed as an ordering file activates them,
merged into the weights, and mixed in one batch with a request that uses none.
"""
import copy
import json

import pytest
import torch
import transformers

from mistralrs import ChatCompletionRequest, CompletionRequest, Runner, Which
from mistralrs_core.adapters.loader import attach_lora
from mistralrs_core.engine.model_runner import build_metadata
from mistralrs_core.engine.step import StepRecord
from mistralrs_core.layers.recurrent import make_layer_cache
from mistralrs_core.testing.parity import SingleSequence, load_for_test, max_rel_err, perturb_parameters, \
    random_prompt, save_reference
from mistralrs_core.testing.tiny import write_tiny_tokenizer, tokenizer_vocab_size

peft = pytest.importorskip("peft")

TOL = 1e-4


def _peft_adapter(base, out, **cfg):
    """A random-valued PEFT adapter (both A and B non-zero) saved to ``out``."""
    torch.manual_seed(len(out.name))
    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(init_lora_weights=False, **cfg))
    perturb_parameters(model, seed=len(out.name), scale=0.02)
    model.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("lora")
    base_dir = d / "base"
    base_dir.mkdir()
    write_tiny_tokenizer(base_dir)
    vocab = tokenizer_vocab_size(base_dir)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    ref = transformers.LlamaForCausalLM(cfg).eval()
    perturb_parameters(ref)
    save_reference(ref, base_dir)
    adapters = d / "adapters"
    _peft_adapter(ref, adapters / "a", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"],
                  rank_pattern={"down_proj": 2}, alpha_pattern={"v_proj": 3})
    _peft_adapter(ref, adapters / "b", r=8, lora_alpha=16, use_rslora=True,
                  target_modules=r".*\.(k_proj|o_proj|up_proj)")
    # LoRA on the LM head, and a whole MLP projection saved per adapter (modules_to_save).
    _peft_adapter(ref, adapters / "c", r=4, lora_alpha=4, target_modules=["lm_head", "q_proj"],
                  modules_to_save=["down_proj"])
    return ref, base_dir, adapters, vocab


def _peft_model(ref, adapters, names):
    model = peft.PeftModel.from_pretrained(copy.deepcopy(ref), str(adapters / names[0]), adapter_name=names[0])
    for n in names[1:]:
        model.load_adapter(str(adapters / n), adapter_name=n)
    model.base_model.set_adapter(list(names))
    return model.eval()


@torch.inference_mode()
def _ref_logits(model, ids):
    return model(input_ids=torch.tensor([ids])).logits[0].float()


def _ours(base_dir, adapters, names, default, merge=False):
    model = load_for_test(base_dir)
    attach_lora(model, [(n, adapters / n) for n in names], default, merge=merge)
    return model


def _run(model, prompt, decode):
    run = SingleSequence(model)
    out = [run.step(prompt)]
    for t in decode:
        out.append(run.step([t]))
    return torch.cat(out)


@pytest.mark.parametrize("active,merge", [(["a"], False), (["b"], False), (["a", "b"], False), (["a"], True),
                                          (["c"], False), (["c"], True)])
def test_lora_matches_peft(tiny, active, merge):
    ref, base_dir, adapters, vocab = tiny
    prompt = random_prompt(9, vocab, seed=1)
    decode = [5, 17, 33]
    want = _ref_logits(_peft_model(ref, adapters, active), prompt + decode)
    ours = _ours(base_dir, adapters, active, active, merge=merge)
    assert ours.adapters.merged is merge
    got = _run(ours, prompt, decode)
    base = _run(load_for_test(base_dir), prompt, decode)
    assert max_rel_err(base, want) > 1e-2            # the adapters really change the logits
    assert max_rel_err(got, want) <= TOL


def test_unmerged_single_adapter_on_the_fused_layers(tiny):
    """q/k/v and gate/up are fused after load: each part's update lands on its own rows."""
    _, base_dir, adapters, _ = tiny
    model = _ours(base_dir, adapters, ["a"], ["a"])
    fused = model.model.layers[0].self_attn._qkv_runtime
    pieces = fused.lora.by_adapter[0]
    assert sorted((p.rows.start, p.rows.stop) for p in pieces) == [(0, 64), (96, 128)]   # q and v


@torch.inference_mode()
def _batched(model, seqs, block_size=4):
    """seqs: (prompt, adapter id); one prefill step for all, then one decode step each."""
    caches = [make_layer_cache(s, 16 * len(seqs), block_size, model.dtype, "cpu") for s in model.kv_cache_specs()]
    blocks = [list(range(i * 16, i * 16 + 16)) for i in range(len(seqs))]
    recs = [StepRecord(i, p, 0, blocks[i], adapter_id=a) for i, (p, a) in enumerate(seqs)]
    ids, pos, meta = build_metadata(recs, block_size, "cpu")
    hidden = model(ids, pos, meta, caches)
    ends = torch.tensor(meta.query_lens).cumsum(0) - 1
    first = model.compute_logits(hidden[ends])
    recs = [StepRecord(i, [p[0]], len(p), blocks[i], adapter_id=a) for i, (p, a) in enumerate(seqs)]
    ids, pos, meta = build_metadata(recs, block_size, "cpu")
    second = model.compute_logits(model(ids, pos, meta, caches))
    return first, second


def test_batch_with_two_adapters_and_none_equals_each_alone(tiny):
    _, base_dir, adapters, vocab = tiny
    model = _ours(base_dir, adapters, ["a", "b", "c"], default=[])
    seqs = [(random_prompt(7, vocab, seed=2), "a"), (random_prompt(5, vocab, seed=3), None),
            (random_prompt(9, vocab, seed=4), "b"), (random_prompt(6, vocab, seed=5), "a"),
            (random_prompt(4, vocab, seed=6), "c")]
    together = _batched(model, seqs)
    for i, s in enumerate(seqs):
        alone = _batched(model, [s])
        for t, a in zip(together, alone):
            assert max_rel_err(t[i:i + 1], a) <= 1e-5
    # The unadapted request equals the base model.
    base = _batched(load_for_test(base_dir), [seqs[1]])
    assert max_rel_err(_batched(model, [seqs[1]])[0], base[0]) <= 1e-6


# --- through the Runner ------------------------------------------------------------------
def _ordering(path, **kw):
    path.write_text(json.dumps(kw))
    return str(path)


def test_runner_per_request_adapters_batch_together(tiny, tmp_path):
    _, base_dir, adapters, _ = tiny
    order = _ordering(tmp_path / "order.json", order=[], base_model_id=str(base_dir),
                      preload_adapters=[{"name": "a", "adapter_model_id": str(adapters)},
                                        {"name": "b", "adapter_model_id": str(adapters / "b")}])
    runner = Runner(which=Which.Lora(model_id=str(base_dir), adapter_model_id=str(adapters), order=order))
    try:
        def req(adapter=None):
            return CompletionRequest(prompt="def main", max_tokens=12, temperature=0.0, adapter=adapter)
        alone = {a: runner.send_completion_request(req(a)).choices[0].text for a in (None, "a", "b")}
        assert len(set(alone.values())) == 3       # the adapters change the greedy text
        import concurrent.futures as cf
        with cf.ThreadPoolExecutor(6) as ex:
            futs = {ex.submit(runner.send_completion_request, req(a)): a for a in (None, "a", "b") * 2}
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


# --- bad input -----------------------------------------------------------------------------
def test_adapter_for_a_different_base_is_refused(tiny, tmp_path):
    _, base_dir, _, _ = tiny
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    other = transformers.LlamaForCausalLM(cfg).eval()
    _peft_adapter(other, tmp_path / "wrong", r=4, lora_alpha=8, target_modules=["q_proj"])
    with pytest.raises(ValueError, match=r"q_proj: lora_A \[4, 32\].*different base model"):
        _ours(base_dir, tmp_path, ["wrong"], ["wrong"])


def test_missing_ordering_file_is_refused(tiny, tmp_path):
    _, base_dir, adapters, _ = tiny
    with pytest.raises(FileNotFoundError, match=r"^order: .*nope.json: ordering file not found"):
        Runner(which=Which.Lora(model_id=str(base_dir), adapter_model_id=str(adapters),
                                order=str(tmp_path / "nope.json")))
    with pytest.raises(FileNotFoundError, match=r"order: .*ordering file not found"):
        Runner(which=Which.XLora(model_id=str(base_dir), xlora_model_id=str(adapters),
                                 order=str(tmp_path / "nope.json")))


def test_unknown_target_module_is_refused(tiny, tmp_path):
    _, base_dir, adapters, _ = tiny
    bad = tmp_path / "bad"
    bad.mkdir()
    cfg = json.loads((adapters / "a" / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps({**cfg, "target_modules": ["q_proj", "qkv_magic"]}))
    (bad / "adapter_model.safetensors").write_bytes((adapters / "a" / "adapter_model.safetensors").read_bytes())
    with pytest.raises(ValueError, match=r"target_modules: 'qkv_magic' matches no linear layer"):
        _ours(base_dir, tmp_path, ["bad"], ["bad"])
    # A tensor for a module the base does not have.
    from safetensors.torch import save_file
    save_file({"base_model.model.model.layers.0.mlp.nope_proj.lora_A.weight": torch.zeros(4, 64),
               "base_model.model.model.layers.0.mlp.nope_proj.lora_B.weight": torch.zeros(64, 4)},
              str(bad / "adapter_model.safetensors"))
    (bad / "adapter_config.json").write_text(json.dumps({**cfg, "target_modules": ["q_proj"]}))
    with pytest.raises(ValueError, match=r"target module 'model.layers.0.mlp.nope_proj' is not a linear layer"):
        _ours(base_dir, tmp_path, ["bad"], ["bad"])


def test_ordering_naming_a_missing_adapter_is_refused(tiny, tmp_path):
    _, base_dir, adapters, _ = tiny
    order = _ordering(tmp_path / "o.json", order=["a", "zzz"])
    with pytest.raises(FileNotFoundError, match=r"adapter 'zzz': no .*zzz/adapter_config.json"):
        Runner(which=Which.Lora(model_id=str(base_dir), adapter_model_id=str(adapters), order=order))


def test_lora_on_a_quantized_method_base_is_not_merged(tiny):
    """A base whose layers hold a quant method (ISQ, UQFF) keeps it; LoRA adds its path after."""
    from mistralrs_core.layers.linear import Linear, UnquantizedMethod
    ref, base_dir, adapters, vocab = tiny
    model = load_for_test(base_dir)
    for m in model.modules():
        if isinstance(m, Linear) and m.weight is not None:
            m.set_quant_method(UnquantizedMethod(m.weight.detach().clone()))
    rt = attach_lora(model, [("a", adapters / "a")], ["a"])
    assert not rt.merged
    prompt = random_prompt(6, vocab, seed=7)
    assert max_rel_err(_run(model, prompt, [3]), _ref_logits(_peft_model(ref, adapters, ["a"]), prompt + [3])) <= TOL


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
