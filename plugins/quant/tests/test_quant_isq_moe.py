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
        if isq == "Q4K" and cpp_kernels.available():
            # ISQ'd experts run inside the C++ decoder step: routing, per-expert products and
            # the weighted sum equal the torch path up to summation order.
            from mistralrs_quant.fused_decoder import FusedDecoder
            assert isinstance(model.fast_forward, FusedDecoder)
            assert _fused_vs_torch(model, model.fast_forward) <= 1e-5
    finally:
        r.shutdown()
    shard = next(p for p in out.iterdir() if p.suffix == ".uqff")
    from safetensors import safe_open
    with safe_open(str(shard), "pt") as f:
        keys = set(f.keys())
    # GGML and AFQ experts as upstream writes them, one 3-D stack per projection (see
    # test_quant_uqff_upstream.py); HQQ (which upstream cannot quantize as experts) one
    # entry per expert.
    if isq in ("Q4K", "Q8_0", "AFQ4"):
        assert "model.layers.1.mlp.experts.down_proj.weight.format" in keys
        assert not any(".experts.3." in k for k in keys)
    else:
        assert "model.layers.1.mlp.experts.3.down_proj.weight.format" in keys
    r2 = Runner(which=Which.Plain(model_id=str(out), from_uqff=shard.name, dtype="F32"), max_seqs=2)
    try:
        m2 = r2._pipeline(None).model
        assert _part_types(m2) == types
        assert torch.equal(_logits(m2), want)       # bit-identical: no quantization pass on load
    finally:
        r2.shutdown()


@pytest.mark.skipif(not cpp_kernels.available(), reason="C++ kernels unavailable")
def test_moqe_then_send_re_isq(qwen3_moe):
    """MoQE quantizes the experts only; ``send_re_isq`` re-reads every expert from the
    checkpoint and quantizes it to the new type (the organization kept)."""
    from mistralrs import IsqOrganization
    from mistralrs_core.loading.safetensors_io import SafetensorsWeights
    from mistralrs_quant.formats import T
    r, model = _load(qwen3_moe, "Q4K", organization=IsqOrganization.MoQE)
    try:
        assert _part_types(model) == {"Q4_K"}
        assert not any(getattr(m, "qmethod", None) is not None for m in model.modules())
        assert max_rel_err(_logits(model), _logits(_dequantized_reference(qwen3_moe, model))) < 1e-5
        r.send_re_isq("Q8_0")
        assert _part_types(model) == {"Q8_0"}
        assert not any(getattr(m, "qmethod", None) is not None for m in model.modules())
        weights = SafetensorsWeights(qwen3_moe)
        for layer, (name, ex) in enumerate(_experts(model)):
            for (e, part), method in ex.quant.parts.items():
                w = weights.get(f"model.layers.{layer}.mlp.experts.{e}.{part}_proj.weight").float()
                assert torch.equal(method.raw, cpp_kernels.quantize(w, T.Q8_0))
        assert max_rel_err(_logits(model), _logits(_dequantized_reference(qwen3_moe, model))) < 1e-5
    finally:
        r.shutdown()


def test_expert_biases_round_trip_uqff(tmp_path):
    """GPT-OSS: stacked, gate/up-interleaved checkpoint tensors with expert biases; the UQFF
    writes each expert's weight and bias slices under per-expert names, read back exactly,
    whether the experts are quantized (layer 0) or stay dense under the topology (layer 1:
    its stacks would otherwise be read back in the checkpoint's interleaved layout)."""
    from mistralrs import Runner, Which
    path = _write(tmp_path / "gptoss", "GptOssForCausalLM", "GptOssConfig", hidden_size=64, intermediate_size=64,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                  num_experts_per_tok=2, head_dim=16, sliding_window=8)
    out = tmp_path / "uq"
    topo = tmp_path / "t.yml"
    topo.write_text("0:\n  isq: Q8_0\n")
    r = Runner(which=Which.Plain(model_id=str(path), dtype="F32", topology=str(topo), write_uqff=str(out)),
               max_seqs=2)
    model = r._pipeline(None).model
    try:
        layers = [layer.mlp.experts for layer in model.model.layers]
        assert isinstance(layers[0].quant, QuantizedExperts) and layers[0].quant.gate_up_bias is not None
        assert layers[1].quant is None
        want = _logits(model)
        assert max_rel_err(want, _logits(_dequantized_reference(path, model))) < 1e-5
    finally:
        r.shutdown()
    r2 = Runner(which=Which.Plain(model_id=str(out), from_uqff="uqff-0.uqff", dtype="F32"), max_seqs=2)
    try:
        assert torch.equal(_logits(r2._pipeline(None).model), want)
    finally:
        r2.shutdown()


