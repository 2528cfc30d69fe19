"""Turn a model id (local directory or Hugging Face Hub repo id) into files on disk.

Every failure here becomes one exception with one readable message: users meet these
errors before anything else, and a raw hub traceback says little about what to fix.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

# Only what a loader reads: configs, weights, templates and tokenizer files. Hub repos
# often also carry pickles, ONNX exports and GGUF files that would multiply the download.
DEFAULT_ALLOW_PATTERNS: tuple[str, ...] = (
    "*.json",
    "*.safetensors",
    "*.jinja",
    "tokenizer*",
    "*.tiktoken",
    "merges.txt",
    "vocab.txt",
)
# Mistral repos ship the same weights twice (HF shards + consolidated.safetensors), and
# Llama repos keep the original Meta checkpoint under original/.
DEFAULT_IGNORE_PATTERNS: tuple[str, ...] = ("consolidated*.safetensors", "original/*")

# Hub ids are "name" or "namespace/name" with a restricted alphabet; anything else the
# user typed must be a filesystem path.
_REPO_ID_RE = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[A-Za-z0-9][\w.\-]*)?$")


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in {"1", "true", "yes", "on", "y"}


def hub_offline() -> bool:
    """Whether the hub must not be contacted.

    Read at call time: huggingface_hub reads the variables once at import, so a process
    that sets them later (tests, notebooks) would otherwise still hit the network.
    """
    return _truthy(os.environ.get("HF_HUB_OFFLINE")) or _truthy(os.environ.get("TRANSFORMERS_OFFLINE"))


def parse_token_source(token_source: str | None) -> str | None | bool:
    """Map the SDK's `token_source` string to huggingface_hub's `token=` argument.

    "cache" → None (the hub uses its cached login / HF_TOKEN), "none" → False (send no
    token), "literal:<tok>" → the token, "env:<VAR>" → that variable's value,
    "path:<file>" → the file's first line.
    """
    if token_source is None:
        return None
    if not isinstance(token_source, str):
        raise ValueError(f"token_source must be a string, got {type(token_source).__name__}")
    src = token_source.strip()
    lowered = src.lower()
    if lowered == "cache":
        return None
    if lowered == "none":
        return False
    kind, sep, value = src.partition(":")
    kind = kind.strip().lower()
    if sep and kind == "literal":
        if not value:
            raise ValueError("token_source 'literal:' needs a token after the colon")
        return value
    if sep and kind == "env":
        var = value.strip()
        if not var:
            raise ValueError("token_source 'env:' needs a variable name after the colon")
        tok = os.environ.get(var)
        if not tok:
            raise ValueError(f"token_source {token_source!r}: environment variable {var} is not set")
        return tok.strip()
    if sep and kind == "path":
        path = Path(value.strip()).expanduser()
        try:
            tok = path.read_text(encoding="utf-8").strip().splitlines()
        except OSError as exc:
            raise ValueError(f"token_source {token_source!r}: cannot read token file {path}: {exc.strerror or exc}") from None
        if not tok or not tok[0].strip():
            raise ValueError(f"token_source {token_source!r}: token file {path} is empty")
        return tok[0].strip()
    raise ValueError(
        f"invalid token_source {token_source!r}: expected 'cache', 'none', "
        "'literal:<token>', 'env:<VARIABLE>' or 'path:<file>'"
    )


def looks_like_repo_id(model_id: str) -> bool:
    return bool(_REPO_ID_RE.match(model_id)) and ".." not in model_id and not model_id.endswith((".", "-"))


def _hub_error(exc: Exception, model_id: str, what: str, offline: bool) -> Exception:
    """Translate a huggingface_hub exception into one clear builtin exception."""
    from huggingface_hub import errors as hf_errors

    if isinstance(exc, hf_errors.GatedRepoError):
        return PermissionError(
            f"{model_id!r} is a gated repository on the Hugging Face Hub; accept its licence on the "
            "website and pass a token (token_source='cache' after `huggingface-cli login`, or 'env:HF_TOKEN')"
        )
    if isinstance(exc, hf_errors.RepositoryNotFoundError):
        return FileNotFoundError(
            f"model {model_id!r} is neither a local directory nor a repository on the Hugging Face Hub "
            "(or it is private and no valid token was given)"
        )
    if isinstance(exc, hf_errors.RevisionNotFoundError):
        return FileNotFoundError(f"revision not found for {model_id!r} on the Hugging Face Hub")
    if isinstance(exc, hf_errors.RemoteEntryNotFoundError):
        return FileNotFoundError(f"{what} does not exist in Hugging Face Hub repository {model_id!r}")
    if isinstance(exc, hf_errors.LocalEntryNotFoundError):
        if offline:
            return FileNotFoundError(
                f"cannot find {what} of {model_id!r} in the local Hugging Face cache, and HF_HUB_OFFLINE is "
                "set so nothing can be downloaded; unset HF_HUB_OFFLINE or pass a local directory"
            )
        return FileNotFoundError(
            f"cannot download {what} of {model_id!r} (is the Hugging Face Hub reachable?), "
            "and no copy is in the local cache"
        )
    if isinstance(exc, hf_errors.HFValidationError):
        return FileNotFoundError(f"model {model_id!r} is not a local path and not a valid Hugging Face repo id")
    if isinstance(exc, hf_errors.HfHubHTTPError):
        return ConnectionError(f"Hugging Face Hub request for {model_id!r} failed: {exc}")
    return exc


def _local_path(model_id: str) -> Path | None:
    """The local path meant by model_id, or None when it should be looked up on the hub."""
    path = Path(model_id).expanduser()
    if path.exists():
        return path
    if not looks_like_repo_id(model_id) or model_id.startswith((".", "~")):
        raise FileNotFoundError(f"local model path {model_id!r} does not exist")
    return None


def resolve_model_dir(
    model_id: str,
    *,
    hf_cache_path: str | None = None,
    token_source: str = "cache",
    revision: str | None = None,
    allow_patterns: list[str] | None = None,
    ignore_patterns: list[str] | None = None,
) -> Path:
    """A directory holding the model's files: the local directory itself, or a hub snapshot."""
    if not isinstance(model_id, (str, os.PathLike)) or not str(model_id).strip():
        raise ValueError("model id must be a non-empty string")
    model_id = os.fspath(model_id).strip()
    token = parse_token_source(token_source)
    local = _local_path(model_id)
    if local is not None:
        if not local.is_dir():
            raise NotADirectoryError(f"model path {model_id!r} is a file; expected a directory with the model files")
        return local.resolve()

    from huggingface_hub import snapshot_download

    offline = hub_offline()
    try:
        path = snapshot_download(
            model_id,
            revision=revision,
            cache_dir=hf_cache_path,
            token=token,
            local_files_only=offline,
            allow_patterns=list(allow_patterns) if allow_patterns is not None else list(DEFAULT_ALLOW_PATTERNS),
            ignore_patterns=list(ignore_patterns) if ignore_patterns is not None else list(DEFAULT_IGNORE_PATTERNS),
        )
    except Exception as exc:  # noqa: BLE001 - translated below, unknown ones re-raised unchanged
        raise _hub_error(exc, model_id, "the model files", offline) from None
    return Path(path)


