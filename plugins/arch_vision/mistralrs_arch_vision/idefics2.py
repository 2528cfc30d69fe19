"""Idefics2: a SigLIP tower at each image's own resolution, a connector (gated-MLP modality
projection + perceiver resampler) that turns any image into ``resampler_n_latents`` rows,
and a Mistral (or Llama) text decoder (the core's ``DecoderLM``).

The chat template writes ``<image>`` per image part. As transformers' ``Idefics2Processor``,
the rendered text then gets, per image, ``<fake_token_around_image>`` + ``image_seq_len``
``<image>`` tokens + ``<fake_token_around_image>`` (five times, four quadrants then the whole
image, with ``do_image_splitting``); neighbouring boundary tokens merge into one, and a
closing boundary followed by a word gets a space, so the text reads as the model was trained
on. Each run of ``<image>`` tokens is one ``FeatureSpan`` (causal, as the reference's text
model sees them) whose data is one crop's pixels.

Checkpoints: ``model.text_model.*``, ``model.vision_model.*``, ``model.connector.*``,
``lm_head.*`` (the hub's layout, which transformers 5 keeps).
"""
from __future__ import annotations

import re

import attrs
import torch

from mistralrs_core.engine.step import FeatureSpan
from mistralrs_core.models.decoder import DecoderLM
from mistralrs_core.models.text_config import base_config
from mistralrs_core.pipeline.text import Prompt
from mistralrs_core.tokenization.prompt import encode_prompt

from mistralrs_arch_vision.family import VisionFamilyMixin
from mistralrs_arch_vision.pipeline import part_digest, token_runs
from mistralrs_arch_vision.processors.idefics2 import Idefics2ImageProcessor
from mistralrs_arch_vision.towers.perceiver import Idefics2Connector, PerceiverConfig
from mistralrs_arch_vision.towers.siglip import SiglipTowerConfig
from mistralrs_arch_vision.towers.siglip_navit import NaViTSiglipTower

# transformers' MistralConfig / LlamaConfig defaults: a text_config lists only what differs.
# (Idefics2Config's own text defaults apply only when text_config is absent altogether.)
_TEXT_DEFAULTS = {
    "mistral": dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=8, hidden_act="silu",
                    max_position_embeddings=4096 * 32, rms_norm_eps=1e-6, rope_theta=10000.0,
                    sliding_window=4096, tie_word_embeddings=False),
    "llama": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, hidden_act="silu", max_position_embeddings=2048,
                  rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False),
}
# Idefics2Config with no text_config: a Mistral with these changes.
_ABSENT_TEXT = dict(model_type="mistral", max_position_embeddings=4096 * 8, rms_norm_eps=1e-5, pad_token_id=0)
_IDEFICS2_VISION_DEFAULTS = dict(patch_size=32)   # Idefics2VisionConfig differs from SigLIP's 16 here
_IMAGE_TOKEN = 32_001
FAKE_TOKEN = "<fake_token_around_image>"


def text_config_of(hf: dict) -> dict:
    text = dict(hf.get("text_config") or _ABSENT_TEXT)
    kind = text.get("model_type") or "mistral"
    if kind not in _TEXT_DEFAULTS:
        raise ValueError(f"text_config.model_type: Idefics2 with a {kind!r} text model is not supported "
                         f"(mistral or llama)")
    return {**_TEXT_DEFAULTS[kind], **text, "model_type": kind}


_PREFIXES = (  # checkpoint prefix -> module-tree prefix
    ("model.text_model.", "model."),
    ("model.vision_model.", "vision_model."),
    ("model.connector.", "connector."),
)


