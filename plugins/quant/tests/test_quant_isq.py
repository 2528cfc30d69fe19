"""In-situ quantization (``mistralrs_quant.isq``): quantizers bit-exact with llama.cpp and
gguf-py, type names, topology/MoQE/imatrix plans, ISQ'd models against the dequantize-
then-matmul reference, one dense tensor at a time, UQFF round trips, SDK errors."""
import struct
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch

from mistralrs_core.errors import NotAvailableYet
from mistralrs_core.layers.linear import Embedding, Linear
from mistralrs_core.loading.quant_config import QuantConfig
from mistralrs_core.testing.parity import SingleSequence, load_for_test
from mistralrs_core.testing.tiny import write_random_llama
from mistralrs_quant.formats import T
from mistralrs_quant.isq import imatrix as imx
from mistralrs_quant.isq.plan import build_plan
from mistralrs_quant.isq.quantize import quantize_tensor
from mistralrs_quant.isq.topology import parse_topology
from mistralrs_quant.isq.types import TYPES, parse_isq_type, promoted
from mistralrs_quant.kernels import cpp as cpp_kernels
from mistralrs_quant.qlinear import GGMLQuantMethod

DATA = Path(__file__).parent / "data" / "quantize_reference.npz"
needs_cpp = pytest.mark.skipif(not cpp_kernels.available(), reason="C++ kernels unavailable")


# --------------------------------------------------------------------------- quantizers

@needs_cpp
def test_quantizers_bit_exact_with_llama_cpp():
    """Every stored llama.cpp output (K-quants and the 32-element formats, with and
    without an imatrix; MXFP4) is reproduced byte for byte."""
    ref = np.load(DATA, allow_pickle=False)
    x, im = torch.from_numpy(ref["x"]), torch.from_numpy(ref["imatrix"])
    keys = [k for k in ref.files if k.startswith("t")]
    assert len(keys) == 20
    for key in keys:
        t = int(key[1:].split("_")[0])
        ours = quantize_tensor(x, t, im if key.endswith("_im") else None).numpy()
        assert np.array_equal(ours, ref[key]), key


