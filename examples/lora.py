"""LoRA adapters, offline on a tiny random model.

Two PEFT-format adapters (``adapter_config.json`` + ``adapter_model.safetensors``, written here
with torch and safetensors only) are loaded next to a base model through upstream's ordering
file. ``order`` lists the adapters active by default (summed); ``preload_adapters`` are loaded
but used only by requests that name them with ``adapter=``. Requests with different adapters,
and ones without, run in the same batch: one base matmul per layer plus each adapter's
low-rank update on its own rows.

    python examples/lora.py
"""
import json
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors.torch import save_file

from mistralrs import CompletionRequest, ModelDType, Runner, Which
from mistralrs_core.testing.tiny import write_random_llama

root = Path(tempfile.mkdtemp())
base = write_random_llama(root / "base", hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128)


def write_adapter(out: Path, targets: dict[str, tuple[int, int]], r: int, alpha: float, seed: int) -> None:
    """A PEFT LoRA adapter: per target module lora_A [r, in] and lora_B [out, r]."""
    out.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(2):
        for name, (n_in, n_out) in targets.items():
            key = f"base_model.model.model.layers.{layer}.{name}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(r, n_in, generator=g) * 0.3
            tensors[f"{key}.lora_B.weight"] = torch.randn(n_out, r, generator=g) * 0.3
    save_file(tensors, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": r, "lora_alpha": alpha, "use_rslora": False, "bias": "none",
        "target_modules": sorted(n.rsplit(".", 1)[1] for n in targets), "base_model_name_or_path": str(base)}))


write_adapter(root / "adapters" / "terse", {"self_attn.q_proj": (64, 64), "self_attn.v_proj": (64, 32)}, 4, 8, 1)
write_adapter(root / "adapters" / "chatty", {"mlp.gate_proj": (64, 128), "mlp.down_proj": (128, 64)}, 8, 16, 2)
ordering = root / "ordering.json"
ordering.write_text(json.dumps({
    "order": [],                       # requests without adapter= run the base model
    "base_model_id": str(base),
    "preload_adapters": [{"name": "terse", "adapter_model_id": str(root / "adapters")},
                         {"name": "chatty", "adapter_model_id": str(root / "adapters")}]}))

runner = Runner(which=Which.Lora(model_id=str(base), adapter_model_id=str(root / "adapters"), order=str(ordering),
                                 dtype=ModelDType.F32))


def complete(adapter: str | None) -> str:
    req = CompletionRequest(prompt="def main():", max_tokens=16, temperature=0.0, ignore_eos=True, adapter=adapter)
    return runner.send_completion_request(req).choices[0].text


alone = {a: complete(a) for a in (None, "terse", "chatty")}
with ThreadPoolExecutor(3) as pool:            # the three requests share engine steps
    together = dict(zip((None, "terse", "chatty"), pool.map(complete, (None, "terse", "chatty"))))
for adapter, text in alone.items():
    print(f"{adapter or 'base'}: {text!r}  (same when batched: {together[adapter] == text})")
runner.shutdown()

# One adapter directory and no ordering file: it serves every request, merged into the weights.
merged = Runner(which=Which.Lora(model_id=str(base), adapter_model_id=str(root / "adapters" / "terse"), dtype=ModelDType.F32))
print("merged 'terse':", merged.send_completion_request(CompletionRequest(
    prompt="def main():", max_tokens=16, temperature=0.0, ignore_eos=True)).choices[0].text == alone["terse"])
merged.shutdown()

# X-LoRA: a classifier mixes both adapters per token. Its folder holds the adapters, the
# classifier (hidden -> one logit per adapter here) and its config; the ordering file gives the
# adapters in training order and each adapted module's classifier layer index.
xl = root / "xlora"
xl.mkdir()
for name in ("terse", "chatty"):
    (xl / name).symlink_to(root / "adapters" / name)
g = torch.Generator().manual_seed(3)
save_file({"internal_xlora_classifier.layers.0.weight": torch.randn(2, 64, generator=g),
           "internal_xlora_classifier.layers.0.bias": torch.zeros(2)}, str(xl / "xlora_classifier.safetensors"))
(xl / "xlora_config.json").write_text(json.dumps({"hidden_size": 64, "xlora_depth": 1, "layerwise_scalings": False}))
modules = [f"model.layers.{i}.{m}" for i in range(2)
           for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.down_proj")]
(root / "xlora_ordering.json").write_text(json.dumps({
    "order": ["terse", "chatty"], "base_model_id": str(base), "layers": {m: i for i, m in enumerate(modules)}}))
xrunner = Runner(which=Which.XLora(xlora_model_id=str(xl), order=str(root / "xlora_ordering.json"),
                                   model_id=str(base), tgt_non_granular_index=None, dtype=ModelDType.F32))
print("x-lora:", repr(xrunner.send_completion_request(CompletionRequest(
    prompt="def main():", max_tokens=16, temperature=0.0, ignore_eos=True)).choices[0].text))
xrunner.shutdown()
