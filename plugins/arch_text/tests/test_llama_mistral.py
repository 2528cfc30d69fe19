"""Parity of Llama and Mistral against transformers: rope scalings, tied and untied
embeddings, biases, sliding windows and batching."""
import pytest
import torch
import transformers

from mistralrs_core.testing.parity import (check_batched_equals_alone, check_family, check_prefill_and_decode,
                                           perturb_parameters, random_prompt)

COVERS = ["Llama", "Mistral"]
VOCAB = 256
TOL = 1e-4
TINY = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)

ROPE_CASES = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 2.0},
    # max_position_embeddings 32: the greedy run crosses it and the frequencies regrow per step.
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
}


def llama(**overrides):
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**TINY, **overrides}))


@pytest.mark.parametrize("rope", ROPE_CASES)
def test_llama_rope_scaling(tmp_path, rope):
    scaling = ROPE_CASES[rope]
    over = {}
    if scaling is not None:
        over["rope_parameters"] = {"rope_theta": 10000.0, **scaling}
    if rope == "dynamic":
        over["max_position_embeddings"] = 32
    ref = llama(**over)
    prompts = [random_prompt(5, VOCAB, 1), random_prompt(19, VOCAB, 2)]
    model, err = check_family(ref, tmp_path, "Llama", prompts, greedy_prompt=random_prompt(20, VOCAB, 3))
    if rope == "dynamic":
        # A cached decode keeps keys roped with older frequencies while a full rerun does not,
        # so past the trained length only a prefill compares with a full reference run. The
        # reference keeps the largest length it has seen, hence a fresh copy of it.
        fresh = llama(**over)
        perturb_parameters(fresh)
        err = max(err, check_prefill_and_decode(fresh, model, random_prompt(40, VOCAB, 4), decode_steps=0))
    print(f"Llama rope={rope}: max rel err {err:.2e}")
    assert err <= TOL


@pytest.mark.parametrize("tied", [False, True])
def test_llama_embeddings(tmp_path, tied):
    ref = llama(tie_word_embeddings=tied)
    model, err = check_family(ref, tmp_path, "Llama", [random_prompt(11, VOCAB, 5)])
    assert model.cfg.tie_word_embeddings == tied
    print(f"Llama tied={tied}: max rel err {err:.2e}")
    assert err <= TOL


def test_llama_biases(tmp_path):
    ref = llama(attention_bias=True, mlp_bias=True)
    _, err = check_family(ref, tmp_path, "Llama", [random_prompt(13, VOCAB, 6)])
    print(f"Llama attention_bias: max rel err {err:.2e}")
    assert err <= TOL


def test_llama_batched_equals_alone(tmp_path):
    model, _ = check_family(llama(), tmp_path, "Llama", [random_prompt(7, VOCAB, 7)], greedy_tokens=4)
    prompts = [random_prompt(n, VOCAB, 10 + n) for n in (5, 17, 33)]
    err = check_batched_equals_alone(model, prompts)
    print(f"Llama batched vs alone: max rel err {err:.2e}")
    assert err <= 1e-5


def test_mistral_sliding_window(tmp_path):
    torch.manual_seed(0)
    ref = transformers.MistralForCausalLM(transformers.MistralConfig(**TINY, sliding_window=8))
    prompts = [random_prompt(5, VOCAB, 8), random_prompt(21, VOCAB, 9)]
    model, err = check_family(ref, tmp_path, "Mistral", prompts)
    assert model.model.layers[0].self_attn.sliding_window == 8
    print(f"Mistral sliding_window=8: max rel err {err:.2e}")
    assert err <= TOL