@pytest.mark.parametrize("name", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"])
def test_legacy_quantizers_match_gguf_py(name, rng):
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize
    x = rng.standard_normal((8, 256)).astype(np.float32)
    x[0, :32] = 0
    t = getattr(T, name)
    ours = quantize_tensor(torch.from_numpy(x), t).numpy()
    assert np.array_equal(ours, quantize(x, GGMLQuantizationType[name]))


def test_slabs_give_the_same_bytes(monkeypatch, rng):
    x = torch.from_numpy(rng.standard_normal((40, 256)).astype(np.float32)).to(torch.bfloat16)
    whole = quantize_tensor(x, T.Q8_0)
    monkeypatch.setattr("mistralrs_quant.isq.quantize.SLAB_ELEMENTS", 256 * 7)
    assert torch.equal(quantize_tensor(x, T.Q8_0), whole)


# --------------------------------------------------------------------------- names

def test_type_names_case_insensitive_and_shorthands():
    assert parse_isq_type("q4k").name == "Q4K"
    assert parse_isq_type("Q8_0").ggml_type == T.Q8_0
    assert parse_isq_type("fp8").name == "FP8" and parse_isq_type("F8E4M3").name == "FP8"
    assert {s: parse_isq_type(s).name for s in ("2", "3", "4", "5", "6", "8")} == \
        {"2": "Q2K", "3": "Q3K", "4": "Q4K", "5": "Q5K", "6": "Q6K", "8": "Q8_0"}
    assert parse_isq_type(4).name == "Q4K"
    assert len(TYPES) == 22
    with pytest.raises(ValueError, match="unknown ISQ type 'Q7K'.*Q4K.*MXFP4.*AFQ8"):
        parse_isq_type("Q7K")


def test_promotion_as_upstream():
    assert promoted(parse_isq_type("Q4K")).name == "Q6K"
    assert promoted(parse_isq_type("Q2K")).name == "Q6K"
    assert promoted(parse_isq_type("Q4_0")).name == "Q6K"
    assert promoted(parse_isq_type("Q6K")).name == "Q8_0"
    assert promoted(parse_isq_type("Q5_1")).name == "Q8_0"
    assert promoted(parse_isq_type("AFQ4")).name == "AFQ6"
    assert promoted(parse_isq_type("HQQ4")).name == "HQQ4"


def test_family_types_resolve_to_the_formats_classes():
    # HQQ/AFQ/FP8/F8Q8 are method classes in formats/<family>.py, imported only when used.
    assert {n: TYPES[n].load_class().__name__ for n in ("HQQ4", "HQQ8", "AFQ2", "AFQ8", "FP8", "F8Q8")} == {
        "HQQ4": "HQQMethod", "HQQ8": "HQQMethod", "AFQ2": "AFQMethod", "AFQ8": "AFQMethod",
        "FP8": "FP8Method", "F8Q8": "F8Q8Method"}


# --------------------------------------------------------------------------- plans

class _E(Embedding):
    def __init__(self):
        torch.nn.Module.__init__(self)


def test_plan_defaults_promotion_and_routers():
    plan = build_plan("Q4K")
    assert plan.type_for("model.layers.0.self_attn.q_proj") == "Q4K"
    assert plan.type_for("lm_head") == "Q6K"
    assert plan.type_for("model.embed_tokens", _E()) == "Q6K"
    assert plan.type_for("model.layers.0.mlp.gate") is None                 # MoE router
    assert plan.type_for("model.per_layer_embed", _E()) is None            # other embeddings
    assert build_plan(None).type_for("model.layers.0.mlp.up_proj") is None


def test_topology_ranges_indices_regexes():
    topo = parse_topology("0-2:\n  isq: Q3K\n3:\n  isq: q8_0\n'/mlp\\.down_proj\\.weight$/':\n  isq: Q6K\n"
                          "4-6:\n  {}\n")
    plan = build_plan("Q4K", topo)
    assert plan.type_for("model.layers.1.self_attn.q_proj") == "Q3K"
    assert plan.type_for("model.layers.2.self_attn.q_proj") == "Q4K"          # end exclusive
    assert plan.type_for("model.layers.3.self_attn.o_proj") == "Q8_0"
    assert plan.type_for("model.layers.1.mlp.down_proj") == "Q6K"            # regex beats range
    assert plan.type_for("model.layers.5.mlp.up_proj") == "Q4K"              # no isq: default
    assert build_plan(None, topo).type_for("model.layers.9.mlp.up_proj") is None


@pytest.mark.parametrize("text, err, match", [
    ("abc:\n  isq: Q4K\n", ValueError, "layer range"),
    ("4-2:\n  isq: Q4K\n", ValueError, "end must be > start"),
    ("0:\n  isq: Q9K\n", ValueError, "unknown ISQ type"),
    ("0:\n  isq: Q4K\n  foo: 1\n", ValueError, "unknown key"),
    ("'/(/':\n  isq: Q4K\n", ValueError, "invalid regex"),
])
def test_topology_errors(text, err, match):
    with pytest.raises(err, match=match):
        parse_topology(text)


def test_moqe_quantizes_experts_only():
    plan = build_plan("Q4K", moqe=True)
    assert plan.type_for("model.layers.0.block_sparse_moe.experts.3.w1") == "Q4K"
    assert plan.type_for("model.layers.0.mlp.experts.gate_proj") == "Q4K"
    assert plan.type_for("model.layers.0.self_attn.q_proj") is None
    assert plan.type_for("lm_head") is None


# --------------------------------------------------------------------------- imatrix files

def _write_legacy_imatrix(path: Path, entries: dict, ncall: int = 4):
    with open(path, "wb") as f:
        f.write(struct.pack("<i", len(entries)))
        for name, vals in entries.items():
            f.write(struct.pack("<i", len(name)) + name.encode() + struct.pack("<ii", ncall, len(vals)))
            f.write(np.asarray(vals, dtype="<f4").tobytes())
        f.write(struct.pack("<i", 10) + struct.pack("<i", 4) + b"data")


def test_imatrix_formats(tmp_path, tiny):
    from mistralrs_core.loading.hf_config import load_model_config
    from mistralrs_core.loading.model_loader import detect_architecture
    hf = load_model_config(tiny)
    entry = detect_architecture(hf)
    v = np.arange(1, 257, dtype=np.float32)
    _write_legacy_imatrix(tmp_path / "a.imatrix", {"blk.0.attn_q.weight": v * 4, "blk.1.ffn_down.weight": np.ones(512)})
    got = imx.load_imatrix(str(tmp_path / "a.imatrix"), hf, entry)
    assert set(got) == {"model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"}
    assert torch.equal(got["model.layers.0.self_attn.q_proj"], torch.from_numpy(v))
    imx.write_cimatrix(tmp_path / "b.cimatrix", {"model.layers.0.mlp.up_proj": torch.from_numpy(v)})
    got = imx.load_imatrix(str(tmp_path / "b.cimatrix"), hf, entry)
    assert torch.equal(got["model.layers.0.mlp.up_proj"], torch.from_numpy(v))
    import gguf
    w = gguf.GGUFWriter(str(tmp_path / "c.gguf"), "imatrix")
    w.add_tensor("blk.1.attn_k.weight.in_sum2", v * 3)
    w.add_tensor("blk.1.attn_k.weight.counts", np.array([3.0], dtype=np.float32))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
    got = imx.load_imatrix(str(tmp_path / "c.gguf"), hf, entry)
    assert torch.allclose(got["model.layers.1.self_attn.k_proj"], torch.from_numpy(v))
    (tmp_path / "bad.imatrix").write_bytes(b"\x05\x00\x00\x00\x03")
    with pytest.raises(ValueError, match="truncated"):
        imx.load_imatrix(str(tmp_path / "bad.imatrix"), hf, entry)


# --------------------------------------------------------------------------- models

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny Llama whose rows are whole 256-blocks (K-quants apply), stored in bfloat16."""
    return write_random_llama(tmp_path_factory.mktemp("isq"), hidden=256, intermediate=512, heads=4, kv_heads=2,
                              layers=2, dtype="bfloat16")


def _load_isq(path, isq, **which_kw):
    from mistralrs import Runner, Which
    r = Runner(which=Which.Plain(model_id=str(path), dtype="F32", **which_kw), in_situ_quant=isq, max_seqs=2)
    return r, r._pipeline(None).model


def _logits(model, prompt, steps=3):
    run = SingleSequence(model)
    out = [run.step(prompt)]
    for i in range(steps):
        out.append(run.step([(prompt[-1] * 7 + i) % 300]))
    return torch.cat(out)


def _dequantized_reference(path, model):
    """The dense model with every quantized layer's weight replaced by its dequantized values."""
    ref = load_for_test(path)
    values = {}
    for m in model.modules():
        if getattr(m, "qmethod", None) is None:
            continue
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
    return ref


@pytest.mark.parametrize("isq, types", [("Q4K", {"Q4_K", "Q6_K"}), ("q8_0", {"Q8_0"}), ("3", {"Q3_K", "Q6_K"})])
def test_isq_model_equals_dequantize_then_matmul(tiny, isq, types):
    r, model = _load_isq(tiny, isq)
    try:
        got = {m.qmethod.spec.name for m in model.modules()
               if isinstance(getattr(m, "qmethod", None), GGMLQuantMethod)}
        assert got == types
        assert all(m.weight is None for m in model.modules() if isinstance(m, Linear))
        ref = _dequantized_reference(tiny, model)
        prompt = [5, 17, 33, 2, 90, 41]
        a, b = _logits(model, prompt), _logits(ref, prompt)
        assert float((a - b).abs().max() / b.abs().max()) < 1e-5
        if types <= {"Q4_K", "Q6_K", "Q8_0"} and cpp_kernels.available():
            assert model.fast_forward is not None   # the C++ decoder step serves ISQ'd models too
    finally:
        r.shutdown()


def test_fallback_for_rows_not_whole_superblocks(tmp_path):
    # hidden 96: Q4K falls back to Q4_1 for rows of 96 (as upstream), the 192-wide down
    # projection too; a 96-row Q6K (embedding) to Q5_1.
    p = write_random_llama(tmp_path, hidden=96, intermediate=192, heads=4, kv_heads=2, layers=1, vocab=320)
    r, model = _load_isq(p, "Q4K")
    try:
        names = {m.hf_name: m.qmethod.spec.name for m in model.modules() if getattr(m, "qmethod", None) is not None}
        assert names["model.layers.0.self_attn.q_proj"] == "Q4_1"
        assert names["model.embed_tokens"] == "Q5_1"
    finally:
        r.shutdown()


def test_one_dense_tensor_alive_during_isq(tiny):
    """Every checkpoint tensor the hook quantizes is freed before the next one streams in."""
    from mistralrs_core.loading.hf_config import load_model_config
    from mistralrs_core.loading.model_loader import detect_architecture
    from mistralrs_core.loading.safetensors_io import SafetensorsWeights
    hf = load_model_config(tiny)
    model = detect_architecture(hf).load().from_hf_config(hf, torch.float32)
    plan = build_plan("Q8_0")
    model.quant_config = QuantConfig(kind="isq", compute_dtype=torch.float32, plan=plan)
    refs, alive = [], []
    store = SafetensorsWeights(tiny)

    def stream():
        for name, t in store.items():
            alive.append(sum(r() is not None for r in refs))
            if name.endswith("proj.weight") or "embed" in name:
                refs.append(weakref.ref(t))
            yield name, t
            del t

    model.load_weights(stream())
    # when each tensor streams in, every earlier quantized tensor is already freed
    assert max(alive) == 0 and sum(r() is not None for r in refs) == 0
    assert sum(isinstance(getattr(m, "qmethod", None), GGMLQuantMethod) for m in model.modules()) == 16


def test_topology_and_moqe_through_runner(tiny, tmp_path):
    topo = tmp_path / "t.yml"
    topo.write_text("0:\n  isq: Q8_0\n'/mlp\\.up_proj\\.weight$/':\n  isq: Q5K\n")
    r, model = _load_isq(tiny, "Q4K", topology=str(topo))
    try:
        names = {m.hf_name: m.qmethod.spec.name for m in model.modules() if getattr(m, "qmethod", None) is not None}
        assert names["model.layers.0.self_attn.q_proj"] == "Q8_0"
        assert names["model.layers.1.self_attn.q_proj"] == "Q4_K"
        assert names["model.layers.1.mlp.up_proj"] == "Q5_K"
        assert names["lm_head"] == "Q6_K"
    finally:
        r.shutdown()


def test_topology_device_keys_are_the_core_s(tmp_path):
    # One file, two readers: the quantizer reads `isq` and skips `device`, the core's device
    # map reads `device` (and checks it) and skips `isq`.
    topo = parse_topology("0-2:\n  isq: Q8_0\n  device: cpu[1]\n2:\n  device: nowhere\n")
    assert {i: t and t.name for i, t in topo.layers.items()} == {0: "Q8_0", 1: "Q8_0", 2: None}


def test_topology_with_isq_and_device_keys_through_runner(tiny, tmp_path):
    from mistralrs import ChatCompletionRequest, Runner, Which
    both = tmp_path / "both.yml"
    both.write_text("0:\n  isq: Q8_0\n  device: cpu[0]\n1:\n  isq: Q4K\n  device: cpu[1]\n")
    isq_only = "0:\n  isq: Q8_0\n1:\n  isq: Q4K\n"     # the YAML itself also passes both readers

    def ask(r):
        req = ChatCompletionRequest(messages=[{"role": "user", "content": "Tell me a story"}], max_tokens=6,
                                    temperature=0.0, logprobs=True)
        out = r.send_chat_completion_request(req).choices[0]
        return out.message.content, [t.logprob for t in out.logprobs.content]

    runners = []
    try:
        for path in (both, isq_only):
            runners.append(Runner(which=Which.Plain(model_id=str(tiny), dtype="F32", topology=str(path)),
                                  max_seqs=2))
        mapped, plain = (r._pipeline(None).model for r in runners)
        assert mapped.device_map.labels == ["cpu[0]", "cpu[1]"] and mapped.device_map.source == "topology"
        assert runners[0].model_placement(runners[0].list_models()[0])["device_map"]["layers"] == [
            {"device": "cpu[0]", "layers": [0, 0]}, {"device": "cpu[1]", "layers": [1, 1]}]
        assert getattr(plain, "device_map", None) is None
        for model in (mapped, plain):
            names = {m.hf_name: m.qmethod.spec.name for m in model.modules()
                     if getattr(m, "qmethod", None) is not None}
            assert names["model.layers.0.self_attn.q_proj"] == "Q8_0"
            assert names["model.layers.1.mlp.down_proj"] == "Q4_K"
            assert "lm_head" not in names          # no default type: only the topology's layers
        a, b = ask(runners[0]), ask(runners[1])
        assert a[0] == b[0] and a[1] == b[1]
    finally:
        for r in runners:
            r.shutdown()


def test_imatrix_changes_the_blocks_as_llama_cpp(tiny, tmp_path):
    rng = np.random.default_rng(0)
    vals = {f"model.layers.{i}.mlp.down_proj": torch.from_numpy(rng.gamma(0.5, 2.0, 512).astype(np.float32))
            for i in range(2)}
    imx.write_cimatrix(tmp_path / "m.cimatrix", vals)
    r, model = _load_isq(tiny, "Q4K", imatrix=str(tmp_path / "m.cimatrix"))
    r0, plain = _load_isq(tiny, "Q4K")
    try:
        from mistralrs_core.loading.safetensors_io import SafetensorsWeights
        w = SafetensorsWeights(tiny).get("model.layers.1.mlp.down_proj.weight")
        down = model.model.layers[1].mlp.down_proj.qmethod.raw
        assert torch.equal(down, cpp_kernels.quantize(w.float(), T.Q4_K, vals["model.layers.1.mlp.down_proj"]))
        assert not torch.equal(down, plain.model.layers[1].mlp.down_proj.qmethod.raw)
        # layers the imatrix does not name are quantized without one
        assert torch.equal(model.model.layers[1].mlp.up_proj.qmethod.raw, plain.model.layers[1].mlp.up_proj.qmethod.raw)
    finally:
        r.shutdown()
        r0.shutdown()


def test_calibration_file_computes_an_imatrix(tiny, tmp_path):
    text = tmp_path / "cal.txt"
    text.write_text("the quick brown fox jumps over the lazy dog " * 20)
    r, model = _load_isq(tiny, "Q4K", calibration_file=str(text))
    try:
        plan = model.quant_config.plan
        assert plan.imatrix and "model.layers.0.self_attn.q_proj" in plan.imatrix
        assert plan.imatrix["model.layers.0.self_attn.q_proj"].shape == (256,)
        assert bool((plan.imatrix["model.layers.0.mlp.down_proj"] > 0).all())
    finally:
        r.shutdown()


def test_sdk_errors(tiny, tmp_path):
    from mistralrs import Runner, Which
    (tmp_path / "x.imatrix").write_bytes(b"")
    with pytest.raises(ValueError, match="imatrix / calibration_file"):
        Runner(which=Which.Plain(model_id=str(tiny), imatrix="a", calibration_file="b"), in_situ_quant="Q4K")
    with pytest.raises(ValueError, match="unknown ISQ type"):
        Runner(which=Which.Plain(model_id=str(tiny)), in_situ_quant="Q4KK")
    with pytest.raises(ValueError, match="write_uqff: needs in-situ quantization"):
        Runner(which=Which.Plain(model_id=str(tiny), write_uqff=str(tmp_path / "o")))
    with pytest.raises(ValueError, match="in_situ_quant: from_uqff"):
        Runner(which=Which.Plain(model_id=str(tiny), from_uqff="x-0.uqff"), in_situ_quant="Q4K")
    with pytest.raises(FileNotFoundError, match="from_uqff"):
        Runner(which=Which.Plain(model_id=str(tiny), from_uqff="nope-0.uqff"))


# --------------------------------------------------------------------------- UQFF

def test_uqff_round_trip_bit_identical(tiny, tmp_path):
    from mistralrs import Runner, Which
    out = tmp_path / "uq"
    r, model = _load_isq(tiny, "Q4K", write_uqff=str(out))
    try:
        prompt = [3, 9, 27, 81, 243]
        want = _logits(model, prompt)
    finally:
        r.shutdown()
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "q4k-0.uqff", "residual.safetensors",
                                                     "tokenizer.json", "tokenizer_config.json"]
    from safetensors import safe_open
    with safe_open(str(out / "q4k-0.uqff"), "pt") as f:
        names = set(f.keys())
        assert int(f.get_tensor("uqff.version.major")) == 1 and int(f.get_tensor("uqff.version.minor")) == 2
        key = "model.layers.0.self_attn.q_proj"
        assert {f"{key}.weight", f"{key}.weight.format", f"{key}.weight.dtype", f"{key}.weight.shape"} <= names
        assert int(f.get_tensor(f"{key}.weight.format")) == 0 and int(f.get_tensor(f"{key}.weight.dtype")) == T.Q4_K
        assert f.get_tensor(f"{key}.weight.shape").tolist() == [256, 256]
        assert f.get_slice(f"{key}.weight").get_dtype() == "U8"
        assert int(f.get_tensor("model.embed_tokens.weight.dtype")) == T.Q6_K   # UQFF 1.2: embeddings inline
    with safe_open(str(out / "residual.safetensors"), "pt") as f:
        assert "model.embed_tokens.weight" not in f.keys() and "model.norm.weight" in f.keys()
    for spec in ("q4k-0.uqff", str(out / "q4k-0.uqff"), [str(out / "q4k-0.uqff")]):
        r2 = Runner(which=Which.Plain(model_id=str(out), from_uqff=spec, dtype="F32"), max_seqs=2)
        try:
            m2 = r2._pipeline(None).model
            assert torch.equal(_logits(m2, prompt), want)
        finally:
            r2.shutdown()


