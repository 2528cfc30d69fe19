"""Finding a model's MLPs by their Hugging Face names, and building the expert MLPs.

An expert is a fresh copy of the base layer's MLP, built on the meta device and filled through
the one weight-loading path (``loading.weights.load_module``, quantization hook included, so
an ISQ'd base gets ISQ'd experts):

* ``FineTuned``: the tensors ``{prefix}.{N}.{mlp}.*`` of a fine-tuned model of the same
  architecture (safetensors only);
* ``LoraAdapter``: the base layer's own weights plus ``alpha / rank * B @ A`` of a PEFT
  adapter (``adapter_model.safetensors``) for each of ``target_modules``, merged once, as
  upstream does (each expert is its own dense MLP).
"""
from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import torch
from torch import nn

from mistralrs_core.loading.weights import load_module, read_weight

_FIELD = "anymoe_config"


def find_mlps(model: nn.Module, prefix: str, mlp: str) -> dict[int, tuple[nn.Module, str, nn.Module]]:
    """Layer index -> (parent module, attribute name, MLP module) for every module named
    ``{prefix}.{N}.{mlp}``, by module path or by its recorded HF name."""
    pattern = re.compile(re.escape(prefix) + r"\.(\d+)\." + re.escape(mlp))
    found: dict[int, tuple[nn.Module, str, nn.Module]] = {}
    for path, module in model.named_modules():
        # A container's checkpoint name shows in its children's (a family may map names).
        child = next((c.__dict__.get("hf_name") for c in module.children() if c.__dict__.get("hf_name")), None)
        from_child = child.rpartition(".")[0] if child else None
        for name in (path, module.__dict__.get("hf_name"), from_child):
            m = pattern.fullmatch(name or "")
            if m:
                parent_path, _, attr = path.rpartition(".")
                found.setdefault(int(m.group(1)), (model.get_submodule(parent_path), attr, module))
                break
    return found


def _fresh_mlp(parent: nn.Module, base: nn.Module, layer: int) -> nn.Module:
    """An unloaded copy of ``base`` with checkpoint-named parameters on the meta device."""
    build, cfg = getattr(parent, "build_mlp", None), getattr(parent, "cfg", None)
    if build is not None and cfg is not None:
        # The family's own builder: unfused, named as in checkpoints (the base may have fused
        # gate/up after loading; the copy fuses the same way in post_load).
        return build(cfg, layer)
    memo = {id(p): nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"), requires_grad=False)
            for p in base.parameters()}
    return copy.deepcopy(base, memo)


def _load_expert(parent, base, layer: int, name_prefix: str, stream, model, where: str) -> nn.Module:
    fresh = _fresh_mlp(parent, base, layer)
    device = next((p.device for p in base.parameters() if p.device.type != "meta"), torch.device("cpu"))
    cut = len(name_prefix) + 1
    try:
        load_module(fresh, stream, device=device, dtype=getattr(model, "dtype", None),
                    quant_config=getattr(model, "quant_config", None),
                    map_name=lambda n: n[cut:], ignored_suffixes=())
    except ValueError as exc:
        raise ValueError(f"{where}: layer {layer}: {exc}") from None
    fresh.eval()
    return fresh


def fine_tuned_expert(model, parent, base, layer: int, prefix: str, mlp: str, weights, index: int,
                      where: str) -> nn.Module:
    """Expert ``index`` (1-based) of ``layer`` from a fine-tuned model's safetensors."""
    src = f"{prefix}.{layer}.{mlp}."
    names = [n for n in weights.names() if n.startswith(src)]
    if not names:
        raise ValueError(f"{where}: has no tensors named {src}* (is it the same architecture as the base?)")
    dst = f"{prefix}.{layer}.{mlp}.experts.{index}"
    stream = ((dst + "." + n[len(src):], weights.get(n)) for n in names)
    return _load_expert(parent, base, layer, dst, stream, model, where)


