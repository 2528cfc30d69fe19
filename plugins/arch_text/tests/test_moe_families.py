"""Mixture-of-experts and latent-attention families against transformers, on tiny random
models in float32: routing variants, shared experts, dense-layer placement, MLA with and
without q compression, yarn with mscale, attention sinks and sliding layers."""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from mistralrs_core.layers.moe import MoEConfig, MoEExperts, dispatch, route  # noqa: E402
from mistralrs_core.testing.parity import (SingleSequence, check_batched_equals_alone, check_family,  # noqa: E402
                                           load_for_test, max_rel_err, perturb_parameters, random_prompt,
                                           reference_logits, save_reference)

COVERS = ["Mixtral", "Phi3_5MoE", "Qwen3Moe", "DeepseekV2", "DeepseekV3", "GptOss"]
V = 256
TOL = 1e-4
# No EOS: the reference's greedy run (min_new_tokens) would forbid it, ours would not.
COMMON = dict(vocab_size=V, max_position_embeddings=256, eos_token_id=None)
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 32,
        "mscale": 0.9, "mscale_all_dim": 0.8, "beta_fast": 32, "beta_slow": 1}


def _run(ref, tmp_path, arch, prompts=None, greedy_prompt=None, cuts=((0, 6), (6, 7), (7, 21))):
    torch.manual_seed(0)
    prompts = prompts or [random_prompt(5, V, 1), random_prompt(23, V, 2)]
    model, worst = check_family(ref, tmp_path / arch, arch, prompts, greedy_prompt=greedy_prompt)
    batched = check_batched_equals_alone(model, [random_prompt(n, V, 10 + n) for n in (5, 17, 33)])
    # A prefill continued over several chunks attends over cached context (not a fresh prefill).
    prompt, run = random_prompt(21, V, 4), SingleSequence(model)
    chunked = max_rel_err(torch.cat([run.step(prompt[a:b]) for a, b in cuts]),
                          reference_logits(ref, prompt))
    print(f"{arch}: max rel err {worst:.2e}, batched vs alone {batched:.2e}, chunked prefill {chunked:.2e}")
    assert worst <= TOL
    assert batched <= TOL
    assert chunked <= TOL
    return model


def _model(cls, cfg_cls, **kw):
    torch.manual_seed(0)
    return getattr(transformers, cls)(getattr(transformers, cfg_cls)(**COMMON, **kw))


def test_mixtral(tmp_path):
    ref = _model("MixtralForCausalLM", "MixtralConfig", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
                 sliding_window=8)
    model = _run(ref, tmp_path, "Mixtral")
    assert model.model.layers[0].mlp.experts.gate_up_proj.shape == (8, 192, 64)


LONGROPE = {"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0, 1.1, 1.2, 1.3],
            "long_factor": [2.0, 2.3, 2.6, 2.9], "short_mscale": 1.1, "long_mscale": 1.3,
            "original_max_position_embeddings": 16}


@pytest.mark.parametrize("rope", ["default", "longrope"])
def test_phimoe(tmp_path, rope):
    kw = dict(rope_parameters=LONGROPE) if rope == "longrope" else {}
    ref = _model("PhimoeForCausalLM", "PhimoeConfig", hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, num_local_experts=6, num_experts_per_tok=2,
                 attention_bias=True, lm_head_bias=True, **kw)
    # The reference's generate recomputes its whole cache once when a sequence first grows
    # past original_max_position_embeddings (the scale switches); a greedy prompt, and a
    # first prefill chunk, already past it keep both sides on the long scale.
    _run(ref, tmp_path, "Phi3_5MoE", greedy_prompt=random_prompt(20, V, 3), cuts=((0, 17), (17, 18), (18, 21)))


@pytest.mark.parametrize("norm_topk", [False, True])
def test_qwen3_moe(tmp_path, norm_topk):
    ref = _model("Qwen3MoeForCausalLM", "Qwen3MoeConfig", hidden_size=64, intermediate_size=96,
                 moe_intermediate_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                 head_dim=16, num_experts=8, num_experts_per_tok=3, decoder_sparse_step=2, mlp_only_layers=[3],
                 norm_topk_prob=norm_topk)
    model = _run(ref, tmp_path, "Qwen3Moe")
    assert model.cfg.moe_layers == [False, True, False, False]
    assert model.cfg.moe.renormalize == norm_topk


