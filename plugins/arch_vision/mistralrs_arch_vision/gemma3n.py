"""Gemma 3n: a MobileNetV5 image tower, an audio encoder, and the Gemma 3n text decoder.

Each image becomes ``\\n\\n<start_of_image>`` + ``vision_soft_tokens_per_image`` image tokens +
``<end_of_image>\\n\\n`` (each audio clip likewise with ``<start_of_audio>`` /
``<audio_soft_token>`` × ``audio_soft_tokens_per_image`` / ``<end_of_audio>``), written into
the rendered chat text where the template put the image (audio) token, then tokenized, as
transformers' ``Gemma3nProcessor`` does. Attention stays causal over them.

Two vocabularies sit past the text model's per-layer table: ids in
``[embed_vision.vocab_offset, embed_audio.vocab_offset)`` are embedded by ``embed_vision``'s
own table (hard embedding → norm → projection → weightless norm), ids from
``embed_audio.vocab_offset`` up by ``embed_audio``'s. That covers ``<end_of_image>``,
``<end_of_audio>`` and the placeholders themselves, whose rows the features then replace.
The features are the tower's soft tokens through the same embedder's soft path. The
per-layer embeddings of all these ids are the per-layer table's row 0 (transformers maps
every id outside that table to 0) plus the projection of the spliced embeddings.

Checkpoints (hub = transformers 5): ``model.language_model.*``,
``model.vision_tower.timm_model.*``, ``model.audio_tower.*``, ``model.embed_vision.*``,
``model.embed_audio.*``; ``lm_head`` is tied.
"""
from __future__ import annotations

import re

import attrs
import torch

from mistralrs_core.engine.step import FeatureSpan
from mistralrs_core.pipeline.text import Prompt
from mistralrs_core.tokenization.prompt import encode_prompt

from mistralrs_arch_vision.family import VisionFamilyMixin
from mistralrs_arch_vision.gemma3n_text import Gemma3nTextLM, gemma3n_text_config
from mistralrs_arch_vision.pipeline import token_runs
from mistralrs_arch_vision.processors.gemma3n import Gemma3nImageProcessor
from mistralrs_arch_vision.processors.gemma3n_audio import Gemma3nAudioFeatureExtractor, Gemma3nAudioFeatures
from mistralrs_arch_vision.towers.gemma3n_audio import Gemma3nAudioEncoder, encode_clips
from mistralrs_arch_vision.towers.mobilenetv5 import MobileNetV5Tower
from mistralrs_arch_vision.towers.multimodal_embedder import Gemma3nMultimodalEmbedder

# Gemma3nConfig's defaults (the released checkpoints' ids and counts).
GEMMA3N_DEFAULTS = dict(boi_token_id=255_999, eoi_token_id=262_144, image_token_id=262_145, boa_token_id=256_000,
                        eoa_token_id=262_272, audio_token_id=262_273, vision_soft_tokens_per_image=256,
                        audio_soft_tokens_per_image=188)
_VISION_DEFAULTS = dict(hidden_size=2048, vocab_size=128, vocab_offset=262_144, rms_norm_eps=1e-6)
_AUDIO_DEFAULTS = dict(hidden_size=1536, vocab_size=128, vocab_offset=262_272, rms_norm_eps=1e-6)


# --------------------------------------------------------------------------- the model
_PREFIXES = (
    ("model.language_model.", "model."),
    ("model.vision_tower.", "vision_tower."),
    ("model.audio_tower.", "audio_tower."),
    ("model.embed_vision.", "embed_vision."),
    ("model.embed_audio.", "embed_audio."),
)