@pytest.mark.parametrize("isq, cls", [("HQQ4", "HQQMethod"), ("AFQ4", "AFQMethod"), ("FP8", "FP8Method"),
                                      ("F8Q8", "F8Q8Method")])
def test_family_isq_equals_dequantize_then_matmul_and_round_trips_uqff(tiny, tmp_path, isq, cls):
    from mistralrs import Runner, Which
    out = tmp_path / "uq"
    r, model = _load_isq(tiny, isq, write_uqff=str(out))
    try:
        kinds = {type(m.qmethod).__name__ for m in model.modules() if getattr(m, "qmethod", None) is not None}
        assert cls in kinds
        ref = _dequantized_reference(tiny, model)
        prompt = [5, 17, 33, 2, 90, 41]
        want = _logits(model, prompt)
        b = _logits(ref, prompt)
        assert float((want - b).abs().max() / b.abs().max()) < 1e-5
    finally:
        r.shutdown()
    shard = next(p.name for p in out.iterdir() if p.suffix == ".uqff")
    r2 = Runner(which=Which.Plain(model_id=str(out), from_uqff=shard, dtype="F32"), max_seqs=2)
    try:
        assert torch.equal(_logits(r2._pipeline(None).model, prompt), want)
    finally:
        r2.shutdown()


