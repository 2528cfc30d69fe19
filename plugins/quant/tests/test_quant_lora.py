"""LoRA and X-LoRA on GGUF/GGML bases: the base stays packed (``GGMLQuantMethod``), the
adapters add their low-rank path per fused part's rows, and the result equals peft on the
file's dequantized weights (so only summation order differs, whatever the format's error).
The fused C++ decode step reads the base weights only: it must stand aside whenever an
adapter touches the step, and still serve the steps none does."""
import copy
import json

import pytest
import torch
import transformers

from gguf_convert import set_values, write_gguf, write_ggml
from mistralrs import CompletionRequest, Runner, Which
from mistralrs_core.adapters.loader import attach_lora
from mistralrs_core.testing.parity import SingleSequence, max_rel_err, perturb_parameters, random_prompt
from mistralrs_quant.gguf_loader import load_gguf_model
from mistralrs_quant.qlinear import GGMLQuantMethod

peft = pytest.importorskip("peft")

VOCAB = 288
TOL = 1e-4


def _adapter(base, out, seed, **cfg):
    torch.manual_seed(seed)
    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(init_lora_weights=False, **cfg))
    perturb_parameters(model, seed=seed, scale=0.05)
    model.save_pretrained(str(out))


@pytest.fixture(scope="module")
def q8(tmp_path_factory):
    d = tmp_path_factory.mktemp("lora_gguf")
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    ref = transformers.LlamaForCausalLM(cfg).eval()
    perturb_parameters(ref)
    set_values(ref, write_gguf(d / "m.gguf", "llama", ref, cfg, "Q8_0", tokenizer_size=VOCAB))
    _adapter(ref, d / "ad" / "a", 1, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"])
    _adapter(ref, d / "ad" / "b", 2, r=8, lora_alpha=16, use_rslora=True, target_modules=["k_proj", "up_proj", "o_proj"])
    return d, ref


@torch.inference_mode()
def _peft_logits(ref, adapters, names, ids):
    m = peft.PeftModel.from_pretrained(copy.deepcopy(ref), str(adapters / names[0]), adapter_name=names[0])
    for n in names[1:]:
        m.load_adapter(str(adapters / n), adapter_name=n)
    m.base_model.set_adapter(list(names))
    return m.eval()(input_ids=torch.tensor([ids])).logits[0].float()


def _run(model, prompt, decode):
    run = SingleSequence(model)
    return torch.cat([run.step(prompt)] + [run.step([t]) for t in decode])


@pytest.mark.parametrize("cpp", [True, False], ids=["cpp", "torch"])
@pytest.mark.parametrize("active", [["a"], ["a", "b"]])
def test_lora_on_q8_0_equals_lora_on_the_dequantized_base(q8, active, cpp, monkeypatch):
    d, ref = q8
    if not cpp:
        # Without the C++ kernels q/k/v and gate/up are fused into one packed matmul each.
        monkeypatch.setenv("MISTRALRS_QUANT_NO_CPP", "1")
    prompt, decode = random_prompt(9, VOCAB, seed=1), [5, 17, 33, 60]
    want = _peft_logits(ref, d / "ad", active, prompt + decode)
    model, _, _ = load_gguf_model([d / "m.gguf"], torch.float32)
    rt = attach_lora(model, [(n, d / "ad" / n) for n in active], active)
    assert not rt.merged      # a packed base is never merged
    attn = model.model.layers[0].self_attn
    qkv = attn._qkv_runtime if not cpp else attn.q_proj
    assert isinstance(qkv.qmethod, GGMLQuantMethod) and qkv.lora is not None
    if not cpp:
        assert sorted((p.rows.start, p.rows.stop) for p in qkv.lora.by_adapter[0]) == [(0, 64), (96, 128)]
    assert max_rel_err(_run(model, prompt, decode), want) <= TOL


def test_fused_step_declines_adapted_steps_only(q8):
    d, ref = q8
    model, _, _ = load_gguf_model([d / "m.gguf"], torch.float32)
    if model.fast_forward is None:
        pytest.skip("the fused C++ decode step is not available here")
    served = []
    fast = model.fast_forward
    model.fast_forward = lambda *a: served.append(1) or fast(*a)
    attach_lora(model, [("a", d / "ad" / "a")], default=[])
    prompt = random_prompt(6, VOCAB, seed=2)
    run = SingleSequence(model)
    run.step(prompt)
    run.step([3])
    assert served                                   # no adapter in the step: the fused step runs
    model.adapters.default = ((0, 1.0),)            # now every step is adapted
    served.clear()
    got = _run(model, prompt, [3, 4])
    assert not served
    want = _peft_logits(ref, d / "ad", ["a"], prompt + [3, 4])
    assert max_rel_err(got, want) <= TOL


def test_runner_lora_gguf_per_request(q8, tmp_path):
    d, _ = q8
    order = tmp_path / "order.json"
    order.write_text(json.dumps({"order": ["a"], "preload_adapters": [
        {"name": "b", "adapter_model_id": str(d / "ad" / "b")}]}))
    r = Runner(which=Which.LoraGGUF(quantized_model_id=str(d), quantized_filename="m.gguf",
                                    adapters_model_id=str(d / "ad"), order=str(order)))
    try:
        texts = {a: r.send_completion_request(CompletionRequest(prompt="hello", max_tokens=8, temperature=0.0,
                                                                adapter=a)).choices[0].text
                 for a in (None, "a", "b")}
        assert texts[None] == texts["a"]            # the ordering's default set is adapter a
        assert texts["b"] != texts["a"]
    finally:
        r.shutdown()


def test_runner_lora_ggml(tmp_path):
    from test_quant_ggml import GQA, PIECES, SCORES, V3_TYPES, tiny_llama
    cfg, ref = tiny_llama()
    set_values(ref, write_ggml(tmp_path / "t.bin", ref, cfg, PIECES, SCORES, V3_TYPES))
    _adapter(ref, tmp_path / "ad" / "a", 1, r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"])
    order = tmp_path / "order.json"
    order.write_text(json.dumps({"order": ["a"]}))
    r = Runner(which=Which.LoraGGML(quantized_model_id=str(tmp_path), quantized_filename="t.bin",
                                    adapters_model_id=str(tmp_path / "ad"), order=str(order), gqa=GQA))
    try:
        model = r._pipeline(None).model
        assert model.adapters.names == ["a"] and not model.adapters.merged
        prompt = random_prompt(5, len(PIECES), seed=3)
        want = _peft_logits(ref, tmp_path / "ad", ["a"], prompt)
        run = SingleSequence(model)
        assert max_rel_err(run.step(prompt), want) <= TOL
    finally:
        r.shutdown()


def test_xlora_on_q8_0_equals_peft_on_the_dequantized_base(q8, tmp_path):
    """The scaling pass (no adapters) may run on the fused C++ step, over its own cache."""
    from safetensors.torch import save_file

    from mistralrs_core.adapters.loader import attach_xlora
    from mistralrs_core.adapters.ordering import read_ordering
    d, ref = q8
    xcfg = dict(xlora_depth=2, xlora_size=16, layerwise_scalings=True)
    ref = copy.deepcopy(ref)
    ref.config.use_cache = False
    pm = peft.get_peft_model(ref, peft.XLoraConfig(task_type="CAUSAL_LM", hidden_size=64, adapters={
        "0": str(d / "ad" / "a"), "1": str(d / "ad" / "b")}, **xcfg)).eval()
    clf = pm.base_model.internal_xlora_classifier
    torch.manual_seed(3)
    with torch.no_grad():
        for p in clf.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    xl = tmp_path / "xl"
    xl.mkdir()
    for n in ("a", "b"):
        (xl / n).symlink_to(d / "ad" / n)
    save_file({f"internal_xlora_classifier.{k}": v.contiguous() for k, v in clf.state_dict().items()},
              str(xl / "xlora_classifier.safetensors"))
    (xl / "xlora_config.json").write_text(json.dumps({"hidden_size": 64, **xcfg}))
    layers = [n for n, m in pm.named_modules() if isinstance(m, peft.tuners.lora.Linear)]
    (tmp_path / "o.json").write_text(json.dumps({"order": ["a", "b"], "layers": {
        n[n.index("model.layers."):]: i for i, n in enumerate(layers)}}))
    prompt, decode = random_prompt(7, VOCAB, seed=4), [9, 21, 40]
    with torch.inference_mode():
        want = pm(input_ids=torch.tensor([prompt + decode])).logits[0].float()
    model, _, _ = load_gguf_model([d / "m.gguf"], torch.float32)
    served, fast = [], model.fast_forward
    if fast is not None:
        model.fast_forward = lambda *a: served.append(1) or fast(*a)
    attach_xlora(model, xl, read_ordering(str(tmp_path / "o.json")), None)
    assert max_rel_err(_run(model, prompt, decode), want) <= TOL
    if fast is not None:
        assert len(served) == 1 + len(decode)      # every scaling pass, never a scaled one
