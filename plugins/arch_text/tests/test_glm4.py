"""Parity of GLM-4 against transformers (post-attention/post-MLP norms, interleaved
partial rotary, fused gate_up)."""
import pytest
import torch
import transformers

from mistralrs_core.testing.parity import check_family, random_prompt

COVERS = ["GLM4"]
VOCAB = 256
TOL = 1e-4
TINY = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=128,
            pad_token_id=0, eos_token_id=1)


@pytest.mark.parametrize("attention_bias", [True, False])
def test_glm4(tmp_path, attention_bias):
    torch.manual_seed(0)
    ref = transformers.Glm4ForCausalLM(transformers.Glm4Config(**TINY, attention_bias=attention_bias))
    prompts = [random_prompt(6, VOCAB, 1), random_prompt(19, VOCAB, 2)]
    model, err = check_family(ref, tmp_path, "GLM4", prompts)
    assert model.cfg.rope_interleaved and model.rope.rotary_dim == 8
    print(f"GLM4 attention_bias={attention_bias}: max rel err {err:.2e}")
    assert err <= TOL
