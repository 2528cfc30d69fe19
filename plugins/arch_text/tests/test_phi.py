"""Parity of Phi-2 and Phi-3 against transformers, including Phi-3's LongRoPE past the
original context."""
import pytest
import torch
import transformers

from mistralrs_core.testing.parity import check_family, random_prompt

COVERS = ["Phi2", "Phi3"]
VOCAB = 256
TOL = 1e-4
TINY = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
            pad_token_id=0, bos_token_id=1, eos_token_id=2)


@pytest.mark.parametrize("qk_layernorm", [False, True])
def test_phi2(tmp_path, qk_layernorm):
    torch.manual_seed(0)
    cfg = transformers.PhiConfig(**TINY, partial_rotary_factor=0.5, qk_layernorm=qk_layernorm)
    ref = transformers.PhiForCausalLM(cfg)
    prompts = [random_prompt(6, VOCAB, 1), random_prompt(19, VOCAB, 2)]
    model, err = check_family(ref, tmp_path, "Phi2", prompts)
    assert model.rope.rotary_dim == 8
    print(f"Phi2 qk_layernorm={qk_layernorm}: max rel err {err:.2e}")
    assert err <= TOL


def test_phi3_sliding_window(tmp_path):
    torch.manual_seed(0)
    ref = transformers.Phi3ForCausalLM(transformers.Phi3Config(**TINY, sliding_window=8))
    prompts = [random_prompt(6, VOCAB, 3), random_prompt(21, VOCAB, 4)]
    _, err = check_family(ref, tmp_path, "Phi3", prompts)
    print(f"Phi3 sliding_window=8: max rel err {err:.2e}")
    assert err <= TOL


@pytest.mark.parametrize("partial", [1.0, 0.5])
def test_phi3_longrope(tmp_path, partial):
    rotary_half = int(16 * partial) // 2
    scaling = {"rope_type": "longrope",
               "short_factor": [1.0 + 0.1 * i for i in range(rotary_half)],
               "long_factor": [1.0 + 0.7 * i for i in range(rotary_half)]}
    cfg = transformers.Phi3Config(**{**TINY, "max_position_embeddings": 64}, original_max_position_embeddings=16,
                                  rope_parameters={"rope_theta": 10000.0, "partial_rotary_factor": partial,
                                                   **scaling})
    torch.manual_seed(0)
    ref = transformers.Phi3ForCausalLM(cfg)
    # Short prompts stay on the short factors; the 24-token prompt (> 16) runs on the long ones
    # from its prefill on; the greedy run starts short and crosses 16 while decoding.
    prompts = [random_prompt(6, VOCAB, 5), random_prompt(24, VOCAB, 6)]
    model, err = check_family(ref, tmp_path, "Phi3", prompts, greedy_prompt=random_prompt(9, VOCAB, 7))
    assert model.rope.cfg.rope_type == "longrope"
    assert model.rope.scaling != 1.0
    print(f"Phi3 longrope partial={partial}: max rel err {err:.2e}")
    assert err <= TOL
