"""Gemma 3 (vision): a SigLIP tower, Gemma 3's pooling projector and the Gemma 3 text decoder.

Each image (and each pan-and-scan crop) becomes ``\\n\\n<start_of_image>`` +
``mm_tokens_per_image`` soft tokens + ``<end_of_image>\\n\\n`` in the prompt; the soft tokens'
embeddings are replaced by the projected features of the tower's last hidden state, and they
attend to each other both ways (``FeatureSpan(bidirectional=True)``: transformers'
``token_type_ids`` blocks), while the rest of the sequence stays causal.

The expansion is done on the rendered *text*, as transformers' ``Gemma3Processor`` does, then
tokenized: Gemma's tokenizer merges runs of newlines into single tokens, so the "\\n\\n"
around an image fuses with a template's neighbouring newline and a token-level splice would
give different ids.

Checkpoints: hub (``language_model.model.*``, ``vision_tower.vision_model.*``,
``multi_modal_projector.*``) and transformers-5 (``model.language_model.*``,
``model.vision_tower.*``, ``model.multi_modal_projector.*``, ``lm_head.*``) layouts.
"""
from __future__ import annotations


import attrs
import torch

from mistralrs_core.engine.step import FeatureSpan
from mistralrs_core.models.decoder import DecoderLM
from mistralrs_core.models.gemma_config import gemma3_config
from mistralrs_core.pipeline.text import Prompt
from mistralrs_core.tokenization.prompt import encode_prompt

from mistralrs_arch_vision.family import VisionFamilyMixin
from mistralrs_arch_vision.pipeline import part_digest, token_runs
from mistralrs_arch_vision.processors.gemma3 import Gemma3ImageProcessor
from mistralrs_arch_vision.towers.siglip import Gemma3MultiModalProjector, SiglipTowerConfig, SiglipVisionTower

# transformers' Gemma3TextConfig defaults: hub configs (4b/12b/27b) list only what differs.
GEMMA3_TEXT_DEFAULTS = dict(vocab_size=262_208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                            num_attention_heads=8, num_key_value_heads=4, head_dim=256,
                            hidden_activation="gelu_pytorch_tanh", max_position_embeddings=131_072,
                            rms_norm_eps=1e-6, tie_word_embeddings=True, attention_bias=False,
                            query_pre_attn_scalar=256, sliding_window=4096, sliding_window_pattern=6)
# Gemma3Config defaults (the released checkpoints' special-token ids).
_BOI, _EOI, _IMAGE, _MM_TOKENS = 255_999, 256_000, 262_144, 256


def text_config_of(hf: dict) -> dict:
    text = dict(hf.get("text_config") or {})
    if text.get("model_type") not in ("gemma3_text", None):
        raise ValueError(f"text_config.model_type: Gemma 3 vision with a {text['model_type']!r} text model "
                         f"is not supported (gemma3_text only)")
    return {**GEMMA3_TEXT_DEFAULTS, **text}


def gemma3_text_config(text: dict):
    """A ``DecoderConfig`` equal to transformers' ``Gemma3TextModel`` for a (defaults-filled)
    ``text_config`` (the rules are core's, shared with the text family)."""
    if text.get("use_bidirectional_attention"):
        raise ValueError("text_config.use_bidirectional_attention: a bidirectional Gemma 3 text model "
                         "(EmbeddingGemma) is not a vision-language model")
    return gemma3_config(text)


