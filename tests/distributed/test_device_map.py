"""Device mapping: parsing, placement of layers and their KV caches, outputs equal to an
unmapped model, automatic mapping from free memory, topology devices, and the errors.
The logic is device-agnostic; on this CPU-only machine the ordinals are logical CPUs."""
from __future__ import annotations

import pytest
import torch

from mistralrs_core.distributed import device_map as dm
from tiny_models import write_mixtral

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from mistralrs_core.testing.tiny import write_random_llama
    return write_random_llama(tmp_path_factory.mktemp("dm") / "llama", layers=4, seed=5)


def _ask(runner, q="Tell me a story"):
    from mistralrs_core.api import ChatCompletionRequest
    req = ChatCompletionRequest(messages=[{"role": "user", "content": q}], max_tokens=8, temperature=0.0,
                                logprobs=True)
    r = runner.send_chat_completion_request(req)
    return r.choices[0].message.content, [t.logprob for t in r.choices[0].logprobs.content]


def test_num_device_layers_places_layers_and_caches_and_keeps_outputs(model_dir):
    from mistralrs_core.api import Which
    from mistralrs_core.runner import Runner
    plain = Runner(which=Which.Plain(model_id=str(model_dir)), device="cpu")
    mapped = Runner(which=Which.Plain(model_id=str(model_dir)), device="cpu", num_device_layers=["0:1", "1:3"])
    try:
        mid = mapped.list_models()[0]
        model = mapped._pipeline(mid).model
        assert model.device_map.labels == ["cpu[0]", "cpu[1]", "cpu[1]", "cpu[1]"]
        # every module of a layer was loaded onto its device, the KV cache of each layer next to it
        assert model.model.layers[2].input_layernorm.__dict__["load_device"] == model.layer_devices[2]
        assert all(p.device == model.layer_devices[2] for p in model.model.layers[2].parameters())
        caches = mapped._pipeline(mid).engine.runner.caches
        assert [c.k.device for c in caches] == model.layer_devices
        assert len(model._device_hops) == 5            # 4 layers + the final norm
        assert mapped.model_placement(mid) == {"device_map": {
            "source": "num_device_layers", "base": "cpu",
            "layers": [{"device": "cpu[0]", "layers": [0, 0]}, {"device": "cpu[1]", "layers": [1, 3]}]}}
        for q in ("Tell me a story", "def main():"):
            a, b = _ask(plain, q), _ask(mapped, q)
            assert a[0] == b[0]
            assert max(abs(x - y) for x, y in zip(a[1], b[1])) < 1e-5
        # a map that covers fewer layers puts the rest on the host
        short = dm.parse_num_device_layers(["0:2"], 4, CPU)
        assert short.labels == ["cpu[0]", "cpu[0]", "cpu", "cpu"]
        assert plain.model_placement(plain.list_models()[0]) is None
    finally:
        plain.shutdown()
        mapped.shutdown()


@pytest.mark.parametrize("entries, match", [
    (["0:3", "1:3"], "maps 6 layers but the model has 4"),
    (["0-3"], r"num_device_layers\[0\]: expected 'ORD:NUM'"),
    ("0:4", "non-empty list"),
    ([], "non-empty list"),
])
def test_impossible_maps_are_clear_errors(model_dir, entries, match):
    from mistralrs_core.api import Which
    from mistralrs_core.runner import Runner
    with pytest.raises(ValueError, match=match):
        Runner(which=Which.Plain(model_id=str(model_dir)), device="cpu", num_device_layers=entries)


def test_unknown_devices_are_clear_errors():
    with pytest.raises(ValueError, match=r"cuda\[7\]' does not exist"):
        dm.parse_device_key("cuda[7]", "topology['0-2'].device")
    with pytest.raises(ValueError, match="unknown device 'gpu0'"):
        dm.parse_device_key("gpu0", "topology['0-2'].device")
    if torch.cuda.device_count() < 9:
        with pytest.raises(ValueError, match="device ordinal 8 does not exist"):
            dm._device_for_ordinal(8, torch.device("cuda"))


def test_topology_device_keys():
    topo = {"0-2": {"isq": "Q4K", "device": "cpu"}, "3": {"device": "cpu"}, "/mlp/": {"isq": "Q8_0"}}
    m = dm.device_map_from_topology(topo, 4, CPU)
    assert m.labels == ["cpu", "cpu", "cpu", "cpu"] and m.source == "topology"
    assert dm.device_map_from_topology({"0-2": {"isq": "Q4K"}}, 4, CPU) is None   # quantizer's business only
    # logical host devices, as num_device_layers ordinals off CUDA
    m = dm.device_map_from_topology({"0": {"device": "cpu[0]"}, "1-4": {"device": "cpu[1]", "isq": "Q8_0"}}, 4, CPU)
    assert m.labels == ["cpu[0]", "cpu[1]", "cpu[1]", "cpu[1]"] and set(m.layers) == {CPU}
    with pytest.raises(ValueError, match="layer 1 is already placed on cpu\\[1\\]"):
        dm.device_map_from_topology({"1-3": {"device": "cpu[1]"}, "0-2": {"device": "cpu[0]"}}, 4, CPU)
    with pytest.raises(ValueError, match=r"topology\['0-9'\]: layers 0-9 are outside the model's 4 layers"):
        dm.device_map_from_topology({"0-9": {"device": "cpu"}}, 4, CPU)
    with pytest.raises(ValueError, match="only be given for a layer range"):
        dm.device_map_from_topology({"/attn/": {"device": "cpu"}}, 4, CPU)
    with pytest.raises(ValueError, match="expected a layer range"):
        dm.device_map_from_topology({"first": {"device": "cpu"}}, 4, CPU)