# --------------------------------------------------------------------------- importance matrices

def _routed_reference(path, ids):
    """Plain torch over transformers' model: per layer and expert, the mean squared input
    columns of the rows its router sent there (gate/up) and of act(gate) * up (down)."""
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    out = {}

    def hook(module, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        top = args[1] if len(args) > 1 else kwargs["top_k_index"]
        layer = layers[id(module)]
        for e in range(module.num_experts):
            rows = x[(top == e).any(-1)].double()
            gate, up = torch.nn.functional.linear(rows, module.gate_up_proj[e].double()).chunk(2, dim=-1)
            mid = module.act_fn(gate) * up
            for part, v in (("gate", rows), ("up", rows), ("down", mid)):
                key = f"model.layers.{layer}.mlp.experts.{e}.{part}_proj"
                s, n = out.get(key, (0, 0))
                out[key] = (s + (v * v).sum(0), n + len(v))

    def router_hook(module, args):
        x = args[0].reshape(-1, args[0].shape[-1]).double()
        out[f"model.layers.{layers[id(module)]}.mlp.gate"] = ((x * x).sum(0), len(x))

    layers = {}
    for i, block in enumerate(ref.model.layers):
        layers[id(block.mlp.experts)] = layers[id(block.mlp.gate)] = i
        block.mlp.experts.register_forward_pre_hook(hook, with_kwargs=True)
        block.mlp.gate.register_forward_pre_hook(router_hook)
    with torch.inference_mode():
        ref(torch.tensor([ids]))
    return {k: (s / n).float() if n else torch.ones(len(s) if torch.is_tensor(s) else 0) for k, (s, n) in out.items()}


def test_calibration_imatrix_per_expert_equals_routed_inputs(qwen3_moe):
    from mistralrs_quant.isq.imatrix import collect_imatrix
    ids = [int(i) for i in torch.randint(0, 384, (40,), generator=torch.Generator().manual_seed(3))]
    got = collect_imatrix(load_for_test(qwen3_moe), ids)
    want = _routed_reference(qwen3_moe, ids)
    # every expert part, and each router (calibrated too: some families' ISQ quantizes it)
    assert len(want) == 2 * 4 * 3 + 2
    for key, value in want.items():
        assert got[key].shape == value.shape and max_rel_err(got[key], value) < 1e-5, key
    # experts differ: each is calibrated on its own rows
    assert not torch.allclose(got["model.layers.0.mlp.experts.0.gate_proj"],
                              got["model.layers.0.mlp.experts.1.gate_proj"])
    assert "model.layers.0.self_attn.q_proj" in got          # dense layers as before


@pytest.mark.skipif(not cpp_kernels.available(), reason="C++ kernels unavailable")
def test_calibration_file_quantizes_each_expert_with_its_imatrix(qwen3_moe, tmp_path):
    from mistralrs_core.loading.safetensors_io import SafetensorsWeights
    from mistralrs_quant.formats import T
    text = tmp_path / "cal.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. Paris is the capital of France. " * 6)
    r, model = _load(qwen3_moe, "Q4K", calibration_file=str(text))
    try:
        imatrix = model.quant_config.plan.imatrix
        parts = model.model.layers[1].mlp.experts.quant.parts
        weights = SafetensorsWeights(qwen3_moe)
        for e, part in ((2, "gate"), (2, "down"), (3, "up")):
            name = f"model.layers.1.mlp.experts.{e}.{part}_proj"
            w = weights.get(f"{name}.weight").float()
            assert torch.equal(parts[(e, part)].raw, cpp_kernels.quantize(w, T.Q4_K, imatrix[name]))
            assert not torch.equal(parts[(e, part)].raw, cpp_kernels.quantize(w, T.Q4_K))
    finally:
        r.shutdown()


