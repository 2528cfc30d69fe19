"""One PEFT adapter's tensors, matched and checked against the base model's layers.

Keys are PEFT's saved names (``base_model.model.<module>.lora_A.weight``, with or without
an adapter name before ``.weight``; biases of ``bias="all"/"lora_only"`` as
``base_model.model.<module>.bias``). Modules are found by their Hugging Face names through
``loading.weights.weight_index``, so fused q/k/v and gate/up resolve to their rows.
"""
from __future__ import annotations

import re
from pathlib import Path

import attrs
import torch
from torch import nn

from mistralrs_core.adapters.peft_config import LoraConfig, read_lora_config
from mistralrs_core.layers.linear import Linear

_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+?)\.lora_(?P<which>A|B)(?:\.[^.]+)?\.weight$")
_BIAS_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+?)(?:\.modules_to_save(?:\.[^.]+)?)?\.bias$")
# A whole weight: a ``modules_to_save`` copy, or the ``base_layer`` PEFT stores beside a LoRA on
# an embedding-like layer (the LM head) in case the vocabulary was resized.
_WEIGHT_KEY = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+?)(?P<base>\.base_layer)?(?:\.modules_to_save(?:\.[^.]+)?)?\.weight$")


@attrs.define(eq=False)
class TargetUpdate:
    """``y[:, rows] += scale * B (A x)`` for one checkpoint module of one adapter."""
    module: str
    A: torch.Tensor          # [r, in]
    B: torch.Tensor          # [out_part, r]
    scale: float


@attrs.define(eq=False)
class AdapterWeights:
    name: str
    config: LoraConfig
    updates: dict[str, TargetUpdate]
    biases: dict[str, torch.Tensor]        # module -> the bias the adapter trained (replaces the base's)
    weights: dict[str, torch.Tensor] = attrs.field(factory=dict)   # modules_to_save: module -> its weight


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: adapter weights not found") from None
    except Exception as exc:   # safetensors raises its own error types for damaged files
        raise ValueError(f"{path}: not a readable safetensors file ({exc})") from None


def linear_modules(model: nn.Module, index: dict) -> dict[str, tuple[Linear, slice | None]]:
    """HF layer name -> (Linear holding it, its rows) for every linear layer of the model."""
    return {name: hit for name, hit in index.items() if isinstance(hit[0], Linear)}