class Idefics2ForConditionalGeneration(VisionFamilyMixin, DecoderLM):
    checkpoint_prefixes = _PREFIXES
    ignored_weight_suffixes = ("rotary_emb.inv_freq", "position_ids")

    @classmethod
    def from_hf_config(cls, hf: dict, dtype: torch.dtype = torch.float32) -> "Idefics2ForConditionalGeneration":
        text = text_config_of(hf)
        model = cls(cls.config_from_hf(text), dtype)
        vision = SiglipTowerConfig.from_hf({**_IDEFICS2_VISION_DEFAULTS, **(hf.get("vision_config") or {})})
        model.vision_model = NaViTSiglipTower(vision, dtype=dtype)
        perceiver = PerceiverConfig.from_hf(hf.get("perceiver_config") or {}, text["hidden_size"],
                                            float(text["rms_norm_eps"]))
        model.connector = Idefics2Connector(vision.hidden_size, text["intermediate_size"], text["hidden_size"],
                                            text["hidden_act"], perceiver)
        model.image_seq_len = perceiver.resampler_n_latents
        model.image_token_id = int(hf.get("image_token_id", _IMAGE_TOKEN))
        return model

    @classmethod
    def config_from_hf(cls, text: dict):
        window = text.get("sliding_window") if text["model_type"] == "mistral" else None
        bias = bool(text.get("attention_bias", False)) if text["model_type"] == "llama" else False
        return base_config(text, sliding_window=window, qkv_bias=bias, o_bias=bias)

    def map_weight_name(self, name):
        name = self.rename_checkpoint(name)
        if name.startswith("vision_model."):
            inner = self.vision_model.map_weight_name(name[len("vision_model."):])
            return None if inner is None else "vision_model." + inner
        return super().map_weight_name(name)

    def image_features(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
        """[3, H, W] each, any sizes -> [image_seq_len, text hidden] each. All images go
        through the tower and the connector as one padded batch."""
        images = [im.to(device=self.lm_device, dtype=self.dtype) for im in images]
        patches, mask = self.vision_model(images)
        return list(self.connector(patches, mask))

    def encode_features(self, spans):
        return self.image_features([s.data for s in spans])


# --------------------------------------------------------------------------- the processor
@attrs.define
class Idefics2Processor:
    """The family's half of the pipeline: ``expand_prompt`` writes each image's boundary and
    image tokens into the rendered text (as transformers' ``Idefics2Processor``), tokenizes,
    and gives each run of image tokens (one per crop) its own ``FeatureSpan``."""
    image_processor: Idefics2ImageProcessor
    tokenizer: object
    image_token_id: int
    image_token: str
    fake_token: str
    image_seq_len: int
    image_part: dict = attrs.field(factory=lambda: {"type": "image"})

    @classmethod
    def from_pretrained(cls, *, model, hf_config: dict, preprocessor_config: dict, tokenizer=None,
                        model_dir=None) -> "Idefics2Processor":
        if tokenizer is None:
            raise ValueError("Idefics2's processor needs the tokenizer (its image tokens are text)")
        image_token = tokenizer.id_to_token(model.image_token_id)
        if image_token is None:
            raise ValueError(f"config.json: image_token_id {model.image_token_id} is not in the tokenizer")
        if tokenizer.token_to_id(FAKE_TOKEN) is None:
            raise ValueError(f"tokenizer: no {FAKE_TOKEN!r} token")
        return cls(Idefics2ImageProcessor.from_hf(preprocessor_config), tokenizer, model.image_token_id,
                   image_token, FAKE_TOKEN, model.image_seq_len)

    def image_text(self) -> str:
        """What one image placeholder becomes, before boundary merging."""
        one = f"{self.fake_token}{self.image_token * self.image_seq_len}{self.fake_token}"
        return one * self.image_processor.crops_per_image

    def expand_text(self, text: str) -> str:
        text = text.replace(self.image_token, self.image_text())
        # Adjacent crops (and images) share one boundary token; a boundary that runs into a
        # word is separated from it by a space.
        text = text.replace(self.fake_token * 2, self.fake_token)
        return re.sub(re.escape(self.fake_token) + r"(?=[^\s<])", self.fake_token + " ", text)

    def expand_prompt(self, text: str, images, audios=()) -> Prompt:
        """Rendered chat text + loaded images -> token ids with one span per crop."""
        found = text.count(self.image_token)
        if found != len(images):
            raise ValueError(f"messages: the rendered prompt holds {found} image placeholder(s) for "
                             f"{len(images)} image(s); the chat template must emit one per image part")
        units = [(img, k, px) for img in images for k, px in enumerate(self.image_processor(img.image))]
        ids = encode_prompt(self.tokenizer, self.expand_text(text))
        runs = token_runs(ids, self.image_token_id)
        if len(runs) != len(units) or any(n != self.image_seq_len for _, n in runs):
            raise ValueError(f"messages: the prompt's image tokens form runs {[n for _, n in runs]}, expected "
                             f"{len(units)} of {self.image_seq_len}")
        last = self.image_processor.crops_per_image - 1
        spans = [FeatureSpan(start=start, length=n, data=px, content_hash=_crop_hash(img.content_hash, k, last))
                 for (start, n), (img, k, px) in zip(runs, units)]
        return Prompt(ids, spans)


def _crop_hash(content_hash: bytes, k: int, whole: int) -> bytes:
    """Crop k of an image, keyed by the image's digest; the whole image (the last crop)
    keeps the image's own digest."""
    if k == whole:
        return content_hash
    return part_digest(content_hash, b"idefics2-crop", k)
