"""Chat requests with images -> placeholder token ids + one ``FeatureSpan`` per image.

The pipeline is family-agnostic: it loads every ``image_url`` part (``inputs.py``), hands
the chat template the part it expects instead (``processor.image_part``, ``{"type":
"image"}`` for the hub's templates), renders and tokenizes, then expands each image
placeholder token into the number of tokens the family's processor says the image takes.
Families differ only in their processor (``prepare(image) -> ImagePrompt(num_tokens,
data, token_ids=None)``, ``image_token_id``, ``image_part``); ``token_ids`` spells out a span
that holds more than image tokens (Pixtral's row breaks). A processor whose images expand to
more than one run of placeholder tokens with text around them (Gemma 3: boi/eoi tokens,
pan-and-scan crops) defines ``expand_prompt(text, images, audios) -> Prompt`` instead, and
expands the rendered text itself before tokenizing. A processor whose chat templates take
message content as a string defines ``message_text(parts, before) -> str`` (``before``: how
many image and audio parts earlier messages held, ``{"image": n, "audio": m}``, for
numbered tags).

Audio (``audio_url`` and OpenAI ``input_audio`` parts) takes the same road: a processor that
hears defines ``audio_token_id``, ``audio_part`` (default ``{"type": "audio"}``) and
``prepare_audio(LoadedAudio) -> ImagePrompt``; the span's ``data`` is whatever that returns,
and the model's ``encode_features`` tells image from audio data by its type. A processor
without ``prepare_audio`` refuses audio parts.

Video (``video_url`` parts: a video file by any image source, or ``{"url": [frame urls],
"fps": f}``) likewise: a processor that watches defines ``video_token_id``, ``video_part``
(default ``{"type": "video"}``), ``sample_video_frames(total, fps) -> indices`` (which frames of
a file to decode), ``video_fps`` (the rate of a frame list whose part names none) and
``prepare_video(LoadedVideo) -> ImagePrompt``. Frames are decoded by PyAV, imported only when a
video arrives. A processor without ``prepare_video`` refuses video parts.
"""
from __future__ import annotations

import hashlib
from typing import Any

import attrs

from mistralrs_core.agent.calling import template_tools
from mistralrs_core.api.validate import normalize_messages
from mistralrs_core.engine.step import FeatureSpan
from mistralrs_core.pipeline.text import Prompt, TextPipeline
from mistralrs_core.tokenization.prompt import encode_prompt, render_chat

from mistralrs_arch_vision.inputs import (audio_url_of, image_url_of, load_audio, load_image, load_video,
                                          video_url_of)


@attrs.frozen
class ImagePrompt:
    """What the pipeline needs per image: how many placeholder tokens, and the encoder input.

    ``token_ids``, when given (``num_tokens`` of them), are the span's tokens in place of
    ``num_tokens`` image tokens: families whose image runs hold structure tokens (Pixtral's
    row breaks) spell them out; the encoder's feature rows still cover the whole span."""
    num_tokens: int
    data: Any
    token_ids: tuple[int, ...] | None = None


