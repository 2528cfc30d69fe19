"""Reading Hugging Face style JSON configs (config.json, generation_config.json)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable

DEFAULT_CONTEXT_LENGTH = 4096
# Names different model families use for the trained context length, most common first.
_CONTEXT_KEYS = (
    "max_position_embeddings",
    "n_positions",
    "seq_length",
    "max_seq_len",
    "max_sequence_length",
    "n_ctx",
)


def load_json(path: str | os.PathLike) -> Any:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FileNotFoundError(f"file {str(p)!r} does not exist") from None
    except UnicodeDecodeError:
        raise ValueError(f"{str(p)!r} is not UTF-8 text, so it cannot be a JSON file") from None
    except OSError as exc:
        raise ValueError(f"cannot read {str(p)!r}: {exc.strerror or exc}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{str(p)!r} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None


def _load_object(path: Path) -> dict:
    data = load_json(path)
    if not isinstance(data, dict):
        raise ValueError(f"{str(path)!r} must hold a JSON object, found {type(data).__name__}")
    return data


def load_model_config(model_dir: str | os.PathLike) -> dict:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no config.json in model directory {str(model_dir)!r}")
    return _load_object(path)


def load_generation_config(model_dir: str | os.PathLike) -> dict:
    """generation_config.json, or {} when the model has none."""
    path = Path(model_dir) / "generation_config.json"
    if not path.is_file():
        return {}
    return _load_object(path)


def max_context_length(config: dict, default: int = DEFAULT_CONTEXT_LENGTH) -> int:
    """The longest sequence the model was built for, looking into `text_config` for multimodal models."""
    for cfg in (config, config.get("text_config"), config.get("llm_config"), config.get("language_config")):
        if not isinstance(cfg, dict):
            continue
        for key in _CONTEXT_KEYS:
            value = cfg.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return default


def _as_id_list(value: Any) -> list[int]:
    if isinstance(value, bool) or value is None:
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, (list, tuple)):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


def config_eos_token_ids(*configs: dict | None) -> set[int]:
    """Union of `eos_token_id` (an int or a list) across configs, including nested text_config."""
    ids: set[int] = set()
    for cfg in configs:
        if not isinstance(cfg, dict):
            continue
        ids.update(_as_id_list(cfg.get("eos_token_id")))
        text_cfg = cfg.get("text_config")
        if isinstance(text_cfg, dict):
            ids.update(_as_id_list(text_cfg.get("eos_token_id")))
    return ids


def first_present(config: dict, keys: Iterable[str], default: Any = None) -> Any:
    for key in keys:
        if key in config and config[key] is not None:
            return config[key]
    return default
