"""Phi-3-vision / Phi-3.5-vision: CLIP ViT-L/14-336 over HD crops, a 2x2 patch merge with
learned row separators, an MLP projector, and the Phi-3 text decoder.

There is no transformers implementation; the behaviour is Microsoft's hub code
(``image_embedding_phi3_v.py``, ``processing_phi3_v.py``), as upstream mistral.rs and vLLM
also implement it:

* every crop of an image (the 336 px global image first, then the HD crops row-major,
  ``processors/phi3v.py``) goes through CLIP; the features are the hidden states of
  ``img_processor.layer_idx`` (-2) without the CLS row;
* each crop's 24 x 24 patches are merged 2 x 2 into 12 x 12 rows of 4 x the width; the
  crops are laid out as one (rows * 12) x (cols * 12) map, and every map row is ended by
  ``sub_GN``; the global image is treated the same as a 1 x 1 map;
* ``hd_transform_order`` "sub_glb" (the released checkpoints) gives [crops, ``glb_GN``,
  global], "glb_sub" the other way round; the rows go through ``img_projection``
  (Linear, GELU, Linear).

The text side is the core ``DecoderLM`` with Phi-3's fused ``qkv_proj`` / ``gate_up_proj``
and LongRoPE ("su" in Phi-3-vision's config, "longrope" in Phi-3.5's). Microsoft's
checkpoint keeps everything under ``model.``: ``model.vision_embed_tokens.img_processor.
vision_model.*`` (a full ``CLIPVisionModel``), ``model.vision_embed_tokens.glb_GN`` /
``sub_GN`` / ``img_projection.{0,2}``, ``model.layers.*``.

Prompts: the hub writes images as ``<|image_N|>`` tags in the text and expands each into
negative ids; here the tag becomes a run of the tokenizer's ``<|image|>`` token (id 32044 in
the released tokenizers), one ``FeatureSpan`` per tag. Chat templates of this family take
content as a string, so a message's parts are written as one string (``message_text``): its
image parts become ``<|image_N|>`` tags in front of its text unless the text already holds
tags, as upstream mistral.rs prefixes them.
"""
from __future__ import annotations

import re

import attrs
import torch
from torch import nn

from mistralrs_core.engine.step import FeatureSpan
from mistralrs_core.layers.linear import Linear
from mistralrs_core.models.decoder import DecoderLM
from mistralrs_core.models.text_config import base_config
from mistralrs_core.pipeline.text import Prompt
from mistralrs_core.tokenization.prompt import encode_prompt

from mistralrs_arch_vision.family import VisionFamilyMixin
from mistralrs_arch_vision.pipeline import ImagePrompt
from mistralrs_arch_vision.processors.phi3v import CROP, Phi3VImageProcessor, Phi3VPixels, image_token_count
from mistralrs_arch_vision.towers.clip import CLIPVisionConfig, CLIPVisionTower

# What the hub's image_embedding_phi3_v.py hard-codes (config.json does not carry it).
CLIP_VIT_L_14_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                         image_size=336, patch_size=14, num_channels=3, layer_norm_eps=1e-5,
                         hidden_act="quick_gelu")
IMAGE_TOKEN = "<|image|>"
IMAGE_TAG = re.compile(r"<\|image_(\d+)\|>")
_ORDERS = ("sub_glb", "glb_sub")


def _meta_param(*shape) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, device="meta"), requires_grad=False)


