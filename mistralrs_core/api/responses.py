"""Response classes, with upstream's names and fields.

Positional order is upstream's pyi order; the trailing fields the engine
rarely varies (`system_fingerprint`, `object`, `usage`) have defaults so the
engine can build responses by keyword without ceremony.  Fields marked
`omit_if_none` are left out of JSON when None, as upstream's serde does and
OpenAI clients expect (e.g. `tool_calls` only when the model called a tool);
`content: null` and `logprobs: null` stay, as in OpenAI's own responses.
"""

from __future__ import annotations

import base64
import os

import attrs

from ._fields import enum_field, field
from .enums import ToolCallType

SYSTEM_FINGERPRINT = "local"


@attrs.define
class CompletionTokensDetails:
    """OpenAI's breakdown of ``completion_tokens``. Speculative decoding reports its drafts
    here with the fields OpenAI uses for predicted outputs: drafted tokens the target kept
    (``accepted_prediction_tokens``) and those it rejected."""
    accepted_prediction_tokens: int = field(0)
    rejected_prediction_tokens: int = field(0)


@attrs.define
class Usage:
    completion_tokens: int = field(0)
    prompt_tokens: int = field(0)
    total_tokens: int = field(0)
    avg_tok_per_sec: float = field(0.0)
    avg_prompt_tok_per_sec: float = field(0.0)
    avg_compl_tok_per_sec: float = field(0.0)
    total_time_sec: float = field(0.0)
    total_prompt_time_sec: float = field(0.0)
    total_completion_time_sec: float = field(0.0)
    # Beyond upstream: present only when the request's tokens were speculated.
    completion_tokens_details: CompletionTokensDetails | None = field(None, omit_if_none=True)


@attrs.define
class CalledFunction:
    name: str = field()
    arguments: str = field()


@attrs.define
class ToolCallResponse:
    index: int = field()
    id: str = field()
    # `type` is a builtin; upstream names the attribute `tp` and writes "type".
    tp: ToolCallType = enum_field(ToolCallType, json_name="type")
    function: CalledFunction = field()

    @property
    def type(self) -> ToolCallType:
        return self.tp


@attrs.define
class TopLogprob:
    # Upstream quirk kept for compatibility: here `token` is the token id.
    token: int = field()
    logprob: float = field()
    bytes: str | None = field(None)


@attrs.define
class ResponseLogprob:
    token: str = field()
    logprob: float = field()
    bytes: list[int] | None = field(None)
    top_logprobs: list[TopLogprob] = field(factory=list)


@attrs.define
class Logprobs:
    content: list[ResponseLogprob] | None = field(None)


@attrs.define
class ResponseMessage:
    content: str | None = field(None)
    role: str = field("assistant")
    tool_calls: list[ToolCallResponse] | None = field(None, omit_if_none=True)
    reasoning_content: str | None = field(None, omit_if_none=True)


@attrs.define
class Choice:
    finish_reason: str = field()
    index: int = field()
    message: ResponseMessage = field()
    logprobs: Logprobs | None = field(None)


@attrs.define
class FileSource:
    tool: str = field()
    round: int = field(0)
    turn: int = field(0)


@attrs.define
class File:
    """A file produced by an agentic run; small bodies are inline."""

    id: str = field()
    name: str = field()
    format: str | None = field(None)
    mime_type: str | None = field(None)
    bytes: int = field(0)
    source: FileSource | None = field(None)
    text: str | None = field(None)
    data_base64: str | None = field(None)
    preview: str | None = field(None)
    # Set by the producer when the body was too large to inline; the full
    # body is then available through Runner.find_file.
    truncated: bool = field(False, kw_only=True)
    error: str | None = field(None, kw_only=True, omit_if_none=True)

    def is_text(self) -> bool:
        return self.text is not None

    def is_binary(self) -> bool:
        return self.data_base64 is not None

    def is_image(self) -> bool:
        return (self.mime_type or "").startswith("image/")

    def is_video(self) -> bool:
        return (self.mime_type or "").startswith("video/")

    def is_error(self) -> bool:
        return self.error is not None

    def is_truncated(self) -> bool:
        return self.truncated or (self.text is None and self.data_base64 is None)

    def save(self, path: str | os.PathLike) -> None:
        if self.text is not None:
            data = self.text.encode("utf-8")
        elif self.data_base64 is not None:
            data = base64.b64decode(self.data_base64)
        else:
            raise ValueError(f"file {self.id}: body is not inline; use Runner.find_file first")
        with open(os.fspath(path), "wb") as fh:
            fh.write(data)


