"""AnyMoE, offline on tiny random models.

``Runner(anymoe_config=AnyMoeConfig(...))`` turns a dense model's MLPs at the chosen layers
into a mixture of experts: expert 0 is the model's own MLP, the others come from fine-tuned
models of the same architecture (``AnyMoeExpertType.FineTuned()``) or from PEFT LoRA adapters
(``AnyMoeExpertType.LoraAdapter(rank, alpha, target_modules)``). A gate per layer is trained on
a JSON dataset ``{"rows": [{"prompt": ..., "expert": ...}]}`` (or loaded from
``gate_model_id`` with ``training=False``); the losses go to ``loss_csv_path``. The result
serves requests like any model.

    python examples/anymoe.py
"""
import csv
import json
import tempfile
from typing import Any
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mistralrs import AnyMoeConfig, AnyMoeExpertType, ChatCompletionRequest, ModelDType, Runner, Which
from mistralrs_core.testing.tiny import write_random_llama

root = Path(tempfile.mkdtemp())
base = write_random_llama(root / "base", hidden=64, layers=4, heads=4, kv_heads=2, intermediate=128)


def fine_tuned(name: str, seed: int) -> Path:
    """A stand-in for a fine-tune of the base: same architecture, its MLP weights moved."""
    out = root / name
    out.mkdir()
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (out / f).write_bytes((base / f).read_bytes())
    g = torch.Generator().manual_seed(seed)
    save_file({k: v + 0.5 * v.std() * torch.randn(v.shape, generator=g) if ".mlp." in k else v
               for k, v in load_file(str(base / "model.safetensors")).items()}, str(out / "model.safetensors"))
    return out


numbers_expert, story_expert = fine_tuned("numbers", 1), fine_tuned("stories", 2)
rows: list[dict[str, Any]] = ([{"prompt": p, "expert": 1} for p in ["1 2 3 4 5", "7 8 9 10 100", "3 5 7 9", "10 100 1000", "2 4 6 8"]]
        + [{"prompt": p, "expert": 2} for p in ["once upon a time", "the lazy dog", "tell me a story",
                                                 "the quick brown fox", "a compiler loved borrowing"]])
(root / "amoe.json").write_text(json.dumps({"rows": rows}))

config = AnyMoeConfig(
    hidden_size=64, dataset_json=str(root / "amoe.json"), prefix="model.layers", mlp="mlp",
    model_ids=[str(numbers_expert), str(story_expert)], expert_type=AnyMoeExpertType.FineTuned(),
    layers=[1, 3], lr=0.05, epochs=20, batch_size=4,
    gate_model_id=str(root / "gate"),            # training=True: the trained gate is saved here
    loss_csv_path=str(root / "loss.csv"))
runner = Runner(which=Which.Plain(model_id=str(base), dtype=ModelDType.F32), anymoe_config=config, seed=0)

with open(root / "loss.csv") as f:
    losses = list(csv.reader(f))
print(f"{losses[0]}: first step {losses[1][1:]}, last step {losses[-1][1:]}")
for prompt in ("5 6 7 8", "the dog jumps over"):
    # Beyond the SDK: {layer: expert} the gate picks for a prompt.
    print(f"{prompt!r} is routed to {runner.anymoe_routes(prompt)}")
res = runner.send_chat_completion_request(ChatCompletionRequest(
    messages=[{"role": "user", "content": "1 2 3"}], max_tokens=16, temperature=0.0))
print("answer:", repr(res.choices[0].message.content))
runner.shutdown()

# The saved gate, without training again.
inference = Runner(which=Which.Plain(model_id=str(base), dtype=ModelDType.F32), anymoe_config=AnyMoeConfig(
    hidden_size=64, dataset_json="", prefix="model.layers", mlp="mlp",
    model_ids=[str(numbers_expert), str(story_expert)], expert_type=AnyMoeExpertType.FineTuned(),
    layers=[1, 3], gate_model_id=str(root / "gate"), training=False))
print("loaded gate routes '5 6 7 8' to", inference.anymoe_routes("5 6 7 8"))
inference.shutdown()

# LoRA experts: a PEFT adapter directory (adapter_model.safetensors) per expert.
adapter = root / "adapter"
adapter.mkdir()
g = torch.Generator().manual_seed(3)
save_file({f"base_model.model.model.layers.{n}.mlp.gate_proj.lora_{ab}.weight": t
           for n in (1, 3) for ab, t in (("A", 0.1 * torch.randn(8, 64, generator=g)),
                                         ("B", 0.1 * torch.randn(128, 8, generator=g)))},
          str(adapter / "adapter_model.safetensors"))
# Two experts now: 0 (the base MLP) for numbers, 1 (base + adapter) for stories.
(root / "lora.json").write_text(json.dumps({"rows": [dict(r, expert=r["expert"] - 1) for r in rows]}))
lora = Runner(which=Which.Plain(model_id=str(base), dtype=ModelDType.F32), anymoe_config=AnyMoeConfig(
    hidden_size=64, dataset_json=str(root / "lora.json"), prefix="model.layers", mlp="mlp",
    model_ids=[str(adapter)], layers=[1, 3], lr=0.05, epochs=20,
    expert_type=AnyMoeExpertType.LoraAdapter(rank=8, alpha=16.0, target_modules=["gate_proj"])), seed=0)
print("LoRA experts: 'once upon a fox' is routed to", lora.anymoe_routes("once upon a fox"))
lora.shutdown()
