"""X-LoRA against peft's XLoraModel: classifier scalings and logits, two adapters.

peft runs the whole sequence twice without a cache (a scaling pass, then the scaled pass);
ours runs prefill + decode steps over the paged cache with the scaling pass on its own
cache, so equal logits at every position also show the two passes never share K/V.
"""
import copy
import json

import pytest
import torch
import transformers
from safetensors.torch import save_file

from mistralrs import CompletionRequest, Runner, Which
from mistralrs_core.adapters.loader import attach_xlora
from mistralrs_core.adapters.ordering import read_ordering
from mistralrs_core.testing.parity import SingleSequence, load_for_test, max_rel_err, perturb_parameters, \
    random_prompt, save_reference
from mistralrs_core.testing.tiny import tokenizer_vocab_size, write_tiny_tokenizer

peft = pytest.importorskip("peft")

TOL = 1e-4


def _adapter(base, out, seed, **cfg):
    torch.manual_seed(seed)
    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(init_lora_weights=False, **cfg))
    perturb_parameters(model, seed=seed, scale=0.05)
    model.save_pretrained(str(out))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    d = tmp_path_factory.mktemp("xlora")
    base_dir = d / "base"
    base_dir.mkdir()
    write_tiny_tokenizer(base_dir)
    vocab = tokenizer_vocab_size(base_dir)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   bos_token_id=1, eos_token_id=2, pad_token_id=0, use_cache=False)
    torch.manual_seed(0)
    ref = transformers.LlamaForCausalLM(cfg).eval()
    perturb_parameters(ref)
    save_reference(ref, base_dir)
    root = d / "xlora"
    _adapter(ref, root / "math", 1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    _adapter(ref, root / "code", 2, r=8, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "k_proj", "up_proj"])
    return ref, base_dir, root, vocab


def _xlora(ref, root, tmp_path, **xcfg):
    """peft's X-LoRA model, and the same classifier/config/ordering written as upstream reads them."""
    cfg = peft.XLoraConfig(task_type="CAUSAL_LM", hidden_size=64,
                           # peft names the loaded adapters "0", "1", ... and activates the keys: use those
                           adapters={"0": str(root / "math"), "1": str(root / "code")}, **xcfg)
    model = peft.get_peft_model(copy.deepcopy(ref), cfg).eval()
    xl = model.base_model
    torch.manual_seed(3)
    with torch.no_grad():
        for p in xl.internal_xlora_classifier.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    out = tmp_path / "xl"
    out.mkdir()
    for name in ("math", "code"):
        (out / name).symlink_to(root / name)
    save_file({f"internal_xlora_classifier.{k}": v.contiguous()
               for k, v in xl.internal_xlora_classifier.state_dict().items()}, str(out / "xlora_classifier.safetensors"))
    (out / "xlora_config.json").write_text(json.dumps({"hidden_size": 64, **xcfg}))
    layers, n = {}, 0
    for name, module in model.named_modules():
        if isinstance(module, peft.tuners.lora.Linear):
            layers[name[name.index("model.layers."):]] = n
            n += 1
    order = tmp_path / "ordering.json"
    order.write_text(json.dumps({"order": ["math", "code"], "layers": layers, "base_model_id": "tiny"}))
    return model, out, str(order)


@torch.inference_mode()
def _peft_run(model, ids):
    logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    return logits, model.base_model.get_latest_scalings()[0].float()


XCFGS = {
    "layerwise_depth2": dict(xlora_depth=2, xlora_size=16, layerwise_scalings=True, softmax_temperature=0.7,
                             global_scaling_weight=1.3),
    "global_topk": dict(xlora_depth=1, layerwise_scalings=False, top_k_lora=1, enable_softmax_topk=True,
                        enable_softmax=False),
}


