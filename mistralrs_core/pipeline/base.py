"""Pipeline kinds: what a loaded model can be asked to do.

Every pipeline declares ``kind`` (one of ``KINDS``) and implements that kind's methods;
the Runner dispatches on ``kind`` rather than probing for methods, so a model that
cannot serve a call fails with an error naming the model and what it is. Vision models
are text-generation pipelines (chat with images); their kind is "vision".
"""
from __future__ import annotations

from typing import Any, ClassVar

KINDS = ("text", "vision", "embedding", "diffusion", "speech")


class Pipeline:
    """Common to every kind: a name (the model id), a lifecycle and a tokenizer view."""

    kind: ClassVar[str] = ""
    name: str

    def shutdown(self) -> None:
        raise NotImplementedError

    @property
    def max_context(self) -> int | None:
        return None


class TextGeneration(Pipeline):
    """Chat and completion over a token stream (text and vision kinds)."""

    kind: ClassVar[str] = "text"

    def chat(self, req) -> Any:
        raise NotImplementedError

    def completion(self, req) -> Any:
        raise NotImplementedError

    def completion_stream(self, req) -> Any:
        raise NotImplementedError

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        raise NotImplementedError

    def detokenize(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        raise NotImplementedError


class Embedding(Pipeline):
    kind: ClassVar[str] = "embedding"

    def embed(self, req) -> list[list[float]]:
        raise NotImplementedError

    def prepare(self, req) -> list[list[int]]:
        """The token ids ``embed`` would run for ``req`` (usage accounting)."""
        raise NotImplementedError

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        raise NotImplementedError

    def detokenize(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        raise NotImplementedError


class ImageGeneration(Pipeline):
    kind: ClassVar[str] = "diffusion"

    def generate_image(self, prompt: str, response_format, height: int, width: int,
                       save_file: str | None = None) -> Any:
        raise NotImplementedError


class SpeechGeneration(Pipeline):
    kind: ClassVar[str] = "speech"

    def generate_audio(self, prompt: str) -> Any:
        raise NotImplementedError


# kind -> the calls it serves (Runner method name -> what the model must be)
TEXT_KINDS = ("text", "vision")
TOKENIZER_KINDS = ("text", "vision", "embedding")


def kind_of(pipeline) -> str:
    kind = getattr(pipeline, "kind", None)
    if kind not in KINDS:
        raise TypeError(f"pipeline {type(pipeline).__name__} declares kind {kind!r}; expected one of {KINDS}")
    return kind
