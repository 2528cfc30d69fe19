"""UQFF files written by upstream itself (the Rust ``mistralrs`` 0.9.5 wheel, ISQ of a tiny
Llama and a tiny Mixtral: ``data/make_upstream_uqff.py``) load here with ``from_uqff`` and no
quantization pass; ours of MoE models have upstream's layout (expert stacks, which routers are
quantized, MoQE).

* Every GGML-family layer dequantizes to exactly what gguf-py's reference dequantizer makes
  of upstream's stored blocks (its tags, dtype ids and shapes are read as upstream meant them).
* For Q4_0 and Q8_0 our ISQ of the same float weights writes byte-identical files (every
  entry, metadata included). Upstream's K-quant quantizer is not llama.cpp's (ours is, as
  the quantizer tests check): every K-quant block's bytes differ (at about the same error),
  so for Q4K only the reading (and, for MoE, the layout) is compared.
* HQQ4 and FP8 layers (upstream's own scale/zero and scale layouts) dequantize to within
  the format's error of the float weights and of our own ISQ of them; a misread layout
  (a transposed shape, swapped scales) would be off by the weights' own size.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mistralrs import CompletionRequest, Runner, Which
from mistralrs_core.loading.weights import read_weight, weight_index

DATA = Path(__file__).parent / "data" / "upstream_uqff"
WRITTEN = json.loads((DATA / "written_by.json").read_text())
MATRICES = [k for k, v in load_file(str(DATA / "model.f16.safetensors")).items() if v.dim() == 2]


def _folder(root: Path, name: str, files: list[Path]) -> Path:
    d = root / name
    d.mkdir()
    for f in files:
        shutil.copy(f, d / f.name)
    for n in ("config.json", "tokenizer.json"):
        shutil.copy(DATA / n, d / n)
    return d


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("upstream_uqff")
    f32 = _folder(root, "f32", [])
    save_file({k: v.float() for k, v in load_file(str(DATA / "model.f16.safetensors")).items()},
              str(f32 / "model.safetensors"))
    out = {"f32": f32}
    for q in WRITTEN["types"]:
        out[q] = _folder(root, q.lower(), sorted((DATA / q.lower()).iterdir()))
    return out


def _dequantized(runner) -> dict[str, torch.Tensor]:
    model = runner._pipeline(None).model
    index = weight_index(model)
    return {name: read_weight(model, name, index).float() for name in MATRICES}


def _entries(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _generator():
    import sys
    if str(DATA.parent) not in sys.path:
        sys.path.insert(0, str(DATA.parent))
    import make_upstream_uqff
    return make_upstream_uqff


def _mixtral_weights() -> dict[str, np.ndarray]:
    """The Mixtral's float16 weights, remade from the data script's seed (not stored)."""
    return _generator().mixtral_weights()


def _float_model(root: Path, model: str) -> Path:
    """The float32 checkpoint upstream quantized (``mixtral`` or ``qwen3moe``)."""
    gen = _generator()
    weights, config = ((gen.mixtral_weights(), gen.MIXTRAL) if model == "mixtral"
                       else (gen.qwen3_moe_weights(), gen.QWEN3_MOE))
    src = root / f"{model}-f32"
    src.mkdir()
    save_file({k: torch.from_numpy(v.astype(np.float32)) for k, v in weights.items()}, str(src / "model.safetensors"))
    (src / "config.json").write_text(json.dumps(config))
    shutil.copy(DATA / "tokenizer.json", src / "tokenizer.json")
    return src


def _upstream_moe(tmp_path: Path, q: str) -> Path:
    d = tmp_path / q.lower()
    shutil.copytree(DATA / WRITTEN["moe_types"][q], d)
    shutil.copy(DATA / "tokenizer.json", d / "tokenizer.json")
    return d


def _greedy(runner) -> str:
    res = runner.send_completion_request(CompletionRequest(
        prompt="the rain in spain", model="default", max_tokens=6, temperature=0.0, ignore_eos=True))
    return res.choices[0].text


def test_the_data_covers_each_family():
    assert WRITTEN["mistralrs"] == "0.9.5"
    assert set(WRITTEN["types"]) == {"Q4_0", "Q8_0", "Q4K", "HQQ4", "FP8"}
    assert set(WRITTEN["moe_types"]) == {"Q8_0", "AFQ4", "AFQ3"}
    # Upstream stacks only GGML and AFQ experts (IsqType::supports_stacked_gather) and refuses
    # the other families for MoE models; ours quantizes them per expert (see _expert_layers).
    assert set(WRITTEN["moe_refused"]) == {"HQQ4", "HQQ8", "FP8", "F8Q8", "MXFP4"}
    assert all("does not support stacked expert gather" in m for m in WRITTEN["moe_refused"].values())


@pytest.mark.parametrize("q", ["Q4_0", "Q8_0", "Q4K"])
def test_ggml_layers_read_as_gguf_py_dequantizes_upstream_blocks(folders, q):
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize
    runner = Runner(which=Which.Plain(model_id=str(folders[q]), from_uqff="tiny-0.uqff"))
    assert getattr(runner._pipeline(None).model, "isq_seconds", None) in (None, 0)
    got = _dequantized(runner)
    stored = _entries(folders[q] / "tiny-0.uqff")
    for name in MATRICES:
        raw = stored[name].numpy()
        ggml = GGMLQuantizationType(int(stored[name + ".dtype"]))
        shape = tuple(int(s) for s in stored[name + ".shape"])
        want = torch.from_numpy(dequantize(raw, ggml).reshape(shape).astype(np.float32))
        assert torch.equal(got[name], want), f"{q}: {name} ({ggml.name}) differs from gguf-py's dequantization"
    assert _greedy(runner)


@pytest.mark.parametrize("q", ["Q4_0", "Q8_0"])
def test_our_isq_writes_upstreams_bytes(folders, q, tmp_path):
    Runner(which=Which.Plain(model_id=str(folders["f32"]), write_uqff=str(tmp_path / "tiny.uqff")), in_situ_quant=q)
    ours, theirs = _entries(tmp_path / "tiny-0.uqff"), _entries(folders[q] / "tiny-0.uqff")
    assert sorted(ours) == sorted(theirs)
    # The token embedding is promoted to Q6K by both (Q4_0 -> Q6K, Q8_0 stays): a K-quant,
    # whose blocks upstream rounds its own way (see the module docstring). Same type, same
    # size; every other entry byte for byte.
    kquant = {k for k, v in theirs.items() if k.endswith(".weight.dtype") and 10 <= int(v) <= 15}
    for k in theirs:
        assert ours[k].dtype == theirs[k].dtype and ours[k].shape == theirs[k].shape, k
        if k.endswith(".weight") and k + ".dtype" in kquant:
            continue
        assert torch.equal(ours[k], theirs[k]), k
    assert len(kquant) == (1 if q == "Q4_0" else 0)


@pytest.mark.parametrize("q, bound", [("HQQ4", 0.1), ("FP8", 0.07)])
def test_hqq_and_fp8_layers_read_within_the_formats_error(folders, q, bound):
    floats = {k: v.float() for k, v in load_file(str(DATA / "model.f16.safetensors")).items()}
    upstream = Runner(which=Which.Plain(model_id=str(folders[q]), from_uqff="tiny-0.uqff"))
    ours = Runner(which=Which.Plain(model_id=str(folders["f32"])), in_situ_quant=q)
    got, mine = _dequantized(upstream), _dequantized(ours)
    for name in MATRICES:
        scale = floats[name].abs().max()
        err = (got[name] - floats[name]).abs().max() / scale
        ours_err = (mine[name] - floats[name]).abs().max() / scale
        assert err <= bound, f"{q}: {name} read from upstream's file is {err:.3g} off the float weights"
        # As good as our own quantization of the same weights (a misread layout is ~1 off).
        assert err <= 2 * ours_err + 1e-3, f"{q}: {name}: {err:.3g} vs ours {ours_err:.3g}"
    assert _greedy(upstream)


def test_upstream_moe_expert_stacks_load(tmp_path):
    """Upstream writes a MoE layer's experts as 3-D stacks (``experts.gate_proj`` [E, out,
    in], one entry per projection) and quantizes the router too (Mixtral, Q8_0 here): each
    expert reads back as gguf-py dequantizes its slice of the stack, in expert order, and
    the router as its dequantized rows."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize
    d = _upstream_moe(tmp_path, "Q8_0")
    runner = Runner(which=Which.Plain(model_id=str(d), from_uqff="tiny-0.uqff"))
    model = runner._pipeline(None).model
    moe = model.model.layers[0].mlp
    stored = _entries(d / "tiny-0.uqff")
    floats = {k: torch.from_numpy(v.astype(np.float32)) for k, v in _mixtral_weights().items()}
    prefix = "model.layers.0.block_sparse_moe"
    for part, name, hf in (("gate", "gate_proj", "w1"), ("up", "up_proj", "w3"), ("down", "down_proj", "w2")):
        key = f"{prefix}.experts.{name}.weight"
        n_exp, out, k = (int(s) for s in stored[key + ".shape"])
        ggml = GGMLQuantizationType(int(stored[key + ".dtype"]))
        want = torch.from_numpy(dequantize(stored[key].numpy(), ggml).reshape(n_exp, out, k).astype(np.float32))
        for e in range(n_exp):
            got = moe.experts.quant.parts[(e, part)].dequantize().float()
            assert torch.equal(got, want[e]), f"expert {e} {name}"
            ref = floats[f"{prefix}.experts.{e}.{hf}.weight"]
            assert (got - ref).abs().max() <= 0.01 * ref.abs().max(), f"expert {e} {name} is another expert's"
    router = stored[f"{prefix}.gate.weight"]
    want = dequantize(router.numpy(), GGMLQuantizationType(int(stored[f"{prefix}.gate.weight.dtype"])))
    # The router stays quantized, as upstream runs it (its blocks, not a dense copy).
    assert moe.gate.weight is None and moe.gate.qmethod.ggml_type == int(stored[f"{prefix}.gate.weight.dtype"])
    assert torch.equal(moe.gate.qmethod.dequantize().float(), torch.from_numpy(want.astype(np.float32)).reshape(4, -1))
    assert _greedy(runner)