def resolve_file(
    model_id: str,
    filename: str,
    *,
    hf_cache_path: str | None = None,
    token_source: str = "cache",
    revision: str | None = None,
) -> Path:
    """One file of a model: `model_id/filename` locally, else downloaded from the hub repo.

    A filename that is itself an existing path is returned as is, so users may point
    straight at a local GGUF file.
    """
    if not filename:
        raise ValueError("filename must be a non-empty string")
    direct = Path(filename).expanduser()
    if direct.is_absolute() and direct.is_file():
        return direct.resolve()
    token = parse_token_source(token_source)
    local = _local_path(model_id) if model_id else None
    if local is not None:
        if local.is_file():
            if local.name == filename:
                return local.resolve()
            raise NotADirectoryError(f"model path {model_id!r} is a file; expected a directory containing {filename!r}")
        candidate = local / filename
        if not candidate.is_file():
            raise FileNotFoundError(f"{filename!r} not found in local model directory {str(local)!r}")
        return candidate.resolve()
    if not model_id:
        raise FileNotFoundError(f"file {filename!r} does not exist")

    from huggingface_hub import hf_hub_download

    offline = hub_offline()
    try:
        path = hf_hub_download(
            model_id,
            filename,
            revision=revision,
            cache_dir=hf_cache_path,
            token=token,
            local_files_only=offline,
        )
    except Exception as exc:  # noqa: BLE001
        raise _hub_error(exc, model_id, f"file {filename!r}", offline) from None
    return Path(path)