def _write_gguf_imatrix(path, entries: dict):
    import gguf
    w = gguf.GGUFWriter(str(path), "imatrix")
    for name, (sums, counts) in entries.items():
        w.add_tensor(f"{name}.in_sum2", np.asarray(sums, np.float32))
        w.add_tensor(f"{name}.counts", np.asarray(counts, np.float32).reshape(-1, 1))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()


@pytest.mark.skipif(not cpp_kernels.available(), reason="C++ kernels unavailable")
def test_llama_cpp_expert_imatrix_entries_map_to_per_expert_names(qwen3_moe, tmp_path):
    """llama.cpp stores an MoE layer's experts as one ``blk.N.ffn_*_exps`` entry: a GGUF
    imatrix [E, n] with one count per expert (zero: read as ones, as llama.cpp's quantize
    does), the legacy format E*n values already divided per expert; both land on the
    per-expert checkpoint names (and on Mixtral's ``w1/w2/w3`` spelling of them)."""
    import struct
    from mistralrs_core.loading.hf_config import load_model_config
    from mistralrs_core.loading.model_loader import detect_architecture
    from mistralrs_core.loading.safetensors_io import SafetensorsWeights
    from mistralrs_quant.formats import T
    from mistralrs_quant.isq import imatrix as imx
    from mistralrs_quant.isq.plan import build_plan
    rng = np.random.default_rng(1)
    down = rng.gamma(0.5, 2.0, (4, 256)).astype(np.float32)
    counts = np.array([7, 3, 0, 5], np.float32)
    _write_gguf_imatrix(tmp_path / "m.gguf", {"blk.1.ffn_down_exps.weight": (down, counts),
                                              "blk.0.attn_q.weight": (down[0], [2])})
    hf = load_model_config(qwen3_moe)
    entry = detect_architecture(hf)
    plan = build_plan("Q4K", imatrix=imx.load_imatrix(str(tmp_path / "m.gguf"), hf, entry))
    for e in (0, 1, 3):
        want = torch.from_numpy(down[e] / counts[e])
        assert torch.equal(plan.imatrix_for(f"model.layers.1.mlp.experts.{e}.down_proj"), want)
        assert torch.equal(plan.imatrix_for(f"model.layers.1.block_sparse_moe.experts.{e}.w2"), want)
    assert torch.equal(plan.imatrix_for("model.layers.1.mlp.experts.2.down_proj"), torch.ones(256))
    assert torch.equal(plan.imatrix_for("model.layers.0.self_attn.q_proj"), torch.from_numpy(down[0] / 2))
    assert plan.imatrix_for("model.layers.1.mlp.experts.2.up_proj") is None

    gate = rng.gamma(0.5, 2.0, (4, 256)).astype(np.float32)
    with open(tmp_path / "m.imatrix", "wb") as f:       # legacy: (sums / count) * ncall, ncall = 3
        name = b"blk.0.ffn_gate_exps.weight"
        f.write(struct.pack("<i", 1) + struct.pack("<i", len(name)) + name + struct.pack("<ii", 3, gate.size))
        f.write((gate * 3).astype("<f4").tobytes())
    legacy = imx.load_imatrix(str(tmp_path / "m.imatrix"), hf, entry)
    assert torch.allclose(legacy["model.layers.0.mlp.experts.3.gate_proj"], torch.from_numpy(gate[3]))

    r, model = _load(qwen3_moe, "Q4K", imatrix=str(tmp_path / "m.gguf"))
    try:
        w = SafetensorsWeights(qwen3_moe).get("model.layers.1.mlp.experts.3.down_proj.weight").float()
        got = model.model.layers[1].mlp.experts.quant.parts[(3, "down")].raw
        assert torch.equal(got, cpp_kernels.quantize(w, T.Q4_K, torch.from_numpy(down[3] / counts[3])))
    finally:
        r.shutdown()