def test_stacks_of_other_families_are_refused():
    """Upstream stacks only GGUF and AFQ experts; a 3-D entry of another family is a clear
    error, not a misread layer."""
    from mistralrs_quant.isq.uqff import FORMAT_HQQ, UqffQuantizedWeight
    key = "model.layers.0.block_sparse_moe.experts.gate_proj"
    with pytest.raises(ValueError, match="only GGUF and AFQ expert stacks"):
        UqffQuantizedWeight(key, {f"{key}.weight.format": torch.tensor(FORMAT_HQQ, dtype=torch.uint8),
                                  f"{key}.weight": torch.zeros(4, 8, 16, dtype=torch.uint8)}, Path("x.uqff"))


def _afq_error_bound(entries: dict, key: str, weight: torch.Tensor, got: torch.Tensor) -> None:
    """Upstream's AFQ quantizer (its CPU path: ``scale = (max - min) / (2^bits - 1)``, ``bias =
    min``, round to nearest) leaves every value within half its group's stored scale: a
    misread layout (scales of another row or expert, a wrong bit order) breaks the bound."""
    gs = int(entries[key + ".group_size"])
    scale = entries[key + ".scales"].float().repeat_interleave(gs, dim=-1)
    err = (got - weight).abs()
    assert bool((err <= scale.abs() / 2 * (1 + 1e-4) + 1e-6).all()), \
        f"{key}: {float((err / scale.abs()).max()):.3g} scales off"


