"""Mistral 3 (Mistral Small 3.1 / 3.2 vision): a Pixtral ViT, a projector that RMS-normalises,
merges each s x s block of neighbouring patches (unfold + linear) and maps them through
linear-gelu-linear, and a Mistral text decoder (the core's ``DecoderLM``).

An image of R x C tokens (after merging) enters the prompt as R rows of C ``[IMG]`` tokens,
each row closed by ``[IMG_BREAK]``, the last by ``[IMG_END]``. The whole run, breaks included,
is ONE ``FeatureSpan``: its feature rows are the projected image features at the ``[IMG]``
positions and the break/end tokens' own text embeddings at theirs, which is exactly what the
reference feeds the decoder (it embeds every token, then overwrites the ``[IMG]`` rows). So
the core's contract (a span = contiguous rows replaced by the encoder's rows) holds
unchanged, chunked prefill may cut anywhere inside it, and the prefix cache keys it by the
image content as for any other family.
"""
from __future__ import annotations

import json
from pathlib import Path

import attrs
import torch
import torch.nn.functional as F
from torch import nn

from mistralrs_core.layers.activations import get_activation
from mistralrs_core.layers.linear import Linear
from mistralrs_core.layers.norms import RMSNorm
from mistralrs_core.models.decoder import DecoderLM
from mistralrs_core.models.text_config import base_config

from mistralrs_arch_vision.family import VisionFamilyMixin
from mistralrs_arch_vision.pipeline import ImagePrompt
from mistralrs_arch_vision.processors.pixtral import PixtralImageProcessor, image_tokens
from mistralrs_arch_vision.towers.pixtral import PixtralTowerConfig, PixtralVisionTower

# transformers' MistralConfig defaults: a text_config lists only what differs from them.
MISTRAL_TEXT_DEFAULTS = dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                             num_attention_heads=32, num_key_value_heads=8, hidden_act="silu",
                             max_position_embeddings=4096 * 32, rms_norm_eps=1e-6, rope_theta=10000.0,
                             sliding_window=4096, tie_word_embeddings=False)
_TEXT_TYPES = ("mistral", None)


def text_config_of(hf: dict) -> dict:
    text = dict(hf.get("text_config") or {})
    if text.get("model_type") not in _TEXT_TYPES:
        raise ValueError(f"text_config.model_type: Mistral 3 with a {text['model_type']!r} text model is not "
                         f"supported yet (Mistral text only)")
    return {**MISTRAL_TEXT_DEFAULTS, **text}


class PatchMerger(nn.Module):
    """Each s x s block of a patch grid -> one row: the block's patch vectors laid out as
    ``F.unfold`` lays them (channel-major: channel c of block position k at c * s^2 + k),
    through one bias-free linear."""

    def __init__(self, dim: int, s: int):
        super().__init__()
        self.s = s
        self.merging_layer = Linear(dim * s * s, dim)

    def forward(self, x: torch.Tensor, grids: list[tuple[int, int]]) -> torch.Tensor:
        s, d, out = self.s, x.shape[-1], []
        for rows, (h, w) in zip(x.split([h * w for h, w in grids]), grids):
            grid = rows.view(h, w, d).permute(2, 0, 1)[None]
            out.append(F.unfold(grid, kernel_size=s, stride=s)[0].T)   # [(h/s)(w/s), d s s]
        return self.merging_layer(torch.cat(out))


class Mistral3Projector(nn.Module):
    def __init__(self, vision_dim: int, text_dim: int, *, merge: int, eps: float, act: str, bias: bool):
        super().__init__()
        self.norm = RMSNorm(vision_dim, eps)
        self.patch_merger = PatchMerger(vision_dim, merge)
        self.linear_1 = Linear(vision_dim, text_dim, bias=bias)
        self.act = get_activation(act)
        self.linear_2 = Linear(text_dim, text_dim, bias=bias)

    def forward(self, x, grids):
        return self.linear_2(self.act(self.linear_1(self.patch_merger(self.norm(x), grids))))


@attrs.frozen
class PixtralImage:
    """A span's encoder input: the pixels and the span's token ids (where ``[IMG]`` is, the
    encoder's rows go; elsewhere the token's own embedding)."""
    pixels: torch.Tensor          # [3, H, W]
    token_ids: tuple[int, ...]


