"""Upstream's adapter ordering file and where each adapter's files live.

The ordering file is JSON: ``order`` (adapter names: for LoRA the adapters active by
default, for X-LoRA the classifier's classes in training order), ``layers`` (X-LoRA:
HF module name -> the classifier's layer index, as upstream's ``create_ordering.py`` writes
it from PEFT's module order), ``base_model_id`` and ``preload_adapters`` (``[{name,
adapter_model_id}]``: adapters loaded but active only when a request names them). An adapter
named in ``order`` lives in ``<adapters_model_id>/<name>/`` (``adapter_config.json`` +
``adapter_model.safetensors``).
"""
from __future__ import annotations

import json
from pathlib import Path

import attrs


@attrs.frozen
class AdapterSource:
    name: str
    directory: Path


@attrs.frozen
class Ordering:
    order: tuple[str, ...] = ()
    layers: dict | None = None
    base_model_id: str | None = None
    preload: tuple[tuple[str, str], ...] = ()   # (name, adapter_model_id)
    path: str = ""


def read_ordering(path: str) -> Ordering:
    where = f"order: {path}"
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{where}: ordering file not found")
    try:
        raw = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{where}: not a readable JSON ordering file ({exc})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: the ordering file must be a JSON object")
    order = raw.get("order") or []
    if not isinstance(order, list) or not all(isinstance(n, str) and n for n in order):
        raise ValueError(f"{where}: order: must be a list of adapter names")
    if len(set(order)) != len(order):
        raise ValueError(f"{where}: order: names an adapter twice")
    layers = raw.get("layers")
    if layers is not None and (not isinstance(layers, dict) or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in layers.values())):
        raise ValueError(f"{where}: layers: must map module names to layer indices >= 0")
    preload = []
    for i, item in enumerate(raw.get("preload_adapters") or []):
        if not isinstance(item, dict) or not item.get("name") or not item.get("adapter_model_id"):
            raise ValueError(f"{where}: preload_adapters[{i}]: needs name and adapter_model_id")
        preload.append((str(item["name"]), str(item["adapter_model_id"])))
    names = list(order) + [n for n, _ in preload]
    if len(set(names)) != len(names):
        raise ValueError(f"{where}: preload_adapters: a name is also in order or given twice")
    return Ordering(tuple(order), layers, raw.get("base_model_id"), tuple(preload), str(path))


def adapter_dir(root: Path, name: str, what: str) -> Path:
    """``root/name`` when it holds an adapter, else a clear error."""
    d = root / name
    if not (d / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{what}: adapter {name!r}: no {d}/adapter_config.json")
    return d


def is_adapter_dir(path: Path) -> bool:
    return (path / "adapter_config.json").is_file()