@pytest.mark.parametrize("q", ["AFQ4", "AFQ3"])
def test_upstream_afq_expert_stacks_load(tmp_path, q):
    """Upstream writes AFQ experts as 3-D stacks too (``experts.gate_proj.weight`` u32 [E, out,
    in*bits/32], ``.scales`` / ``.biases`` [E, out, in/64], one ``bits`` / ``group_size``): each
    expert reads back within upstream's quantization bound of its own float weights, as do
    the quantized router and the attention layers. (The 0.9.5 wheel itself cannot run these
    files on CPU: its MoE forward fails with "non-contiguous lhs".)"""
    d = _upstream_moe(tmp_path, q)
    runner = Runner(which=Which.Plain(model_id=str(d), from_uqff="tiny-0.uqff"))
    moe = runner._pipeline(None).model.model.layers[0].mlp
    stored = _entries(d / "tiny-0.uqff")
    floats = {k: torch.from_numpy(v.astype(np.float32)) for k, v in _mixtral_weights().items()}
    prefix = "model.layers.0.block_sparse_moe"
    bits = int(q[3:])
    for part, name, hf in (("gate", "gate_proj", "w1"), ("up", "up_proj", "w3"), ("down", "down_proj", "w2")):
        key = f"{prefix}.experts.{name}.weight"
        assert stored[key].dim() == 3 and int(stored[key + ".bits"]) == bits
        for e in range(4):
            method = moe.experts.quant.parts[(e, part)]
            assert type(method).__name__ == "AFQMethod" and method.bits == bits
            expert = {k: (v[e] if v.dim() == 3 else v) for k, v in stored.items() if k.startswith(key)}
            _afq_error_bound(expert, key, floats[f"{prefix}.experts.{e}.{hf}.weight"], method.dequantize().float())
    assert type(moe.gate.qmethod).__name__ == "AFQMethod"
    _afq_error_bound(stored, f"{prefix}.gate.weight", floats[f"{prefix}.gate.weight"],
                     moe.gate.qmethod.dequantize().float())
    model = runner._pipeline(None).model
    for name in ("model.layers.0.self_attn.q_proj.weight", "lm_head.weight"):
        _afq_error_bound(stored, name, floats[name], read_weight(model, name[:-len(".weight")] + ".weight").float())
    assert _greedy(runner)