def test_uqff_shards_and_version_check(tiny, tmp_path):
    from mistralrs_quant.isq import uqff
    r, model = _load_isq(tiny, "Q8_0")
    try:
        paths = uqff.write_uqff(model, tmp_path / "o" / "m.uqff", tiny, "x", shard_bytes=200_000)
    finally:
        r.shutdown()
    assert len(paths) > 2 and [p.name for p in paths[:2]] == ["m-0.uqff", "m-1.uqff"]
    assert uqff.expand_shards("m-1.uqff", tmp_path / "o") == paths   # siblings found from any shard
    assert uqff.expand_shards(";".join(str(p) for p in paths[:2]), None) == paths
    from safetensors.torch import load_file, save_file
    t = load_file(str(paths[0]))
    t["uqff.version.major"] = torch.tensor(2, dtype=torch.uint32)
    save_file(t, str(tmp_path / "new-0.uqff"))
    with pytest.raises(ValueError, match="version 2.2.0 is incompatible"):
        list(uqff.iter_uqff([tmp_path / "new-0.uqff"]))
    t["uqff.version.major"] = torch.tensor(1, dtype=torch.uint32)
    t["uqff.version.minor"] = torch.tensor(3, dtype=torch.uint32)
    save_file(t, str(tmp_path / "newer-0.uqff"))
    with pytest.raises(ValueError, match="newer producer"):
        list(uqff.iter_uqff([tmp_path / "newer-0.uqff"]))
    del t["uqff.version.major"]
    save_file(t, str(tmp_path / "old-0.uqff"))
    with pytest.raises(ValueError, match="no version tag"):
        list(uqff.iter_uqff([tmp_path / "old-0.uqff"]))