@attrs.define
class AgenticToolCallRecord:
    round: int = field()
    name: str = field()
    arguments: str = field()
    result_content: str = field("")
    result_images_base64: list[str] = field(factory=list)
    file_ids: list[str] = field(factory=list)


@attrs.define
class ChatCompletionResponse:
    id: str = field()
    choices: list[Choice] = field()
    created: int = field()
    model: str = field()
    system_fingerprint: str = field(SYSTEM_FINGERPRINT)
    object: str = field("chat.completion")
    usage: Usage = field(factory=Usage)
    adapter_generation: int | None = field(None, omit_if_none=True)
    agentic_tool_calls: list[AgenticToolCallRecord] | None = field(None, omit_if_none=True)
    files: list[File] | None = field(None, omit_if_none=True)
    session_id: str | None = field(None, omit_if_none=True)


@attrs.define
class FunctionDelta:
    name: str | None = field(None, omit_if_none=True)
    arguments: str | None = field(None, omit_if_none=True)


@attrs.define
class ToolCallDelta:
    """A piece of a streamed tool call, as OpenAI streams them: the first piece of call
    ``index`` carries its id, type and name, the next ones only argument text (clients
    concatenate the pieces per index)."""

    index: int = field()
    id: str | None = field(None, omit_if_none=True)
    tp: ToolCallType | None = enum_field(ToolCallType, None, optional=True, json_name="type",
                                         omit_if_none=True)
    function: FunctionDelta = field(factory=FunctionDelta)

    @property
    def type(self) -> ToolCallType | None:
        return self.tp


@attrs.define
class Delta:
    content: str | None = field(None)
    role: str = field("assistant")
    tool_calls: list[ToolCallDelta] | None = field(None, omit_if_none=True)
    reasoning_content: str | None = field(None, omit_if_none=True)


@attrs.define
class ChunkChoice:
    finish_reason: str | None = field()
    index: int = field()
    delta: Delta = field()
    # A single ResponseLogprob per chunk (upstream's shape), not a Logprobs list.
    logprobs: ResponseLogprob | None = field(None)


@attrs.define
class ChatCompletionChunkResponse:
    id: str = field()
    choices: list[ChunkChoice] = field()
    created: int = field()
    model: str = field()
    system_fingerprint: str = field(SYSTEM_FINGERPRINT)
    object: str = field("chat.completion.chunk")
    usage: Usage | None = field(None, omit_if_none=True)
    adapter_generation: int | None = field(None, omit_if_none=True)
    session_id: str | None = field(None, omit_if_none=True)


@attrs.define
class CompletionChoice:
    finish_reason: str = field()
    index: int = field()
    text: str = field()
    logprobs: Logprobs | None = field(None)


@attrs.define
class CompletionResponse:
    id: str = field()
    choices: list[CompletionChoice] = field()
    created: int = field()
    model: str = field()
    system_fingerprint: str = field(SYSTEM_FINGERPRINT)
    object: str = field("text_completion")
    usage: Usage = field(factory=Usage)
    adapter_generation: int | None = field(None, omit_if_none=True)


@attrs.define
class ImageChoice:
    url: str | None = field(None, omit_if_none=True)
    b64_json: str | None = field(None, omit_if_none=True)


@attrs.define
class ImageGenerationResponse:
    data: list[ImageChoice] = field()
    created: int = field()

    @property
    def choices(self) -> list[ImageChoice]:
        # Older upstream releases named the list `choices`.
        return self.data


@attrs.define
class SpeechGenerationResponse:
    """Raw PCM samples in [-1, 1], interleaved when channels > 1."""

    pcm: list[float] = field()
    rate: int = field()
    channels: int = field(1)


@attrs.define
class CalibrationStatus:
    """State of online imatrix calibration (begin/status/apply_calibration).

    Upstream does not document this class's fields; these are ours.
    `state` is one of "idle", "collecting", "applied", "error".
    """

    state: str = field("idle")
    tokens_collected: int = field(0)
    requests_collected: int = field(0)
    model_id: str | None = field(None, omit_if_none=True)
    cimatrix_path: str | None = field(None, omit_if_none=True)
    message: str | None = field(None, omit_if_none=True)