def test_our_moe_uqff_writes_upstreams_file(tmp_path):
    """Our ISQ Q8_0 of the same Mixtral writes upstream's file byte for byte: the experts as
    one 3-D stack per projection under the checkpoint's prefix, the router quantized as
    upstream's ``MixtralLoader`` lists it, every other entry and the residual's names too
    (upstream's own loader reads our file: checked by hand with the 0.9.5 wheel, same greedy
    text as from its own file)."""
    src = _float_model(tmp_path, "mixtral")
    Runner(which=Which.Plain(model_id=str(src), write_uqff=str(tmp_path / "out" / "tiny.uqff")), in_situ_quant="Q8_0")
    ours, theirs = _entries(tmp_path / "out" / "tiny-0.uqff"), _entries(DATA / "mixtral" / "tiny-0.uqff")
    assert sorted(ours) == sorted(theirs)
    assert len([k for k in theirs if ".experts." in k]) == 12    # 3 projections x (weight, format, dtype, shape)
    for k in theirs:
        assert ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k]), k
    assert sorted(_entries(tmp_path / "out" / "residual.safetensors")) == \
        sorted(_entries(DATA / "mixtral" / "residual.safetensors"))


def _layout(directory: Path) -> dict:
    """``make_upstream_uqff._layout`` of one of our UQFF directories."""
    return json.loads(json.dumps(_generator()._layout(directory)))


LAYOUTS = json.loads((DATA / "moe_layouts.json").read_text())


@pytest.mark.parametrize("case", sorted(LAYOUTS))
def test_our_moe_uqff_layout_is_upstreams(tmp_path, case):
    """Which tensors end up quantized, and how they are stored, for a tiny Mixtral (router
    ``block_sparse_moe.gate`` quantized) and a tiny Qwen3-MoE (router ``mlp.gate`` dense, in
    the residual), at GGML and AFQ types: every entry's name, dtype and shape as upstream
    0.9.5 writes them, and its small integer entries' values (format tags, ggml type ids,
    bits, group sizes, shapes, version). The quantized values themselves differ where the
    quantizers do (K-quants: llama.cpp's here; AFQ: MLX's here, upstream's plain affine)."""
    model, q = case.split("/")
    src = _float_model(tmp_path, model)
    Runner(which=Which.Plain(model_id=str(src), write_uqff=str(tmp_path / "out" / "tiny.uqff")), in_situ_quant=q)
    ours, theirs = _layout(tmp_path / "out"), LAYOUTS[case]
    for f in theirs:
        assert sorted(ours[f]) == sorted(theirs[f]), f
        for k, v in theirs[f].items():
            assert ours[f][k] == v, f"{f}: {k}: ours {ours[f][k]}, upstream {v}"


