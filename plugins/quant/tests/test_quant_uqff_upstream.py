"""UQFF files written by upstream itself (the Rust ``mistralrs`` 0.9.5 wheel, ISQ of a tiny
Llama: ``data/make_upstream_uqff.py``) load here with ``from_uqff`` and no quantization pass.

* Every GGML-family layer dequantizes to exactly what gguf-py's reference dequantizer makes
  of upstream's stored blocks (its tags, dtype ids and shapes are read as upstream meant them).
* For Q4_0 and Q8_0 our ISQ of the same float weights writes byte-identical files (every
  entry, metadata included). Upstream's K-quant quantizer is not llama.cpp's (ours is, as
  the quantizer tests check): a few blocks round differently, so for Q4K only the reading
  is compared.
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


def _mixtral_weights() -> dict[str, np.ndarray]:
    """The Mixtral's float16 weights, remade from the data script's seed (not stored)."""
    import sys
    if str(DATA.parent) not in sys.path:
        sys.path.insert(0, str(DATA.parent))
    from make_upstream_uqff import mixtral_weights
    return mixtral_weights()


def _greedy(runner) -> str:
    res = runner.send_completion_request(CompletionRequest(
        prompt="the rain in spain", model="default", max_tokens=6, temperature=0.0, ignore_eos=True))
    return res.choices[0].text


def test_the_data_covers_each_family():
    assert WRITTEN["mistralrs"] == "0.9.5"
    assert set(WRITTEN["types"]) == {"Q4_0", "Q8_0", "Q4K", "HQQ4", "FP8"}


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
    d = tmp_path / "mixtral"
    shutil.copytree(DATA / "mixtral", d)
    shutil.copy(DATA / "tokenizer.json", d / "tokenizer.json")
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
    got = [p for n, p in moe.named_parameters() if "gate" in n and "experts" not in n]
    assert len(got) == 1 and torch.equal(got[0].float(), torch.from_numpy(want.astype(np.float32)).reshape(got[0].shape))
    assert _greedy(runner)


def test_our_moe_uqff_writes_upstreams_expert_stacks(tmp_path):
    """Our ISQ Q8_0 of the same Mixtral writes the experts as upstream does: one 3-D stack
    per projection under the checkpoint's prefix, byte for byte (upstream's own loader then
    reads our file: checked by hand with the 0.9.5 wheel, same greedy text as its own file).
    The router stays dense here (a residual tensor), where upstream quantizes it too."""
    src = tmp_path / "f32"
    src.mkdir()
    save_file({k: torch.from_numpy(v.astype(np.float32)) for k, v in _mixtral_weights().items()},
              str(src / "model.safetensors"))
    shutil.copy(DATA / "mixtral" / "config.json", src / "config.json")
    shutil.copy(DATA / "tokenizer.json", src / "tokenizer.json")
    Runner(which=Which.Plain(model_id=str(src), write_uqff=str(tmp_path / "out" / "tiny.uqff")), in_situ_quant="Q8_0")
    ours, theirs = _entries(tmp_path / "out" / "tiny-0.uqff"), _entries(DATA / "mixtral" / "tiny-0.uqff")
    stacks = [k for k in theirs if ".experts." in k]
    assert len(stacks) == 12                      # 3 projections x (weight, format, dtype, shape)
    for k in stacks:
        assert k in ours and ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k]), k
    assert not [k for k in ours if ".experts." in k and k not in theirs]
