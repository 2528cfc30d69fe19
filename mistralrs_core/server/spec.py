"""What to load: ``Which`` variants from command-line flags or a multi-model config file.

Config file (JSON, or TOML when the name ends in .toml), modelled on upstream's
``from-config`` format::

    default_model_id = "small"          # a served id; default: the first model
    [server]                            # optional: host, port
    port = 8080
    [runtime]                           # optional: Runner keyword arguments for all models
    max_seqs = 32
    [[models]]
    model_id = "Qwen/Qwen3-0.6B"        # hub id or directory (relative to this file)
    name = "small"                      # served id; default: model_id
    kind = "auto"                       # auto|text|embedding|vision|diffusion|speech
    arch = "qwen3"                      # and any other field of the chosen Which variant
    quantized_filename = "q4.gguf"      # GGUF: one file or a list
    prefix_cache_n = 0                  # and any load option, overriding [runtime]
    anymoe_config = {hidden_size = 64, dataset_json = "amoe.json", prefix = "model.layers",
                     mlp = "mlp", model_ids = ["..."], expert_type = "fine_tuned"}   # optional

Every error names the offending key (``models[1].kind: ...``).
"""
from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

import attrs

from mistralrs_core.api.which import Which
from mistralrs_core.loading.options import LoadOptions

KINDS = ("auto", "text", "embedding", "vision", "multimodal", "diffusion", "speech", "lora", "xlora")
# Adapter kinds: (dense base, GGUF base); their adapter fields come from the entry.
_ADAPTER_CLASSES = {"lora": (Which.Lora, Which.LoraGGUF), "xlora": (Which.XLora, Which.XLoraGGUF)}
_CLASSES = {"embedding": Which.Embedding, "vision": Which.VisionPlain, "multimodal": Which.VisionPlain,
            "diffusion": Which.DiffusionPlain, "speech": Which.Speech}
LOAD_OPTIONS = frozenset(attrs.fields_dict(LoadOptions))


@attrs.define
class ModelSpec:
    which: Any
    model_id: str | None = None      # served id; None: the Runner derives one from `which`
    default: bool = False
    options: dict = attrs.field(factory=dict)

    @property
    def label(self) -> str:
        return self.model_id or getattr(self.which, "model_id", None) or \
            getattr(self.which, "quantized_model_id", "model")


@attrs.define
class ServeConfig:
    models: list[ModelSpec]
    runtime: dict = attrs.field(factory=dict)
    server: dict = attrs.field(factory=dict)


def runner_arguments() -> frozenset[str]:
    from mistralrs_core.runner import Runner
    return frozenset(p for p in inspect.signature(Runner.__init__).parameters if p not in ("self", "which"))


def build_which(kind: str, model_id: str, *, quantized_filename=None, tok_model_id: str | None = None,
                where: str = "", **fields: Any):
    """The ``Which`` variant for ``kind`` (auto: GGUF when files are given, else Plain).
    ``fields`` are that variant's own fields (arch, dtype, tokenizer_json, ...); None is absent."""
    def name(key: str) -> str:
        return f"{where}{key}"

    if kind not in KINDS:
        raise ValueError(f"{name('kind')}: must be one of {', '.join(KINDS)}, got {kind!r}")
    if not isinstance(model_id, str) or not model_id:
        raise ValueError(f"{name('model_id')}: required (a model directory or hub id)")
    fields = {k: v for k, v in fields.items() if v is not None}
    if kind in ("auto", "text") and quantized_filename is None and model_id.lower().endswith(".gguf") \
            and Path(model_id).is_file():
        # `-m model.gguf` names the file directly.
        model_id, quantized_filename = str(Path(model_id).parent), Path(model_id).name
    if kind in _ADAPTER_CLASSES:
        dense, gguf = _ADAPTER_CLASSES[kind]
        if quantized_filename is not None:
            cls, args = gguf, dict(quantized_model_id=model_id, quantized_filename=quantized_filename,
                                   tok_model_id=tok_model_id)
        else:
            if tok_model_id is not None:
                raise ValueError(f"{name('tok_model_id')}: only used with GGUF files")
            cls, args = dense, {"model_id": model_id}
    elif kind in ("auto", "text") and quantized_filename is not None:
        cls = Which.GGUF
        files = list(quantized_filename) if isinstance(quantized_filename, (list, tuple)) \
            else [quantized_filename]
        if "arch" in fields:
            raise ValueError(f"{name('arch')}: not used with GGUF files (the file names its architecture)")
        args = dict(quantized_model_id=model_id, quantized_filename=files[0] if len(files) == 1 else files,
                    tok_model_id=tok_model_id)
    else:
        if quantized_filename is not None:
            raise ValueError(f"{name('quantized_filename')}: GGUF files need kind auto or text, not {kind!r}")
        if tok_model_id is not None:
            raise ValueError(f"{name('tok_model_id')}: only used with GGUF files")
        cls = _CLASSES.get(kind, Which.Plain)
        args = {"model_id": model_id}
    known = attrs.fields_dict(cls)
    for key in fields:
        if key not in known:
            raise ValueError(f"{name(key)}: not a field of Which.{cls.__name__} "
                             f"(fields: {', '.join(k for k in known if k not in args)})")
    try:
        return cls(**args, **fields)
    except TypeError as exc:
        missing = [f.name for f in attrs.fields(cls)
                   if f.default is attrs.NOTHING and f.name not in args and f.name not in fields]
        if missing:
            raise ValueError(f"{name(missing[0])}: required for kind {kind!r}") from None
        raise ValueError(f"{where or 'model'}: {exc}") from None
    except ValueError as exc:
        raise ValueError(f"{where}{exc}") from None