def test_moqe_quantizes_only_the_experts(tmp_path):
    """``organization=MoQE`` (upstream's ``isq_layer_regexes_moqe``, MixtralLoader: the
    experts only, no promoted embedding / LM head, no router): the UQFF holds the three
    expert stacks, everything else is in the residual. (The 0.9.5 wheel does not export
    ``IsqOrganization``, so this follows the Rust source, not a wheel-made file.)"""
    from mistralrs import IsqOrganization
    src = _float_model(tmp_path, "mixtral")
    Runner(which=Which.Plain(model_id=str(src), write_uqff=str(tmp_path / "out" / "tiny.uqff"),
                             organization=IsqOrganization.MoQE), in_situ_quant="Q8_0")
    shard = _entries(tmp_path / "out" / "tiny-0.uqff")
    assert sorted(k for k in shard if k.endswith(".format")) == [
        f"model.layers.0.block_sparse_moe.experts.{p}.weight.format" for p in ("down_proj", "gate_proj", "up_proj")]
    residual = _entries(tmp_path / "out" / "residual.safetensors")
    for name in ("model.layers.0.block_sparse_moe.gate.weight", "model.embed_tokens.weight", "lm_head.weight",
                 "model.layers.0.self_attn.q_proj.weight"):
        assert residual[name].dtype == torch.float32, name


@pytest.mark.skipif(not __import__("mistralrs_quant.kernels.cpp", fromlist=["available"]).available(),
                    reason="C++ kernels unavailable")
def test_quantized_router_takes_llama_cpp_router_imatrix(tmp_path):
    """With ``imatrix=``, the quantized Mixtral router is weighted by llama.cpp's
    ``blk.N.ffn_gate_inp`` entry (upstream's ``gguf_imatrix_names``: ``.gate`` ->
    ``ffn_gate_inp``), the fused decoder step runs the quantized router as the torch path, and
    ``send_re_isq`` re-quantizes it."""
    import gguf
    from mistralrs_quant.formats import T
    from mistralrs_quant.kernels import cpp as cpp_kernels
    src = _float_model(tmp_path, "mixtral")
    imp = np.random.default_rng(3).gamma(0.5, 2.0, 256).astype(np.float32)
    w = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "imatrix")
    w.add_tensor("blk.0.ffn_gate_inp.weight.in_sum2", imp * 5)
    w.add_tensor("blk.0.ffn_gate_inp.weight.counts", np.array([[5.0]], np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    runner = Runner(which=Which.Plain(model_id=str(src), imatrix=str(tmp_path / "m.gguf")), in_situ_quant="Q4K")
    model = runner._pipeline(None).model
    router = model.model.layers[0].mlp.gate
    weight = torch.from_numpy(_mixtral_weights()["model.layers.0.block_sparse_moe.gate.weight"].astype(np.float32))
    want = cpp_kernels.quantize(weight, T.Q4_K, torch.from_numpy(imp))
    assert torch.equal(router.qmethod.raw.reshape(-1), want.reshape(-1))
    assert not torch.equal(want, cpp_kernels.quantize(weight, T.Q4_K, None))
    from mistralrs_core.testing.parity import max_rel_err
    from test_quant_fused_decoder import Counting, run_schedule
    from test_quant_isq_moe import _schedule
    assert model.fast_forward is not None
    sched, counting = _schedule(vocab=320), Counting(model.fast_forward)
    got, want = run_schedule(model, counting, sched), run_schedule(model, None, sched)
    assert counting.calls == len(sched) - 1
    assert max(max_rel_err(g, w) for g, w in zip(got, want)) <= 1e-5
    runner.send_re_isq("Q8_0")                    # the router is re-quantized with the rest
    assert router.qmethod.ggml_type == T.Q8_0