def test_uqff_layers_shard_as_gguf_blocks(tiny, tmp_path):
    """Tensor parallelism takes rows / block-aligned columns of a GGUF-family UQFF layer (the
    same bytes as the dense rows' quantization); other families are refused by name."""
    from mistralrs_quant.isq import uqff
    from mistralrs_quant.qlinear import GGUFQuantizedWeight
    r, model = _load_isq(tiny, "Q8_0", write_uqff=str(tmp_path / "q"))
    r.shutdown()
    layers = dict(uqff.iter_uqff([tmp_path / "q" / "q8_0-0.uqff"]))
    w = layers["model.layers.0.mlp.down_proj.weight"]           # [256, 512]
    full = w.dequantize()
    rows = w.take_rows([(0, 16), (100, 120)])
    assert isinstance(rows, uqff.UqffQuantizedWeight) and rows.shape == (36, 512)
    assert torch.equal(rows.dequantize(), torch.cat([full[:16], full[100:120]]))
    cols = w.take_cols(256, 512)
    assert cols.shape == (256, 256) and torch.equal(cols.dequantize(), full[:, 256:])
    with pytest.raises(ValueError, match="whole quantization blocks of 32"):
        w.take_cols(0, 48)
    assert isinstance(w._ggml_view(), GGUFQuantizedWeight)