def read_config(path: Path) -> dict:
    """The document in a .json or .toml file (errors name the file)."""
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".toml":
        try:
            import tomllib
        except ImportError:  # Python 3.10
            try:
                import tomli as tomllib
            except ImportError:
                raise ValueError(f"{path}: TOML configs need Python 3.11+ or the tomli package; "
                                 f"use JSON instead") from None
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"{path}: invalid TOML: {exc}") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: invalid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: must hold an object with a 'models' list")
    return data


_TOP_KEYS = {"default_model_id", "models", "runtime", "server"}
_SERVER_KEYS = {"host", "port"}


def _model_spec(entry: Any, i: int, base: Path) -> ModelSpec:
    where = f"models[{i}]."
    if not isinstance(entry, dict):
        raise ValueError(f"models[{i}]: must be an object")
    entry = dict(entry)
    model_id = entry.pop("model_id", None)
    if isinstance(model_id, str) and (base / model_id).exists():
        model_id = str((base / model_id).resolve())
    served = entry.pop("name", None)
    if served is not None and not isinstance(served, str):
        raise ValueError(f"{where}name: must be a string")
    kind = entry.pop("kind", "auto")
    # anymoe_config (an object of AnyMoeConfig's fields) belongs to this model, like a load option.
    options = {k: entry.pop(k) for k in list(entry) if k in LOAD_OPTIONS or k == "anymoe_config"}
    which = build_which(kind, model_id, where=where, quantized_filename=entry.pop("quantized_filename", None),
                        tok_model_id=entry.pop("tok_model_id", None), **entry)
    return ModelSpec(which, served, False, options)


def load_config(path: str | Path) -> ServeConfig:
    path = Path(path)
    return config_from_data(read_config(path), path.parent)


def config_from_data(data: dict, base: Path) -> ServeConfig:
    """A config document (``base``: the directory its relative model paths start from)."""
    for key in data:
        if key not in _TOP_KEYS:
            raise ValueError(f"{key}: unknown top-level key (expected: {', '.join(sorted(_TOP_KEYS))})")
    models = data.get("models")
    if not isinstance(models, list) or not models:
        raise ValueError("models: must be a non-empty list")
    specs = [_model_spec(m, i, base) for i, m in enumerate(models)]
    runtime = data.get("runtime") or {}
    if not isinstance(runtime, dict):
        raise ValueError("runtime: must be an object of Runner options")
    allowed = runner_arguments()
    for key in runtime:
        if key not in allowed:
            raise ValueError(f"runtime.{key}: not a Runner option")
    server = data.get("server") or {}
    if not isinstance(server, dict) or set(server) - _SERVER_KEYS:
        raise ValueError(f"server: may hold only {', '.join(sorted(_SERVER_KEYS))}")
    default = data.get("default_model_id")
    if default is not None:
        hits = [s for s in specs if default in (s.model_id, s.label)]
        if not hits:
            raise ValueError(f"default_model_id: {default!r} names none of the models")
        hits[0].default = True
    return ServeConfig(specs, runtime, server)
