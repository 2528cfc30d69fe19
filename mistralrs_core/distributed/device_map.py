"""Device mapping: which device holds each decoder layer (and its KV cache).

Three ways to ask, as upstream: ``Runner(num_device_layers=["0:16", "1:16"])`` (ORD:NUM,
consecutive layers per device ordinal), ``Which.*(auto_map_params=TextAutoMapParams(...))``
(fill devices from their free memory) and the ``device`` keys of a topology file
(``cuda[N]``, ``cpu`` per layer range). The result is a ``DeviceMap``: one device per layer
plus the device of everything else (embeddings, final norm, LM head). Layers are placed
while the weights stream in (``load_device`` on the layer's modules), each layer's KV
cache is allocated on its device (``ModelRunner``), and hooks move the activations (and
the step's attention metadata) to a layer's device when they arrive from another.

The logic is device-agnostic: ordinals name CUDA devices when the model runs on CUDA and
logical CPU devices (``cpu[N]``, all the host) otherwise, so maps are testable on a CPU.
"""
from __future__ import annotations

import logging
import re
import weakref
from typing import Mapping, Sequence

import attrs
import torch
from torch import nn

log = logging.getLogger("mistralrs")

_ORD_NUM = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")
_DEVICE_KEY = re.compile(r"^\s*(cuda|metal|cpu)\s*\[\s*(\d+)\s*\]\s*$|^\s*cpu\s*$")


@attrs.define
class DeviceMap:
    """``layers[i]``: the torch device of layer i; ``labels[i]``: its name as asked
    (``cuda[1]``, ``cpu[0]``); ``base``: device of the non-layer modules."""
    layers: list[torch.device]
    labels: list[str]
    base: torch.device
    source: str                               # "num_device_layers" | "auto_map_params" | "topology"

    def summary(self) -> list[dict]:
        """Consecutive runs of layers per device: [{"device", "layers": [first, last]}]."""
        runs: list[dict] = []
        for i, label in enumerate(self.labels):
            if runs and runs[-1]["device"] == label:
                runs[-1]["layers"][1] = i
            else:
                runs.append({"device": label, "layers": [i, i]})
        return runs

    def describe(self) -> str:
        return ", ".join(f"layers {r['layers'][0]}-{r['layers'][1]} on {r['device']}" for r in self.summary())

    @property
    def spans_devices(self) -> bool:
        return len({*self.layers, self.base}) > 1


def _device_for_ordinal(ordinal: int, base: torch.device) -> tuple[torch.device, str]:
    if base.type == "cuda":
        count = torch.cuda.device_count()
        if ordinal >= count:
            raise ValueError(f"num_device_layers: device ordinal {ordinal} does not exist "
                             f"({count} CUDA device(s) visible)")
        return torch.device("cuda", ordinal), f"cuda[{ordinal}]"
    return torch.device(base.type), f"{base.type}[{ordinal}]"


def check_num_device_layers(entries) -> list[tuple[int, int]]:
    """(ordinal, layer count) per entry; a malformed list is a ``ValueError`` naming it
    (checked when the Runner is made, before any load)."""
    if isinstance(entries, str) or not isinstance(entries, (list, tuple)) or not entries:
        raise ValueError(f"num_device_layers: expected a non-empty list of 'ORD:NUM' strings, got {entries!r}")
    out = []
    for k, entry in enumerate(entries):
        m = _ORD_NUM.match(entry) if isinstance(entry, str) else None
        if m is None:
            raise ValueError(f"num_device_layers[{k}]: expected 'ORD:NUM' (e.g. '0:16'), got {entry!r}")
        out.append((int(m[1]), int(m[2])))
    return out


def parse_num_device_layers(entries: Sequence[str], num_layers: int, base: torch.device) -> DeviceMap:
    """``["0:16", "1:16"]``: the first 16 layers on ordinal 0, the next 16 on ordinal 1.
    Layers the list does not cover stay on the CPU (upstream's host layers); more layers
    than the model has, a malformed entry, or an unknown ordinal is a ``ValueError``."""
    layers: list[torch.device] = []
    labels: list[str] = []
    for ordinal, count in check_num_device_layers(entries):
        dev, label = _device_for_ordinal(ordinal, base)
        layers += [dev] * count
        labels += [label] * count
    if len(layers) > num_layers:
        raise ValueError(f"num_device_layers: maps {len(layers)} layers but the model has {num_layers}")
    if len(layers) < num_layers:
        log.info("num_device_layers covers %d of %d layers; the rest go on the CPU", len(layers), num_layers)
        rest = num_layers - len(layers)
        layers += [torch.device("cpu")] * rest
        labels += ["cpu"] * rest
    return DeviceMap(layers, labels, layers[0], "num_device_layers")


