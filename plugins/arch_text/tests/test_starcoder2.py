"""Parity of Starcoder2 against transformers."""
import pytest
import torch
import transformers

from mistralrs_core.testing.parity import check_family, random_prompt

COVERS = ["Starcoder2"]
VOCAB = 256
TOL = 1e-4
TINY = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)


@pytest.mark.parametrize("variant", ["sliding_tied", "no_bias_untied"])
def test_starcoder2(tmp_path, variant):
    if variant == "sliding_tied":
        over = dict(sliding_window=8)
    else:
        over = dict(use_bias=False, tie_word_embeddings=False)
    torch.manual_seed(0)
    ref = transformers.Starcoder2ForCausalLM(transformers.Starcoder2Config(**TINY, **over))
    prompts = [random_prompt(6, VOCAB, 1), random_prompt(21, VOCAB, 2)]
    model, err = check_family(ref, tmp_path, "Starcoder2", prompts)
    assert model.cfg.tie_word_embeddings == (variant == "sliding_tied")
    print(f"Starcoder2 {variant}: max rel err {err:.2e}")
    assert err <= TOL
