"""Gemma 3n's text decoder against transformers' ``Gemma3nForCausalLM`` (tiny, every parameter
perturbed): prefill, cached decode and chunked-prefill logits, greedy tokens, a batch equal to
each sequence alone; the KV-shared layers keep no cache, write nothing and read their source
layer's blocks; a released config reads like transformers reads it."""
import json

import pytest
import torch

from mistralrs_core.engine.model_runner import build_metadata
from mistralrs_core.layers.recurrent import make_layer_cache
from mistralrs_core.testing.parity import SingleSequence, check_batched_equals_alone, max_rel_err, random_prompt

transformers = pytest.importorskip("transformers")

from tiny_gemma3n import make_text_reference  # noqa: E402

TOL = 1e-4
VOCAB, PER_LAYER_VOCAB = 300, 280     # ids 280..299 lie outside the per-layer table


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    from safetensors.torch import load_file

    from mistralrs_arch_vision.gemma3n_text import Gemma3nTextLM
    ref = make_text_reference(VOCAB, PER_LAYER_VOCAB)
    out = tmp_path_factory.mktemp("gemma3n_text")
    ref.save_pretrained(out, safe_serialization=True)
    model = Gemma3nTextLM.from_hf_config(json.loads((out / "config.json").read_text()))
    model.load_weights(iter(load_file(str(out / "model.safetensors")).items()))
    return model.eval(), ref


@torch.inference_mode()
def ref_logits(ref, ids):
    return ref(input_ids=torch.tensor([ids])).logits[0].float()


def test_prefill_decode_and_chunked_prefill_match_reference(pair):
    model, ref = pair
    ids = random_prompt(23, VOCAB, seed=3)
    assert any(i >= PER_LAYER_VOCAB for i in ids)
    want = ref_logits(ref, ids)
    run = SingleSequence(model)
    worst = max_rel_err(run.step(ids), want)
    seq = list(ids)
    for i in range(5):
        seq.append((seq[-1] * 7 + 3 + i) % VOCAB)
        worst = max(worst, max_rel_err(run.step(seq[-1:])[-1], ref_logits(ref, seq)[-1]))
    assert worst <= TOL, f"prefill/decode: {worst:.2e}"
    # Chunks of 7, 8 and 8 tokens: later chunks read earlier K/V (the shared layers their
    # source layer's) through the paged cache, past the sliding window of 6.
    run = SingleSequence(model)
    chunks = [run.step(ids[:7]), run.step(ids[7:15]), run.step(ids[15:])]
    assert max_rel_err(torch.cat(chunks), want) <= TOL


def test_greedy_32_tokens_match_reference(pair):
    model, ref = pair
    prompt = random_prompt(9, VOCAB, seed=4)
    run, ours = SingleSequence(model, num_blocks=16), []
    logits = run.step(prompt)[-1]
    for _ in range(32):
        ours.append(int(logits.argmax()))
        logits = run.step(ours[-1:])[-1]
    seq, theirs = list(prompt), []
    for _ in range(32):
        theirs.append(int(ref_logits(ref, seq)[-1].argmax()))
        seq.append(theirs[-1])
    assert ours == theirs


def test_batched_equals_alone(pair):
    model, _ = pair
    prompts = [random_prompt(n, VOCAB, seed=n) for n in (13, 5, 9)]
    assert check_batched_equals_alone(model, prompts, decode_steps=3) <= 1e-5


def test_kv_shared_layers_keep_no_cache_and_read_their_source(pair):
    model, _ = pair
    c = model.cfg
    assert c.kv_source == [0, 1, 2, 3, 2, 3]            # transformers: [.., store, store, reuse, reuse]
    specs = model.kv_cache_specs()
    assert [s is None for s in specs] == [False] * 4 + [True] * 2
    assert not hasattr(model.model.layers[4].self_attn, "k_proj")
    ids = random_prompt(10, VOCAB, seed=6)
    caches = [make_layer_cache(s, 8, 4, model.dtype, "cpu") for s in specs]
    with torch.inference_mode():
        _, pos, meta = build_metadata([(ids[:6], 0, list(range(8)))], 4, "cpu")
        model(torch.tensor(ids[:6]), pos, meta, caches)
        _, pos, meta = build_metadata([(ids[6:], 6, list(range(8)))], 4, "cpu")
        before = model.compute_logits(model(torch.tensor(ids[6:]), pos, meta, caches))
        # The next step reads layer 3's blocks (layers 3 and 5); spoil only the prefix part of
        # them: layer 5's attention moves, so it reads them. (Layer 3 rewrites its own new rows.)
        snapshot = caches[3].k.clone()
        caches[3].k[:1].mul_(3.0)
        _, pos, meta = build_metadata([(ids[6:], 6, list(range(8)))], 4, "cpu")
        spoiled = model.compute_logits(model(torch.tensor(ids[6:]), pos, meta, caches))
    assert max_rel_err(spoiled, before) > 1e-3
    caches[3].k.copy_(snapshot)


