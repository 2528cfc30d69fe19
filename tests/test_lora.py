"""LoRA adapters against peft (the math reference) on a tiny random Llama.

Three adapters (``lora_testing.make_tiny``): ``a`` (q/v/gate/down by name, alpha/r, per-module
rank/alpha overrides), ``b`` (k/o/up by regex, rsLoRA) and ``c`` (the LM head, and ``down_proj``
saved whole); checked alone, summed as an ordering file activates them, merged into the
weights, and mixed in one batch with a request that uses none.
"""
import copy
import json

import pytest
import torch
import transformers

from lora_testing import make_tiny, ordering, ours, peft_adapter
from mistralrs import Runner, Which
from mistralrs_core.adapters.loader import attach_lora
from mistralrs_core.engine.model_runner import build_metadata
from mistralrs_core.engine.step import StepRecord
from mistralrs_core.layers.recurrent import make_layer_cache
from mistralrs_core.testing.parity import SingleSequence, load_for_test, max_rel_err, random_prompt

peft = pytest.importorskip("peft")

TOL = 1e-4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("lora"))


def _peft_model(ref, adapters, names):
    model = peft.PeftModel.from_pretrained(copy.deepcopy(ref), str(adapters / names[0]), adapter_name=names[0])
    for n in names[1:]:
        model.load_adapter(str(adapters / n), adapter_name=n)
    model.base_model.set_adapter(list(names))
    return model.eval()


@torch.inference_mode()
def _ref_logits(model, ids):
    return model(input_ids=torch.tensor([ids])).logits[0].float()


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
    model = ours(base_dir, adapters, active, active, merge=merge)
    assert model.adapters.merged is merge
    got = _run(model, prompt, decode)
    base = _run(load_for_test(base_dir), prompt, decode)
    assert max_rel_err(base, want) > 1e-2            # the adapters really change the logits
    assert max_rel_err(got, want) <= TOL


def test_unmerged_single_adapter_on_the_fused_layers(tiny):
    """q/k/v and gate/up are fused after load: each part's update lands on its own rows."""
    _, base_dir, adapters, _ = tiny
    model = ours(base_dir, adapters, ["a"], ["a"])
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
    model = ours(base_dir, adapters, ["a", "b", "c"], default=[])
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



# --- bad input -----------------------------------------------------------------------------
def test_adapter_for_a_different_base_is_refused(tiny, tmp_path):
    _, base_dir, _, _ = tiny
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    other = transformers.LlamaForCausalLM(cfg).eval()
    peft_adapter(other, tmp_path / "wrong", r=4, lora_alpha=8, target_modules=["q_proj"])
    with pytest.raises(ValueError, match=r"q_proj: lora_A \[4, 32\].*different base model"):
        ours(base_dir, tmp_path, ["wrong"], ["wrong"])


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
        ours(base_dir, tmp_path, ["bad"], ["bad"])
    # A tensor for a module the base does not have.
    from safetensors.torch import save_file
    save_file({"base_model.model.model.layers.0.mlp.nope_proj.lora_A.weight": torch.zeros(4, 64),
               "base_model.model.model.layers.0.mlp.nope_proj.lora_B.weight": torch.zeros(64, 4)},
              str(bad / "adapter_model.safetensors"))
    (bad / "adapter_config.json").write_text(json.dumps({**cfg, "target_modules": ["q_proj"]}))
    with pytest.raises(ValueError, match=r"target module 'model.layers.0.mlp.nope_proj' is not a linear layer"):
        ours(base_dir, tmp_path, ["bad"], ["bad"])


def test_ordering_naming_a_missing_adapter_is_refused(tiny, tmp_path):
    _, base_dir, adapters, _ = tiny
    order = ordering(tmp_path / "o.json", order=["a", "zzz"])
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




@torch.inference_mode()
def test_lm_head_rows_follow_num_logits(tiny):
    """A mid-prompt chunk (no logits rows) next to a finished prompt: the LM head's adapter
    rows are the wanted rows only, as the model runner selects them."""
    _, base_dir, adapters, vocab = tiny
    model = ours(base_dir, adapters, ["a", "c"], default=[])
    p0, p1 = random_prompt(5, vocab, seed=8), random_prompt(4, vocab, seed=9)

    def logits(records):
        caches = [make_layer_cache(s, 32, 4, model.dtype, "cpu") for s in model.kv_cache_specs()]
        ids, pos, meta = build_metadata(records, 4, "cpu")
        hidden = model(ids, pos, meta, caches)
        rows, off = [], 0
        for r in records:
            off += r.num_tokens
            rows.extend(range(off - r.num_logits, off))
        return model.compute_logits(hidden[rows])

    both = logits([StepRecord(0, p0, 0, list(range(8)), adapter_id="a", num_logits=0),
                   StepRecord(1, p1, 0, list(range(8, 16)), adapter_id="c")])
    alone = logits([StepRecord(1, p1, 0, list(range(8, 16)), adapter_id="c")])
    assert both.shape[0] == 1 and max_rel_err(both, alone) <= 1e-5
