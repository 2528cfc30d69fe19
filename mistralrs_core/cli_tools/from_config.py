"""``mistralrs from-config -f models.toml``: serve or chat from one file naming several models.

Reads upstream mistral.rs's CLI TOML format (``command = "serve" | "run"``, ``[global]``,
``[server]``, ``[runtime]``, ``[paged_attn]``, ``[[models]]`` with ``[models.format]``,
``[models.quantization]``, ``[models.device]``, ``[models.vision]``) and this project's own
config format (``mistralrs serve --config``, see ``server/spec.py``; it has no ``command``
key and serves). Upstream keys that select something this engine does not do are refused
with the key's name, never ignored.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

NAME = "from-config"

_TOP = {"command", "default_model_id", "enable_thinking", "thinking", "global", "server", "runtime",
        "paged_attn", "models"}
_GLOBAL = {"seed": "seed", "token_source": "token_source"}
_SERVER = {"host", "port", "ui"}
# [paged_attn] key -> Runner argument
_PAGED = {"context_len": "pa_ctxt_len", "memory_mb": "pa_gpu_mem", "memory_fraction": "pa_gpu_mem_usage",
          "block_size": "pa_blk_size", "cache_type": "pa_cache_type"}
# [models.*] key -> field of our flat model entry
_MODEL_TOP = {"kind": "kind", "model_id": "model_id", "tokenizer": "tokenizer_json", "arch": "arch",
              "dtype": "dtype", "chat_template": "chat_template", "jinja_explicit": "jinja_explicit",
              "name": "name"}
_FORMAT = {"tok_model_id": "tok_model_id", "gqa": "gqa"}
_QUANT = {"in_situ_quant": "in_situ_quant", "from_uqff": "from_uqff", "isq_organization": "organization",
          "imatrix": "imatrix", "calibration_file": "calibration_file", "write_uqff": "write_uqff"}
_DEVICE = {"topology": "topology", "hf_cache": "hf_cache_path"}
# Sizes for upstream's automatic multi-device mapping: one device here, nothing to size.
_DEVICE_MAP_ONLY = {"max_seq_len", "max_batch_size"}
_VISION = {"max_edge": "max_edge"}
_VISION_MAP_ONLY = {"max_num_images", "max_image_length"}


def add_parser(sub: Any) -> None:
    from mistralrs_core.cli import chat_args
    p = sub.add_parser(NAME, help="serve or chat from a TOML file naming several models",
                       description="Run `serve` or `run` from one TOML file in upstream mistral.rs's format "
                                   "(command = \"serve\" | \"run\", [server], [runtime], [paged_attn], "
                                   "[[models]] with [models.format] / [models.quantization] / ...), or a "
                                   "`mistralrs serve --config` file.")
    p.add_argument("-f", "--file", required=True, help="the .toml (or .json) configuration file")
    p.add_argument("--api-key", default=None, help="serve: require this bearer key (default: $MISTRALRS_API_KEY)")
    p.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"))
    p.add_argument("--no-progress", dest="progress", action="store_const", const=False, default=None,
                   help="no loading progress on stderr")
    chat_args(p)
    p.set_defaults(tool=sys.modules[__name__])


def _table(data: dict, key: str, where: str = "") -> dict:
    value = data.get(key, {})
    if not isinstance(value, dict):
        raise ValueError(f"{where}{key}: must be a table")
    return value


def _take(section: dict, mapping: dict[str, str], where: str, out: dict,
          ignored: frozenset[str] | set[str] = frozenset()) -> None:
    for key, value in section.items():
        if key in mapping:
            out[mapping[key]] = value
        elif key not in ignored:
            known = ", ".join(sorted({*mapping, *ignored}))
            raise ValueError(f"{where}{key}: not supported here (known keys: {known})")


def _semicolons(value: Any, where: str) -> list[str]:
    if isinstance(value, str):
        return [v for v in (part.strip() for part in value.split(";")) if v]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise ValueError(f"{where}: must be a file name, a ';'-separated list or a list of names")


def _model(entry: Any, i: int) -> dict:
    where = f"models[{i}]."
    if not isinstance(entry, dict):
        raise ValueError(f"models[{i}]: must be a table")
    out: dict = {}
    sections = {k: v for k, v in entry.items() if isinstance(v, dict)}
    _take({k: v for k, v in entry.items() if k not in sections}, _MODEL_TOP, where, out)
    for name, section in sections.items():
        at = f"{where}{name}."
        if name == "format":
            fmt = str(section.get("format", "auto")).lower()
            if fmt not in ("auto", "plain", "gguf"):
                raise ValueError(f"{at}format: {fmt!r} is not supported here (plain or gguf)")
            if "quantized_file" in section:
                files = _semicolons(section["quantized_file"], f"{at}quantized_file")
                out["quantized_filename"] = files[0] if len(files) == 1 else files
            elif fmt == "gguf":
                raise ValueError(f"{at}quantized_file: required with format = \"gguf\"")
            _take({k: v for k, v in section.items() if k not in ("format", "quantized_file")}, _FORMAT, at, out)
        elif name == "quantization":
            _take(section, _QUANT, at, out)
            if isinstance(out.get("from_uqff"), str) and ";" in out["from_uqff"]:
                out["from_uqff"] = _semicolons(out["from_uqff"], f"{at}from_uqff")
        elif name == "device":
            rest = dict(section)
            if rest.pop("cpu", False):
                out["device"] = "cpu"
            _take(rest, _DEVICE, at, out, ignored=_DEVICE_MAP_ONLY)
        elif name == "vision":
            _take(section, _VISION, at, out, ignored=_VISION_MAP_ONLY)
        elif name == "adapter":
            raise ValueError(f"{at[:-1]}: LoRA/X-LoRA adapters are not supported by from-config yet; "
                             f"load them through the Python API (Which.Lora / Which.XLora)")
        else:
            raise ValueError(f"{where}{name}: unknown section (format, quantization, device, vision)")
    if "model_id" not in out:
        raise ValueError(f"{where}model_id: required")
    return out


def translate(data: dict) -> tuple[str, dict, dict]:
    """Upstream's document -> (command, our config document, chat request fields)."""
    for key in data:
        if key not in _TOP:
            raise ValueError(f"{key}: unknown top-level key (expected: {', '.join(sorted(_TOP))})")
    command = data.get("command")
    if command not in ("serve", "run"):
        raise ValueError(f"command: must be \"serve\" or \"run\", got {command!r}")
    runtime = dict(_table(data, "runtime"))
    _take(_table(data, "global"), _GLOBAL, "global.", runtime)
    paged = dict(_table(data, "paged_attn"))
    mode = str(paged.pop("mode", "auto")).lower()
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"paged_attn.mode: must be auto, on or off, got {mode!r}")
    if mode == "off":
        runtime["no_paged_attn"] = True   # refused by the Runner with the reason
    _take(paged, _PAGED, "paged_attn.", runtime)
    server = dict(_table(data, "server"))
    _take(server, {k: k for k in _SERVER}, "server.", {})
    if server.pop("ui", True) is False:
        raise ValueError("server.ui: the chat page at /ui is always served; it cannot be turned off")
    models = data.get("models")
    if not isinstance(models, list) or not models:
        raise ValueError("models: must be a non-empty list of [[models]] tables")
    doc: dict = {"models": [_model(m, i) for i, m in enumerate(models)], "runtime": runtime, "server": server}
    if "default_model_id" in data:
        doc["default_model_id"] = data["default_model_id"]
    chat: dict = {}
    thinking = data.get("enable_thinking", data.get("thinking"))
    if thinking is not None:
        if not isinstance(thinking, bool):
            raise ValueError(f"enable_thinking: must be true or false, got {thinking!r}")
        if thinking:   # false defers to the template's default, as upstream
            chat["enable_thinking"] = True
    return command, doc, chat


def load(path: str | Path) -> tuple[str, Any, dict]:
    """(command, ServeConfig, chat fields) for ``path`` in either format."""
    from mistralrs_core.server.spec import config_from_data, read_config
    path = Path(path)
    data = read_config(path)
    if "command" not in data:
        return "serve", config_from_data(data, path.parent), {}
    command, doc, chat = translate(data)
    return command, config_from_data(doc, path.parent), chat


def main(args: argparse.Namespace) -> int:
    from mistralrs_core.cli import error, execute
    from mistralrs_core.errors import NotAvailableYet
    try:
        command, cfg, chat = load(args.file)
    except (ValueError, OSError, NotAvailableYet) as exc:
        return error(f"{args.file}: {exc}")
    if args.progress is not None:
        cfg.runtime["progress"] = args.progress
    if command == "serve":
        import os
        args.api_key = args.api_key or os.environ.get("MISTRALRS_API_KEY") or None
        args.host = args.port = None
        args.drain_timeout, args.max_body_mb = 30.0, 16.0
    return execute(command, cfg, args, chat=chat)