def parse_device_key(value: str, where: str) -> tuple[torch.device, str]:
    """A topology ``device`` value: ``cuda[N]``, ``cpu`` or a logical host device ``cpu[N]``
    (all the host, as ``num_device_layers`` ordinals off CUDA; ``metal[N]`` is refused here)."""
    m = _DEVICE_KEY.match(value) if isinstance(value, str) else None
    if m is None:
        raise ValueError(f"{where}: unknown device {value!r}; expected 'cuda[N]', 'cpu' or 'cpu[N]'")
    if m[1] is None:
        return torch.device("cpu"), "cpu"
    if m[1] == "cpu":
        return torch.device("cpu"), f"cpu[{int(m[2])}]"
    if m[1] == "metal":
        raise ValueError(f"{where}: {value!r}: Metal devices are not available in this build")
    ordinal = int(m[2])
    if ordinal >= torch.cuda.device_count():
        raise ValueError(f"{where}: {value!r} does not exist ({torch.cuda.device_count()} CUDA device(s) visible)")
    return torch.device("cuda", ordinal), f"cuda[{ordinal}]"


def _layer_range(key, num_layers: int, where: str) -> range | None:
    """Topology keys: ``"start-end"`` (end exclusive, as upstream), a bare index, or
    ``/regex/`` (None: a name pattern, which cannot place a whole layer)."""
    text = str(key).strip()
    if text.startswith("/") and text.endswith("/") and len(text) >= 2:
        return None
    m = re.fullmatch(r"(\d+)\s*-\s*(\d+)", text)
    if m:
        lo, hi = int(m[1]), int(m[2])
    elif text.isdigit():
        lo, hi = int(text), int(text) + 1
    else:
        raise ValueError(f"{where}: expected a layer range 'start-end', a layer index or '/regex/', got {key!r}")
    if lo >= hi or hi > num_layers:
        raise ValueError(f"{where}: layers {lo}-{hi} are outside the model's {num_layers} layers")
    return range(lo, hi)


def device_map_from_topology(topology: Mapping, num_layers: int, base: torch.device) -> DeviceMap | None:
    """The ``device`` keys of a parsed topology (``{"0-16": {"isq": "Q4K", "device": "cuda[0]"},
    ...}``); None when no entry names a device. Layers no entry places stay on ``base``.
    The ``isq`` keys are the quantizer's business (mistralrs-quant reads the same dict)."""
    if not isinstance(topology, Mapping):
        raise ValueError(f"topology: expected a mapping of layer ranges, got {type(topology).__name__}")
    layers: list[torch.device | None] = [None] * num_layers
    labels: list[str | None] = [None] * num_layers
    for key, entry in topology.items():
        where = f"topology[{key!r}]"
        if not isinstance(entry, Mapping) or "device" not in entry or entry["device"] is None:
            continue
        rng = _layer_range(key, num_layers, where)
        if rng is None:
            raise ValueError(f"{where}.device: a device can only be given for a layer range, not a name pattern")
        dev, label = parse_device_key(entry["device"], f"{where}.device")
        for i in rng:
            if labels[i] is not None and labels[i] != label:
                raise ValueError(f"{where}.device: layer {i} is already placed on {labels[i]}")
            layers[i], labels[i] = dev, label
    if all(d is None for d in layers):
        return None
    base_label = f"{base.type}[{base.index or 0}]" if base.type == "cuda" else "cpu"
    return DeviceMap([d or base for d in layers], [lb or base_label for lb in labels], base, "topology")


# --- automatic mapping ----------------------------------------------------------------
def auto_device_map(layer_bytes: Sequence[int], kv_bytes: Sequence[int], base_bytes: int,
                    devices: Sequence[tuple[torch.device, str, int]]) -> DeviceMap:
    """Fill ``devices`` (device, label, free bytes; in order, the host last) with consecutive
    layers, each costing its weights plus its KV cache at the requested size; the first
    device also holds the non-layer weights (``base_bytes``). The last device takes what
    is left when it has room; a model that does not fit anywhere is a ``ValueError``."""
    if not devices:
        raise ValueError("auto_map_params: no device to map onto")
    n = len(layer_bytes)
    layers: list[torch.device] = []
    labels: list[str] = []
    i = 0
    for k, (dev, label, free) in enumerate(devices):
        used = base_bytes if k == 0 else 0
        if used > free:
            raise ValueError(f"auto_map_params: the embeddings and LM head ({used >> 20} MiB) do not fit "
                             f"on {label} ({free >> 20} MiB free)")
        while i < n and used + layer_bytes[i] + kv_bytes[i] <= free:
            used += layer_bytes[i] + kv_bytes[i]
            layers.append(dev)
            labels.append(label)
            i += 1
    if i < n:
        need = sum(layer_bytes[i:]) + sum(kv_bytes[i:])
        raise ValueError(f"auto_map_params: {n - i} of {n} layers ({need >> 20} MiB with their KV cache at "
                         f"the requested max_seq_len x max_batch_size) do not fit in the free memory of "
                         f"{', '.join(lb for _, lb, _ in devices)}; lower max_seq_len/max_batch_size or quantize")
    return DeviceMap(layers, labels, devices[0][0], "auto_map_params")


