"""One weight-loading path for any ``nn.Module`` built on the meta device.

Weights stream in as ``(hf_name, tensor | QuantizedWeight)`` pairs and are placed one at a
time, so a model never holds a second copy of its weights:

1. the name is mapped to the module tree (``map_name``, by default the module's
   ``map_weight_name``; None drops it), names ending in an ignored suffix are skipped;
2. a per-parameter loader may reshape what the checkpoint gives (a ``weight_loader``
   attribute on the parameter or its module, ``(param_or_module, name, tensor) -> tensor``:
   tensor-parallel sharding keeps only its rows or columns this way, packed blocks included
   when the loader sets ``packed_ok``; see ``mistralrs_core/distributed/tp.py``);
3. for the ``weight`` of a layer that can hold a quantized method (``Linear``,
   ``Embedding``: anything with ``set_quant_method``), the ``mistralrs_quant_method`` hook
   sees the tensor as the checkpoint stored it, before any cast or move, and may return a
   method; the dense tensor is then dropped straight away;
4. otherwise the tensor is cast to the model dtype, moved to the device and installed.

Every module learns the HF name of its weights (``module.hf_name``, e.g.
``model.layers.0.self_attn.q_proj``), which quantization topologies, UQFF writing, LoRA
targeting and sharding match against. Fused layers (``fuse_linears``) keep their parts'
names, so ``resolve_weight`` still finds any checkpoint tensor after fusion.
"""
from __future__ import annotations

from typing import Callable, Iterable

import attrs
import torch
from torch import nn

from mistralrs_core import progress
from mistralrs_core.loading.quant_config import QuantConfig

#: ``(param_or_module, name, tensor) -> tensor``: what of a checkpoint tensor this
#: parameter keeps (the whole tensor by default; a shard under tensor parallelism).
ParamLoader = Callable[[object, str, torch.Tensor], torch.Tensor]


def _keep_name(name: str) -> str:
    return name


def assign_prefixes(module: nn.Module, prefix: str = "") -> None:
    """Give every submodule without one its path as ``hf_name``; the loader then replaces it
    with the prefix the checkpoint actually used where a family renames (``map_weight_name``).
    Names already set (a second load call, a fused layer) are kept."""
    for name, sub in module.named_modules(prefix=prefix):
        # A plain string attribute: skip nn.Module.__setattr__'s parameter/buffer bookkeeping.
        sub.__dict__.setdefault("hf_name", name)


def _length(weights: object) -> int | None:
    try:
        return len(weights)  # type: ignore[arg-type]
    except TypeError:  # a generator: the bar counts without a total
        return None


