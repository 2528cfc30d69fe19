"""In-situ quantization of MoE experts: tiny random Qwen3-MoE / GPT-OSS checkpoints (one
tensor per expert, every parameter perturbed) quantized as they stream in, against the
dense model carrying the dequantized weights; UQFF round trips; ``send_re_isq``; MoQE;
per-expert importance matrices (calibration and llama.cpp's 3-D ``ffn_*_exps`` entries)."""
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from mistralrs_core.layers.moe import MoEExperts, QuantizedExperts  # noqa: E402
from mistralrs_core.testing.parity import (SingleSequence, load_for_test, max_rel_err,  # noqa: E402
                                           perturb_parameters, save_reference)
from mistralrs_core.testing.tiny import write_tiny_tokenizer  # noqa: E402
from mistralrs_quant.kernels import cpp as cpp_kernels  # noqa: E402

PROMPT = [5, 17, 33, 2, 90, 41, 7, 250]


def _write(out: Path, cls: str, cfg_cls: str, **kw) -> Path:
    write_tiny_tokenizer(out)
    torch.manual_seed(0)
    cfg = getattr(transformers, cfg_cls)(vocab_size=384, max_position_embeddings=256, eos_token_id=None, **kw)
    ref = getattr(transformers, cls)(cfg)
    perturb_parameters(ref)
    return save_reference(ref, out)


@pytest.fixture(scope="module")
def qwen3_moe(tmp_path_factory):
    """Rows of 256 (whole K-quant blocks) in every expert weight; 4 experts, top-2."""
    return _write(tmp_path_factory.mktemp("moe") / "qwen3moe", "Qwen3MoeForCausalLM", "Qwen3MoeConfig",
                  hidden_size=256, intermediate_size=256, moe_intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=64, num_experts=4,
                  num_experts_per_tok=2, norm_topk_prob=True)


def _load(path, isq, **which_kw):
    from mistralrs import Runner, Which
    r = Runner(which=Which.Plain(model_id=str(path), dtype="F32", **which_kw), in_situ_quant=isq, max_seqs=2)
    return r, r._pipeline(None).model


def _logits(model, steps=3):
    run = SingleSequence(model)
    out = [run.step(PROMPT)]
    for i in range(steps):
        out.append(run.step([(PROMPT[-1] * 7 + i) % 300]))
    return torch.cat(out)


def _experts(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, MoEExperts)]


def _dequantized_reference(path, model):
    """The dense model of the same checkpoint with every quantized weight (linears and each
    expert's gate / up / down) replaced by its dequantized values."""
    ref = load_for_test(path)
    values = {}
    for m in model.modules():
        if getattr(m, "qmethod", None) is not None:
            w = m.qmethod.dequantize()
            for part, start, stop in getattr(m, "fused_parts", None) or [(m.__dict__.get("hf_name"), 0, len(w))]:
                values[part] = w[start:stop]
    for module in ref.modules():
        for part, start, stop in getattr(module, "fused_parts", ()):
            if part in values:
                module.weight.data[start:stop] = values.pop(part)
        name = module.__dict__.get("hf_name")
        if name in values and not getattr(module, "fused_parts", None):
            module.weight.data.copy_(values.pop(name))
    assert not values
    ref_experts = dict(_experts(ref))
    for name, ex in _experts(model):
        if ex.quant is None:
            continue
        dense, i = ref_experts[name], ex.intermediate
        for (e, part), method in ex.quant.parts.items():
            w = method.dequantize().float()
            target = dense.down_proj.data[e] if part == "down" else \
                dense.gate_up_proj.data[e, :i] if part == "gate" else dense.gate_up_proj.data[e, i:]
            target.copy_(w)
    return ref


def _part_types(model):
    out = set()
    for _, ex in _experts(model):
        assert isinstance(ex.quant, QuantizedExperts) and ex.gate_up_proj is None and ex.down_proj is None
        for method in ex.quant.parts.values():
            spec = getattr(method, "spec", None)
            out.add(spec.name if spec is not None else type(method).__name__)
    return out


# --------------------------------------------------------------------------- ISQ + UQFF

@pytest.mark.parametrize("isq, types", [("Q4K", {"Q4_K"}), ("Q8_0", {"Q8_0"}), ("HQQ4", {"HQQMethod"}),
                                        ("AFQ4", {"AFQMethod"})])
def test_isq_experts_equal_dequantized_reference_and_round_trip_uqff(qwen3_moe, tmp_path, isq, types):
    from mistralrs import Runner, Which
    out = tmp_path / "uq"
    r, model = _load(qwen3_moe, isq, write_uqff=str(out))
    try:
        assert _part_types(model) == types
        want = _logits(model)
        ref = _logits(_dequantized_reference(qwen3_moe, model))
        assert max_rel_err(want, ref) < 1e-5
    finally:
        r.shutdown()
    shard = next(p for p in out.iterdir() if p.suffix == ".uqff")
    from safetensors import safe_open
    with safe_open(str(shard), "pt") as f:
        assert "model.layers.1.mlp.experts.3.down_proj.weight.format" in f.keys()
    r2 = Runner(which=Which.Plain(model_id=str(out), from_uqff=shard.name, dtype="F32"), max_seqs=2)
    try:
        m2 = r2._pipeline(None).model
        assert _part_types(m2) == types
        assert torch.equal(_logits(m2), want)       # bit-identical: no quantization pass on load
    finally:
        r2.shutdown()


def test_moqe_quantizes_the_experts_only(qwen3_moe):
    from mistralrs import IsqOrganization
    r, model = _load(qwen3_moe, "Q4K", organization=IsqOrganization.MoQE)
    try:
        assert _part_types(model) == {"Q4_K"}
        assert not any(getattr(m, "qmethod", None) is not None for m in model.modules())
        assert max_rel_err(_logits(model), _logits(_dequantized_reference(qwen3_moe, model))) < 1e-5
    finally:
        r.shutdown()


def test_send_re_isq_requantizes_the_experts(qwen3_moe):
    r, model = _load(qwen3_moe, "Q4K")
    fresh, want = _load(qwen3_moe, "Q8_0")
    try:
        r.send_re_isq("Q8_0")
        assert _part_types(model) == {"Q8_0"}
        assert torch.equal(_logits(model), _logits(want))
    finally:
        r.shutdown()
        fresh.shutdown()


def test_expert_biases_round_trip_uqff(tmp_path):
    """GPT-OSS: stacked, gate/up-interleaved checkpoint tensors with expert biases; the UQFF
    writes each expert's weight and bias slices under per-expert names, read back exactly."""
    from mistralrs import Runner, Which
    path = _write(tmp_path / "gptoss", "GptOssForCausalLM", "GptOssConfig", hidden_size=64, intermediate_size=64,
                  num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                  num_experts_per_tok=2, head_dim=16, sliding_window=8)
    out = tmp_path / "uq"
    r, model = _load(path, "Q8_0", write_uqff=str(out))
    try:
        assert _part_types(model) == {"Q8_0"} and model.model.layers[0].mlp.experts.quant.gate_up_bias is not None
        want = _logits(model)
        assert max_rel_err(want, _logits(_dequantized_reference(path, model))) < 1e-5
    finally:
        r.shutdown()
    r2 = Runner(which=Which.Plain(model_id=str(out), from_uqff="q8_0-0.uqff", dtype="F32"), max_seqs=2)
    try:
        assert torch.equal(_logits(r2._pipeline(None).model), want)
    finally:
        r2.shutdown()