@pytest.mark.parametrize("isq", ["AFQ4", "AFQ3", "AFQ6", "F8Q8", "FP8", "HQQ4", "HQQ8"])
def test_uqff_layers_of_every_family_shard_exactly(isq, tmp_path):
    """Rows and group-aligned columns of an AFQ / F8Q8 / FP8 / HQQ UQFF layer dequantize to
    exactly those rows and columns of the whole layer (HQQ's 96 rows are not whole bands of
    its 64 groups, so its shards keep the whole packed layer); a split inside a group is
    refused by name."""
    from mistralrs_quant.isq import uqff
    from mistralrs_quant.isq.types import TYPES
    torch.manual_seed(0)
    method = TYPES[isq].load_class().from_float(torch.randn(96, 256), **TYPES[isq].kwargs)
    entries = {f"x.{k}": v for k, v in method.to_uqff_tensors().items()}
    w = uqff.UqffQuantizedWeight("x", entries, tmp_path / "m-0.uqff")
    full = w.dequantize()
    rows = w.take_rows([(0, 16), (40, 72)])
    assert rows.dequantize().shape == (48, 256)
    assert torch.equal(rows.dequantize(), torch.cat([full[:16], full[40:72]]))
    cols = w.take_cols(128, 256)
    assert torch.equal(cols.dequantize(), full[:, 128:])
    x = torch.randn(3, 128)
    got = uqff.uqff_quant_method(types_config(), "x", None, cols).forward(x)
    assert torch.allclose(got, x @ full[:, 128:].T, rtol=1e-5, atol=1e-5)
    if isq.startswith(("AFQ", "F8Q8")):
        with pytest.raises(ValueError, match="do not fall on its"):
            w.take_cols(0, 48)