# --------------------------------------------------------------------------- the model
_PREFIXES = (  # checkpoint prefix -> module-tree prefix (first match wins)
    ("model.language_model.", "model."),
    ("language_model.model.", "model."),
    ("language_model.lm_head.", "lm_head."),
    ("model.vision_tower.", "vision_tower."),
    ("vision_tower.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("multi_modal_projector.", "multi_modal_projector."),
)


class Gemma3ForConditionalGeneration(VisionFamilyMixin, DecoderLM):
    checkpoint_prefixes = _PREFIXES
    compiled_towers = ("vision_tower",)
    ignored_weight_suffixes = ("rotary_emb.inv_freq", "position_ids")

    @classmethod
    def from_hf_config(cls, hf: dict, dtype: torch.dtype = torch.float32) -> "Gemma3ForConditionalGeneration":
        text = text_config_of(hf)
        model = cls(cls.config_from_hf(text), dtype)
        vision = SiglipTowerConfig.from_hf(hf.get("vision_config") or {})
        # Gemma 3 reads the last hidden state (post_layernorm) and has no pooling head.
        model.vision_tower = SiglipVisionTower(vision, use_head=False, dtype=dtype)
        model.mm_tokens_per_image = int(hf.get("mm_tokens_per_image") or _MM_TOKENS)
        model.multi_modal_projector = Gemma3MultiModalProjector(
            vision.hidden_size, model.cfg.hidden_size, vision.patches_per_side, model.mm_tokens_per_image,
            eps=vision.layer_norm_eps)
        model.image_token_id = int(hf.get("image_token_id", hf.get("image_token_index", _IMAGE)))
        model.boi_token_id = int(hf.get("boi_token_id", hf.get("boi_token_index", _BOI)))
        model.eoi_token_id = int(hf.get("eoi_token_id", hf.get("eoi_token_index", _EOI)))
        return model

    @classmethod
    def config_from_hf(cls, text: dict):
        return gemma3_text_config(text)

    def map_weight_name(self, name):
        name = self.rename_checkpoint(name)
        if name.startswith("vision_tower."):
            inner = self.vision_tower.map_weight_name(name[len("vision_tower."):])
            return None if inner is None else "vision_tower." + inner
        return super().map_weight_name(name)

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> projected soft tokens [B, mm_tokens_per_image, text hidden]."""
        patches = self.vision_tower(pixels.to(device=self.lm_device, dtype=self.dtype))
        return self.multi_modal_projector(patches)

    def encode_features(self, spans):
        # Every image and crop of the step in one tower call (all are resized to one size).
        return list(self.image_features(torch.stack([s.data for s in spans])))


# --------------------------------------------------------------------------- the processor
@attrs.frozen
class Gemma3Image:
    """One prepared image: its whole-image pixels and its pan-and-scan crops'."""
    pixels: list[torch.Tensor]       # [3, H, W] each: the image, then its crops


@attrs.define
class Gemma3Processor:
    """The family's half of the pipeline. The chat template emits ``<start_of_image>`` per
    image part; ``expand_prompt`` replaces each, in the rendered text, by what transformers'
    ``Gemma3Processor`` writes (the crops' text too), tokenizes, and gives every run of soft
    tokens its own bidirectional ``FeatureSpan``."""
    image_processor: Gemma3ImageProcessor
    tokenizer: object
    image_token_id: int        # the soft token (what the features replace)
    boi_token: str             # the template's placeholder, also each image's opening token
    image_token: str
    eoi_token: str
    tokens_per_image: int
    image_part: dict = attrs.field(factory=lambda: {"type": "image"})

    @classmethod
    def from_pretrained(cls, *, model, hf_config: dict, preprocessor_config: dict, tokenizer=None,
                        model_dir=None) -> "Gemma3Processor":
        if tokenizer is None:
            raise ValueError("Gemma 3's processor needs the tokenizer (its image tokens are text)")
        proc = Gemma3ImageProcessor.from_hf(preprocessor_config)
        size = model.vision_tower.cfg.image_size
        if proc.do_resize and proc.size != (size, size):
            raise ValueError(f"preprocessor_config.json: size {proc.size} does not match the vision tower's "
                             f"image_size {size}")
        names = {}
        for what, token_id in (("boi", model.boi_token_id), ("image", model.image_token_id),
                               ("eoi", model.eoi_token_id)):
            names[what] = tokenizer.id_to_token(token_id)
            if names[what] is None:
                raise ValueError(f"config.json: {what} token id {token_id} is not in the tokenizer")
        return cls(proc, tokenizer, model.image_token_id, names["boi"], names["image"], names["eoi"],
                   model.mm_tokens_per_image)

    def image_sequence(self) -> str:
        return f"\n\n{self.boi_token}{self.image_token * self.tokens_per_image}{self.eoi_token}\n\n"

    def image_text(self, num_crops: int) -> str:
        """What one image's placeholder becomes (transformers' wording for pan-and-scan)."""
        full = self.image_sequence()
        if not num_crops:
            return full
        return (f"Here is the original image {full} and here are some crops to help you see better "
                + " ".join([full] * num_crops))

    def prepare(self, image) -> Gemma3Image:
        out = self.image_processor(image)
        return Gemma3Image(list(out.pixel_values))

    def expand_prompt(self, text: str, images, audios=()) -> Prompt:
        """Rendered chat text + loaded images -> token ids with one span per image and crop."""
        pieces = text.split(self.boi_token)
        if len(pieces) - 1 != len(images):
            raise ValueError(f"messages: the rendered prompt holds {len(pieces) - 1} image placeholder(s) for "
                             f"{len(images)} image(s); the chat template must emit one per image part")
        prepared = [self.prepare(img.image) for img in images]
        out = [pieces[0]]
        for p, rest in zip(prepared, pieces[1:]):
            out += [self.image_text(len(p.pixels) - 1), rest]
        ids = encode_prompt(self.tokenizer, "".join(out))
        runs = token_runs(ids, self.image_token_id)
        units = [(img, k, px) for img, p in zip(images, prepared) for k, px in enumerate(p.pixels)]
        if len(runs) != len(units) or any(n != self.tokens_per_image for _, n in runs):
            raise ValueError(f"messages: the prompt's image tokens form runs {[n for _, n in runs]}, expected "
                             f"{len(units)} of {self.tokens_per_image} (is {self.image_token!r} in the text?)")
        spans = [FeatureSpan(start=start, length=n, data=px, bidirectional=True,
                             content_hash=_crop_hash(img.content_hash, k))
                 for (start, n), (img, k, px) in zip(runs, units)]
        return Prompt(ids, spans)


def _crop_hash(content_hash: bytes, k: int) -> bytes:
    """Crop k of an image: keyed by the image's digest (crop 0 is the whole image, which
    keeps the image's own digest)."""
    if k == 0:
        return content_hash
    return part_digest(content_hash, b"gemma3-crop", k)