class Phi3VImageProjector(nn.Module):
    """``glb_GN``, ``sub_GN`` and ``img_projection`` under the hub's names: CLIP patch
    features of one image's crops -> its feature rows in the text width."""

    def __init__(self, dim: int, text_dim: int, per_side: int, order: str):
        super().__init__()
        self.per_side = per_side            # patches per crop side before the 2x2 merge
        self.order = order
        self.glb_GN = _meta_param(1, 1, 4 * dim)
        self.sub_GN = _meta_param(1, 1, 1, 4 * dim)
        self.img_projection = nn.Sequential(Linear(4 * dim, text_dim, bias=True), nn.GELU(),
                                            Linear(text_dim, text_dim, bias=True))

    def merged_map(self, feats: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
        """[rows * cols, p*p, C] crop features (row-major) -> one [rows * q, cols * q, 4C]
        map, q = p / 2; each merged row holds its 2 x 2 patches as (row, col, channel)."""
        p, c, q = self.per_side, feats.shape[-1], self.per_side // 2
        merged = feats.reshape(rows * cols, q, 2, q, 2, c).permute(0, 1, 3, 2, 4, 5).reshape(rows, cols, q, q, 4 * c)
        return merged.permute(0, 2, 1, 3, 4).reshape(rows * q, cols * q, 4 * c)

    def with_row_ends(self, grid: torch.Tensor) -> torch.Tensor:
        h, _, d = grid.shape
        return torch.cat([grid, self.sub_GN.to(grid.dtype).reshape(1, 1, d).expand(h, 1, d)], dim=1).reshape(-1, d)

    def forward(self, feats: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """feats [1 + rows * cols, p*p, C] (global first) -> [image_token_count, text hidden]."""
        rows, cols = grid
        if feats.shape[0] != 1 + rows * cols:
            raise ValueError(f"image of {rows}x{cols} crops: {feats.shape[0]} crops given, expected {1 + rows * cols}")
        glb = self.with_row_ends(self.merged_map(feats[:1], 1, 1))
        sub = self.with_row_ends(self.merged_map(feats[1:], rows, cols))
        sep = self.glb_GN.to(feats.dtype).reshape(1, -1)
        parts = [sub, sep, glb] if self.order == "sub_glb" else [glb, sep, sub]
        return self.img_projection(torch.cat(parts))


def _vision_config(hf: dict) -> CLIPVisionConfig:
    """The tower: CLIP ViT-L/14-336 as the hub code fixes it; a ``vision_config`` in config.json
    (our tiny test models) overrides it."""
    proc = hf.get("img_processor")
    if not isinstance(proc, dict):
        raise ValueError("config.json: img_processor must be an object (Phi-3-vision's CLIP settings)")
    if proc.get("name", "clip_vision_model") != "clip_vision_model":
        raise ValueError(f"img_processor.name: {proc.get('name')!r} is not supported (clip_vision_model)")
    return CLIPVisionConfig.from_hf({**CLIP_VIT_L_14_336, **(hf.get("vision_config") or {})})


def _embd_layer(hf: dict) -> str:
    embd = hf.get("embd_layer") or {}
    if not isinstance(embd, dict):
        raise ValueError("config.json: embd_layer must be an object")
    if not (embd.get("use_hd_transform") and embd.get("with_learnable_separator")):
        raise ValueError("embd_layer: only the HD transform with learnable separators (use_hd_transform and "
                         "with_learnable_separator true, as Phi-3-vision ships) is supported")
    if embd.get("projection_cls", "linear") != "mlp":
        raise ValueError(f"embd_layer.projection_cls: {embd.get('projection_cls', 'linear')!r} is not supported "
                         f"(mlp)")
    order = embd.get("hd_transform_order", "glb_sub")     # the hub code's default
    if order not in _ORDERS:
        raise ValueError(f"embd_layer.hd_transform_order: {order!r} is not one of {list(_ORDERS)}")
    return order


class Phi3VForCausalLM(VisionFamilyMixin, DecoderLM):
    compiled_towers = ("vision_tower",)
    ignored_weight_suffixes = ("rotary_emb.inv_freq", "position_ids")

    @classmethod
    def from_hf_config(cls, hf: dict, dtype: torch.dtype = torch.float32) -> "Phi3VForCausalLM":
        model = cls(cls.config_from_hf(hf), dtype)
        vision = _vision_config(hf)
        proc = hf["img_processor"]
        if vision.image_size != CROP:
            raise ValueError(f"vision_config.image_size: {vision.image_size}; Phi-3-vision's crops are {CROP} px")
        per_side = vision.image_size // vision.patch_size
        if per_side % 2:
            raise ValueError(f"vision_config: {per_side} patches per side cannot be merged 2x2")
        dim = int(proc.get("image_dim_out", vision.hidden_size))
        if dim != vision.hidden_size:
            raise ValueError(f"img_processor.image_dim_out: {dim} differs from the CLIP width {vision.hidden_size}")
        if proc.get("type_feature", "patch") != "patch":
            raise ValueError(f"img_processor.type_feature: {proc.get('type_feature')!r} is not supported (patch)")
        model.vision_tower = CLIPVisionTower(vision, [int(proc.get("layer_idx", -2))])
        model.image_embed = Phi3VImageProjector(dim, model.cfg.hidden_size, per_side, _embd_layer(hf))
        model.merged_side = per_side // 2
        return model

    @classmethod
    def config_from_hf(cls, hf: dict):
        return base_config(hf, qkv_fused=True, mlp_fused=True, sliding_window=hf.get("sliding_window"))

    def map_weight_name(self, name):
        for prefix in ("model.vision_embed_tokens.", "vision_embed_tokens."):
            if not name.startswith(prefix):
                continue
            rest = name[len(prefix):]
            if rest.startswith("img_processor.vision_model."):
                rest = rest[len("img_processor.vision_model."):]
                return "vision_tower." + rest if self.vision_tower.keeps_weight(rest) else None
            if rest.startswith("wte."):
                return None      # the text embedding again (shared in the hub's module tree)
            return "image_embed." + rest
        return super().map_weight_name(name)

    def tokens_for(self, height: int, width: int) -> int:
        """Feature rows of an image whose padded HD size is ``height`` x ``width``."""
        return image_token_count(height, width, self.merged_side)

    def encode_features(self, spans):
        # Every crop of every image of the step in one tower call (all are 336 x 336).
        data: list[Phi3VPixels] = [s.data for s in spans]
        crops = torch.cat([d.crops for d in data]).to(device=self.lm_device, dtype=self.dtype)
        feats = self.vision_tower(crops)[0][:, 1:]
        out = []
        for d, f in zip(data, feats.split([d.crops.shape[0] for d in data])):
            out.append(self.image_embed(f, d.grid))
        return out


@attrs.define
class Phi3VProcessor:
    """``<|image_N|>`` tags -> runs of ``<|image|>`` tokens, one span per tag; the prompt is
    tokenized piece by piece between tags, each piece with the tokenizer's special tokens,
    as the hub's processor does (so a BOS-adding tokenizer starts every piece with BOS)."""
    image_processor: Phi3VImageProcessor
    tokenizer: object
    image_token_id: int
    merged_side: int = 12
    image_part: dict = attrs.field(factory=lambda: {"type": "image"})

    @classmethod
    def from_pretrained(cls, *, model, hf_config: dict, preprocessor_config: dict, tokenizer=None,
                        model_dir=None) -> "Phi3VProcessor":
        if tokenizer is None:
            raise ValueError("Phi-3-vision's processor needs the tokenizer (prompts are split at image tags)")
        token_id = tokenizer.token_to_id(IMAGE_TOKEN)
        if token_id is None:
            raise ValueError(f"tokenizer: no {IMAGE_TOKEN!r} token to stand for image features")
        return cls(Phi3VImageProcessor.from_config(preprocessor_config), tokenizer, token_id, model.merged_side)

    def prepare(self, image) -> ImagePrompt:
        pixels = self.image_processor(image)
        return ImagePrompt(image_token_count(*pixels.image_size, self.merged_side), pixels)

    def message_text(self, parts: list[dict], before: dict[str, int]) -> str:
        """One message's parts as the string the template takes: its text parts joined by a
        space, preceded by a tag for each of its images (numbered after the ``before``
        ones) unless the text already tags images itself."""
        text = " ".join(p["text"] for p in parts if p.get("type") == "text")
        n = sum(1 for p in parts if p.get("type") == "image")
        if n == 0 or IMAGE_TAG.search(text):
            return text
        first = before.get("image", 0) + 1
        return "".join(f"<|image_{k}|>" for k in range(first, first + n)) + text

    def expand_prompt(self, text: str, images, audios=()) -> Prompt:
        if audios:
            raise ValueError("messages: Phi-3-vision takes no audio parts")
        if not images:
            return Prompt(encode_prompt(self.tokenizer, text), [])
        tags = [int(m.group(1)) for m in IMAGE_TAG.finditer(text)]
        if sorted(set(tags)) != list(range(1, len(images) + 1)):
            raise ValueError(f"messages: the prompt's image tags {['<|image_%d|>' % t for t in tags]} do not "
                             f"number its {len(images)} image(s) as <|image_1|> .. <|image_{len(images)}|>")
        prepared = [self.prepare(img.image) for img in images]
        pieces = IMAGE_TAG.split(text)[::2]        # split() also returns each tag's number
        ids: list[int] = []
        spans = []
        for k, piece in enumerate(pieces):
            ids += self.tokenizer.encode(piece, add_special_tokens=True)
            if k < len(tags):
                i = tags[k] - 1
                p = prepared[i]
                spans.append(FeatureSpan(start=len(ids), length=p.num_tokens, data=p.data,
                                         content_hash=images[i].content_hash))
                ids += [self.image_token_id] * p.num_tokens
        return Prompt(ids, spans)