class WeightLoader:
    """Loads one model; ``load`` streams the weights, ``finish`` checks and post-processes."""

    def __init__(self, model: nn.Module, device: torch.device | str = "cpu", dtype: torch.dtype | None = None,
                 quant_config: QuantConfig | None = None, map_name: Callable[[str], str | None] | None = None,
                 ignored_suffixes: Iterable[str] | None = None):
        from mistralrs_core.plugins import get_plugin_manager
        self.model = model
        self.device = torch.device(device)
        self.dtype = dtype or getattr(model, "dtype", torch.float32)
        self.map_name = map_name or getattr(model, "map_weight_name", None) or _keep_name
        self.ignored = tuple(getattr(model, "ignored_weight_suffixes", ()) if ignored_suffixes is None
                             else ignored_suffixes)
        qc = quant_config or QuantConfig()
        # Quantized products may run in a cheaper dtype than the residual stream.
        compute = qc.compute_dtype or getattr(model, "quant_compute_dtype", None) or self.dtype
        self.quant_config = attrs.evolve(qc, compute_dtype=compute, device=qc.device or self.device)
        self._hook = get_plugin_manager().hook.mistralrs_quant_method
        self._modules: dict[str, nn.Module] | None = None
        #: HF names (layer prefixes) of the layers the hook quantized, in load order
        self.quantized: list[str] = []

    # --- streaming ----------------------------------------------------------
    def packed_stream(self, weights: Iterable[tuple[str, object]]) -> Iterable[tuple[str, object]]:
        """``weights`` with a pre-quantized checkpoint's per-layer parts grouped into one
        ``QuantizedWeight`` each (by the plugin that knows the format); unchanged otherwise.
        A pre-quantized format no installed plugin groups is a ``ValueError``."""
        from mistralrs_core.loading.quant_config import PREQUANTIZED
        kind = self.quant_config.kind
        if kind not in PREQUANTIZED:
            return weights
        from mistralrs_core.plugins import get_plugin_manager
        grouped = get_plugin_manager().hook.mistralrs_packed_weights(quant_config=self.quant_config, weights=weights)
        if grouped is None:
            raise ValueError(f"quantization_config.quant_method: {kind!r} checkpoints need a plugin that "
                             "reads them (install mistralrs-quant)")
        return grouped

    def load(self, weights: Iterable[tuple[str, object]]) -> None:
        if self._modules is None:
            assign_prefixes(self.model)
            self._modules = dict(self.model.named_modules())
        modules, ignored, map_name = self._modules, self.ignored, self.map_name
        # Every model kind streams its checkpoint through here: the one place to count it.
        # Counted by hand rather than by iterating the bar, whose generator would hold each
        # tensor one step longer (see the `del` below).
        with progress.bar(total=_length(weights), desc=f"loading {type(self.model).__name__}",
                          unit=" tensors") as shown:
            for raw_name, value in weights:
                shown.update(1)
                if raw_name.endswith(ignored):
                    continue
                name = map_name(raw_name)
                if name is None:
                    continue
                mod_name, _, attr = name.rpartition(".")
                module = modules.get(mod_name)
                if module is None or not hasattr(module, attr):
                    raise ValueError(f"unexpected weight {raw_name!r} for {type(self.model).__name__}")
                self.assign(module, attr, value, name, raw_name)
                # Drop our reference before the stream produces the next tensor, so that a
                # weight the hook quantized is freed now, not one step later.
                del value

    def assign(self, module: nn.Module, attr: str, value, name: str, hf_name: str | None = None) -> None:
        """Install one checkpoint value as ``module.<attr>`` (``name``: its module-tree name,
        ``hf_name``: its checkpoint name)."""
        hf_name = hf_name or name
        prefix = hf_name.rpartition(".")[0]
        if prefix:
            module.__dict__["hf_name"] = prefix
        current = getattr(module, attr)
        packed = not isinstance(value, torch.Tensor)
        # Instance attributes only (set by whoever shards the model): nn.Module's
        # __getattr__ on a missing name costs an exception per tensor.
        fn = current.__dict__.get("weight_loader") if current is not None else None
        if fn is None:
            fn = module.__dict__.get("weight_loader")
        # A loader that can slice packed blocks says so (``packed_ok``); others see dense tensors.
        if fn is not None and (not packed or getattr(fn, "packed_ok", False)):
            value = fn(current if current is not None else module, name, value)
        if attr == "weight" and hasattr(module, "set_quant_method"):
            method = self.quant_method(prefix, module, value)
            if method is not None:
                module.set_quant_method(method)
                return
        if packed:
            # Nobody keeps this layer packed (or it is a norm/bias): use its values.
            value = value.dequantize()
        if current is not None and tuple(current.shape) != tuple(value.shape):
            raise ValueError(f"weight {name!r} has shape {tuple(value.shape)}, "
                             f"expected {tuple(current.shape)}")
        tensor = value.to(device=self.device_for(module), dtype=self.dtype)
        setattr(module, attr, nn.Parameter(tensor, requires_grad=False))

    def device_for(self, module: nn.Module) -> torch.device:
        """Where ``module``'s weights go: its ``load_device`` (set by device mapping on a
        layer's modules) or the load's device."""
        return module.__dict__.get("load_device") or self.device

    def quant_method(self, hf_prefix: str, module: nn.Module, weight):
        """The quantization hook's answer for one checkpoint weight (None: keep it dense).
        Modules that store weights their own way (stacked MoE experts) ask through here too."""
        config = self.quant_config
        dev = module.__dict__.get("load_device")
        if dev is not None and dev != config.device:
            config = attrs.evolve(config, device=dev)
        method = self._hook(quant_config=config, hf_name=hf_prefix, module=module, weight=weight)
        if method is not None:
            self.quantized.append(hf_prefix)
        return method

    # --- after the stream ----------------------------------------------------
    def finish(self) -> None:
        finish_loading(self.model)