class VisionPipeline(TextPipeline):
    #: set by the loader: the family's processor and ``Which.VisionPlain.max_edge``
    processor = None
    max_edge: int | None = None

    def chat_prompt(self, req) -> Prompt:
        if isinstance(req.messages, str):
            return super().chat_prompt(req)
        messages = normalize_messages(req.messages)
        if not any(isinstance(m.get("content"), list) for m in messages):
            return super().chat_prompt(req)           # plain strings: exactly the text path
        images, audios, videos = [], [], []
        message_text = getattr(self.processor, "message_text", None)
        for i, m in enumerate(messages):
            content = m.get("content")
            if not isinstance(content, list):
                continue
            before = {"image": len(images), "audio": len(audios), "video": len(videos)}
            parts = []
            for j, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else None
                where = f"messages[{i}].content[{j}]"
                if kind == "image_url":
                    where += ".image_url"
                    images.append(load_image(image_url_of(part, where), where=where, max_edge=self.max_edge))
                    parts.append(dict(self.processor.image_part))
                elif kind in ("audio_url", "input_audio"):
                    where += f".{kind}"
                    if getattr(self.processor, "prepare_audio", None) is None:
                        raise ValueError(f"{where}: this model does not take audio input")
                    audios.append(load_audio(audio_url_of(part, where), where=where))
                    parts.append(dict(getattr(self.processor, "audio_part", {"type": "audio"})))
                elif kind == "video_url":
                    where += ".video_url"
                    if not self.takes_video:
                        raise ValueError(f"{where}: this model does not take video input")
                    url, fps = video_url_of(part, where)
                    videos.append(load_video(url, where=where, sample_frames=self.processor.sample_video_frames,
                                             fps=fps if fps is not None else self.processor.video_fps))
                    parts.append(dict(getattr(self.processor, "video_part", {"type": "video"})))
                elif kind == "text":
                    parts.append({"type": "text", "text": part.get("text", "")})
                else:
                    raise ValueError(f"{where}: unsupported content part type {kind!r} "
                                     f"(text, image_url, audio_url, input_audio or video_url)")
            # Parts stay a list, as transformers' processors hand them to the template: the
            # hub's vision templates iterate content parts (a joined string would render
            # as no text at all in LLaVa's). A family whose templates take a string
            # (Phi-3-vision: ``<|image_N|>`` tags in the text) writes the parts as one.
            m["content"] = parts if message_text is None else message_text(parts, before)
        if self.template is None:
            raise ValueError("messages: this model has no chat template; pass chat_template= to Runner")
        extra = {}
        if req.reasoning_effort is not None:
            extra["reasoning_effort"] = req.reasoning_effort
        text = render_chat(self.template, self.tokenizer, messages, enable_thinking=req.enable_thinking,
                           tools=template_tools(req), **extra)
        expand_prompt = getattr(self.processor, "expand_prompt", None)
        if expand_prompt is not None:
            if videos:
                raise ValueError("messages: this model's processor expands prompts itself and takes no video")
            return expand_prompt(text, images, audios)
        return self.expand_media(encode_prompt(self.tokenizer, text), images, audios, videos)

    @property
    def takes_video(self) -> bool:
        return (getattr(self.processor, "prepare_video", None) is not None
                and getattr(self.processor, "video_token_id", None) is not None)

    def expand_images(self, ids: list[int], images) -> Prompt:
        return self.expand_media(ids, images, [])

    def expand_media(self, ids: list[int], images, audios, videos=()) -> Prompt:
        """Replace the i-th image (audio, video) placeholder token with image (clip, video) i's
        tokens and span."""
        proc = self.processor
        image_token = proc.image_token_id
        audio_token = getattr(proc, "audio_token_id", None) if audios else None
        video_token = getattr(proc, "video_token_id", None) if videos else None
        for token, items, what in ((image_token, images, "image"), (audio_token, audios, "audio"),
                                   (video_token, videos, "video")):
            found = ids.count(token) if token is not None else 0
            if found != len(items):
                raise ValueError(f"messages: the rendered prompt holds {found} {what} placeholder(s) for "
                                 f"{len(items)} {what} part(s); the chat template must emit one per part")
        out, spans, k, a, v = [], [], 0, 0, 0
        for t in ids:
            if t == image_token:
                item, token, k = images[k], image_token, k + 1
                prepared = proc.prepare(item.image)
            elif audio_token is not None and t == audio_token:
                item, token, a = audios[a], audio_token, a + 1
                prepared = proc.prepare_audio(item)
            elif video_token is not None and t == video_token:
                item, token, v = videos[v], video_token, v + 1
                prepared = proc.prepare_video(item)
            else:
                out.append(t)
                continue
            spans.append(FeatureSpan(start=len(out), length=prepared.num_tokens, data=prepared.data,
                                     content_hash=item.content_hash))
            span_ids = getattr(prepared, "token_ids", None) or [token] * prepared.num_tokens
            if len(span_ids) != prepared.num_tokens:
                raise ValueError(f"processor gave {len(span_ids)} token ids for a span of "
                                 f"{prepared.num_tokens} tokens")
            out.extend(span_ids)
        return Prompt(out, spans)


def token_runs(ids: list[int], token: int) -> list[tuple[int, int]]:
    """(start, length) of each maximal run of ``token``: the image runs a processor's
    ``expand_prompt`` turns into spans."""
    runs, start = [], None
    for i, t in enumerate(ids + [None]):
        if t == token and start is None:
            start = i
        elif t != token and start is not None:
            runs.append((start, i - start))
            start = None
    return runs


def part_digest(image_digest: bytes, kind: bytes, k: int) -> bytes:
    """The prefix-cache digest of part ``k`` (a crop, a tile) of an image: derived from the
    image's digest, so a repeated image reuses every part's blocks while no two parts of one
    image share a key."""
    return hashlib.sha256(image_digest + kind + k.to_bytes(4, "little")).digest()
