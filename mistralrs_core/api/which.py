"""`Which`: what model to load, one attrs class per loader variant.

Positional order and defaults are the spec's; upstream's later additions are
keyword-only so that they can never shift a positional argument.  Each variant
carries class attributes the runner dispatches on: `kind` (text, vision,
diffusion, speech, embedding), `variant` (the canonical class name),
`weights_format` (safetensors, gguf, ggml) and `adapter_kind` (None, lora, xlora).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, ClassVar, TypeVar

import attrs

from ._fields import enum_field, field, int_field, list_field, str_field, str_or_list_field
from .config import LoraAdapter, TextAutoMapParams, VisionAutoMapParams
from .enums import (
    Architecture,
    DiffusionArchitecture,
    EmbeddingArchitecture,
    IsqOrganization,
    ModelDType,
    SpeechLoaderType,
    VisionArchitecture,
)


def _auto_map(value: Any) -> Any:
    # The spec prints the default as `(None,)` (a stray trailing comma in the
    # upstream pyi); treat a literal `(None,)` the same as None.
    return None if value == (None,) else value


def _auto_map_field(cls: type, *, kw_only: bool = False) -> Any:
    return field(
        None,
        kw_only=kw_only,
        converter=_auto_map,
        validator=attrs.validators.optional(attrs.validators.instance_of(cls)),
    )


def _dtype() -> Any:
    return enum_field(ModelDType, ModelDType.Auto)


def _arch(enum_cls: type, *, required: bool = False) -> Any:
    if required:
        return enum_field(enum_cls)
    return enum_field(enum_cls, None, optional=True)


def _organization() -> Any:
    return enum_field(IsqOrganization, None, optional=True, kw_only=True)


_GIB = 1 << 30


class Which:
    """Namespace and common base of the loader variants: `Which.Plain(model_id=...)`.

    As with upstream's pyo3 enum, every variant is a subclass, so
    `isinstance(x, Which)` tells a model selection from anything else.
    """

    kind: ClassVar[str]
    variant: ClassVar[str]
    weights_format: ClassVar[str] = "safetensors"
    adapter_kind: ClassVar[str | None] = None

    if TYPE_CHECKING:
        # The variants are attached by `_variant` at import time; spelled out here so that
        # type checkers and editors complete `Which.Plain(...)` and its fields.
        from mistralrs_core.api import which as _w
        Plain: ClassVar[type[_w.Plain]]
        XLora: ClassVar[type[_w.XLora]]
        Lora: ClassVar[type[_w.Lora]]
        GGUF: ClassVar[type[_w.GGUF]]
        XLoraGGUF: ClassVar[type[_w.XLoraGGUF]]
        LoraGGUF: ClassVar[type[_w.LoraGGUF]]
        GGML: ClassVar[type[_w.GGML]]
        XLoraGGML: ClassVar[type[_w.XLoraGGML]]
        LoraGGML: ClassVar[type[_w.LoraGGML]]
        Embedding: ClassVar[type[_w.Embedding]]
        VisionPlain: ClassVar[type[_w.VisionPlain]]
        MultimodalPlain: ClassVar[type[_w.VisionPlain]]
        DiffusionPlain: ClassVar[type[_w.DiffusionPlain]]
        Speech: ClassVar[type[_w.Speech]]
        MistralGGUF: ClassVar[Callable[..., _w.GGUF]]

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        if cls is Which:
            raise TypeError("Which is not constructible; use a variant such as Which.Plain(...)")
        return super().__new__(cls)


# For engine code where "a variant" reads better than "a Which".
WhichVariant = Which


_V = TypeVar("_V", bound="type[Which]")


def _variant(kind: str, weights_format: str = "safetensors",
             adapter_kind: str | None = None) -> Callable[[_V], _V]:
    """Registers an attrs class (decorated with a plain ``@attrs.define`` below this, so
    that type checkers see its fields and ``__init__``) as ``Which.<name>``."""
    def wrap(cls: _V) -> _V:
        cls.kind = kind
        cls.variant = cls.__name__
        cls.weights_format = weights_format
        cls.adapter_kind = adapter_kind
        cls.__qualname__ = f"Which.{cls.__name__}"
        setattr(Which, cls.__name__, cls)
        return cls

    return wrap


@_variant("text")
@attrs.define
class Plain(Which):
    model_id: str = str_field()
    arch: Architecture | None = _arch(Architecture)
    tokenizer_json: str | None = str_field(None)
    topology: str | None = str_field(None)
    organization: IsqOrganization | None = enum_field(IsqOrganization, None, optional=True)
    from_uqff: str | list[str] | None = str_or_list_field(None)
    write_uqff: str | None = str_field(None)
    dtype: ModelDType = _dtype()
    auto_map_params: TextAutoMapParams | None = _auto_map_field(TextAutoMapParams)
    calibration_file: str | None = str_field(None)
    imatrix: str | None = str_field(None)
    hf_cache_path: str | None = str_field(None)
    matformer_config_path: str | None = str_field(None, kw_only=True)
    matformer_slice_name: str | None = str_field(None, kw_only=True)


@_variant("text", adapter_kind="xlora")
@attrs.define
class XLora(Which):
    xlora_model_id: str = str_field()
    order: str = str_field()
    arch: Architecture | None = _arch(Architecture)
    model_id: str | None = str_field(None)
    tokenizer_json: str | None = str_field(None)
    tgt_non_granular_index: int | None = int_field(None)
    topology: str | None = str_field(None)
    from_uqff: str | list[str] | None = str_or_list_field(None)
    write_uqff: str | None = str_field(None)
    dtype: ModelDType = _dtype()
    auto_map_params: TextAutoMapParams | None = _auto_map_field(TextAutoMapParams)
    hf_cache_path: str | None = str_field(None)


@_variant("text", adapter_kind="lora")
@attrs.define
class Lora(Which):
    # Required by the spec; optional here only because upstream's newer
    # form passes `adapters=[LoraAdapter(...)]` instead (checked below).
    adapter_model_id: str | list[str] | None = str_or_list_field(None)
    arch: Architecture | None = _arch(Architecture)
    model_id: str | None = str_field(None)
    tokenizer_json: str | None = str_field(None)
    topology: str | None = str_field(None)
    from_uqff: str | list[str] | None = str_or_list_field(None)
    write_uqff: str | None = str_field(None)
    dtype: ModelDType = _dtype()
    auto_map_params: TextAutoMapParams | None = _auto_map_field(TextAutoMapParams)
    hf_cache_path: str | None = str_field(None)
    adapters: list[LoraAdapter] = list_field(kw_only=True)
    max_adapters: int = int_field(16, kw_only=True)
    max_rank: int = int_field(256, kw_only=True)
    max_bytes: int = int_field(8 * _GIB, kw_only=True)
    # Upstream's older form: an ordering file naming the adapters under adapter_model_id.
    order: str | None = str_field(None, kw_only=True)

    def __attrs_post_init__(self) -> None:
        if self.adapter_model_id is None and not self.adapters:
            raise ValueError("adapter_model_id: required unless `adapters` is given")
        for i, adapter in enumerate(self.adapters):
            if not isinstance(adapter, LoraAdapter):
                raise TypeError(f"adapters[{i}]: must be a LoraAdapter, got {adapter!r}")


@_variant("text", weights_format="gguf")
@attrs.define
class GGUF(Which):
    quantized_model_id: str = str_field()
    quantized_filename: str | list[str] = str_or_list_field()
    tok_model_id: str | None = str_field(None)
    topology: str | None = str_field(None)
    dtype: ModelDType = _dtype()
    auto_map_params: TextAutoMapParams | None = _auto_map_field(TextAutoMapParams)
    tokenizer_json: str | None = str_field(None, kw_only=True)
    mmproj_filename: str | None = str_field(None, kw_only=True)
    organization: IsqOrganization | None = _organization()
    write_uqff: str | None = str_field(None, kw_only=True)
    imatrix: str | None = str_field(None, kw_only=True)
    calibration_file: str | None = str_field(None, kw_only=True)
    max_edge: int | None = int_field(None, kw_only=True)
    multimodal_auto_map_params: VisionAutoMapParams | None = _auto_map_field(
        VisionAutoMapParams, kw_only=True
    )
    adapters: list[LoraAdapter] = list_field(kw_only=True)
    max_adapters: int = int_field(16, kw_only=True)
    max_rank: int = int_field(256, kw_only=True)
    max_bytes: int = int_field(8 * _GIB, kw_only=True)
    hf_cache_path: str | None = str_field(None, kw_only=True)
    matformer_config_path: str | None = str_field(None, kw_only=True)
    matformer_slice_name: str | None = str_field(None, kw_only=True)


@_variant("text", weights_format="gguf", adapter_kind="xlora")
@attrs.define
class XLoraGGUF(Which):
    quantized_model_id: str = str_field()
    quantized_filename: str | list[str] = str_or_list_field()
    xlora_model_id: str = str_field()
    order: str = str_field()
    tok_model_id: str | None = str_field(None)
    tgt_non_granular_index: int | None = int_field(None)
    topology: str | None = str_field(None)
    dtype: ModelDType = _dtype()
    auto_map_params: TextAutoMapParams | None = _auto_map_field(TextAutoMapParams)
    tokenizer_json: str | None = str_field(None, kw_only=True)
    hf_cache_path: str | None = str_field(None, kw_only=True)


@_variant("text", weights_format="gguf", adapter_kind="lora")
@attrs.define
class LoraGGUF(Which):
    quantized_model_id: str = str_field()
    quantized_filename: str | list[str] = str_or_list_field()
    adapters_model_id: str = str_field()
    order: str = str_field()
    tok_model_id: str | None = str_field(None)
    topology: str | None = str_field(None)
    dtype: ModelDType = _dtype()
    auto_map_params: TextAutoMapParams | None = _auto_map_field(TextAutoMapParams)
    tokenizer_json: str | None = str_field(None, kw_only=True)
    hf_cache_path: str | None = str_field(None, kw_only=True)


@_variant("text", weights_format="ggml")
@attrs.define
class GGML(Which):
    quantized_model_id: str = str_field()
    quantized_filename: str = str_field()
    tok_model_id: str | None = str_field(None)
    tokenizer_json: str | None = str_field(None)
    # None means the GGML default of 1 (no grouped-query attention).
    gqa: int | None = int_field(None)
    topology: str | None = str_field(None)
    dtype: ModelDType = _dtype()
    auto_map_params: TextAutoMapParams | None = _auto_map_field(TextAutoMapParams)


@_variant("text", weights_format="ggml", adapter_kind="xlora")
@attrs.define
class XLoraGGML(Which):
    quantized_model_id: str = str_field()
    quantized_filename: str = str_field()
    xlora_model_id: str = str_field()
    order: str = str_field()
    tok_model_id: str | None = str_field(None)
    tgt_non_granular_index: int | None = int_field(None)
    tokenizer_json: str | None = str_field(None)
    gqa: int | None = int_field(None)
    topology: str | None = str_field(None)
    dtype: ModelDType = _dtype()
    auto_map_params: TextAutoMapParams | None = _auto_map_field(TextAutoMapParams)


@_variant("text", weights_format="ggml", adapter_kind="lora")
@attrs.define
class LoraGGML(Which):
    quantized_model_id: str = str_field()
    quantized_filename: str = str_field()
    adapters_model_id: str = str_field()
    order: str = str_field()
    tok_model_id: str | None = str_field(None)
    tokenizer_json: str | None = str_field(None)
    topology: str | None = str_field(None)
    dtype: ModelDType = _dtype()
    auto_map_params: TextAutoMapParams | None = _auto_map_field(TextAutoMapParams)
    gqa: int | None = int_field(None, kw_only=True)


@_variant("embedding")
@attrs.define
class Embedding(Which):
    model_id: str = str_field()
    arch: EmbeddingArchitecture | None = _arch(EmbeddingArchitecture)
    tokenizer_json: str | None = str_field(None)
    topology: str | None = str_field(None)
    from_uqff: str | list[str] | None = str_or_list_field(None)
    write_uqff: str | None = str_field(None)
    dtype: ModelDType = _dtype()
    hf_cache_path: str | None = str_field(None)
    imatrix: str | None = str_field(None, kw_only=True)
    calibration_file: str | None = str_field(None, kw_only=True)


@_variant("vision")
@attrs.define
class VisionPlain(Which):
    model_id: str = str_field()
    arch: VisionArchitecture = _arch(VisionArchitecture, required=True)
    tokenizer_json: str | None = str_field(None)
    topology: str | None = str_field(None)
    from_uqff: str | list[str] | None = str_or_list_field(None)
    write_uqff: str | None = str_field(None)
    dtype: ModelDType = _dtype()
    max_edge: int | None = int_field(None)
    auto_map_params: VisionAutoMapParams | None = _auto_map_field(VisionAutoMapParams)
    calibration_file: str | None = str_field(None)
    imatrix: str | None = str_field(None)
    hf_cache_path: str | None = str_field(None)
    matformer_config_path: str | None = str_field(None, kw_only=True)
    matformer_slice_name: str | None = str_field(None, kw_only=True)
    organization: IsqOrganization | None = _organization()


@_variant("diffusion")
@attrs.define
class DiffusionPlain(Which):
    model_id: str = str_field()
    arch: DiffusionArchitecture = _arch(DiffusionArchitecture, required=True)
    dtype: ModelDType = _dtype()


@_variant("speech")
@attrs.define
class Speech(Which):
    model_id: str = str_field()
    # The spec types this DiffusionArchitecture (a doc slip); the loader
    # enum upstream actually takes is SpeechLoaderType.
    arch: SpeechLoaderType = _arch(SpeechLoaderType, required=True)
    dac_model_id: str | None = str_field(None)
    dtype: ModelDType = _dtype()


# Upstream renamed VisionPlain; both names denote the same class.
Which.MultimodalPlain = VisionPlain  # type: ignore[attr-defined]


def _mistral_gguf(
    tok_model_id: str | None = None,
    quantized_model_id: str | None = None,
    quantized_filename: str | list[str] | None = None,
    tokenizer_json: str | None = None,
    repeat_last_n: int = 64,
    **kwargs: Any,
) -> GGUF:
    """The spec's oldest example loads `Which.MistralGGUF(...)`, the
    per-family loader of early releases; it is a GGUF load like any other.
    `repeat_last_n` (the old repetition-penalty window) is accepted and
    ignored, as upstream itself dropped it from every loader."""
    if quantized_model_id is None or quantized_filename is None:
        raise TypeError("MistralGGUF: quantized_model_id and quantized_filename are required")
    return GGUF(
        quantized_model_id, quantized_filename, tok_model_id, tokenizer_json=tokenizer_json, **kwargs
    )


Which.MistralGGUF = staticmethod(_mistral_gguf)  # type: ignore[attr-defined]

WHICH_VARIANTS: tuple[type[Which], ...] = (
    Which.Plain,
    Which.XLora,
    Which.Lora,
    Which.GGUF,
    Which.XLoraGGUF,
    Which.LoraGGUF,
    Which.GGML,
    Which.XLoraGGML,
    Which.LoraGGML,
    Which.Embedding,
    Which.VisionPlain,
    Which.DiffusionPlain,
    Which.Speech,
)