@pytest.fixture(scope="module")
def deepseek_v2(tmp_path_factory):
    """A tiny DeepSeek-V2 with two shared experts (``mlp.shared_experts``, intermediate 64) on
    its MoE layer 1; every row 64 or 32 wide (whole Q4_0 blocks)."""
    return _write(tmp_path_factory.mktemp("moe") / "deepseekv2", "DeepseekV2ForCausalLM", "DeepseekV2Config",
                  hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2,
                  num_attention_heads=4, n_routed_experts=4, num_experts_per_tok=2, first_k_dense_replace=1,
                  kv_lora_rank=32, q_lora_rank=None, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=16,
                  n_shared_experts=2)


def _write_legacy_imatrix(path, entries: dict):
    """llama.cpp's legacy format: per entry the name, ncall and the sums (importance * ncall)."""
    import struct
    with open(path, "wb") as f:
        f.write(struct.pack("<i", len(entries)))
        for name, (vals, ncall) in entries.items():
            b = name.encode()
            f.write(struct.pack("<i", len(b)) + b + struct.pack("<ii", ncall, vals.size))
            f.write((vals * ncall).astype("<f4").tobytes())


@pytest.mark.skipif(not cpp_kernels.available(), reason="C++ kernels unavailable")
@pytest.mark.parametrize("fmt", ["gguf", "legacy"])
def test_llama_cpp_shared_expert_imatrix_entries(deepseek_v2, tmp_path, fmt):
    """llama.cpp names a shared expert ``blk.N.ffn_{gate,up,down}_shexp`` (Qwen2-MoE, DeepSeek,
    Granite, Llama4); upstream looks them up for ``shared_expert(s).*_proj`` and Granite's
    ``shared_mlp.input_linear`` / ``output_linear`` (``pipeline/isq.rs``
    ``gguf_imatrix_names``). Read from either file format, they weight the shared expert's
    quantization exactly as ``quantize(W, Q4_0, imatrix)``, whatever the family calls it."""
    from mistralrs_core.loading.hf_config import load_model_config
    from mistralrs_core.loading.model_loader import detect_architecture
    from mistralrs_core.loading.safetensors_io import SafetensorsWeights
    from mistralrs_quant.formats import T
    from mistralrs_quant.isq import imatrix as imx
    from mistralrs_quant.isq.plan import build_plan
    rng = np.random.default_rng(4)
    want = {p: rng.gamma(0.5, 2.0, 64).astype(np.float32) for p in ("gate", "up", "down")}
    path = tmp_path / ("m.gguf" if fmt == "gguf" else "m.imatrix")
    entries = {f"blk.1.ffn_{p}_shexp.weight": (v, 3) for p, v in want.items()}
    if fmt == "gguf":
        _write_gguf_imatrix(path, {n: (v * c, [c]) for n, (v, c) in entries.items()})
    else:
        _write_legacy_imatrix(path, entries)
    hf = load_model_config(deepseek_v2)
    plan = build_plan("Q4_0", imatrix=imx.load_imatrix(str(path), hf, detect_architecture(hf)))
    for p, v in want.items():
        for spelling in (f"model.layers.1.mlp.shared_experts.{p}_proj", f"model.layers.1.mlp.shared_expert.{p}_proj"):
            assert torch.allclose(plan.imatrix_for(spelling), torch.from_numpy(v), rtol=1e-6), spelling
    assert torch.allclose(plan.imatrix_for("model.layers.1.shared_mlp.input_linear"), torch.from_numpy(want["gate"]))
    assert torch.allclose(plan.imatrix_for("model.layers.1.shared_mlp.output_linear"), torch.from_numpy(want["down"]))
    assert plan.imatrix_for("model.layers.0.mlp.shared_experts.gate_proj") is None
    assert plan.imatrix_for("model.layers.1.mlp.experts.0.gate_proj") is None

    r, model = _load(deepseek_v2, "Q4_0", imatrix=str(path))
    try:
        shared = model.model.layers[1].mlp.shared_experts
        ckpt = SafetensorsWeights(deepseek_v2)
        for p, v in want.items():
            w = ckpt.get(f"model.layers.1.mlp.shared_experts.{p}_proj.weight").float()
            if p == "down":
                got = shared.down_proj.qmethod.raw
            elif hasattr(shared, "gate_up_proj"):        # gate and up fused after the load
                rows = shared.gate_up_proj.qmethod.raw.reshape(128, -1)
                got = rows[:64] if p == "gate" else rows[64:]
            else:
                got = getattr(shared, f"{p}_proj").qmethod.raw
            imp = plan.imatrix_for(f"model.layers.1.mlp.shared_experts.{p}_proj")
            expect = cpp_kernels.quantize(w, T.Q4_0, imp).reshape(64, -1)
            assert torch.equal(got.reshape(64, -1), expect), p
            assert not torch.equal(expect, cpp_kernels.quantize(w, T.Q4_0, None).reshape(64, -1))
    finally:
        r.shutdown()


