"""LLaVa-NeXT (LLaVa 1.6): LLaVa's CLIP tower and projector over "anyres" tiles.

Each image arrives as a squashed base tile plus the tiles of the best-fitting canvas
(``processors/llava_next.py``). All tiles of all images of a step go through the tower in
one call; per image the grid tiles' features are laid out as one feature map, the rows or
columns that only saw canvas padding are dropped, and ``image_newline`` ends every remaining
row. The base tile's features come first. The placeholder count is computed by the same
function the unpacking uses (``anyres_token_count``).

The text side is the core ``DecoderLM`` (Llama or Mistral text configs).
"""
from __future__ import annotations

import attrs
import torch
from torch import nn

from mistralrs_arch_vision.llava import (LLAMA_TEXT_DEFAULTS, LlavaForConditionalGeneration,
                                         LlavaProjector, feature_layers_of)
from mistralrs_arch_vision.pipeline import ImagePrompt
from mistralrs_arch_vision.processors.llava_next import (AnyResPixels, LlavaNextImageProcessor,
                                                         anyres_token_count, best_resolution, pinpoints_of,
                                                         unpadded_window)
from mistralrs_arch_vision.towers.clip import CLIPVisionConfig, CLIPVisionTower

# transformers' MistralConfig defaults (llava-v1.6-mistral lists only what differs).
MISTRAL_TEXT_DEFAULTS = dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                             num_attention_heads=32, num_key_value_heads=8, hidden_act="silu",
                             max_position_embeddings=4096 * 32, rms_norm_eps=1e-6, rope_theta=10000.0,
                             sliding_window=4096, tie_word_embeddings=False)
_TEXT_DEFAULTS = {"llama": LLAMA_TEXT_DEFAULTS, None: LLAMA_TEXT_DEFAULTS, "mistral": MISTRAL_TEXT_DEFAULTS}


def next_text_config_of(hf: dict) -> dict:
    text = dict(hf.get("text_config") or {})
    kind = text.get("model_type")
    if kind not in _TEXT_DEFAULTS:
        raise ValueError(f"text_config.model_type: LLaVa-NeXT with a {kind!r} text model is not supported yet "
                         f"(Llama or Mistral text)")
    return {**_TEXT_DEFAULTS[kind], **text}


class LlavaNextForConditionalGeneration(LlavaForConditionalGeneration):
    @classmethod
    def from_hf_config(cls, hf: dict, dtype: torch.dtype = torch.float32) -> "LlavaNextForConditionalGeneration":
        model = cls(cls.config_from_hf(next_text_config_of(hf)), dtype)
        vision = CLIPVisionConfig.from_hf(hf.get("vision_config") or {})
        layers = feature_layers_of(hf)
        strategy = hf.get("vision_feature_select_strategy", "default")
        if strategy != "default":
            # With the CLS kept a tile's features are no longer a square patch grid: the
            # reference cannot lay them out either.
            raise ValueError(f"vision_feature_select_strategy: {strategy!r}; LLaVa-NeXT supports 'default' only")
        model.vision_tower = CLIPVisionTower(vision, layers)
        model.multi_modal_projector = LlavaProjector(
            vision.hidden_size * len(layers), model.cfg.hidden_size, hf.get("projector_hidden_act", "gelu"),
            bool(hf.get("multimodal_projector_bias", True)))
        model.image_newline = nn.Parameter(torch.zeros(model.cfg.hidden_size, dtype=dtype), requires_grad=False)
        model.drop_cls = True
        model.image_token_id = int(hf.get("image_token_id", hf.get("image_token_index", 32000)))
        model.tile = vision.image_size
        model.per_side = vision.image_size // vision.patch_size
        model.tokens_per_image = None           # depends on the image's size: see tokens_for
        model.pinpoints = pinpoints_of(hf.get("image_grid_pinpoints"), vision.image_size)
        return model

    @classmethod
    def config_from_hf(cls, text: dict):
        cfg = super().config_from_hf(text)
        return attrs.evolve(cfg, sliding_window=text.get("sliding_window"))

    def map_weight_name(self, name):
        if name in ("image_newline", "model.image_newline"):
            return "image_newline"
        return super().map_weight_name(name)

    def tokens_for(self, height: int, width: int) -> int:
        return anyres_token_count(height, width, self.pinpoints, self.tile, self.per_side)

    def pack_image(self, feats: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        """One image's projected tile features [tiles, per_side**2, D] -> its feature rows
        [tokens_for(image), D]: base tile, then the unpadded grid row by row, each row ended
        by ``image_newline``."""
        height, width = image_size
        ch, cw = best_resolution(height, width, self.pinpoints)
        gh, gw, p, d = ch // self.tile, cw // self.tile, self.per_side, feats.shape[-1]
        if feats.shape[0] != 1 + gh * gw:
            raise ValueError(f"image of {height}x{width}: {feats.shape[0]} tiles, expected {1 + gh * gw}")
        # [gh, gw, p, p, D] -> one [gh*p, gw*p, D] map (tile row, patch row, tile col, patch col).
        grid = feats[1:].view(gh, gw, p, p, d).permute(0, 2, 1, 3, 4).reshape(gh * p, gw * p, d)
        r0, r1, c0, c1 = unpadded_window(height, width, gh * p, gw * p)
        grid = grid[r0:r1, c0:c1]
        newline = self.image_newline.to(grid.dtype).expand(grid.shape[0], 1, d)
        return torch.cat([feats[0], torch.cat([grid, newline], dim=1).reshape(-1, d)])

    def encode_features(self, spans):
        # Every tile of every image of the step in one tower call (all tiles share one size).
        data = [s.data for s in spans]
        feats = self.image_features(torch.cat([x.tiles for x in data]))
        out = []
        for x, f in zip(data, feats.split([x.tiles.shape[0] for x in data])):
            out.append(self.pack_image(f, x.image_size))
        return out


@attrs.define
class LlavaNextProcessor:
    """Each image becomes ``tokens_for(height, width)`` image tokens carrying its tiles."""
    image_processor: LlavaNextImageProcessor
    image_token_id: int
    pinpoints: tuple
    tile: int
    per_side: int
    image_part: dict = attrs.field(factory=lambda: {"type": "image"})

    @classmethod
    def from_pretrained(cls, *, model, hf_config: dict, preprocessor_config: dict, tokenizer=None,
                        model_dir=None) -> "LlavaNextProcessor":
        proc = LlavaNextImageProcessor.from_config(preprocessor_config)
        if proc.tile != model.tile:
            raise ValueError(f"preprocessor_config.json: tiles of {proc.tile} px do not match the vision tower's "
                             f"image_size {model.tile}")
        if "image_grid_pinpoints" in preprocessor_config and proc.pinpoints != model.pinpoints:
            raise ValueError(f"preprocessor_config.json: image_grid_pinpoints {proc.pinpoints} differ from "
                             f"config.json's {model.pinpoints}")
        proc = attrs.evolve(proc, pinpoints=model.pinpoints)
        return cls(proc, model.image_token_id, model.pinpoints, model.tile, model.per_side)

    def num_tokens(self, height: int, width: int) -> int:
        return anyres_token_count(height, width, self.pinpoints, self.tile, self.per_side)

    def prepare(self, image) -> ImagePrompt:
        pixels: AnyResPixels = self.image_processor(image)
        return ImagePrompt(self.num_tokens(*pixels.image_size), pixels)
