"""Parity of Qwen2 and Qwen3 against transformers."""
import pytest
import torch
import transformers

from mistralrs_core.testing.parity import check_family, random_prompt

COVERS = ["Qwen2", "Qwen3"]
VOCAB = 256
TOL = 1e-4
TINY = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
# Layers 1 and 2 slide (max_window_layers=1), layer 0 attends fully.
SLIDING = dict(use_sliding_window=True, sliding_window=8, max_window_layers=1)


@pytest.mark.parametrize("sliding", [False, True])
def test_qwen2(tmp_path, sliding):
    torch.manual_seed(0)
    ref = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**TINY, **(SLIDING if sliding else {})))
    prompts = [random_prompt(6, VOCAB, 1), random_prompt(21, VOCAB, 2)]
    model, err = check_family(ref, tmp_path, "Qwen2", prompts)
    windows = [layer.self_attn.sliding_window for layer in model.model.layers]
    assert windows == ([None, 8, 8] if sliding else [None] * 3)
    print(f"Qwen2 sliding={sliding}: max rel err {err:.2e}")
    assert err <= TOL


@pytest.mark.parametrize("variant", ["plain", "bias_sliding_tied"])
def test_qwen3(tmp_path, variant):
    # head_dim 32 with hidden 64 and 4 heads: q/o are wider than the hidden size, as in Qwen3.
    over = dict(head_dim=32)
    if variant != "plain":
        over.update(SLIDING, attention_bias=True, tie_word_embeddings=True)
    torch.manual_seed(0)
    ref = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**TINY, **over))
    prompts = [random_prompt(6, VOCAB, 3), random_prompt(21, VOCAB, 4)]
    model, err = check_family(ref, tmp_path, "Qwen3", prompts)
    assert model.cfg.head_dim == 32
    print(f"Qwen3 {variant}: max rel err {err:.2e}")
    assert err <= TOL