_PREFIXES = (  # checkpoint prefix -> module-tree prefix (first match wins)
    ("model.language_model.", "model."),
    ("language_model.model.", "model."),
    ("language_model.lm_head.", "lm_head."),
    ("model.vision_tower.", "vision_tower."),
    ("vision_tower.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("multi_modal_projector.", "multi_modal_projector."),
)


class Mistral3ForConditionalGeneration(VisionFamilyMixin, DecoderLM):
    checkpoint_prefixes = _PREFIXES
    ignored_weight_suffixes = ("rotary_emb.inv_freq", "position_ids")

    @classmethod
    def from_hf_config(cls, hf: dict, dtype: torch.dtype = torch.float32) -> "Mistral3ForConditionalGeneration":
        text = text_config_of(hf)
        model = cls(cls.config_from_hf(text), dtype)
        vision = PixtralTowerConfig.from_hf(hf.get("vision_config") or {})
        layer = hf.get("vision_feature_layer", -1)
        layers = [int(layer)] if isinstance(layer, int) else [int(x) for x in layer]
        if len(layers) != 1:
            # The reference's projector normalises hidden_size channels: a concatenation of
            # several layers cannot pass through it.
            raise ValueError(f"vision_feature_layer: {layer} lists several layers; Mistral 3 takes one")
        model.vision_tower = PixtralVisionTower(vision, layers)
        model.spatial_merge_size = int(hf.get("spatial_merge_size", 2))
        model.multi_modal_projector = Mistral3Projector(
            vision.hidden_size, model.cfg.hidden_size, merge=model.spatial_merge_size,
            eps=float(text["rms_norm_eps"]), act=hf.get("projector_hidden_act", "gelu"),
            bias=bool(hf.get("multimodal_projector_bias", False)))
        model.image_token_id = int(hf.get("image_token_index", hf.get("image_token_id", 10)))
        return model

    @classmethod
    def config_from_hf(cls, text: dict):
        return base_config(text, sliding_window=text.get("sliding_window"))

    @property
    def token_unit(self) -> int:
        """Pixels per side of one prompt token."""
        return self.vision_tower.cfg.patch_size * self.spatial_merge_size

    def map_weight_name(self, name):
        name = self.rename_checkpoint(name)
        if name.startswith("vision_tower.") and not self.vision_tower.keeps_weight(name[len("vision_tower."):]):
            return None
        return super().map_weight_name(name)

    def image_features(self, images: list[torch.Tensor]) -> list[torch.Tensor]:
        """[3, H, W] each (sides multiples of ``token_unit``) -> [(H/u)(W/u), text hidden] each,
        rows in raster order of the merged grid. All images go through the tower at once."""
        images = [im.to(device=self.lm_device, dtype=self.dtype) for im in images]
        states, grids = self.vision_tower(images)
        feats = self.multi_modal_projector(states, grids)
        s = self.spatial_merge_size
        return list(feats.split([(h // s) * (w // s) for h, w in grids]))

    def encode_features(self, spans):
        images = [s.data for s in spans]
        out = []
        for img, feats in zip(images, self.image_features([im.pixels for im in images])):
            ids = torch.tensor(img.token_ids, device=self.lm_device)
            rows = self.embed(ids)
            at = (ids == self.image_token_id).nonzero()[:, 0]
            if at.numel() != feats.shape[0]:
                raise ValueError(f"an image span holds {at.numel()} image tokens for {feats.shape[0]} features")
            out.append(rows.index_copy(0, at, feats.to(rows.dtype)))
        return out


@attrs.define
class Mistral3Processor:
    """The family's half of the pipeline (transformers' ``PixtralProcessor``): ``[IMG]`` is the
    template's placeholder, and it expands to the image's rows of tokens with breaks."""
    image_processor: PixtralImageProcessor
    image_token_id: int
    break_token_id: int
    end_token_id: int
    image_part: dict = attrs.field(factory=lambda: {"type": "image"})

    @classmethod
    def from_pretrained(cls, *, model, hf_config: dict, preprocessor_config: dict, tokenizer=None,
                        model_dir=None) -> "Mistral3Processor":
        names = {"image_break_token": "[IMG_BREAK]", "image_end_token": "[IMG_END]"}
        proc_file = Path(model_dir) / "processor_config.json" if model_dir is not None else None
        if proc_file is not None and proc_file.is_file():
            names.update({k: v for k, v in json.loads(proc_file.read_text()).items() if k in names and v})
        ids = {}
        for key, token in names.items():
            ids[key] = tokenizer.token_to_id(token) if tokenizer is not None else None
            if ids[key] is None:
                raise ValueError(f"tokenizer: no {token!r} token ({key} of the Pixtral processor)")
        return cls(PixtralImageProcessor.from_config(preprocessor_config, model.token_unit), model.image_token_id,
                   ids["image_break_token"], ids["image_end_token"])

    def prepare(self, image) -> ImagePrompt:
        pixels = self.image_processor(image)
        u = self.image_processor.unit
        ids = image_tokens(pixels.shape[1] // u, pixels.shape[2] // u, self.image_token_id, self.break_token_id,
                           self.end_token_id)
        return ImagePrompt(len(ids), PixtralImage(pixels, tuple(ids)), token_ids=tuple(ids))