class PeftAdapter:
    """The low-rank tensors of one PEFT adapter directory, read from safetensors only."""

    def __init__(self, directory: Path, where: str):
        from mistralrs_core.loading.safetensors_io import SafetensorsWeights
        self.where = where
        cfg_path = directory / "adapter_config.json"
        self.config: dict = {}
        if cfg_path.is_file():
            try:
                self.config = json.loads(cfg_path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise ValueError(f"{where}: adapter_config.json is not valid JSON ({exc})") from None
        path = directory / "adapter_model.safetensors"
        try:
            weights = SafetensorsWeights(path if path.is_file() else directory)
        except (FileNotFoundError, ValueError) as exc:
            raise ValueError(f"{where}: {exc}") from None
        self._weights = weights
        # PEFT prefixes the base model's names with "base_model.model." and may keep the
        # adapter name ("lora_A.default.weight") in older files.
        self._names = {}
        for n in weights.names():
            short = n.removeprefix("base_model.model.").replace(".lora_A.default.", ".lora_A.") \
                                                     .replace(".lora_B.default.", ".lora_B.")
            self._names[short] = n

    def delta(self, module_name: str, rank: int, alpha: float, shape: tuple[int, int]) -> torch.Tensor:
        """``scale * B @ A`` (float32, shaped like the base weight) for ``module_name``."""
        a_name, b_name = f"{module_name}.lora_A.weight", f"{module_name}.lora_B.weight"
        if a_name not in self._names or b_name not in self._names:
            raise ValueError(f"{self.where}: the adapter has no {a_name} / {b_name}")
        a = self._weights.get(self._names[a_name]).float()
        b = self._weights.get(self._names[b_name]).float()
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise ValueError(f"{self.where}: {module_name}: lora_A {tuple(a.shape)} and lora_B "
                             f"{tuple(b.shape)} do not form a low-rank product")
        if a.shape[0] != rank:
            raise ValueError(f"{_FIELD}.expert_type.rank: is {rank}, but {self.where} has rank "
                             f"{a.shape[0]} for {module_name}")
        d = b @ a
        if self.config.get("fan_in_fan_out"):
            d = d.T
        if tuple(d.shape) != tuple(shape):
            raise ValueError(f"{self.where}: {module_name}: the adapter's update has shape {tuple(d.shape)}, "
                             f"the base weight {tuple(shape)}; the adapter was made for another base model")
        scale = alpha / (rank ** 0.5 if self.config.get("use_rslora") else rank)
        return d * scale


def lora_expert(model, parent, base, layer: int, prefix: str, mlp: str, adapter: PeftAdapter, expert_type,
                index: int, weight_index: dict, where: str) -> nn.Module:
    """Expert ``index`` of ``layer``: the base MLP's weights plus the adapter's updates."""
    base_name = f"{prefix}.{layer}.{mlp}"
    fresh = _fresh_mlp(parent, base, layer)
    params = dict(fresh.named_parameters())
    targets = list(expert_type.target_modules)
    for t in targets:
        if f"{t}.weight" not in params:
            linears = sorted(n[:-len(".weight")] for n in params if n.endswith(".weight"))
            raise ValueError(f"{_FIELD}.expert_type.target_modules: {t!r} is not a linear layer of "
                             f"{base_name} (it has {linears})")
    dst = f"{base_name}.experts.{index}"
    # The updates first, so that a wrong adapter fails before anything is built.
    deltas = {f"{t}.weight": adapter.delta(f"{base_name}.{t}", expert_type.rank, float(expert_type.alpha),
                                           tuple(params[f"{t}.weight"].shape)) for t in targets}

    def stream():
        for rel in params:
            value = read_weight(model, f"{base_name}.{rel}", weight_index)
            if rel in deltas:
                value = value.float() + deltas[rel]
            yield f"{dst}.{rel}", value

    return _load_expert(parent, base, layer, dst, stream(), model, where)