class Gemma3nForConditionalGeneration(VisionFamilyMixin, Gemma3nTextLM):
    checkpoint_prefixes = _PREFIXES

    @classmethod
    def from_hf_config(cls, hf: dict, dtype: torch.dtype = torch.float32, *, vision_tower=None,
                       audio_tower=None) -> "Gemma3nForConditionalGeneration":
        """``vision_tower``: a module taking pixels [B, 3, H, W] to soft tokens [B, n, hidden],
        ``audio_tower`` one taking (mel [B, T, bins], valid [B, T]) to (encodings [B, n,
        hidden], valid [B, n]), in place of the built ones (tests of the rest)."""
        if hf.get("model_type") not in (None, "gemma3n"):
            raise ValueError(f"config.json: model_type {hf['model_type']!r} is not gemma3n")
        c = {**GEMMA3N_DEFAULTS, **{k: v for k, v in hf.items() if k in GEMMA3N_DEFAULTS and v is not None}}
        text = dict(hf.get("text_config") or {})
        model = cls(gemma3n_text_config(text), dtype)
        hidden = model.cfg.hidden_size
        vision, audio = dict(hf.get("vision_config") or {}), dict(hf.get("audio_config") or {})
        vision = {**_VISION_DEFAULTS, **{k: v for k, v in vision.items() if v is not None}}
        audio = {**_AUDIO_DEFAULTS, **{k: v for k, v in audio.items() if v is not None}}
        model.embed_vision = Gemma3nMultimodalEmbedder.from_hf(vision, hidden)
        model.embed_audio = Gemma3nMultimodalEmbedder.from_hf(audio, hidden)
        if model.embed_vision.vocab_offset + model.embed_vision.vocab_size > model.embed_audio.vocab_offset:
            raise ValueError("config.json: vision_config's vocabulary overlaps audio_config's")
        model.vision_tower = vision_tower if vision_tower is not None else MobileNetV5Tower.from_hf(vision)
        model.audio_tower = audio_tower if audio_tower is not None else Gemma3nAudioEncoder.from_hf(audio)
        for key in GEMMA3N_DEFAULTS:
            setattr(model, key, int(c[key]))
        tokens = getattr(model.vision_tower, "num_tokens", model.vision_soft_tokens_per_image)
        if tokens != model.vision_soft_tokens_per_image:
            raise ValueError(f"config.json: vision_soft_tokens_per_image {model.vision_soft_tokens_per_image} but the "
                             f"vision tower gives {tokens} soft tokens per image")
        for key, emb in (("image_token_id", model.embed_vision), ("eoi_token_id", model.embed_vision),
                         ("audio_token_id", model.embed_audio), ("eoa_token_id", model.embed_audio)):
            if not emb.vocab_offset <= getattr(model, key) < emb.vocab_offset + emb.vocab_size:
                raise ValueError(f"config.json: {key} {getattr(model, key)} is outside its modality's vocabulary "
                                 f"[{emb.vocab_offset}, {emb.vocab_offset + emb.vocab_size})")
        return model

    def map_weight_name(self, name):
        name = self.rename_checkpoint(name)
        for tower in ("vision_tower", "audio_tower"):
            if name.startswith(tower + "."):
                inner_map = getattr(getattr(self, tower), "map_weight_name", None)
                if inner_map is None:
                    return name
                inner = inner_map(name[len(tower) + 1:])
                return None if inner is None else f"{tower}.{inner}"
        if name.startswith(("embed_vision.", "embed_audio.")):
            return name
        return super().map_weight_name(name)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Text embeddings, the two modality vocabularies' rows where their ids are, and the
        per-layer token rows (see gemma3n_text)."""
        packed = super().embed(input_ids)
        h = packed[:, :self.cfg.hidden_size]
        for embedder in (self.embed_vision, self.embed_audio):
            rows = embedder.owns(input_ids).nonzero(as_tuple=True)[0]
            if rows.numel():
                h[rows] = embedder.embed_ids(input_ids[rows]).to(h.dtype)
        return packed

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> [B, soft tokens, text hidden]."""
        return self.embed_vision.embed_image_features(self.vision_tower(pixels.to(device=self.lm_device,
                                                                                     dtype=self.dtype)))

    def audio_features(self, clips: list[Gemma3nAudioFeatures]) -> list[torch.Tensor]:
        """Clips -> [audio_soft_tokens_per_image, text hidden] each. The encoder gives at most
        that many rows; its padded rows and the missing ones up to the count are the audio
        vocabulary's last entry, as transformers pads them."""
        pad_id = torch.tensor([self.cfg.vocab_size - 1], device=self.lm_device)
        pad = self.embed_audio.embed_ids(pad_id).to(self.dtype)
        out = []
        for enc, ok in encode_clips(self.audio_tower, clips, self.lm_device, self.dtype):
            feats = torch.where(ok[:, None], self.embed_audio.embed_soft(enc), pad.to(enc.dtype))
            missing = self.audio_soft_tokens_per_image - feats.shape[0]
            if missing < 0:
                raise ValueError(f"audio: a clip gives {feats.shape[0]} encoder rows, more than the "
                                 f"{self.audio_soft_tokens_per_image} audio tokens per clip")
            out.append(torch.cat([feats, pad.expand(missing, -1)]))
        return out

    def encode_features(self, spans):
        """Images in one tower call, clips through ``encode_clips`` (same-length clips together)."""
        out: list = [None] * len(spans)
        images = [i for i, s in enumerate(spans) if isinstance(s.data, torch.Tensor)]
        if images:
            feats = self.image_features(torch.stack([spans[i].data for i in images]))
            for i, f in zip(images, feats):
                out[i] = f
        clips = [i for i, s in enumerate(spans) if isinstance(s.data, Gemma3nAudioFeatures)]
        if clips:
            for i, f in zip(clips, self.audio_features([spans[i].data for i in clips])):
                out[i] = f
        for i, s in enumerate(spans):
            if out[i] is None:
                raise ValueError(f"Gemma 3n: a feature span holds {type(s.data).__name__}, not an image or a clip")
        return out


