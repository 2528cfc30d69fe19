"""Gemma, Gemma 2 and Gemma 3 (text) against transformers, on tiny random models in float32."""
from __future__ import annotations

COVERS = ["Gemma", "Gemma2", "Gemma3"]

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from mistralrs_core.testing.parity import check_batched_equals_alone, check_family  # noqa: E402

TOL = 1e-4
SHORT = [5, 17, 42, 99, 3, 250, 7]
# Longer than the sliding window (8) so local layers really drop keys.
LONG = [(i * 37 + 11) % 256 for i in range(21)]

COMMON = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6,
              pad_token_id=0, bos_token_id=2, eos_token_id=1)


@pytest.fixture(autouse=True)
def _seed():
    # The reference models draw their initial weights from the global generator.
    torch.manual_seed(0)


def _run(ref, tmp_path, arch, prompts):
    model, worst = check_family(ref, tmp_path / arch, arch, prompts, greedy_prompt=prompts[-1])
    batched = check_batched_equals_alone(model, [LONG, SHORT, LONG[:11]])
    print(f"{arch}: max relative error {worst:.2e} (batched vs alone {batched:.2e})")
    assert worst <= TOL and batched <= TOL
    return model


def test_gemma(tmp_path):
    # head_dim differs from hidden / heads (16), as in Gemma-7B.
    cfg = transformers.GemmaConfig(**COMMON, num_hidden_layers=2, head_dim=32,
                                   hidden_act="gelu_pytorch_tanh")
    model = _run(transformers.GemmaForCausalLM(cfg), tmp_path, "Gemma", [SHORT, LONG])
    assert model.cfg.norm_offset == 1.0 and model.cfg.tie_word_embeddings


def test_gemma2(tmp_path):
    # Small soft-caps so tanh is far from linear on these tiny logits; the query scalar
    # differs from head_dim as in Gemma-2-27B.
    cfg = transformers.Gemma2Config(**COMMON, num_hidden_layers=4, head_dim=16, query_pre_attn_scalar=24,
                                    sliding_window=8, attn_logit_softcapping=0.5,
                                    final_logit_softcapping=0.3)
    cfg._attn_implementation = "eager"
    model = _run(transformers.Gemma2ForCausalLM(cfg), tmp_path, "Gemma2", [SHORT, LONG])
    assert [model.cfg.is_sliding(i) for i in range(4)] == [True, False, True, False]


def gemma3_config(**kw):
    # Distinct rope per layer type (and a scaled global rope) so a swap cannot pass.
    fields = dict(COMMON, num_hidden_layers=4, head_dim=16, query_pre_attn_scalar=16, sliding_window=8,
                  layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
                  rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0},
                                   "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}})
    fields.update(kw)
    return transformers.Gemma3TextConfig(**fields)


def test_gemma3(tmp_path):
    model = _run(transformers.Gemma3ForCausalLM(gemma3_config()), tmp_path, "Gemma3", [SHORT, LONG])
    assert model.cfg.qk_norm and model.cfg.local_rope.theta == 100.0 and model.cfg.rope.rope_type == "linear"


def test_gemma3_legacy_config_layout():
    """Older config.json files spell the per-type ropes and the layer pattern differently."""
    from mistralrs_arch_text.gemma3 import Gemma3ForCausalLM
    new = json.loads(gemma3_config().to_json_string())
    legacy = {k: v for k, v in new.items() if k not in ("rope_parameters", "layer_types")}
    legacy.update(rope_theta=10000.0, rope_scaling={"rope_type": "linear", "factor": 2.0},
                  rope_local_base_freq=100.0, sliding_window_pattern=2)
    a, b = Gemma3ForCausalLM.config_from_hf(new), Gemma3ForCausalLM.config_from_hf(legacy)

    def rope(r):
        return r.theta, r.rope_type, r.params.get("factor")
    assert a.layer_types == b.layer_types
    assert (rope(a.rope), rope(a.local_rope)) == (rope(b.rope), rope(b.local_rope)) == \
        ((10000.0, "linear", 2.0), (100.0, "default", None))
    # Without any hint the reference pattern is five local layers, then one global.
    six = dict(legacy, num_hidden_layers=6)
    del six["sliding_window_pattern"]
    assert Gemma3ForCausalLM.config_from_hf(six).layer_types == ["sliding_attention"] * 5 + ["full_attention"]


def test_gemma_legacy_gelu():
    from mistralrs_arch_text.gemma import GemmaForCausalLM
    hf = json.loads(transformers.GemmaConfig(**COMMON, num_hidden_layers=1).to_json_string())
    hf["hidden_act"] = "gelu"
    assert GemmaForCausalLM.config_from_hf(hf).hidden_act == "gelu_pytorch_tanh"


def test_registered_names():
    from mistralrs_core.plugins import get_registry
    reg = get_registry()
    assert reg.architecture_for_hf({"model_type": "gemma3_text", "architectures": ["Gemma3ForCausalLM"]},
                                   "text").name == "Gemma3"
    for gguf, name in (("gemma", "Gemma"), ("gemma2", "Gemma2"), ("gemma3", "Gemma3")):
        assert reg.architecture_for_gguf(gguf, "text").name == name