def check_complete(model: nn.Module) -> None:
    """Fail loudly on any parameter the checkpoint did not provide (still on meta)."""
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if missing:
        shown = ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else "")
        raise ValueError(f"checkpoint is missing {len(missing)} weight(s) for "
                         f"{type(model).__name__}: {shown}")


def run_post_load(model: nn.Module) -> None:
    """Layout changes that need every weight in place (e.g. fusing projections)."""
    for module in list(model.modules()):
        hook = getattr(module, "post_load", None)
        if hook is not None:
            hook()


def finish_loading(model: nn.Module) -> None:
    tie = getattr(model, "tie_weights", None)
    if tie is not None:
        tie()
    check_complete(model)
    run_post_load(model)


def load_module(model: nn.Module, weights: Iterable[tuple[str, object]], device="cpu", dtype=None,
                quant_config: QuantConfig | None = None, map_name=None, ignored_suffixes=None) -> WeightLoader:
    """Load any module (vision tower, T5/CLIP, VAE, codec) in one call; returns the loader
    (its ``quantized`` lists the layers the hook packed)."""
    loader = WeightLoader(model, device, dtype, quant_config, map_name, ignored_suffixes)
    loader.load(loader.packed_stream(weights))
    loader.finish()
    return loader


# --- where an HF weight lives after loading ----------------------------------------
def weight_index(model: nn.Module) -> dict[str, tuple[nn.Module, slice | None]]:
    """HF layer prefix -> (module holding it, its rows there or None for the whole module).

    Fused layers list their parts (``fused_parts``), so ``q_proj`` maps to its rows of the
    fused q/k/v projection."""
    index: dict[str, tuple[nn.Module, slice | None]] = {}
    for module in model.modules():
        for part, start, stop in getattr(module, "fused_parts", ()):
            if part is not None:
                index[part] = (module, slice(start, stop))
    for module in model.modules():
        name = module.__dict__.get("hf_name")
        if name and not getattr(module, "fused_parts", None):
            index.setdefault(name, (module, None))
    return index


def resolve_weight(model: nn.Module, hf_name: str,
                   index: dict | None = None) -> tuple[nn.Module, slice | None]:
    """Where the checkpoint tensor ``hf_name`` (e.g. ``...q_proj.weight``) lives now:
    ``(fused_module, row_slice)`` after fusion, else ``(module, None)``. Pass ``index``
    (from ``weight_index``) when resolving many names."""
    prefix, _, attr = hf_name.rpartition(".")
    hit = (index if index is not None else weight_index(model)).get(prefix)
    if hit is None or not hasattr(hit[0], attr):
        raise KeyError(f"weight {hf_name!r} is not part of {type(model).__name__}")
    return hit


def read_weight(model: nn.Module, hf_name: str, index: dict | None = None) -> torch.Tensor:
    """The current values of checkpoint tensor ``hf_name`` (dequantized if packed)."""
    module, rows = resolve_weight(model, hf_name, index)
    attr = hf_name.rpartition(".")[2]
    qmethod = getattr(module, "qmethod", None)
    value = qmethod.dequantize() if attr == "weight" and qmethod is not None else getattr(module, attr)
    return value[rows] if rows is not None else value
