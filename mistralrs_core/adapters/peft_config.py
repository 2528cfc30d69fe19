"""A PEFT LoRA ``adapter_config.json``: the fields that change the math, and target matching."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import attrs

_BIAS_MODES = ("none", "all", "lora_only")


@attrs.frozen
class LoraConfig:
    r: int
    lora_alpha: float
    use_rslora: bool = False
    target_modules: tuple[str, ...] | str | None = None
    fan_in_fan_out: bool = False
    modules_to_save: tuple[str, ...] = ()
    bias: str = "none"
    rank_pattern: dict = attrs.field(factory=dict)
    alpha_pattern: dict = attrs.field(factory=dict)
    base_model_name_or_path: str | None = None
    source: str = ""                         # the file, for messages

    def scale(self, module: str, rank: int) -> float:
        """alpha / r (rsLoRA: alpha / sqrt(r)) for one target, with per-module overrides."""
        alpha = float(_pattern_value(self.alpha_pattern, module, self.lora_alpha))
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank

    def expected_rank(self, module: str) -> int:
        return int(_pattern_value(self.rank_pattern, module, self.r))

    def targets(self, module: str) -> bool:
        """PEFT's rule: a string is a regex matched against the whole module name; a list
        matches a name equal to an entry or ending in ``.entry``."""
        t = self.target_modules
        if t is None:
            return False
        if isinstance(t, str):
            return re.fullmatch(t, module) is not None
        return any(module == name or module.endswith("." + name) for name in t)


def _pattern_value(patterns: dict, module: str, default):
    # PEFT matches a pattern key as the tail of the module name (optionally regex).
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def read_lora_config(path: Path) -> LoraConfig:
    where = str(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{where}: adapter_config.json not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{where}: not a readable adapter config ({exc})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: an adapter config must be a JSON object")
    peft_type = str(raw.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise ValueError(f"{where}: peft_type: {peft_type!r} adapters are not LoRA adapters")
    if raw.get("use_dora"):
        # Upstream mistral.rs does not apply DoRA either; a silent plain-LoRA run would be wrong.
        raise ValueError(f"{where}: use_dora: DoRA adapters are not supported")
    for unsupported in ("layers_to_transform", "layer_replication"):
        if raw.get(unsupported):
            raise ValueError(f"{where}: {unsupported}: not supported")
    bias = raw.get("bias", "none") or "none"
    if bias not in _BIAS_MODES:
        raise ValueError(f"{where}: bias: {bias!r} is not one of {', '.join(_BIAS_MODES)}")
    try:
        r, alpha = int(raw["r"]), float(raw.get("lora_alpha", raw["r"]))
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"{where}: r / lora_alpha: missing or not numbers") from None
    if r < 1:
        raise ValueError(f"{where}: r: must be >= 1, got {r}")
    targets = raw.get("target_modules")
    if isinstance(targets, list):
        targets = tuple(str(t) for t in targets)
    elif targets is not None and not isinstance(targets, str):
        raise ValueError(f"{where}: target_modules: a list of names or a regex string")
    if targets == "all-linear":
        targets = r".*"
    return LoraConfig(
        r=r, lora_alpha=alpha, use_rslora=bool(raw.get("use_rslora", False)), target_modules=targets,
        fan_in_fan_out=bool(raw.get("fan_in_fan_out", False)),
        modules_to_save=tuple(raw.get("modules_to_save") or ()), bias=bias,
        rank_pattern=dict(raw.get("rank_pattern") or {}), alpha_pattern=dict(raw.get("alpha_pattern") or {}),
        base_model_name_or_path=raw.get("base_model_name_or_path"), source=where)
