"""``Runner(anymoe_config=...)``: the checks that need no model, and what a reload reuses.

Every failure is a ``ValueError`` whose message starts with ``anymoe_config.<field>``.
"""
from __future__ import annotations

from pathlib import Path

import attrs
import torch

from mistralrs_core.api.config import AnyMoeConfig, AnyMoeExpertType


def _positive(value, field: str, kind=int) -> None:
    ok = not isinstance(value, bool) and isinstance(value, (int, float) if kind is float else int)
    if not ok or not value > 0:
        raise ValueError(f"anymoe_config.{field}: must be a {'number' if kind is float else 'integer'} > 0, "
                         f"got {value!r}")


@attrs.define
class AnyMoeSetup:
    config: AnyMoeConfig
    layers: list[int]                   # as given; [] means every layer
    #: the gate a first load trained or read, so a reload neither retrains nor rereads
    gates: dict[str, torch.Tensor] | None = None
    #: per training step, per AnyMoE layer, the loss (what loss_csv_path holds)
    losses: list[list[float]] = attrs.field(factory=list)

    @property
    def num_experts(self) -> int:
        return 1 + len(self.config.model_ids)

    @classmethod
    def from_runner_arg(cls, cfg) -> "AnyMoeSetup | None":
        if cfg is None:
            return None
        if isinstance(cfg, dict):
            cfg = config_from_dict(cfg)
        if not isinstance(cfg, AnyMoeConfig):
            raise ValueError(f"anymoe_config: expected an AnyMoeConfig, got {type(cfg).__name__}")
        if not isinstance(cfg.expert_type, (AnyMoeExpertType.FineTuned, AnyMoeExpertType.LoraAdapter)):
            raise ValueError("anymoe_config.expert_type: expected AnyMoeExpertType.FineTuned() or "
                             ".LoraAdapter(rank, alpha, target_modules)")
        _positive(cfg.hidden_size, "hidden_size")
        ids = list(cfg.model_ids)
        if not ids or not all(isinstance(m, str) and m.strip() for m in ids):
            raise ValueError(f"anymoe_config.model_ids: one or more non-empty model ids (the experts "
                             f"besides the base), got {cfg.model_ids!r}")
        layers = list(cfg.layers)
        for n in layers:
            if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                raise ValueError(f"anymoe_config.layers: layer indices are integers >= 0, got {n!r}")
        if len(set(layers)) != len(layers):
            raise ValueError(f"anymoe_config.layers: {layers} lists a layer twice")
        if isinstance(cfg.expert_type, AnyMoeExpertType.LoraAdapter):
            _positive(cfg.expert_type.rank, "expert_type.rank")
            if isinstance(cfg.expert_type.alpha, bool) or not isinstance(cfg.expert_type.alpha, (int, float)):
                raise ValueError(f"anymoe_config.expert_type.alpha: must be a number, got {cfg.expert_type.alpha!r}")
            if not cfg.expert_type.target_modules:
                raise ValueError("anymoe_config.expert_type.target_modules: name at least one MLP linear "
                                 "layer (e.g. ['gate_proj'])")
        if cfg.training:
            _positive(cfg.lr, "lr", float)
            _positive(cfg.epochs, "epochs")
            _positive(cfg.batch_size, "batch_size")
            if not cfg.dataset_json or not Path(cfg.dataset_json).expanduser().is_file():
                raise ValueError(f"anymoe_config.dataset_json: file {cfg.dataset_json!r} does not exist")
            if cfg.loss_csv_path is not None and Path(cfg.loss_csv_path).suffix != ".csv":
                raise ValueError(f"anymoe_config.loss_csv_path: must end in .csv, got {cfg.loss_csv_path!r}")
        elif not cfg.gate_model_id:
            raise ValueError("anymoe_config.gate_model_id: training=False loads a trained gate, so "
                             "gate_model_id must name it")
        return cls(cfg, layers)


def _expert_type(value):
    """Upstream's TOML spellings: ``"fine_tuned"``, ``{fine_tuned = {}}`` or
    ``{lora_adapter = {rank, alpha, target_modules}}``."""
    if isinstance(value, (AnyMoeExpertType.FineTuned, AnyMoeExpertType.LoraAdapter)):
        return value
    if value == "fine_tuned" or value == {"fine_tuned": {}}:
        return AnyMoeExpertType.FineTuned()
    if isinstance(value, dict) and set(value) == {"lora_adapter"} and isinstance(value["lora_adapter"], dict):
        args = value["lora_adapter"]
        unknown = set(args) - {"rank", "alpha", "target_modules"}
        if unknown or not {"rank", "alpha", "target_modules"} <= set(args):
            raise ValueError("anymoe_config.expert_type.lora_adapter: needs exactly rank, alpha and target_modules")
        return AnyMoeExpertType.LoraAdapter(**args)
    raise ValueError(f'anymoe_config.expert_type: "fine_tuned" or {{"lora_adapter": {{"rank": ..., "alpha": ..., '
                     f'"target_modules": [...]}}}}, got {value!r}')


def config_from_dict(d: dict) -> AnyMoeConfig:
    """An ``AnyMoeConfig`` from JSON/TOML (the server's config file)."""
    known = set(attrs.fields_dict(AnyMoeConfig))
    for key in d:
        if key not in known:
            raise ValueError(f"anymoe_config.{key}: not a field of AnyMoeConfig ({', '.join(sorted(known))})")
    d = dict(d)
    if "expert_type" in d:
        d["expert_type"] = _expert_type(d["expert_type"])
    try:
        return AnyMoeConfig(**d)
    except TypeError as exc:
        missing = [f.name for f in attrs.fields(AnyMoeConfig) if f.default is attrs.NOTHING and f.name not in d]
        raise ValueError(f"anymoe_config.{missing[0] if missing else 'expert_type'}: {exc}") from None
    except ValueError as exc:
        raise ValueError(f"anymoe_config: {exc}") from None