# gemma-3n-E2B-it's text_config (the keys that shape the model).
E2B_TEXT = {
    "activation_sparsity_pattern": [0.95] * 10 + [0.0] * 20, "altup_active_idx": 0, "altup_coef_clip": 120.0,
    "altup_correct_scale": True, "altup_num_inputs": 4, "attention_bias": False, "final_logit_softcapping": 30.0,
    "head_dim": 256, "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 2048,
    "hidden_size_per_layer_input": 256, "intermediate_size": [8192] * 30, "laurel_rank": 64,
    "layer_types": (["sliding_attention"] * 4 + ["full_attention"]) * 6, "max_position_embeddings": 32768,
    "model_type": "gemma3n_text", "num_attention_heads": 8, "num_hidden_layers": 30, "num_key_value_heads": 2,
    "num_kv_shared_layers": 10, "rms_norm_eps": 1e-06, "rope_local_base_freq": 10000.0, "rope_scaling": None,
    "rope_theta": 1000000.0, "sliding_window": 512, "vocab_size": 262400, "vocab_size_per_layer_input": 262144,
}


def test_released_config_reads_like_transformers():
    from mistralrs_arch_vision.gemma3n_text import gemma3n_text_config
    c = gemma3n_text_config(E2B_TEXT)
    tc = transformers.Gemma3nTextConfig(**E2B_TEXT)
    modes = tc.kv_sharing_modes
    first = modes.index("reuse")
    for i, m in enumerate(modes):
        if m == "reuse":
            src = c.kv_source[i]
            assert src < first and tc.layer_types[src] == tc.layer_types[i] and modes[src] == "store"
        else:
            assert c.kv_source[i] == i
    assert c.intermediate_sizes == tc.intermediate_size and c.activation_sparsity == tc.activation_sparsity_pattern
    assert (c.rope.theta, c.local_rope.theta) == (tc.rope_parameters["full_attention"]["rope_theta"],
                                                  tc.rope_parameters["sliding_attention"]["rope_theta"])
    assert c.sliding_window == tc.sliding_window and c.final_softcap == 30.0 and c.attn_scale == 1.0
    assert c.embed_scale == 2048 ** 0.5 and c.tie_word_embeddings and c.norm_offset == 0.0
    assert (c.per_layer_vocab, c.per_layer_dim, c.altup_num_inputs, c.laurel_rank) == (262144, 256, 4, 64)


def test_explicit_nulls():
    """Null layer types / sparsity take transformers' derived defaults; a null soft-cap or
    coefficient bound (refused by transformers' strict config, skipped by its modeling code)
    means none, never the default."""
    from mistralrs_arch_vision.gemma3n_text import gemma3n_text_config
    nulls = {**E2B_TEXT, "layer_types": None, "activation_sparsity_pattern": None}
    c, tc = gemma3n_text_config(nulls), transformers.Gemma3nTextConfig(**nulls)
    assert c.layer_types == tc.layer_types and c.activation_sparsity == tc.activation_sparsity_pattern
    c = gemma3n_text_config({**E2B_TEXT, "final_logit_softcapping": None, "altup_coef_clip": None})
    assert c.final_softcap is None and c.altup_coef_clip is None


@pytest.mark.parametrize("change, field", [
    ({"num_kv_shared_layers": 30}, "num_kv_shared_layers"),
    ({"activation_sparsity_pattern": [0.5] * 3}, "activation_sparsity_pattern"),
    ({"intermediate_size": [8192] * 29}, "intermediate_size"),
    ({"altup_active_idx": 4}, "altup_active_idx"),
    ({"layer_types": ["full_attention"] * 29 + ["sliding_attention"]}, "num_kv_shared_layers"),
])
def test_bad_configs_are_refused(change, field):
    from mistralrs_arch_vision.gemma3n_text import gemma3n_text_config
    with pytest.raises(ValueError, match=field):
        gemma3n_text_config({**E2B_TEXT, **change})


def test_altup_coefficients_are_bounded_by_the_clip(tmp_path):
    """``altup_coef_clip`` bounds AltUp's prediction / correction coefficient maps (applied once
    at load; transformers clamps them only while training, and trained weights lie inside)."""
    from safetensors.torch import load_file

    from mistralrs_arch_vision.gemma3n_text import Gemma3nTextLM
    ref = make_text_reference(VOCAB, PER_LAYER_VOCAB)
    ref.save_pretrained(tmp_path, safe_serialization=True)
    hf = json.loads((tmp_path / "config.json").read_text())
    model = Gemma3nTextLM.from_hf_config({**hf, "altup_coef_clip": 0.05})
    model.load_weights(iter(load_file(str(tmp_path / "model.safetensors")).items()))
    for i, layer in enumerate(model.model.layers):
        for name in ("prediction_coefs", "correction_coefs"):
            ours = getattr(layer.altup, name).weight
            theirs = getattr(ref.model.layers[i].altup, name).weight
            assert torch.equal(ours, theirs.clamp(-0.05, 0.05)) and not torch.equal(ours, theirs)
