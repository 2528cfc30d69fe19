"""Upstream's topology YAML (``guides/perf/topology``), the ISQ part.

Keys: a layer range ``START-END`` (end exclusive), a bare layer index, or a ``/regex/``
matched against checkpoint tensor names (``model.layers.0.mlp.up_proj.weight``). Values: a
mapping with ``isq`` (an ISQ type; absent or null: the default type) and ``device``. The same
file serves two readers: ``device`` keys are the core's device map
(``mistralrs_core.distributed.device_map.device_map_from_topology``, which checks them), so
they are skipped here; the core skips ``isq``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from .types import parse_isq_type

_RANGE = re.compile(r"^\s*(\d+)\s*-\s*(\d+)\s*$")


@dataclass
class Topology:
    layers: dict = field(default_factory=dict)     # index -> IsqType | None
    patterns: list = field(default_factory=list)   # [(regex, IsqType | None)] in file order


def parse_topology(text: str, where: str = "topology") -> Topology:
    import yaml  # PyYAML's safe loader: plain data only
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(f"{where}: not valid YAML: {exc}") from None
    topo = Topology()
    if data is None:
        return topo
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping of layer ranges / regexes to settings, got {type(data).__name__}")
    ranges = []
    for key, value in data.items():
        label = f"{where}: entry {key!r}"
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise ValueError(f"{label}: expected a mapping with 'isq', got {value!r}")
        unknown = set(value) - {"isq", "device"}
        if unknown:
            raise ValueError(f"{label}: unknown key(s) {', '.join(sorted(map(str, unknown)))} (known: isq, device)")
        isq = parse_isq_type(value["isq"], f"{label}: isq") if value.get("isq") is not None else None
        skey = str(key).strip()
        if len(skey) >= 2 and skey.startswith("/") and skey.endswith("/"):
            try:
                topo.patterns.append((re.compile(skey[1:-1]), isq))
            except re.error as exc:
                raise ValueError(f"{label}: invalid regex: {exc}") from None
            continue
        m = _RANGE.match(skey)
        if m:
            start, end = int(m.group(1)), int(m.group(2))
            if end <= start:
                raise ValueError(f"{label}: range end must be > start")
        elif skey.isdigit():
            start, end = int(skey), int(skey) + 1
        else:
            raise ValueError(f"{label}: a key is a layer range 'START-END', a layer index or a /regex/")
        ranges.append((start, end, isq))
    # Upstream applies ranges in sorted order, so a later (higher) range wins an overlap.
    for start, end, isq in sorted(ranges, key=lambda r: (r[0], r[1])):
        for i in range(start, end):
            topo.layers[i] = isq
    return topo


def load_topology(path_or_text: str) -> Topology:
    """A topology from a YAML file path (or, if no such file exists and the text has a
    newline or colon, from the YAML text itself)."""
    p = Path(path_or_text).expanduser()
    if p.is_file():
        return parse_topology(p.read_text(encoding="utf-8"), str(p))
    if "\n" in path_or_text or ":" in path_or_text and not p.suffix:
        return parse_topology(path_or_text)
    raise FileNotFoundError(f"topology: no such file {path_or_text!r}")
