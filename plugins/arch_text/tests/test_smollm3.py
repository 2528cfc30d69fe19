"""Parity of SmolLM3 (NoPE layers) against transformers."""
import pytest
import torch
import transformers

from mistralrs_core.testing.parity import check_family, random_prompt

COVERS = ["SmolLm3"]
VOCAB = 256
TOL = 1e-4
TINY = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
            pad_token_id=0, bos_token_id=1, eos_token_id=2)


@pytest.mark.parametrize("variant", ["interval", "explicit_sliding"])
def test_smollm3(tmp_path, variant):
    if variant == "interval":
        # Every 2nd layer skips rope: layers 0 and 2 rotate, layer 1 does not.
        over, use_rope = dict(no_rope_layer_interval=2), [1, 0, 1]
    else:
        # Explicit flags; the NoPE layers are the sliding ones.
        over = dict(no_rope_layers=[0, 1, 0], use_sliding_window=True, sliding_window=8, attention_bias=True)
        use_rope = [0, 1, 0]
    torch.manual_seed(0)
    ref = transformers.SmolLM3ForCausalLM(transformers.SmolLM3Config(**TINY, **over))
    prompts = [random_prompt(6, VOCAB, 1), random_prompt(21, VOCAB, 2)]
    model, err = check_family(ref, tmp_path, "SmolLm3", prompts)
    assert [int(layer.self_attn.use_rope) for layer in model.model.layers] == use_rope
    if variant != "interval":
        assert [layer.self_attn.sliding_window for layer in model.model.layers] == [8, None, 8]
    print(f"SmolLM3 {variant}: max rel err {err:.2e}")
    assert err <= TOL