DEEPSEEK = dict(hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
                num_attention_heads=4, n_routed_experts=8, num_experts_per_tok=3, first_k_dense_replace=1,
                kv_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=12, n_shared_experts=2,
                routed_scaling_factor=1.5)


@pytest.mark.parametrize("variant", ["plain", "group_limited_yarn"])
def test_deepseek_v2(tmp_path, variant):
    extra = (dict(q_lora_rank=None) if variant == "plain" else
             dict(q_lora_rank=32, topk_method="group_limited_greedy", n_group=4, topk_group=2, rope_parameters=YARN))
    model = _run(_model("DeepseekV2ForCausalLM", "DeepseekV2Config", **DEEPSEEK, **extra), tmp_path, "DeepseekV2")
    # The paged cache holds one latent "head" per token: kv_lora_rank + rope dims, no V.
    assert [(s.num_heads, s.k_dim, s.v_dim) for s in model.kv_cache_specs()] == [(1, 32, 0)] * 3
    assert not hasattr(model.model.layers[0].mlp, "experts") and hasattr(model.model.layers[1].mlp, "experts")


@pytest.mark.parametrize("variant", ["q_lora_interleaved", "yarn_halves"])
def test_deepseek_v3(tmp_path, variant):
    extra = (dict(q_lora_rank=32, n_group=4, topk_group=2) if variant == "q_lora_interleaved" else
             dict(q_lora_rank=None, n_group=2, topk_group=1, rope_interleave=False, norm_topk_prob=False,
                  rope_parameters=YARN))
    ref = _model("DeepseekV3ForCausalLM", "DeepseekV3Config", **DEEPSEEK, **extra)
    # The score-correction bias is a buffer (perturb_parameters leaves it at zero); make it
    # large enough to change which experts are chosen.
    g = torch.Generator().manual_seed(1)
    for layer in ref.model.layers[1:]:
        layer.mlp.gate.e_score_correction_bias.copy_(torch.randn(8, generator=g) * 0.3)
    _run(ref, tmp_path, "DeepseekV3")


@pytest.mark.parametrize("variant", ["default", "yarn_mha"])
def test_gpt_oss(tmp_path, variant):
    extra = {} if variant == "default" else dict(
        num_key_value_heads=4, rope_parameters={"rope_type": "yarn", "rope_theta": 1000.0, "factor": 8.0,
                                                "original_max_position_embeddings": 16, "beta_fast": 32.0,
                                                "beta_slow": 1.0, "truncate": True})
    kw = {**dict(hidden_size=64, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=3, head_dim=16,
                 sliding_window=8, swiglu_limit=0.3), **extra}
    torch.manual_seed(0)
    cfg = transformers.GptOssConfig(**COMMON, **kw)
    cfg._attn_implementation = "eager"
    model = _run(transformers.GptOssForCausalLM(cfg), tmp_path, "GptOss")
    assert [model.model.layers[i].self_attn.sliding_window for i in range(4)] == [8, None, 8, None]


# --- the shared layer on its own -------------------------------------------------

def _experts(cfg: MoEConfig, hidden: int, seed: int = 0) -> MoEExperts:
    g = torch.Generator().manual_seed(seed)
    ex = MoEExperts(cfg, hidden)
    for name, p in list(ex.named_parameters()):
        setattr(ex, name, torch.nn.Parameter(torch.randn(p.shape, generator=g) * 0.3, requires_grad=False))
    return ex


@pytest.mark.parametrize("activation", ["gated", "clamped_swiglu"])
@pytest.mark.parametrize("tokens", [1, 11])
def test_dispatch_matches_per_token_loop(activation, tokens):
    cfg = MoEConfig(num_experts=6, top_k=3, intermediate_size=8, activation=activation, expert_bias=True,
                    swiglu_limit=0.5)
    ex = _experts(cfg, 16)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(tokens, 16, generator=g)
    w, ids = route(torch.randn(tokens, 6, generator=g), cfg, None)
    want = torch.stack([sum(w[t, k] * ex.expert_forward(int(ids[t, k]), x[t:t + 1])[0] for k in range(3))
                        for t in range(tokens)])
    torch.testing.assert_close(dispatch(x, ids, w, ex), want, rtol=1e-5, atol=1e-6)