# --------------------------------------------------------------------------- the processor
@attrs.define
class Gemma3nProcessor:
    """The family's half of the pipeline: the chat template writes ``<image_soft_token>`` per
    image part and ``<audio_soft_token>`` per audio part; ``expand_prompt`` replaces each, in
    the rendered text, with what transformers' ``Gemma3nProcessor`` writes, tokenizes, and
    gives each image's and each clip's run of placeholder tokens a (causal) ``FeatureSpan``."""
    image_processor: object
    tokenizer: object
    image_token_id: int
    image_token: str
    boi_token: str
    eoi_token: str
    tokens_per_image: int
    audio_token_id: int
    audio_token: str
    boa_token: str
    eoa_token: str
    tokens_per_audio: int
    #: (samples, rate) -> features with ``mel`` [T, bins] and ``valid`` [T]; None: audio refused
    audio_extractor: object | None = None
    image_part: dict = attrs.field(factory=lambda: {"type": "image"})
    audio_part: dict = attrs.field(factory=lambda: {"type": "audio"})

    @classmethod
    def from_pretrained(cls, *, model, hf_config: dict, preprocessor_config: dict, tokenizer=None,
                        model_dir=None, image_processor=None, audio_extractor=None) -> "Gemma3nProcessor":
        if tokenizer is None:
            raise ValueError("Gemma 3n's processor needs the tokenizer (its image and audio tokens are text)")
        if image_processor is None:
            image_processor = Gemma3nImageProcessor.from_hf(preprocessor_config)
        if audio_extractor is None:
            audio_extractor = Gemma3nAudioFeatureExtractor.from_config(preprocessor_config)
        names = {}
        for what in ("boi_token_id", "eoi_token_id", "image_token_id", "boa_token_id", "eoa_token_id",
                     "audio_token_id"):
            token_id = getattr(model, what)
            names[what] = tokenizer.id_to_token(token_id)
            if names[what] is None:
                raise ValueError(f"config.json: {what} {token_id} is not in the tokenizer")
        return cls(image_processor, tokenizer, model.image_token_id, names["image_token_id"], names["boi_token_id"],
                   names["eoi_token_id"], model.vision_soft_tokens_per_image, model.audio_token_id,
                   names["audio_token_id"], names["boa_token_id"], names["eoa_token_id"],
                   model.audio_soft_tokens_per_image, audio_extractor)

    @property
    def prepare_audio(self):
        """The pipeline's "this model hears" flag (None refuses audio parts up front); the
        clips themselves are prepared in ``expand_prompt``."""
        return None if self.audio_extractor is None else self.audio_clip

    def image_sequence(self) -> str:
        return f"\n\n{self.boi_token}{self.image_token * self.tokens_per_image}{self.eoi_token}\n\n"

    def audio_sequence(self) -> str:
        return f"\n\n{self.boa_token}{self.audio_token * self.tokens_per_audio}{self.eoa_token}\n\n"

    def pixels(self, image) -> torch.Tensor:
        """One image -> [3, H, W] float32."""
        return self.image_processor.to_pixels(image)

    def audio_clip(self, audio) -> Gemma3nAudioFeatures:
        """One ``LoadedAudio`` -> the encoder's input (the extractor resamples to its rate)."""
        return self.audio_extractor(audio.samples, audio.rate)

    def expand_prompt(self, text: str, images, audios=()) -> Prompt:
        if audios and self.audio_extractor is None:
            raise ValueError("messages: this Gemma 3n model does not take audio input")
        pieces = re.split(f"({re.escape(self.image_token)}|{re.escape(self.audio_token)})", text)
        for token, items, what in ((self.image_token, images, "image"), (self.audio_token, audios, "audio")):
            count = pieces.count(token)
            if count != len(items):
                raise ValueError(f"messages: the rendered prompt holds {count} {what} placeholder(s) for "
                                 f"{len(items)} {what}(s); the chat template must emit one per {what} part")
        pixels = [self.pixels(img.image) for img in images]
        clips = [self.audio_clip(a) for a in audios]
        expanded = "".join(self.image_sequence() if p == self.image_token else
                           self.audio_sequence() if p == self.audio_token else p for p in pieces)
        ids = encode_prompt(self.tokenizer, expanded)
        spans = []
        for token_id, items, data, n, what in (
                (self.image_token_id, images, pixels, self.tokens_per_image, "image"),
                (self.audio_token_id, audios, clips, self.tokens_per_audio, "audio")):
            runs = token_runs(ids, token_id)
            if len(runs) != len(items) or any(k != n for _, k in runs):
                raise ValueError(f"messages: the prompt's {what} tokens form runs {[k for _, k in runs]}, "
                                 f"expected {len(items)} of {n}")
            spans += [FeatureSpan(start=start, length=k, data=d, content_hash=item.content_hash)
                      for (start, k), item, d in zip(runs, items, data)]
        return Prompt(ids, sorted(spans, key=lambda sp: sp.start))