def types_config():
    import types
    return types.SimpleNamespace(plan=None, compute_dtype=torch.float32, device=None)


def test_send_re_isq(tiny):
    from mistralrs import CompletionRequest
    r, model = _load_isq(tiny, "Q4K")
    req = CompletionRequest(prompt="a b c d e f g h i j k l m n o p q r s t", model="default", max_tokens=6,
                            temperature=0.0, ignore_eos=True)
    try:
        r.send_completion_request(req)      # leaves the prompt's blocks in the prefix cache
        r.send_re_isq("Q8_0")
        fresh, _ = _load_isq(tiny, "Q8_0")
        try:
            # no K/V computed with the Q4K weights is reused after the swap
            assert r.send_completion_request(req).choices[0].text == \
                fresh.send_completion_request(req).choices[0].text
        finally:
            fresh.shutdown()
        names = {m.qmethod.spec.name for m in model.modules() if getattr(m, "qmethod", None) is not None}
        assert names == {"Q8_0"}
        with pytest.raises(ValueError, match="unknown ISQ type"):
            r.send_re_isq("nope")
    finally:
        r.shutdown()


def test_other_model_kinds_refuse_isq(tmp_path):
    from mistralrs import Runner, Which
    with pytest.raises(NotAvailableYet, match="in_situ_quant on a GGUF model|in_situ_quant"):
        Runner(which=Which.GGUF(quantized_model_id=str(tmp_path), quantized_filename="x.gguf"),
               in_situ_quant="Q4K")


def test_moqe_organization_through_runner(tiny):
    # A dense model has no experts: under MoQE nothing is quantized (upstream does the same).
    from mistralrs import IsqOrganization
    r, model = _load_isq(tiny, "Q4K", organization=IsqOrganization.MoQE)
    try:
        assert not any(getattr(m, "qmethod", None) is not None for m in model.modules())
    finally:
        r.shutdown()