def test_grouped_routing_stays_in_chosen_groups():
    cfg = MoEConfig(num_experts=16, top_k=4, intermediate_size=4, scoring="sigmoid", score_correction_bias=True,
                    n_group=4, topk_group=2, group_score="top2_sum", renormalize=True, routed_scaling_factor=2.0)
    g = torch.Generator().manual_seed(3)
    logits, bias = torch.randn(32, 16, generator=g), torch.randn(16, generator=g)
    w, ids = route(logits, cfg, bias)
    assert all(len(set((row // 4).tolist())) <= 2 for row in ids)
    torch.testing.assert_close(w.sum(-1), torch.full((32,), 2.0))
    # The bias chooses experts but does not weight them.
    torch.testing.assert_close(w / 2.0, (logits.sigmoid().gather(1, ids) /
                                         logits.sigmoid().gather(1, ids).sum(-1, keepdim=True)))


def test_missing_expert_weight_is_reported(tmp_path):
    ref = _model("MixtralForCausalLM", "MixtralConfig", hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                 num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)
    d = save_reference(ref, tmp_path)
    from safetensors.torch import load_file, save_file
    weights = load_file(str(d / "model.safetensors"))
    del weights["model.layers.0.block_sparse_moe.experts.2.w3.weight"]
    save_file(weights, str(d / "model.safetensors"))
    with pytest.raises(ValueError, match=r"gate_up_proj\[2\]\.up"):
        load_for_test(d, "Mixtral")


def test_quantized_experts_seam():
    cfg = MoEConfig(num_experts=4, top_k=2, intermediate_size=8)
    ex = _experts(cfg, 16)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(5, 16, generator=g)
    w, ids = route(torch.randn(5, 4, generator=g), cfg, None)
    dense = dispatch(x, ids, w, ex)

    class Fake:     # what a quant plugin provides: the whole expert MLP per expert id
        def __init__(self, gu, down):
            self.gu, self.down = gu.clone(), down.clone()

        def forward(self, e, h):
            gate, up = (h @ self.gu[e].T).chunk(2, -1)
            return (torch.nn.functional.silu(gate) * up) @ self.down[e].T

    ex.set_quant(Fake(ex.gate_up_proj, ex.down_proj))
    assert ex.gate_up_proj is None and ex.down_proj is None
    torch.testing.assert_close(dispatch(x, ids, w, ex), dense)


def test_mla_absorb_equals_expand():
    """Both ways of attending over cached latents, on a continuing chunk (not a fresh prefill)
    of two sequences, with the latents gathered from the paged cache."""
    from mistralrs_core.engine.model_runner import build_metadata
    from mistralrs_core.layers.attention import KVCacheSpec, LayerKVCache
    from mistralrs_core.layers.linear import Linear
    from mistralrs_core.layers.mla import mla_attention

    g = torch.Generator().manual_seed(5)
    heads, nope, rope, rank, v = 4, 16, 8, 24, 12
    kv_b = Linear(rank, heads * (nope + v))
    kv_b.weight = torch.nn.Parameter(torch.randn(heads * (nope + v), rank, generator=g) * 0.2, requires_grad=False)
    cache = LayerKVCache(KVCacheSpec(1, rank + rope, 0), 16, 4, torch.float32, "cpu")

    def step(chunks, **kw):
        _, _, meta = build_metadata(chunks, 4, "cpu")
        t = sum(len(c[0]) for c in chunks)
        q_nope, q_pe = torch.randn(t, heads, nope, generator=g), torch.randn(t, heads, rope, generator=g)
        latent = torch.randn(t, rank + rope, generator=g)
        return [mla_attention(q_nope, q_pe, latent, meta, cache, kv_b, v_dim=v, scale=0.2, absorb=a)
                for a in (False, True)]

    step([([1] * 9, 0, [0, 1, 2]), ([1] * 5, 0, [5, 6])])
    expand, absorb = step([([1] * 3, 9, [0, 1, 2]), ([1] * 2, 5, [5, 6])])
    torch.testing.assert_close(absorb, expand, rtol=1e-5, atol=1e-5)


class _ExpertQuantizer:
    """A quantization plugin for expert tensors only: int8 per output row, or (``exact``) the
    weight as it is, to check the quantized-expert path itself."""

    def __init__(self, exact=False):
        self.exact, self.seen = exact, []

    def round(self, w):
        w = w.float()
        if self.exact:
            return w.clone()
        scale = w.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127
        return torch.round(w / scale) * scale

    def method(self, w):
        q = self.round(w)

        class Method:
            def forward(self, x):
                return torch.nn.functional.linear(x, q.to(x.dtype))
        return Method()

    def answer(self, quant_config, hf_name, module, weight):
        if quant_config.kind == "isq" and quant_config.for_layer(hf_name, module) == "int8":
            self.seen.append(hf_name)
            return self.method(weight)
        return None


def _load_with_expert_quantizer(family_cls, out, quantizer):
    import types
    from mistralrs_core.hookspecs import hookimpl
    from mistralrs_core.loading.hf_config import load_model_config
    from mistralrs_core.loading.quant_config import QuantConfig
    from mistralrs_core.loading.safetensors_io import SafetensorsWeights
    from mistralrs_core.plugins import get_plugin_manager, register_plugin
    @hookimpl
    def mistralrs_quant_method(quant_config, hf_name, module, weight):
        return quantizer.answer(quant_config, hf_name, module, weight)
    register_plugin(types.SimpleNamespace(mistralrs_quant_method=mistralrs_quant_method), "expert-int8")
    try:
        model = family_cls.from_hf_config(load_model_config(out))
        model.load_weights(SafetensorsWeights(out).items(),
                           quant_config=QuantConfig.isq(None, topology=[(r"\.experts\.\d+\.", "int8")]))
        return model
    finally:
        get_plugin_manager().unregister(name="expert-int8")


def test_mixtral_experts_quantized_through_the_weight_hook(tmp_path):
    """Per-expert checkpoint tensors go through the one quantization hook like any linear:
    a topology that quantizes experts only leaves the dense stacks unallocated, and the
    logits equal a dense load of the same checkpoint with those experts round-tripped
    through the quantizer."""
    import re
    from safetensors.torch import load_file, save_file
    from mistralrs_arch_text.mixtral import MixtralForCausalLM
    from mistralrs_core.layers.moe import QuantizedExperts
    quantizer = _ExpertQuantizer()
    ref = _model("MixtralForCausalLM", "MixtralConfig", hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)
    perturb_parameters(ref)
    out = save_reference(ref, tmp_path / "mixtral")
    model = _load_with_expert_quantizer(MixtralForCausalLM, out, quantizer)
    experts = [layer.mlp.experts for layer in model.model.layers]
    assert all(isinstance(e.quant, QuantizedExperts) and e.gate_up_proj is None for e in experts)
    seen = quantizer.seen
    assert len(seen) == 2 * 4 * 3 and all(re.search(r"\.experts\.\d\.w[123]$", n) for n in seen)

    weights = load_file(str(out / "model.safetensors"))
    rounded = tmp_path / "rounded"
    rounded.mkdir()
    for f in out.iterdir():
        if f.name != "model.safetensors":
            (rounded / f.name).write_bytes(f.read_bytes())
    save_file({k: quantizer.round(v) if ".experts." in k else v for k, v in weights.items()},
              str(rounded / "model.safetensors"))
    dense = load_for_test(rounded, "Mixtral")
    prompt = random_prompt(9, V, 3)
    got, want = SingleSequence(model).step(prompt), SingleSequence(dense).step(prompt)
    assert max_rel_err(got, want) <= 1e-5


def test_gpt_oss_stacked_experts_reach_the_weight_hook(tmp_path):
    """GPT-OSS stores its experts stacked; they reach the hook one expert tensor at a time,
    and the quantized-expert path (biases, clamped SwiGLU) equals the dense one."""
    from mistralrs_arch_text.gpt_oss import GptOssForCausalLM
    from mistralrs_core.layers.moe import QuantizedExperts
    torch.manual_seed(0)
    cfg = transformers.GptOssConfig(**COMMON, hidden_size=32, intermediate_size=24, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                    num_experts_per_tok=2, head_dim=8, sliding_window=8, swiglu_limit=0.3)
    ref = transformers.GptOssForCausalLM(cfg)
    perturb_parameters(ref)
    out = save_reference(ref, tmp_path / "gpt_oss")
    quantizer = _ExpertQuantizer(exact=True)
    model = _load_with_expert_quantizer(GptOssForCausalLM, out, quantizer)
    assert all(isinstance(layer.mlp.experts.quant, QuantizedExperts) for layer in model.model.layers)
    assert len(quantizer.seen) == 2 * 4 * 3
    prompt = random_prompt(9, V, 5)
    dense = load_for_test(out, "GptOss")
    assert max_rel_err(SingleSequence(model).step(prompt), SingleSequence(dense).step(prompt)) <= 1e-5
