"""Configuration classes passed to `Which` variants, `Runner` and requests.

Agent/tool configuration lives in tools.py and is re-exported here so that
`from mistralrs_core.api.config import McpClientConfigPy` keeps working.
"""

from __future__ import annotations

import base64
import mimetypes
import os
from typing import Any

import attrs

from ._fields import field, int_field, list_field, str_field
from .tools import (  # noqa: F401  (re-exported)
    AgentToolApproval,
    AgentToolApprovalDecision,
    AgentToolMetadata,
    ApproximateUserLocation,
    CodeExecutionConfig,
    McpClientConfigPy,
    McpServerConfigPy,
    McpServerSourcePy,
    SandboxPolicy,
    ShellConfig,
    WebSearchOptions,
    WebSearchUserLocation,
)


@attrs.define
class TextAutoMapParams:
    """Sizing hints for automatic device mapping; not hard limits."""

    max_seq_len: int = int_field(4096)
    max_batch_size: int = int_field(1)


@attrs.define
class VisionAutoMapParams:
    max_seq_len: int = int_field(4096)
    max_batch_size: int = int_field(1)
    max_num_images: int = int_field(1)
    max_image_length: int = int_field(1024)


MultimodalAutoMapParams = VisionAutoMapParams


class AnyMoeExpertType:
    """Namespace of expert kinds: `AnyMoeExpertType.FineTuned()` or `.LoraAdapter(...)`."""

    @attrs.define
    class FineTuned:
        pass

    @attrs.define
    class LoraAdapter:
        rank: int = int_field()
        alpha: float = field()
        target_modules: list[str] = field(converter=list)


@attrs.define
class AnyMoeConfig:
    hidden_size: int = int_field()
    dataset_json: str = str_field()
    prefix: str = str_field()
    mlp: str = str_field()
    model_ids: list[str] = field(converter=list)
    expert_type: Any = field(
        validator=attrs.validators.instance_of(
            (AnyMoeExpertType.FineTuned, AnyMoeExpertType.LoraAdapter)
        )
    )
    # Positional order follows upstream's newest pyi, where `layers` comes
    # right after `expert_type`.
    layers: list[int] = list_field()
    lr: float = field(1e-3)
    epochs: int = int_field(100)
    batch_size: int = int_field(4)
    gate_model_id: str | None = str_field(None)
    training: bool = field(True)
    loss_csv_path: str | None = str_field(None)


@attrs.define
class LoraAdapter:
    """A dynamically loadable PEFT adapter: `alias` names it in requests."""

    alias: str = str_field()
    source: str = str_field()
    revision: str | None = str_field(None)


@attrs.define
class LoraAdapterGeneration:
    """Pins a request to one exact generation of an adapter alias."""

    generation: int = int_field()
    alias: str | None = str_field(None, kw_only=True)


class LoraAdapterError(ValueError):
    """LoRA lifecycle failure; `.code` is a stable machine-readable reason."""

    def __init__(self, message: str, code: str = "lora_error") -> None:
        super().__init__(message)
        self.code = code


def _to_bytes(value: Any) -> bytes:
    if isinstance(value, str):
        return value.encode("utf-8")
    return bytes(value)


@attrs.define
class InputFile:
    """A file attached to a chat request (e.g. a CSV for code execution)."""

    name: str = str_field()
    data: bytes = field(converter=_to_bytes)
    mime_type: str | None = str_field(None)

    @classmethod
    def from_text(cls, name: str, text: str, mime_type: str | None = None) -> InputFile:
        guessed = mime_type or mimetypes.guess_type(name)[0] or "text/plain"
        return cls(name, text.encode("utf-8"), guessed)

    @classmethod
    def from_path(
        cls, path: str | os.PathLike, name: str | None = None, mime_type: str | None = None
    ) -> InputFile:
        path = os.fspath(path)
        with open(path, "rb") as fh:
            data = fh.read()
        guessed = mime_type or mimetypes.guess_type(path)[0] or "application/octet-stream"
        return cls(name or os.path.basename(path), data, guessed)

    def data_base64(self) -> str:
        return base64.b64encode(self.data).decode("ascii")


@attrs.define
class RequestedFile:
    """An output file the model is asked to produce through its tools."""

    name: str = str_field()
    format: str | None = str_field(None)
    description: str | None = str_field(None)
