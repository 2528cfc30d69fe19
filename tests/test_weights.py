"""The one weight-loading path (``loading/weights.py``): names, per-parameter loaders, the
quantization hook seeing checkpoint tensors one at a time, and HF names after fusion."""
import re
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mistralrs_core.hookspecs import hookimpl
from mistralrs_core.layers.linear import Embedding, Linear
from mistralrs_core.loading.model_loader import detect_architecture
from mistralrs_core.loading.hf_config import load_model_config
from mistralrs_core.loading.quant_config import QuantConfig
from mistralrs_core.loading.safetensors_io import SafetensorsWeights
from mistralrs_core.loading.weights import (WeightLoader, load_module, read_weight, resolve_weight,
                                            weight_index)
from mistralrs_core.plugins import get_plugin_manager, register_plugin
from mistralrs_core.testing.parity import SingleSequence
from mistralrs_core.testing.tiny import write_random_llama

PROJ = re.compile(r"\.(q|k|v|o|gate|up|down)_proj$")


# --- a test quantizer: int8 per output row ---------------------------------------------
def int8_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    w = w.float()
    scale = w.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127
    return torch.round(w / scale).to(torch.int8), scale


class Int8Method:
    def __init__(self, q: torch.Tensor, scale: torch.Tensor):
        self.q, self.scale = q, scale
        self.out_features, self.in_features = q.shape

    @classmethod
    def from_dense(cls, w):
        return cls(*int8_rows(w))

    @classmethod
    def concat(cls, methods):
        return cls(torch.cat([m.q for m in methods]), torch.cat([m.scale for m in methods]))

    def dequantize(self):
        return self.q.float() * self.scale

    def forward(self, x):
        return F.linear(x, self.dequantize().to(x.dtype))

    def embedding(self, ids):
        return F.embedding(ids, self.dequantize())


class Int8Plugin:
    """Quantizes every layer its ``QuantConfig`` types ``test_int8``; records what it saw."""

    def __init__(self):
        self.seen: list[tuple[str, torch.dtype, torch.device]] = []
        self.alive_at_call: list[int] = []
        self.tracked: list[weakref.ref] = []

    def alive(self) -> int:
        return sum(r() is not None for r in self.tracked)

    @hookimpl
    def mistralrs_quant_method(self, quant_config, hf_name, module, weight):
        if quant_config.kind != "isq" or quant_config.for_layer(hf_name, module) != "test_int8":
            return None
        self.seen.append((hf_name, weight.dtype, weight.device))
        self.alive_at_call.append(self.alive())
        return Int8Method.from_dense(weight)


