"""``DiaPipeline``: text -> Dia audio codes (through the batching ``SpeechEngine``) -> DAC
waveform -> ``SpeechGenerationResponse``."""
from __future__ import annotations

import logging
from typing import ClassVar

from mistralrs_core.api.responses import SpeechGenerationResponse
from mistralrs_core.pipeline.base import SpeechGeneration

from mistralrs_arch_speech.sampling import SpeechSampling

log = logging.getLogger(__name__)

# Dia's byte tokenizer: UTF-8 bytes, with the speaker tags as single control bytes.
SPEAKER_TAGS = {"[S1]": 1, "[S2]": 2}


def encode_text(text: str) -> list[int]:
    ids: list[int] = []
    i = 0
    while i < len(text):
        for tag, tid in SPEAKER_TAGS.items():
            if text.startswith(tag, i):
                ids.append(tid)
                i += len(tag)
                break
        else:
            j = min((p for p in (text.find(t, i) for t in SPEAKER_TAGS) if p >= 0), default=len(text))
            ids.extend(text[i:j].encode("utf-8"))
            i = j
    return ids


class DiaPipeline(SpeechGeneration):
    kind: ClassVar[str] = "speech"

    def __init__(self, name: str, model, codec, engine, sampling: SpeechSampling):
        self.name = name
        self.model = model
        self.codec = codec
        self.engine = engine
        #: Sampling settings for new requests (from the model folder's generation_config.json;
        #: tests replace it, e.g. ``attrs.evolve(p.sampling, greedy=True)``).
        self.sampling = sampling

    @property
    def max_context(self) -> int | None:
        return self.model.cfg.encoder.max_positions

    @property
    def sampling_rate(self) -> int:
        return self.codec.cfg.sampling_rate

    def text_ids(self, prompt) -> list[int]:
        if not isinstance(prompt, str):
            raise ValueError(f"prompt: expected a string, got {type(prompt).__name__}")
        if not prompt.strip():
            raise ValueError("prompt: must be non-empty text to speak")
        ids = encode_text(prompt)
        limit = self.model.cfg.encoder.max_positions
        if len(ids) > limit:
            raise ValueError(f"prompt: {len(ids)} bytes (speaker tags count one) but Dia's text encoder "
                             f"takes at most {limit}; split the text into several requests")
        return ids

    def generate_codes(self, prompt: str):
        """(codes [codebooks, frames], truncated)."""
        return self.engine.generate(self.text_ids(prompt), self.sampling)

    def generate_audio(self, prompt: str) -> SpeechGenerationResponse:
        codes, truncated = self.generate_codes(prompt)
        if truncated:
            log.warning("speech for %d prompt bytes reached the model's maximum of %d frames and was cut there",
                        len(prompt.encode("utf-8")), self.sampling.max_frames)
        if codes.shape[1] == 0:
            return SpeechGenerationResponse(pcm=[], rate=self.sampling_rate, channels=1)
        wave = self.codec.decode(codes[None].to(self.codec_device))[0]
        return SpeechGenerationResponse(pcm=wave.cpu().tolist(), rate=self.sampling_rate, channels=1)

    @property
    def codec_device(self):
        return next(self.codec.parameters()).device

    def shutdown(self) -> None:
        self.engine.shutdown()