def load_adapter(name: str, directory: Path, model: nn.Module, linears: dict) -> AdapterWeights:
    """Read ``directory``'s adapter and check every tensor against the layer it targets."""
    cfg = read_lora_config(directory / "adapter_config.json")
    what = f"adapter {name!r} ({directory})"
    if isinstance(cfg.target_modules, tuple):
        for t in cfg.target_modules:
            if not any(cfg.targets(m) and (m == t or m.endswith("." + t)) for m in linears):
                raise ValueError(f"{directory}/adapter_config.json: target_modules: {t!r} matches no linear "
                                 f"layer of the base model")
    elif isinstance(cfg.target_modules, str) and not any(cfg.targets(m) for m in linears):
        raise ValueError(f"{directory}/adapter_config.json: target_modules: {cfg.target_modules!r} matches "
                         f"no linear layer of the base model")
    files = sorted(directory.glob("adapter_model*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{what}: no adapter_model.safetensors (pickled .bin adapters are not loaded)")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update(_read_tensors(f))
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    biases: dict[str, torch.Tensor] = {}
    full: dict[str, torch.Tensor] = {}

    def saved_whole(module: str) -> bool:
        return any(module == n or module.endswith("." + n) for n in cfg.modules_to_save)

    for key, t in tensors.items():
        m = _LORA_KEY.match(key)
        if m is not None:
            pairs.setdefault(m["module"], {})[m["which"]] = t
            continue
        if "lora_embedding" in key or "lora_magnitude" in key:
            raise ValueError(f"{what}: {key}: embedding LoRA and DoRA tensors are not supported")
        w = _WEIGHT_KEY.match(key)
        if w is not None and w["base"]:
            # PEFT loads it over the base layer; usually it is the base weight itself.
            if _check_base_layer(what, key, w["module"], t, linears):
                full[w["module"]] = t
            continue
        if w is not None and saved_whole(w["module"]):
            full[w["module"]] = t
            continue
        b = _BIAS_KEY.match(key)
        if b is not None and (cfg.bias != "none" or saved_whole(b["module"])):
            biases[b["module"]] = t
            continue
        raise ValueError(f"{what}: {key}: not a LoRA tensor this loader understands")
    updates = {}
    for module, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise ValueError(f"{what}: {module}: lora_A and lora_B must both be present")
        hit = linears.get(module)
        if hit is None:
            raise ValueError(f"{what}: target module {module!r} is not a linear layer of the base model")
        layer, rows = hit
        A, B = ab["A"], ab["B"]
        out = (rows.stop - rows.start) if rows is not None else layer.out_features
        r = A.shape[0]
        if A.dim() != 2 or B.dim() != 2 or A.shape[1] != layer.in_features or B.shape != (out, r):
            raise ValueError(
                f"{what}: {module}: lora_A {list(A.shape)} / lora_B {list(B.shape)} do not fit the base layer "
                f"[{out} x {layer.in_features}] (expected [r, {layer.in_features}] and [{out}, r]): an adapter "
                f"for a different base model?")
        updates[module] = TargetUpdate(module, A.float(), B.float(), cfg.scale(module, r))
    for module, bias in biases.items():
        hit = linears.get(module)
        if hit is None:
            raise ValueError(f"{what}: bias of {module!r}: not a linear layer of the base model")
        layer, rows = hit
        out = (rows.stop - rows.start) if rows is not None else layer.out_features
        if layer.bias is None or tuple(bias.shape) != (out,):
            raise ValueError(f"{what}: bias of {module!r} {list(bias.shape)} does not fit the base layer")
    for module, weight in full.items():
        hit = linears.get(module)
        if hit is None:
            raise ValueError(f"{what}: modules_to_save: {module!r} is not a linear layer of the base model "
                             f"(only linear layers can be saved whole)")
        layer, rows = hit
        out = (rows.stop - rows.start) if rows is not None else layer.out_features
        if tuple(weight.shape) != (out, layer.in_features):
            raise ValueError(f"{what}: modules_to_save: {module!r} {list(weight.shape)} does not fit the base layer "
                             f"[{out} x {layer.in_features}]: an adapter for a different base model?")
    if not updates and not full:
        raise ValueError(f"{what}: holds no LoRA tensors")
    return AdapterWeights(name, cfg, updates, {k: v.float() for k, v in biases.items()},
                          {k: v.float() for k, v in full.items()})


def _check_base_layer(what: str, key: str, module: str, t: torch.Tensor, linears: dict) -> bool:
    """Whether a saved ``base_layer`` weight differs from the base's (then it replaces it)."""
    hit = linears.get(module)
    if hit is None:
        raise ValueError(f"{what}: {key}: {module!r} is not a linear layer of the base model")
    layer, rows = hit
    out = (rows.stop - rows.start) if rows is not None else layer.out_features
    if tuple(t.shape) != (out, layer.in_features):
        raise ValueError(f"{what}: {key} {list(t.shape)} does not fit the base layer [{out} x {layer.in_features}] "
                         f"(a resized vocabulary, or an adapter for a different base model?)")
    return not torch.equal(t.float(), base_weight(layer, rows))


def base_weight(layer: Linear, rows: slice | None) -> torch.Tensor:
    """The layer's current weight rows in float32 (dequantized when packed)."""
    q = getattr(layer, "qmethod", None)
    w = q.dequantize() if q is not None else layer.weight.detach().float()
    return w[rows] if rows is not None else w
