"""Mixture-of-experts UQFF files shared with upstream mistral.rs, offline.

The bundled test data holds UQFF files the Rust ``mistralrs`` 0.9.5 wheel wrote for a tiny
random Mixtral (``plugins/quant/tests/data/upstream_uqff``): Q8_0 (experts as 3-D GGML
stacks) and AFQ4 (experts as 3-D AFQ stacks: packed words, scales and biases with a leading
expert dimension). Both load here with no quantization pass. Then our own ISQ of the same
float weights writes upstream's Q8_0 file byte for byte (the router quantized too, as
upstream's Mixtral loader does; with ``organization=MoQE`` only the experts), and
llama.cpp's imatrix names for shared experts and routers (``ffn_gate_shexp``,
``ffn_gate_inp``) are matched to the model's layers. (Random weights: the texts are noise.)

    python examples/uqff_upstream_moe.py
"""
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mistralrs import CompletionRequest, IsqOrganization, Runner, Which

DATA = Path(__file__).resolve().parents[1] / "plugins" / "quant" / "tests" / "data"
UPSTREAM = DATA / "upstream_uqff"
sys.path.insert(0, str(DATA))
from make_upstream_uqff import MIXTRAL, mixtral_weights  # type: ignore[import-not-found]  # noqa: E402

work = Path(tempfile.mkdtemp())
ask = CompletionRequest(prompt="the rain in spain", model="default", max_tokens=6, temperature=0.0, ignore_eos=True)


def entries(path: Path) -> dict[str, Any]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


# 1. Upstream's files: experts and router arrive quantized, as upstream wrote them.
for name in ("mixtral", "mixtral_afq4"):
    d = work / name
    shutil.copytree(UPSTREAM / name, d)
    shutil.copy(UPSTREAM / "tokenizer.json", d / "tokenizer.json")
    runner = Runner(which=Which.Plain(model_id=str(d), from_uqff="tiny-0.uqff"))
    moe = runner._pipeline(None).model.model.layers[0].mlp
    print(f"upstream {name}: experts {type(moe.experts.quant.parts[(0, 'gate')]).__name__}, "
          f"router {type(moe.gate.qmethod).__name__} ->", repr(runner.send_completion_request(ask).choices[0].text))
    runner.shutdown()

# 2. Our ISQ of the same float weights writes upstream's Q8_0 file byte for byte.
src = work / "mixtral-f32"
src.mkdir()
save_file({k: torch.from_numpy(v.astype(np.float32)) for k, v in mixtral_weights().items()},
          str(src / "model.safetensors"))
(src / "config.json").write_text(json.dumps(MIXTRAL))
shutil.copy(UPSTREAM / "tokenizer.json", src / "tokenizer.json")
Runner(which=Which.Plain(model_id=str(src), write_uqff=str(work / "ours" / "tiny.uqff")), in_situ_quant="Q8_0")
ours, theirs = entries(work / "ours" / "tiny-0.uqff"), entries(UPSTREAM / "mixtral" / "tiny-0.uqff")
same = sorted(ours) == sorted(theirs) and all(torch.equal(ours[k], theirs[k]) for k in theirs)
print("quantized:", sorted(k[:-len(".weight.format")] for k in ours if k.endswith(".weight.format")))
print("our Q8_0 UQFF == upstream's, byte for byte:", same)

# 3. MoQE: only the three expert stacks are quantized (router, attention, embeddings dense).
Runner(which=Which.Plain(model_id=str(src), write_uqff=str(work / "moqe" / "tiny.uqff"),
                         organization=IsqOrganization.MoQE), in_situ_quant="Q8_0")
print("MoQE quantized:", sorted(k[:-len(".weight.format")] for k in entries(work / "moqe" / "tiny-0.uqff")
                                if k.endswith(".weight.format")))

# 4. llama.cpp's imatrix names for a shared expert and a router (a legacy ``.imatrix``: per
#    entry its name, ncall and the summed squares), matched to the layers by what they are.
import struct  # noqa: E402

from mistralrs_quant.isq.imatrix import load_imatrix  # noqa: E402
from mistralrs_quant.isq.plan import build_plan  # noqa: E402

with open(work / "m.imatrix", "wb") as f:
    f.write(struct.pack("<i", 2))
    for entry, n in ((b"blk.1.ffn_gate_shexp.weight", 64), (b"blk.0.ffn_gate_inp.weight", 256)):
        f.write(struct.pack("<i", len(entry)) + entry + struct.pack("<ii", 3, n) + np.full(n, 6.0, "<f4").tobytes())
plan = build_plan("Q4K", imatrix=load_imatrix(str(work / "m.imatrix"), {}, None))
for layer in ("model.layers.1.mlp.shared_experts.gate_proj",       # DeepSeek
              "model.layers.1.shared_mlp.input_linear",            # Granite
              "model.layers.0.block_sparse_moe.gate"):             # Mixtral's router
    print(f"imatrix for {layer}: mean {float(plan.imatrix_for(layer).mean()):.1f}")
shutil.rmtree(work, ignore_errors=True)
