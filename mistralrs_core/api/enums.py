"""Enumerations of the public API.

Member names follow the upstream SDK exactly (they are what user code types);
values follow upstream's pyi where it has one, so JSON written by either side reads
the same.  `parse_enum` is the single entry point for turning user input (a
member, its name, its value, any case) into a member.
"""

from __future__ import annotations

import enum
from typing import Any, TypeVar

E = TypeVar("E", bound=enum.Enum)


class Architecture(enum.Enum):
    Mistral = "mistral"
    Gemma = "gemma"
    Mixtral = "mixtral"
    Llama = "llama"
    Phi2 = "phi2"
    Phi3 = "phi3"
    Qwen2 = "qwen2"
    Gemma2 = "gemma2"
    Starcoder2 = "starcoder2"
    Phi3_5MoE = "phi3.5moe"
    DeepseekV2 = "deepseekv2"
    DeepseekV3 = "deepseekv3"
    Qwen3 = "qwen3"
    GLM4 = "glm4"
    GLM4Moe = "glm4moe"
    GLM4MoeLite = "glm4moelite"
    Qwen3Moe = "qwen3moe"
    SmolLm3 = "smollm3"
    GraniteMoeHybrid = "granitemoehybrid"
    GptOss = "gptoss"
    Qwen3Next = "qwen3next"
    Lfm2 = "lfm2"
    Lfm2Moe = "lfm2moe"
    # Present in upstream's Rust loader though its pyi omits them.
    HunYuanDenseV1 = "hunyuandensev1"
    HunYuanMoEV1 = "hunyuanmoev1"


class VisionArchitecture(enum.Enum):
    Phi3V = "phi3v"
    Idefics2 = "idefics2"
    # The spec spells these LLaVaNext/LLaVa, upstream's pyi LLaVANext/LLaVA;
    # equal values make the second spelling an alias of the first.
    LLaVaNext = "llava-next"
    LLaVANext = "llava-next"
    LLaVa = "llava"
    LLaVA = "llava"
    Lfm2Vl = "Lfm2Vl"
    VLlama = "vllama"
    Qwen2VL = "qwen2vl"
    Idefics3 = "idefics3"
    MiniCpmO = "minicpmo"
    Phi4MM = "phi4mm"
    Qwen2_5VL = "qwen2_5vl"
    Gemma3 = "gemma3"
    Mistral3 = "mistral3"
    Llama4 = "llama4"
    Gemma3n = "Gemma3n"
    Qwen3VL = "Qwen3VL"
    Qwen3VLMoE = "Qwen3VLMoE"
    Qwen3_5 = "Qwen3_5"
    Qwen3_5Moe = "Qwen3_5Moe"
    Voxtral = "Voxtral"
    Gemma4 = "Gemma4"
    MuseGlimmer = "MuseGlimmer"
    DiffusionGemma = "DiffusionGemma"


# Upstream renamed the vision family "multimodal"; both names must import.
MultimodalArchitecture = VisionArchitecture


class DiffusionArchitecture(enum.Enum):
    Flux = "flux"
    FluxOffloaded = "flux-offloaded"


class EmbeddingArchitecture(enum.Enum):
    EmbeddingGemma = "embeddinggemma"
    Qwen3Embedding = "qwen3embedding"


class SpeechLoaderType(enum.Enum):
    Dia = "Dia"


class ModelDType(enum.Enum):
    Auto = "auto"
    BF16 = "bf16"
    F16 = "f16"
    F32 = "f32"


class IsqOrganization(enum.Enum):
    Default = "default"
    MoQE = "moqe"


class PagedCacheType(enum.Enum):
    Auto = 0
    F8E4M3 = 1


class ToolChoice(enum.Enum):
    NoTools = "None"
    Auto = "Auto"


class ImageGenerationResponseFormat(enum.Enum):
    # OpenAI's wire spellings, so a server can echo them unchanged.
    Url = "url"
    B64Json = "b64_json"


class ToolCallType(enum.Enum):
    Function = "function"


class Role(enum.Enum):
    User = "user"
    Assistant = "assistant"
    System = "system"
    Tool = "tool"
    Developer = "developer"


class SearchContextSize(enum.Enum):
    Low = "low"
    Medium = "medium"
    High = "high"


class AgentPermission(enum.Enum):
    Auto = "auto"
    Ask = "ask"
    Deny = "deny"


# Upstream keeps a separate enum with identical members for the older
# code-execution-only knob; one class keeps comparisons between them working.
CodeExecutionPermission = AgentPermission


class NetworkMode(enum.Enum):
    NoNetwork = "none"
    Loopback = "loopback"
    Full = "full"


class AgentToolSource(enum.Enum):
    BuiltIn = "built_in"
    User = "user"
    Mcp = "mcp"
    External = "external"


class AgentToolKind(enum.Enum):
    CodeExecution = "code_execution"
    WebSearch = "web_search"
    Shell = "shell"
    File = "file"
    Custom = "custom"
    External = "external"


class AgentToolApprovalDecisionKind(enum.Enum):
    Approve = "approve"
    Deny = "deny"


def _key(text: str) -> str:
    # Users write "phi3.5moe", "Phi3_5MoE", "flux-offloaded", "b64json": one
    # spelling-insensitive key lets all of them find the member.
    return "".join(ch for ch in text.lower() if ch.isalnum())


_LOOKUPS: dict[type, dict[str, enum.Enum]] = {}


def _lookup(enum_cls: type[E]) -> dict[str, E]:
    table = _LOOKUPS.get(enum_cls)
    if table is None:
        table = {}
        for name, member in enum_cls.__members__.items():
            table.setdefault(_key(name), member)
            if isinstance(member.value, str):
                table.setdefault(_key(member.value), member)
        _LOOKUPS[enum_cls] = table
    return table  # type: ignore[return-value]


def enum_choices(enum_cls: type[enum.Enum]) -> list[str]:
    """Canonical member names, for error messages and CLI help."""
    return [m.name for m in enum_cls]


def parse_enum(enum_cls: type[E], value: Any, field_name: str) -> E:
    """Return the member of `enum_cls` that `value` denotes.

    Accepts a member, a member name or value in any case and with or without
    `_`, `-`, `.` separators, or (for int-valued enums) the int.  Raises
    ValueError that starts with `field_name` and lists the valid names.
    """
    if isinstance(value, enum_cls):
        return value
    if isinstance(value, enum.Enum):
        # A member of another enum (e.g. a DiffusionArchitecture handed to a
        # speech field) is matched by name so the error names what was given.
        value = value.name
    if isinstance(value, str):
        member = _lookup(enum_cls).get(_key(value))
        if member is not None:
            return member
    elif isinstance(value, int) and not isinstance(value, bool):
        try:
            return enum_cls(value)
        except ValueError:
            pass
    valid = ", ".join(enum_choices(enum_cls))
    raise ValueError(
        f"{field_name}: invalid {enum_cls.__name__} {value!r}; expected one of: {valid}"
    )
