"""Llama 4 (Scout / Maverick): the Llama 4 ViT on square tiles, a bias-free linear projector,
and the Llama 4 MoE text decoder (``llama4_text.py``).

An image enters the prompt as ``<|image_start|>``, then (when it was cut into several tiles)
one ``<|patch|>`` run per tile with ``<|tile_x_separator|>`` between tiles of a row and
``<|tile_y_separator|>`` after each row, then ``<|image|>`` and the global thumbnail's
``<|patch|>`` run, then ``<|image_end|>``. The whole expansion is ONE ``FeatureSpan``: its rows
are the tiles' features (in tile order, thumbnail last) at the ``<|patch|>`` positions and the
other tokens' own text embeddings, exactly what the reference feeds the decoder.
"""
from __future__ import annotations

import json
from pathlib import Path

import attrs
import torch
from torch import nn

from mistralrs_core.layers.linear import Linear

from mistralrs_arch_vision.family import VisionFamilyMixin
from mistralrs_arch_vision.llama4_text import Llama4TextLM
from mistralrs_arch_vision.pipeline import ImagePrompt
from mistralrs_arch_vision.processors.llama4 import Llama4ImageProcessor, image_token_layout
from mistralrs_arch_vision.towers.llama4 import Llama4TowerConfig, Llama4VisionTower

_PREFIXES = (  # checkpoint prefix -> module-tree prefix (first match wins)
    ("model.language_model.", "model."),
    ("language_model.model.", "model."),
    ("language_model.lm_head.", "lm_head."),
    ("model.vision_model.", "vision_model."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
)


@attrs.frozen
class Llama4Image:
    """A span's encoder input: the tiles (thumbnail last) and the span's token ids."""
    tiles: torch.Tensor          # [N, 3, S, S]
    token_ids: tuple[int, ...]


class Llama4Projector(nn.Module):
    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.linear_1 = Linear(d_in, d_out)

    def forward(self, x):
        return self.linear_1(x)


class Llama4ForConditionalGeneration(VisionFamilyMixin, Llama4TextLM):
    checkpoint_prefixes = _PREFIXES

    @classmethod
    def from_hf_config(cls, hf: dict, dtype: torch.dtype = torch.float32) -> "Llama4ForConditionalGeneration":
        text = dict(hf.get("text_config") or {})
        if text.get("model_type") not in ("llama4_text", None):
            raise ValueError(f"text_config.model_type: {text['model_type']!r} is not a Llama 4 text model")
        model = cls(cls.config_from_hf(text), dtype)
        vc = dict(hf.get("vision_config") or {})
        model.vision_model = Llama4VisionTower(Llama4TowerConfig.from_hf(vc))
        model.multi_modal_projector = Llama4Projector(int(vc.get("vision_output_dim", 4096)), model.cfg.hidden_size)
        model.image_token_id = int(hf.get("image_token_index", hf.get("image_token_id", 200092)))
        return model

    def map_weight_name(self, name):
        name = self.rename_checkpoint(name)
        return super().map_weight_name(name)

    def image_features(self, tiles: torch.Tensor) -> torch.Tensor:
        """[N, 3, S, S] -> [N * tokens_per_tile, text hidden], tile after tile."""
        feats = self.vision_model(tiles.to(device=self.lm_device, dtype=self.dtype))
        return self.multi_modal_projector(feats).flatten(0, 1)

    def encode_features(self, spans):
        images = [s.data for s in spans]
        counts = [im.tiles.shape[0] for im in images]
        feats = self.image_features(torch.cat([im.tiles for im in images])).split(
            [n * self.vision_model.cfg.tokens_per_tile for n in counts])
        out = []
        for img, f in zip(images, feats):
            ids = torch.tensor(img.token_ids, device=self.lm_device)
            rows = self.embed(ids)
            at = (ids == self.image_token_id).nonzero()[:, 0]
            if at.numel() != f.shape[0]:
                raise ValueError(f"an image span holds {at.numel()} image tokens for {f.shape[0]} features")
            out.append(rows.index_copy(0, at, f.to(rows.dtype)))
        return out


_SPECIAL = {"start_of_image_token": "<|image_start|>", "end_of_image_token": "<|image_end|>",
            "image_token": "<|image|>", "patch_token": "<|patch|>",
            "tile_x_separator_token": "<|tile_x_separator|>", "tile_y_separator_token": "<|tile_y_separator|>"}


@attrs.define
class Llama4Processor:
    """The family's half of the pipeline (transformers' ``Llama4Processor``): the template's
    ``<|image|>`` placeholder expands to the image's whole layout (``image_token_layout``)."""
    image_processor: Llama4ImageProcessor
    tokens_per_tile: int
    ids: dict                         # _SPECIAL key -> token id
    image_part: dict = attrs.field(factory=lambda: {"type": "image"})

    @property
    def image_token_id(self) -> int:
        """The placeholder the chat template emits (transformers' ``fake_image_token``)."""
        return self.ids["image_token"]

    @classmethod
    def from_pretrained(cls, *, model, hf_config: dict, preprocessor_config: dict, tokenizer=None,
                        model_dir=None) -> "Llama4Processor":
        names = dict(_SPECIAL)
        proc_file = Path(model_dir) / "processor_config.json" if model_dir is not None else None
        if proc_file is not None and proc_file.is_file():
            names.update({k: v for k, v in json.loads(proc_file.read_text()).items() if k in names and v})
        ids = {}
        for key, token in names.items():
            ids[key] = tokenizer.token_to_id(token) if tokenizer is not None else None
            if ids[key] is None:
                raise ValueError(f"tokenizer: no {token!r} token ({key} of the Llama 4 processor)")
        if ids["patch_token"] != model.image_token_id:
            raise ValueError(f"config.json: image_token_index {model.image_token_id} is not the "
                             f"{names['patch_token']!r} token ({ids['patch_token']})")
        images = Llama4ImageProcessor.from_config(preprocessor_config)
        cfg = model.vision_model.cfg
        if images.tile_size != cfg.image_size:
            raise ValueError(f"preprocessor_config.json: tile size {images.tile_size} differs from the vision "
                             f"tower's image_size {cfg.image_size}")
        return cls(images, cfg.tokens_per_tile, ids)

    def prepare(self, image) -> ImagePrompt:
        tiles, (rows, cols) = self.image_processor(image)
        i = self.ids
        ids = image_token_layout(rows, cols, self.tokens_per_tile, start=i["start_of_image_token"],
                                 end=i["end_of_image_token"], image=i["image_token"], patch=i["patch_token"],
                                 tile_x=i["tile_x_separator_token"], tile_y=i["tile_y_separator_token"])
        return ImagePrompt(len(ids), Llama4Image(tiles, tuple(ids)), token_ids=tuple(ids))
