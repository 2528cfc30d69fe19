"""Pre-quantized checkpoints (GPTQ, AWQ, FP8, GPT-OSS MXFP4): each format's unpacking against
its published definition (transformers' code where it has one) on tiny tensors, and tiny
checkpoints in each layout loaded through the weight path and the Runner, giving the logits
of a dense load of the dequantized weights."""
import json

import numpy as np
import pytest
import torch

from mistralrs_core.loading.quant_config import QuantConfig, from_hf_config
from mistralrs_core.testing.parity import SingleSequence, load_for_test, max_rel_err
from mistralrs_core.testing.tiny import write_random_llama
from mistralrs_quant import checkpoint_writers as cw
from mistralrs_quant.formats.fp8 import FP8Method
from mistralrs_quant.formats.gptq import AWQMethod, GPTQMethod
from mistralrs_quant.formats.mxfp4_hf import MXFP4Method, dequantize_mxfp4
from mistralrs_quant.prequantized import PrequantizedWeight, packed_weights

PROMPT = [5, 17, 3, 99, 42, 7, 250, 11]


# --- formats on tiny tensors ------------------------------------------------------------
def _naive_codes_rows(qweight, bits):
    """Input row r = word r // p, field r % p (the GPTQ definition), one element at a time."""
    p = 32 // bits
    qw = qweight.numpy().view(np.uint32)
    out = np.zeros((qw.shape[0] * p, qw.shape[1]), np.int64)
    for r in range(out.shape[0]):
        out[r] = (qw[r // p] >> np.uint32((r % p) * bits)) & np.uint32(2 ** bits - 1)
    return out


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("desc_act", [False, True])
def test_gptq_dequantize_matches_definition(bits, desc_act):
    g = torch.Generator().manual_seed(bits)
    in_f, out_f, group = 64, 32, 16
    p = 32 // bits
    qweight = torch.randint(-2 ** 31, 2 ** 31 - 1, (in_f // p, out_f), generator=g, dtype=torch.int64).to(torch.int32)
    qzeros = torch.randint(-2 ** 31, 2 ** 31 - 1, (in_f // group, out_f // p), generator=g, dtype=torch.int64).to(torch.int32)
    scales = (torch.rand(in_f // group, out_f, generator=g) * 0.1).half()
    g_idx = (torch.randperm(in_f, generator=g) // group if desc_act else torch.arange(in_f) // group).int()
    m = GPTQMethod(qweight, qzeros, scales, g_idx, bits=bits, group_size=group)
    q = _naive_codes_rows(qweight, bits)                                   # [in, out]
    z = _naive_codes_rows(qzeros.t().contiguous(), bits).T + 1             # zeros packed along out
    ref = np.zeros((out_f, in_f), np.float32)
    for i in range(in_f):
        gi = int(g_idx[i])
        ref[:, i] = scales[gi].float().numpy() * (q[i] - z[gi]).astype(np.float32)
    np.testing.assert_array_equal(m.dequantize().numpy(), ref)
    x = torch.randn(3, in_f, generator=g)
    torch.testing.assert_close(m.forward(x), x @ torch.from_numpy(ref).T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt", ["gptq", "awq"])
def test_4bit_bf16_runs_on_the_int4_kernel_within_bf16_rounding(fmt):
    from mistralrs_quant.kernels.int4pack import kernel_available
    if not kernel_available():
        pytest.skip("torch has no CPU int4 kernel")
    g = torch.Generator().manual_seed(7)
    in_f, out_f, group = 128, 48, 32
    words = lambda *shape: torch.randint(-2 ** 31, 2 ** 31 - 1, shape, generator=g, dtype=torch.int64).to(torch.int32)
    scales = (torch.rand(in_f // group, out_f, generator=g) * 0.1).half()
    if fmt == "gptq":
        m = GPTQMethod(words(in_f // 8, out_f), words(in_f // group, out_f // 8), scales, bits=4, group_size=group)
    else:
        m = AWQMethod(words(in_f, out_f // 8), words(in_f // group, out_f // 8), scales, group_size=group)
    x = torch.randn(3, in_f, generator=g).bfloat16()
    y = m.forward(x)
    assert m._int4_packed is not None and y.dtype == torch.bfloat16
    deq = m.dequantize().double()
    bound = 2 ** -7 * (x.double().abs() @ deq.abs().T)
    assert bool(((y.double() - x.double() @ deq.T).abs() <= bound).all())
    if fmt == "gptq":   # act order: scattered groups stay on the dequantize path
        perm = GPTQMethod(m.qweight, m.qzeros, scales, torch.randperm(in_f, generator=g) // group, bits=4,
                          group_size=group)
        perm.forward(x)
        assert perm._int4_packed is None


def test_awq_dequantize_matches_definition():
    g = torch.Generator().manual_seed(0)
    in_f, out_f, group = 64, 32, 16
    qweight = torch.randint(-2 ** 31, 2 ** 31 - 1, (in_f, out_f // 8), generator=g, dtype=torch.int64).to(torch.int32)
    qzeros = torch.randint(-2 ** 31, 2 ** 31 - 1, (in_f // group, out_f // 8), generator=g, dtype=torch.int64).to(torch.int32)
    scales = (torch.rand(in_f // group, out_f, generator=g) * 0.1).half()
    m = AWQMethod(qweight, qzeros, scales, group_size=group)

    def unpack(t):  # nibble k of word c is column c*8 + ORDER[k]
        w = t.numpy().view(np.uint32)
        out = np.zeros((w.shape[0], w.shape[1] * 8), np.int64)
        for c in range(w.shape[1]):
            for k, col in enumerate(cw.AWQ_ORDER):
                out[:, c * 8 + col] = (w[:, c] >> np.uint32(4 * k)) & np.uint32(15)
        return out
    q, z = unpack(qweight), unpack(qzeros)
    gi = np.arange(in_f) // group
    ref = ((q - z[gi]).astype(np.float32) * scales.float().numpy()[gi]).T
    np.testing.assert_array_equal(m.dequantize().numpy(), ref)


@pytest.mark.parametrize("block", [(128, 128), None])
def test_fp8_checkpoint_dequantize_matches_transformers(block):
    from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight
    g = torch.Generator().manual_seed(1)
    q = (torch.randn(200, 300, generator=g) * 40).to(torch.float8_e4m3fn)
    s = torch.rand(2, 3, generator=g) + 0.1 if block else torch.rand(1, generator=g)
    m = FP8Method(q, s, block)
    ref = _dequantize_fp8_weight(q, s, list(block) if block else None, torch.float32)
    torch.testing.assert_close(m.dequantize(), ref, rtol=0, atol=0)


def test_mxfp4_dequantize_matches_transformers():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors
    g = torch.Generator().manual_seed(2)
    blocks = torch.randint(0, 256, (3, 10, 4, 16), generator=g, dtype=torch.uint8)
    scales = torch.randint(120, 132, (3, 10, 4), generator=g, dtype=torch.uint8)
    ref = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)      # [E, in, out]
    torch.testing.assert_close(dequantize_mxfp4(blocks, scales), ref.transpose(1, 2), rtol=0, atol=0)
    m = MXFP4Method(blocks[1], scales[1])
    torch.testing.assert_close(m.embedding(torch.tensor([3, 0])), ref[1].T[[3, 0]])


# --- the grouping stream ----------------------------------------------------------------
def test_gptq_parts_grouped_in_any_order_and_incomplete_layers_named():
    qc = QuantConfig(kind="gptq", params={"bits": 4, "group_size": 16, "desc_act": True})
    qw, qz = torch.zeros(8, 32, dtype=torch.int32), torch.zeros(4, 4, dtype=torch.int32)
    sc, gi = torch.ones(4, 32, dtype=torch.float16), (torch.arange(64) // 16).int()
    stream = [("a.q_proj.scales", sc), ("a.q_proj.qweight", qw), ("a.norm.weight", torch.ones(3)),
              ("a.q_proj.qzeros", qz), ("a.q_proj.g_idx", gi)]
    out = list(packed_weights(qc, iter(stream)))
    assert [n for n, _ in out] == ["a.norm.weight", "a.q_proj.weight"]
    assert isinstance(out[1][1], PrequantizedWeight) and out[1][1].shape == (32, 64)
    with pytest.raises(ValueError, match="'a.q_proj' is missing g_idx"):
        list(packed_weights(qc, iter(stream[:2] + stream[3:4])))
    with pytest.raises(ValueError, match="quantization_config.bits"):
        packed_weights(QuantConfig(kind="gptq", params={"bits": 3}), iter(()))


def test_gptq_g_idx_after_its_layer_must_be_the_default_order():
    qc = QuantConfig(kind="gptq", params={"bits": 4, "group_size": 16, "desc_act": False})
    parts = [("l.qweight", torch.zeros(8, 32, dtype=torch.int32)), ("l.qzeros", torch.zeros(4, 4, dtype=torch.int32)),
             ("l.scales", torch.ones(4, 32, dtype=torch.float16))]
    out = list(packed_weights(qc, iter(parts + [("l.g_idx", (torch.arange(64) // 16).int())])))
    assert [n for n, _ in out] == ["l.weight"]
    with pytest.raises(ValueError, match="l.g_idx: arrived after"):
        list(packed_weights(qc, iter(parts + [("l.g_idx", torch.zeros(64, dtype=torch.int32))])))


def test_fp8_and_mxfp4_incomplete_layers_are_named():
    with pytest.raises(ValueError, match="FP8 layer 'a.q_proj' has a weight but no weight_scale_inv"):
        list(packed_weights(QuantConfig(kind="fp8", params={}),
                            iter([("a.q_proj.weight", torch.zeros(4, 4, dtype=torch.float8_e4m3fn))])))
    dense = [("a.norm.weight", torch.ones(4))]
    assert [n for n, _ in packed_weights(QuantConfig(kind="fp8", params={}), iter(dense))] == ["a.norm.weight"]
    with pytest.raises(ValueError, match="has no m.experts.down_proj_scales"):
        list(packed_weights(QuantConfig(kind="mxfp4"),
                            iter([("m.experts.down_proj_blocks", torch.zeros(2, 4, 2, 16, dtype=torch.uint8))])))


def test_quantization_config_detection():
    assert from_hf_config({}) is None
    assert from_hf_config({"quantization_config": {"quant_method": "GPTQ", "bits": 4}}).kind == "gptq"
    with pytest.raises(ValueError, match="quantization_config.quant_method"):
        from_hf_config({"quantization_config": {"quant_method": "bitsandbytes"}})


# --- tiny checkpoints through the loader and the Runner -----------------------------------
WRITERS = {
    "gptq4": lambda d, o: cw.write_gptq(d, o, bits=4, group_size=32),
    "gptq8_act_order": lambda d, o: cw.write_gptq(d, o, bits=8, group_size=16, desc_act=True),
    "awq": lambda d, o: cw.write_awq(d, o, group_size=32),
    "fp8_block": lambda d, o: cw.write_fp8(d, o, block=(128, 128)),
    "fp8_tensor": lambda d, o: cw.write_fp8(d, o, block=None),
}


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory):
    # hidden 64, intermediate 160: 128x128 FP8 blocks with ragged edges
    return write_random_llama(tmp_path_factory.mktemp("dense"), hidden=64, intermediate=160, layers=2)


def _logits(model, prompt=PROMPT):
    run = SingleSequence(model)
    return torch.cat([run.step(prompt[:5]), run.step(prompt[5:6]), run.step(prompt[6:])])


@pytest.mark.parametrize("fmt", list(WRITERS))
def test_checkpoint_logits_equal_dense_load_of_dequantized(fmt, dense_dir, tmp_path):
    deq = WRITERS[fmt](dense_dir, tmp_path / "q")
    ref_dir = cw.write_dense(dense_dir, tmp_path / "ref", deq)
    model = load_for_test(tmp_path / "q")
    q_proj = model.model.layers[0].self_attn
    methods = [type(getattr(m, "qmethod", None)).__name__ for m in q_proj.modules() if hasattr(m, "qmethod")]
    assert methods and all(n in ("GPTQMethod", "AWQMethod", "FP8Method") for n in methods), methods
    err = max_rel_err(_logits(model), _logits(load_for_test(ref_dir)))
    print(f"{fmt}: max rel err {err:.2e}")
    assert err <= 1e-5


def test_runner_loads_gptq_awq_fp8_like_the_dense_equivalent(dense_dir, tmp_path):
    from mistralrs import ChatCompletionRequest, Runner, Which
    outs = {}
    for name, writer in (("gptq", WRITERS["gptq4"]), ("awq", WRITERS["awq"]), ("fp8", WRITERS["fp8_block"])):
        deq = writer(dense_dir, tmp_path / name)
        ref_dir = cw.write_dense(dense_dir, tmp_path / f"{name}_ref", deq)
        for tag, d in ((name, tmp_path / name), (f"{name}_ref", ref_dir)):
            runner = Runner(which=Which.Plain(model_id=str(d), dtype="f32"), max_seqs=2)
            res = runner.send_chat_completion_request(ChatCompletionRequest(
                messages=[{"role": "user", "content": "hello there"}], max_tokens=6, temperature=0.0,
                logprobs=True, ignore_eos=True))
            runner.shutdown() if hasattr(runner, "shutdown") else None
            outs[tag] = [(t.token, t.logprob) for t in res.choices[0].logprobs.content]
        toks, ref_toks = outs[name], outs[f"{name}_ref"]
        assert [t for t, _ in toks] == [t for t, _ in ref_toks]
        np.testing.assert_allclose([lp for _, lp in toks], [lp for _, lp in ref_toks], rtol=1e-4, atol=1e-5)


def test_unknown_quant_method_is_a_clear_error(dense_dir, tmp_path):
    import shutil
    d = tmp_path / "bnb"
    shutil.copytree(dense_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "bitsandbytes"}
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="quantization_config.quant_method"):
        load_for_test(d)


def test_gpt_oss_mxfp4_experts_load_packed(tmp_path):
    transformers = pytest.importorskip("transformers")
    from safetensors.torch import load_file, save_file
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors
    from mistralrs_core.layers.moe import QuantizedExperts
    from mistralrs_core.testing.parity import save_reference
    torch.manual_seed(0)
    cfg = transformers.GptOssConfig(vocab_size=256, max_position_embeddings=256, eos_token_id=None, hidden_size=64,
                                    intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, head_dim=16,
                                    sliding_window=8, swiglu_limit=0.3)
    dense = save_reference(transformers.GptOssForCausalLM(cfg), tmp_path / "dense")
    w = load_file(str(dense / "model.safetensors"))
    g = torch.Generator().manual_seed(5)
    packed = {}
    for name in list(w):
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            e, inn, out = w[name].shape                                   # stored [E, in, out]
            blocks = torch.randint(0, 256, (e, out, inn // 32, 16), generator=g, dtype=torch.uint8)
            scales = torch.randint(121, 125, (e, out, inn // 32), generator=g, dtype=torch.uint8)
            w[name] = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32).contiguous()
            packed[name + "_blocks"], packed[name + "_scales"] = blocks, scales
        else:
            packed[name] = w[name]
    ref_dir = cw.write_dense(dense, tmp_path / "ref", w)
    q_dir = cw.write_dense(dense, tmp_path / "q", packed)
    hf = json.loads((q_dir / "config.json").read_text())
    hf["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn"]}
    (q_dir / "config.json").write_text(json.dumps(hf))
    model = load_for_test(q_dir)
    experts = model.model.layers[0].mlp.experts
    assert isinstance(experts.quant, QuantizedExperts)
    assert type(experts.quant.parts[(0, "gate")]).__name__ == "MXFP4Method"
    err = max_rel_err(_logits(model), _logits(load_for_test(ref_dir)))
    print(f"gpt-oss mxfp4: max rel err {err:.2e}")
    assert err <= 1e-5


def test_gptq_mixtral_experts_run_packed(tmp_path):
    """Per-expert GPTQ tensors (``block_sparse_moe.experts.N.w1.qweight`` ...) reach the MoE
    layer as packed methods, as a GPTQ Mixtral checkpoint's would."""
    transformers = pytest.importorskip("transformers")
    from mistralrs_core.layers.moe import QuantizedExperts
    from mistralrs_core.testing.parity import perturb_parameters, save_reference
    torch.manual_seed(0)
    ref = transformers.MixtralForCausalLM(transformers.MixtralConfig(
        vocab_size=256, max_position_embeddings=256, eos_token_id=None, hidden_size=32, intermediate_size=48,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
        num_experts_per_tok=2))
    perturb_parameters(ref)
    dense = save_reference(ref, tmp_path / "dense")
    deq = cw.write_gptq(dense, tmp_path / "q", bits=4, group_size=16)
    assert any(".experts.3.w2." in k for k in deq)
    model = load_for_test(tmp_path / "q")
    experts = model.model.layers[1].mlp.experts
    assert isinstance(experts.quant, QuantizedExperts) and experts.gate_up_proj is None
    assert type(experts.quant.parts[(3, "down")]).__name__ == "GPTQMethod"
    err = max_rel_err(_logits(model), _logits(load_for_test(cw.write_dense(dense, tmp_path / "ref", deq))))
    assert err <= 1e-5