# --------------------------------------------------------------------------- the C++ decoder step

def _schedule(vocab=384, block_size=4):
    """Prefill of three sequences (torch path), batched decode steps, a mixed step and a
    twelve-token step (the 9-16-row kernels), over scrambled blocks."""
    from mistralrs_core.testing.parity import random_prompt
    lens = [13, 5, 22]
    prompts = [random_prompt(n, vocab, 10 + i) for i, n in enumerate(lens)]
    per_seq = [-(-(n + 24) // block_size) for n in lens]
    pool = iter(sorted(range(sum(per_seq)), key=lambda b: (b % 3, b)))
    blocks = [[next(pool) for _ in range(n)] for n in per_seq]
    sched = [[(p, 0, blocks[i]) for i, p in enumerate(prompts)]]
    pos = list(lens)
    for step in range(3):
        sched.append([([(7 * step + i) % vocab], pos[i], blocks[i]) for i in range(3)])
        pos = [p + 1 for p in pos]
    sched.append([([3], pos[0], blocks[0]), ([4, 5, 6, 7], pos[1], blocks[1]), ([8], pos[2], blocks[2])])
    pos = [pos[0] + 1, pos[1] + 4, pos[2] + 1]
    sched.append([([9], pos[0], blocks[0]), (list(range(20, 30)), pos[1], blocks[1]), ([10], pos[2], blocks[2])])
    return sched


def _fused_vs_torch(model, fused):
    from test_quant_fused_decoder import Counting, run_schedule
    sched = _schedule()
    counting = Counting(fused)
    got = run_schedule(model, counting, sched)
    want = run_schedule(model, None, sched)
    assert counting.calls == len(sched) - 1       # every step but the prefill
    return max(max_rel_err(g, w) for g, w in zip(got, want))


@pytest.mark.skipif(not cpp_kernels.available(), reason="C++ kernels unavailable")
def test_fused_decoder_step_dense_experts_and_mixed_layers(tmp_path):
    """Dense float32 expert stacks, a dense layer beside a sparse one (Qwen3-MoE's
    decoder_sparse_step), no renormalisation; and the portable kernels."""
    from mistralrs_quant.fused_decoder import FusedDecoder
    path = _write(tmp_path / "mixed", "Qwen3MoeForCausalLM", "Qwen3MoeConfig", hidden_size=64, intermediate_size=96,
                  moe_intermediate_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=16, num_experts=8, num_experts_per_tok=3, decoder_sparse_step=2, norm_topk_prob=False)
    model = load_for_test(path)
    assert model.cfg.moe_layers == [False, True]
    for force_scalar in (False, True):      # and the portable kernels
        assert _fused_vs_torch(model, FusedDecoder(model, force_scalar=force_scalar)) <= 1e-5
    # A routed scaling factor after renormalisation (DeepSeek's), and the other routing the
    # step implements: top-k on the logits, softmax over the k (GPT-OSS, Granite), which
    # neither renormalises nor scales (as moe.route).
    moe = model.model.layers[1].mlp
    for after_topk in (False, True):
        moe.cfg.softmax_after_topk, moe.cfg.renormalize, moe.cfg.routed_scaling_factor = after_topk, True, 1.5
        assert _fused_vs_torch(model, FusedDecoder(model)) <= 1e-5