def test_topology_file_reaches_the_placement(tmp_path):
    from mistralrs_core.distributed import placement
    f = tmp_path / "topo.yml"
    f.write_text("0-2:\n  device: cpu\n2-4:\n  isq: Q4K\n")
    assert placement.load_topology_devices(f) == {"0-2": {"device": "cpu"}, "2-4": {"isq": "Q4K"}}
    f.write_text("0-2:\n  isq: Q4K\n")
    assert placement.load_topology_devices(f) is None
    # the YAML itself, as the quantizer also takes it
    assert placement.load_topology_devices("0-2:\n  device: cpu[1]\n") == {"0-2": {"device": "cpu[1]"}}
    assert placement.load_topology_devices("0-2:\n  isq: Q4K\n") is None
    with pytest.raises(ValueError, match="cannot read"):
        placement.load_topology_devices(str(tmp_path / "missing.yml"))
    f.write_text("0-2: [unclosed\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        placement.load_topology_devices(f)


def test_auto_map_fills_devices_in_order_and_refuses_what_does_not_fit():
    a, b, host = torch.device("cuda", 0), torch.device("cuda", 1), CPU
    m = dm.auto_device_map([100] * 4, [10] * 4, 50, [(a, "cuda[0]", 300), (b, "cuda[1]", 250), (host, "cpu", 1000)])
    # device 0: 50 base + 2 x 110 = 270; device 1: 2 x 110 = 220
    assert m.labels == ["cuda[0]", "cuda[0]", "cuda[1]", "cuda[1]"] and m.base == a
    m = dm.auto_device_map([100] * 4, [10] * 4, 50, [(a, "cuda[0]", 200), (host, "cpu", 1000)])
    assert m.labels == ["cuda[0]", "cpu", "cpu", "cpu"]
    with pytest.raises(ValueError, match="2 of 4 layers .* do not fit"):
        dm.auto_device_map([100] * 4, [10] * 4, 0, [(a, "cuda[0]", 250)])
    with pytest.raises(ValueError, match="embeddings and LM head"):
        dm.auto_device_map([1] * 4, [0] * 4, 500 << 20, [(a, "cuda[0]", 100 << 20)])


def test_auto_map_sizes_from_the_model(tmp_path):
    from mistralrs_core.api import TextAutoMapParams
    from mistralrs_core.testing.parity import load_for_test
    model = load_for_test(write_mixtral(tmp_path / "moe"))
    layer = sum(p.numel() for p in model.model.layers[0].parameters()) * 4
    kv = 2 * 2 * 16 * 4 * 64 * 2          # k+v, kv heads, head dim, float32, tokens (seq 64 x batch 2)
    base = sum(p.numel() for p in model.parameters()) * 4 - 2 * layer
    fake = [(torch.device("cuda", 0), "cuda[0]", base + layer + kv), (CPU, "cpu", 10 * layer)]
    m = dm.auto_map_for_model(model, TextAutoMapParams(max_seq_len=64, max_batch_size=2), CPU, devices=fake)
    assert m.labels == ["cuda[0]", "cpu"]
    fake[0] = (fake[0][0], "cuda[0]", base + layer + kv - 1)
    m = dm.auto_map_for_model(model, TextAutoMapParams(max_seq_len=64, max_batch_size=2), CPU, devices=fake)
    assert m.labels == ["cpu", "cpu"]
    # Image tokens count too: the same room that held one layer's text KV holds none with images.
    from mistralrs_core.api import VisionAutoMapParams
    fake[0] = (fake[0][0], "cuda[0]", base + layer + kv)
    m = dm.auto_map_for_model(model, VisionAutoMapParams(max_seq_len=64, max_batch_size=2, max_num_images=1,
                                                         max_image_length=16), CPU, devices=fake)
    assert m.labels == ["cpu", "cpu"]


def test_auto_map_on_a_host_alone_maps_nothing(model_dir):
    from mistralrs_core.api import TextAutoMapParams, Which
    from mistralrs_core.runner import Runner
    r = Runner(which=Which.Plain(model_id=str(model_dir), auto_map_params=TextAutoMapParams(max_seq_len=256)),
               device="cpu")
    try:
        assert r.model_placement(r.list_models()[0]) is None
    finally:
        r.shutdown()


def test_mapping_and_tensor_parallel_do_not_combine(model_dir, monkeypatch):
    from mistralrs_core.distributed import placement, state
    monkeypatch.setattr(state, "_TP", state.TensorParallel(0, 2, "gloo", 1.0))
    from mistralrs_core.testing.parity import load_for_test
    with placement.loading(placement.PlacementRequest(num_device_layers=["0:4"])):
        with pytest.raises(ValueError, match="cannot be combined"):
            load_for_test(model_dir)