@pytest.mark.parametrize("case", list(XCFGS))
def test_xlora_matches_peft(base, tmp_path, case):
    ref, base_dir, root, vocab = base
    pm, xdir, order = _xlora(ref, root, tmp_path, **XCFGS[case])
    prompt, decode = random_prompt(8, vocab, seed=4), [9, 21, 40]
    want, want_s = _peft_run(pm, prompt + decode)
    ours = load_for_test(base_dir)
    rt = attach_xlora(ours, xdir, read_ordering(order), None)
    run = SingleSequence(ours)
    got = [run.step(prompt)]
    scal = [rt.last_scalings]
    for t in decode:
        got.append(run.step([t]))
        scal.append(rt.last_scalings)
    got, scal = torch.cat(got), torch.cat(scal)
    assert scal.shape == want_s.shape == (11, 10, 2)   # q, k, v, up, down adapted in 2 layers
    assert max_rel_err(scal, want_s) <= TOL
    assert max_rel_err(got, want) <= TOL
    assert max_rel_err(_plain_logits(base_dir, prompt + decode), want) > 1e-2   # the adapters matter
    # The scaling pass's own cache holds the base model's V, the engine's the adapted V.
    shadow = rt.shadow_caches(run.caches)
    n = len(prompt) + len(decode)
    real_v = run.caches[-1].v.view(-1, *run.caches[-1].v.shape[2:])[:n]
    base_v = shadow[-1].v.view(-1, *shadow[-1].v.shape[2:])[:n]
    base_run = SingleSequence(load_for_test(base_dir))
    base_run.step(prompt + decode)
    plain_v = base_run.caches[-1].v.view(-1, *base_run.caches[-1].v.shape[2:])[:n]
    assert torch.allclose(base_v, plain_v, atol=1e-6)
    assert (real_v - base_v).abs().max() > 1e-4


def _plain_logits(base_dir, ids):
    run = SingleSequence(load_for_test(base_dir))
    return run.step(ids)


def test_tgt_non_granular_index_freezes_scalings(base, tmp_path, monkeypatch):
    ref, base_dir, root, vocab = base
    _, xdir, order = _xlora(ref, root, tmp_path, **XCFGS["layerwise_depth2"])
    model = load_for_test(base_dir)
    rt = attach_xlora(model, xdir, read_ordering(order), 2)
    run = SingleSequence(model)
    run.step(random_prompt(6, vocab, seed=5))          # prompt: token 1
    run.step([11])                                     # token 2, still granular
    granular = rt.last_scalings[-1].clone()
    calls = []
    inner = type(rt.classifier).__call__
    monkeypatch.setattr(type(rt.classifier), "__call__", lambda self, h: calls.append(1) or inner(self, h))
    for t in (12, 13):
        run.step([t])
        assert torch.equal(rt.last_scalings[0], granular)
    assert calls == []          # every sequence frozen: no scaling pass
    with pytest.raises(ValueError, match="^tgt_non_granular_index"):
        attach_xlora(load_for_test(base_dir), xdir, read_ordering(order), 0)


def test_xlora_through_the_runner(base, tmp_path):
    ref, base_dir, root, vocab = base
    _, xdir, order = _xlora(ref, root, tmp_path, **XCFGS["layerwise_depth2"])
    runner = Runner(which=Which.XLora(xlora_model_id=str(xdir), order=order, model_id=str(base_dir),
                                      tgt_non_granular_index=3))
    try:
        reqs = [CompletionRequest(prompt=p, max_tokens=8, temperature=0.0) for p in ("def f", "print(1)")]
        alone = [runner.send_completion_request(r).choices[0].text for r in reqs]
        import concurrent.futures as cf
        with cf.ThreadPoolExecutor(2) as ex:
            assert [f.result().choices[0].text for f in [ex.submit(runner.send_completion_request, r)
                                                          for r in reqs]] == alone
        with pytest.raises(ValueError, match="^adapter: an X-LoRA model"):
            runner.send_completion_request(CompletionRequest(prompt="x", max_tokens=2, adapter="math"))
    finally:
        runner.shutdown()


def test_xlora_ordering_without_layers_is_refused(base, tmp_path):
    ref, base_dir, root, vocab = base
    _, xdir, order = _xlora(ref, root, tmp_path, **XCFGS["layerwise_depth2"])
    bad = tmp_path / "nolayers.json"
    bad.write_text(json.dumps({"order": ["math", "code"]}))
    with pytest.raises(ValueError, match=r"layers: required for X-LoRA"):
        attach_xlora(load_for_test(base_dir), xdir, read_ordering(str(bad)), None)