@pytest.fixture
def int8_plugin():
    plugin = Int8Plugin()
    register_plugin(plugin, "test-int8")
    yield plugin
    get_plugin_manager().unregister(name="test-int8")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny Llama stored in bfloat16 (the model loads it as float32)."""
    return write_random_llama(tmp_path_factory.mktemp("wl"), hidden=64, layers=2, heads=4, kv_heads=2,
                              intermediate=96, vocab=160, dtype="bfloat16")


def build(ckpt, dtype=torch.float32):
    hf = load_model_config(ckpt)
    return detect_architecture(hf).load().from_hf_config(hf, dtype)


def logits(model, ids=(1, 5, 9, 2, 77, 3)):
    return SingleSequence(model).step(list(ids))


# --- quantization streams, tensor by tensor ---------------------------------------------
def test_isq_quantizes_each_tensor_as_it_streams_in(ckpt, int8_plugin):
    model = build(ckpt)
    store = SafetensorsWeights(ckpt)
    will_quantize = [n for n in store.names() if PROJ.search(n.rpartition(".")[0]) or "embed_tokens" in n]
    dense_alive_at_yield = []

    def stream():
        for name, t in store.items():
            if name in will_quantize:
                int8_plugin.tracked.append(weakref.ref(t))
                dense_alive_at_yield.append(int8_plugin.alive())
            yield name, t
            del t  # the stream itself keeps nothing

    qc = QuantConfig.isq("test_int8", topology={r"^lm_head$": None})
    model.load_weights(stream(), quant_config=qc)

    # The hook saw the checkpoint's tensor (bfloat16), before any cast to the model dtype.
    assert sorted(h for h, _, _ in int8_plugin.seen) == sorted(n.rpartition(".")[0] for n in will_quantize)
    assert {dt for _, dt, _ in int8_plugin.seen} == {torch.bfloat16}
    # Never more than the one tensor in hand, and none of them kept after load.
    assert max(dense_alive_at_yield) == 1 and max(int8_plugin.alive_at_call) == 1
    assert int8_plugin.alive() == 0
    # The quantized layers hold no dense parameter; lm_head (topology: None) stays dense.
    params = dict(model.named_parameters())
    assert not [n for n in params if PROJ.search(n.rpartition(".")[0]) or "embed_tokens" in n]
    assert model.lm_head.qmethod is None and params["lm_head.weight"].dtype == torch.float32
    assert isinstance(model.model.embed_tokens.qmethod, Int8Method)
    assert model.quant_config.kind == "isq" and model.quant_config.compute_dtype == torch.float32


def test_isq_logits_equal_dequantize_then_matmul(ckpt, int8_plugin):
    quantized = build(ckpt)
    quantized.load_weights(SafetensorsWeights(ckpt).items(),
                           quant_config=QuantConfig.isq("test_int8", topology=[(r"lm_head", None)]))

    def dequantized():
        for name, t in SafetensorsWeights(ckpt).items():
            if PROJ.search(name.rpartition(".")[0]) or "embed_tokens" in name:
                t = Int8Method.from_dense(t).dequantize()
            yield name, t

    reference = build(ckpt)
    reference.load_weights(dequantized())
    assert reference.model.embed_tokens.qmethod is None
    # Both fuse q/k/v and gate/up (the int8 method concatenates), so the products match exactly.
    assert torch.equal(logits(quantized), logits(reference))


def test_topology_keeps_matching_layers_dense(ckpt, int8_plugin):
    model = build(ckpt)
    qc = QuantConfig.isq("test_int8", topology=[(r"layers\.1\.", None), (r"embed_tokens|lm_head", None)])
    model.load_weights(SafetensorsWeights(ckpt).items(), quant_config=qc)
    hit = {h for h, _, _ in int8_plugin.seen}
    assert hit and all(h.startswith("model.layers.0.") for h in hit)
    assert model.model.layers[1].self_attn._qkv_runtime.qmethod is None


# --- packed weights go through the same hook ---------------------------------------------
class FakePacked:
    """A pre-quantized weight no plugin claims (the core then uses its values)."""

    def __init__(self, values):
        self.values = values
        self.shape = tuple(values.shape)

    def dequantize(self):
        return self.values

    def quant_method(self, compute_dtype):  # must not be called: only a hook decides
        raise AssertionError("packed weights are placed through mistralrs_quant_method only")


def test_unclaimed_packed_weight_is_dequantized(ckpt):
    model = build(ckpt)
    store = SafetensorsWeights(ckpt)
    model.load_weights((n, FakePacked(t.float()) if "q_proj" in n else t) for n, t in store.items())
    got = read_weight(model, "model.layers.0.self_attn.q_proj.weight")
    assert torch.equal(got, store.get("model.layers.0.self_attn.q_proj.weight").float())


def test_hook_receives_packed_weight_and_config(ckpt):
    calls = []

    class Spy:
        @hookimpl(tryfirst=True)
        def mistralrs_quant_method(self, quant_config, hf_name, module, weight):
            calls.append((hf_name, type(weight).__name__, quant_config.kind, quant_config.compute_dtype,
                          quant_config.device))

    register_plugin(Spy(), "test-spy")
    try:
        model = build(ckpt)
        model.quant_compute_dtype = torch.bfloat16
        model.quant_config = QuantConfig(kind="gguf")
        model.load_weights((n, FakePacked(t.float()) if "o_proj" in n else t)
                           for n, t in SafetensorsWeights(ckpt).items())
    finally:
        get_plugin_manager().unregister(name="test-spy")
    packed = [c for c in calls if c[1] == "FakePacked"]
    assert [c[0] for c in packed] == ["model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.o_proj"]
    assert all(c[2:] == ("gguf", torch.bfloat16, torch.device("cpu")) for c in calls)
    # Every Linear/Embedding weight is offered to the hook, norms are not.
    assert len(calls) == 2 * 7 + 2 and not [c for c in calls if "norm" in c[0]]


# --- HF names after fusion -------------------------------------------------------------
def test_every_checkpoint_name_resolves_after_fusion(ckpt):
    model = build(ckpt)
    store = SafetensorsWeights(ckpt)
    model.load_weights(store.items())
    index = weight_index(model)
    for name in store.names():
        module, rows = resolve_weight(model, name, index)
        want = store.get(name).float()
        assert torch.equal(read_weight(model, name, index), want), name
        if PROJ.search(name.rpartition(".")[0]) and not re.search(r"o_proj|down_proj", name):
            assert rows is not None and module.weight[rows].shape == want.shape, name
    fused, rows = model.resolve_weight("model.layers.1.self_attn.k_proj.weight")
    assert fused is model.model.layers[1].self_attn._qkv_runtime and rows == slice(64, 96)
    assert [p[0] for p in fused.fused_parts] == [f"model.layers.1.self_attn.{p}_proj" for p in "qkv"]
    up, rows = model.resolve_weight("model.layers.0.mlp.up_proj.weight")
    assert up is model.model.layers[0].mlp.gate_up_proj and rows == slice(96, 192)
    with pytest.raises(KeyError, match="not part of"):
        model.resolve_weight("model.layers.0.self_attn.nope.weight")


def test_quantized_fused_rows_resolve(ckpt, int8_plugin):
    model = build(ckpt)
    store = SafetensorsWeights(ckpt)
    model.load_weights(store.items(), quant_config=QuantConfig.isq("test_int8"))
    name = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(read_weight(model, name), Int8Method.from_dense(store.get(name)).dequantize())


def test_renamed_checkpoint_keeps_its_hf_prefix():
    class Tower(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = Linear(4, 3)

    tower = Tower()
    load_module(tower, [("vision.fc.weight", torch.ones(3, 4))],
                map_name=lambda n: n.replace("vision.fc.", "proj."))
    assert tower.proj.hf_name == "vision.fc"
    assert resolve_weight(tower, "vision.fc.weight") == (tower.proj, None)


# --- any nn.Module, the per-parameter loader, errors -------------------------------------
class Tower(nn.Module):
    """Not a CausalLM: a vision-tower-like module with a norm and a bias."""

    def __init__(self):
        super().__init__()
        self.embed = Embedding(10, 4)
        self.fc = Linear(4, 2, bias=True)
        self.norm = nn.LayerNorm(4, device="meta")


def tower_weights():
    g = torch.Generator().manual_seed(0)
    return {"embed.weight": torch.randn(10, 4, generator=g), "fc.weight": torch.randn(2, 4, generator=g),
            "fc.bias": torch.randn(2, generator=g), "norm.weight": torch.randn(4, generator=g),
            "norm.bias": torch.randn(4, generator=g), "norm.num_batches_tracked": torch.zeros(())}


def test_any_module_loads_with_dtype_device_and_prefixes():
    tower = Tower()
    load_module(tower, tower_weights().items(), dtype=torch.bfloat16, ignored_suffixes=("num_batches_tracked",))
    assert tower.fc.weight.dtype == torch.bfloat16 and tower.norm.bias.device.type == "cpu"
    assert torch.equal(tower.fc.bias, tower_weights()["fc.bias"].bfloat16())
    assert (tower.embed.hf_name, tower.fc.hf_name, tower.norm.hf_name) == ("embed", "fc", "norm")


def test_errors_name_the_weight():
    with pytest.raises(ValueError, match=r"unexpected weight 'fc.scale' for Tower"):
        load_module(Tower(), [("fc.scale", torch.ones(2))])
    with pytest.raises(ValueError, match=r"weight 'fc.weight' has shape \(4, 2\), expected \(2, 4\)"):
        load_module(Tower(), [("fc.weight", torch.ones(4, 2))])
    w = tower_weights()
    del w["norm.bias"], w["norm.num_batches_tracked"]
    with pytest.raises(ValueError, match=r"checkpoint is missing 1 weight\(s\) for Tower: norm.bias"):
        load_module(Tower(), w.items())


def test_per_parameter_loader_shards_before_the_shape_check():
    tower = Tower()
    calls = []

    def keep_rank1_rows(param_or_module, name, tensor):  # tensor parallel, rank 1 of 2
        calls.append((type(param_or_module).__name__, name, tuple(tensor.shape)))
        return tensor.chunk(2, dim=0)[1]

    tower.fc.weight.weight_loader = keep_rank1_rows   # on the parameter
    tower.fc.weight_loader = keep_rank1_rows          # on the module: used for its bias
    w = tower_weights()
    w["fc.weight"], w["fc.bias"] = torch.arange(16.).reshape(4, 4), torch.arange(4.)
    del w["norm.num_batches_tracked"]
    load_module(tower, w.items())
    assert torch.equal(tower.fc.weight, torch.arange(8., 16.).reshape(2, 4))
    assert torch.equal(tower.fc.bias, torch.tensor([2., 3.]))
    assert calls == [("Parameter", "fc.weight", (4, 4)), ("Parameter", "fc.bias", (4,))]


def test_quantized_embedding_shape_is_checked():
    emb = Embedding(10, 4)
    with pytest.raises(ValueError, match=r"quantized weight has shape \(10, 5\), expected \(10, 4\)"):
        emb.set_quant_method(Int8Method.from_dense(torch.ones(10, 5)))


def test_quant_config_decides_per_layer():
    qc = QuantConfig.isq("Q4K", topology={r"\.mlp\.": "Q8_0", r"lm_head": None})
    assert qc.for_layer("model.layers.3.mlp.down_proj") == "Q8_0"
    assert qc.for_layer("lm_head") is None
    assert qc.for_layer("model.layers.3.self_attn.q_proj") == "Q4K"
    assert QuantConfig().for_layer("lm_head") is None
    assert QuantConfig(kind="gguf").for_layer("x") == "gguf"
    with pytest.raises(ValueError, match="kind must be one of"):
        QuantConfig(kind="bitsandbytes")
    assert WeightLoader(Tower(), "cpu").quant_config.compute_dtype == torch.float32


def q8_0(w: torch.Tensor) -> torch.Tensor:
    """ggml Q8_0 blocks of ``w`` [out, in]: per 32 weights an f16 scale then 32 int8."""
    blocks = w.float().reshape(w.shape[0], -1, 32)
    scale = (blocks.abs().amax(-1, keepdim=True) / 127).to(torch.float16)
    q = torch.round(blocks / scale.float().clamp_min(1e-12)).clamp(-127, 127).to(torch.int8)
    raw = torch.cat([scale.view(torch.uint8), q.view(torch.uint8)], -1)
    return raw.reshape(w.shape[0], -1)


def test_gguf_blocks_stay_packed_through_the_hook(ckpt):
    qlinear = pytest.importorskip("mistralrs_quant.qlinear")
    model = build(ckpt)
    model.quant_config = QuantConfig(kind="gguf", compute_dtype=torch.float32)
    store = SafetensorsWeights(ckpt)
    packed = {}

    def stream():
        for name, t in store.items():
            if "o_proj" in name:
                t = packed[name] = qlinear.GGUFQuantizedWeight(q8_0(t), 8, tuple(t.shape))  # 8: Q8_0
            yield name, t

    model.load_weights(stream())
    o_proj = model.model.layers[0].self_attn.o_proj
    assert isinstance(o_proj.qmethod, qlinear.GGMLQuantMethod) and o_proj.weight is None
    assert o_proj.qmethod.compute_dtype == torch.float32
    for name, qw in packed.items():
        assert torch.equal(read_weight(model, name), qw.dequantize())