def _param_bytes(module: nn.Module, dtype: torch.dtype) -> int:
    elem = torch.empty(0, dtype=dtype).element_size()
    return sum(p.numel() for p in module.parameters()) * elem


def free_devices(base: torch.device) -> list[tuple[torch.device, str, int]]:
    """Every CUDA device's free memory (90% of it), then the host's available memory."""
    from mistralrs_core.engine.kv_pool import _available_memory
    out = []
    if base.type == "cuda":
        for i in range(torch.cuda.device_count()):
            free, _ = torch.cuda.mem_get_info(i)
            out.append((torch.device("cuda", i), f"cuda[{i}]", int(free * 0.9)))
    out.append((torch.device("cpu"), "cpu", _available_memory(torch.device("cpu"))))
    return out


def auto_map_for_model(model: nn.Module, params, base: torch.device,
                       devices: Sequence[tuple[torch.device, str, int]] | None = None) -> DeviceMap:
    """``params``: ``TextAutoMapParams`` / ``VisionAutoMapParams`` (max_seq_len x
    max_batch_size tokens of KV cache per layer; for vision, images add their tokens)."""
    from mistralrs_core.engine.kv_pool import bytes_per_token
    layers = decoder_layers(model)
    dtype = getattr(model, "dtype", torch.float32)
    tokens = int(params.max_seq_len) * int(params.max_batch_size)
    if hasattr(params, "max_num_images"):
        tokens += int(params.max_num_images) * int(params.max_image_length) * int(params.max_batch_size)
    specs = model.kv_cache_specs()
    kv = [bytes_per_token([specs[i]] if i < len(specs) and specs[i] is not None else [], dtype) * tokens
          for i in range(len(layers))]
    layer_bytes = [_param_bytes(layer, dtype) for layer in layers]
    base_bytes = _param_bytes(model, dtype) - sum(layer_bytes)
    return auto_device_map(layer_bytes, kv, base_bytes, devices if devices is not None else free_devices(base))


# --- applying a map -------------------------------------------------------------------
def decoder_layers(model: nn.Module) -> nn.ModuleList:
    body = getattr(model, "model", None)
    layers = getattr(body, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"device mapping: {type(model).__name__} has no model.layers to map")
    return layers


def place_for_load(model: nn.Module, dmap: DeviceMap) -> None:
    """Before the weights stream in: every module of layer i loads onto ``dmap.layers[i]``,
    everything else onto ``dmap.base``."""
    layers = decoder_layers(model)
    if len(dmap.layers) != len(layers):
        raise ValueError(f"device mapping: the map has {len(dmap.layers)} layers, the model {len(layers)}")
    for module in model.modules():
        module.__dict__["load_device"] = dmap.base
    for layer, dev in zip(layers, dmap.layers):
        for module in layer.modules():
            module.__dict__["load_device"] = dev
    model.device_map = dmap
    model.layer_devices = list(dmap.layers)


def _move(x, dev: torch.device, metas: "weakref.WeakKeyDictionary"):
    from mistralrs_core.layers.attention import AttentionMetadata
    if isinstance(x, torch.Tensor):
        return x if x.device == dev else x.to(dev)
    if isinstance(x, AttentionMetadata):
        per_dev = metas.setdefault(x, {})
        moved = per_dev.get(dev)
        if moved is None:
            if x.slot_mapping.device == dev:
                return x
            moved = attrs.evolve(
                x, slot_mapping=x.slot_mapping.to(dev), block_tables=x.block_tables.to(dev),
                token_index=x.token_index.to(dev), masks={},
                state_slots=None if x.state_slots is None else x.state_slots.to(dev))
            per_dev[dev] = moved
        return moved
    if isinstance(x, tuple):
        return tuple(_move(v, dev, metas) for v in x)
    return x


def install_hops(model: nn.Module, dmap: DeviceMap) -> None:
    """After loading: each layer (and the final norm) moves what it receives to its own
    device, so activations hop devices between layers; one metadata copy per device and
    step."""
    metas: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def hook_for(dev):
        def hook(module, args, kwargs):
            return _move(args, dev, metas), {k: _move(v, dev, metas) for k, v in kwargs.items()}
        return hook

    handles = [layer.register_forward_pre_hook(hook_for(dev), with_kwargs=True)
               for layer, dev in zip(decoder_layers(model), dmap.layers)]
    norm_name = getattr(getattr(model, "cfg", None), "final_norm_name", "norm")
    norm = getattr(model.model, norm_name, None)
    if isinstance(norm, nn.Module):
        handles.append(norm.register_forward_pre_hook(hook_for(dmap.base), with_kwargs=True))
    model._device_hops = handles
    if dmap.spans_devices and getattr(model, "fast_forward", None) is not None:
        # A fused step runs every layer in one call on one device; it cannot hop.
        model.fast_forward = None
    log.info("device map (%s): %s; embeddings and LM head on %s", dmap.source, dmap.describe(), dmap.base)
