"""LLaVa (1.5): a CLIP ViT tower, a two-layer projector and a Llama text decoder.

Each image becomes ``tokens_per_image`` placeholder tokens (the tower's patches, plus the
CLS token under the "full" feature strategy) whose embeddings are replaced by the projected
features of ``vision_feature_layer`` (one layer, or several concatenated on the channel
axis). The text side is the core's ``DecoderLM``, so the paged cache, chunked prefill and
prefix cache work unchanged.

Checkpoints come in two layouts (transformers before and after its 4.52 module rename):
``language_model.model.*`` / ``vision_tower.vision_model.*`` and ``model.language_model.*`` /
``model.vision_tower.*``; both map onto one module tree.
"""
from __future__ import annotations

import attrs
import torch
from torch import nn

from mistralrs_core.layers.activations import get_activation
from mistralrs_core.layers.linear import Linear
from mistralrs_core.models.decoder import DecoderLM
from mistralrs_core.models.text_config import base_config

from mistralrs_arch_vision.family import VisionFamilyMixin
from mistralrs_arch_vision.pipeline import ImagePrompt
from mistralrs_arch_vision.processors.clip import CLIPImageProcessor
from mistralrs_arch_vision.towers.clip import CLIPVisionConfig, CLIPVisionTower

# transformers' LlamaConfig defaults: hub LLaVa configs list only what differs from them.
LLAMA_TEXT_DEFAULTS = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                           num_attention_heads=32, hidden_act="silu", max_position_embeddings=2048,
                           rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False)
_TEXT_TYPES = ("llama", None)


def text_config_of(hf: dict) -> dict:
    text = dict(hf.get("text_config") or {})
    if text.get("model_type") not in _TEXT_TYPES:
        raise ValueError(f"text_config.model_type: LLaVa with a {text['model_type']!r} text model is not "
                         f"supported yet (Llama text only)")
    return {**LLAMA_TEXT_DEFAULTS, **text}


def feature_layers_of(hf: dict) -> list[int]:
    layer = hf.get("vision_feature_layer", -2)
    return [int(layer)] if isinstance(layer, int) else [int(x) for x in layer]


class LlavaProjector(nn.Module):
    def __init__(self, vision_dim: int, text_dim: int, act: str, bias: bool):
        super().__init__()
        self.linear_1 = Linear(vision_dim, text_dim, bias=bias)
        self.act = get_activation(act)
        self.linear_2 = Linear(text_dim, text_dim, bias=bias)

    def forward(self, x):
        return self.linear_2(self.act(self.linear_1(x)))


_PREFIXES = (  # checkpoint prefix -> module-tree prefix (first match wins)
    ("model.language_model.", "model."),
    ("language_model.model.", "model."),
    ("language_model.lm_head.", "lm_head."),
    ("model.vision_tower.vision_model.", "vision_tower."),
    ("vision_tower.vision_model.", "vision_tower."),
    ("model.vision_tower.", "vision_tower."),
    ("vision_tower.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("multi_modal_projector.", "multi_modal_projector."),
)


class LlavaForConditionalGeneration(VisionFamilyMixin, DecoderLM):
    checkpoint_prefixes = _PREFIXES
    compiled_towers = ("vision_tower",)
    ignored_weight_suffixes = ("rotary_emb.inv_freq", "position_ids")

    @classmethod
    def from_hf_config(cls, hf: dict, dtype: torch.dtype = torch.float32) -> "LlavaForConditionalGeneration":
        text = text_config_of(hf)
        model = cls(cls.config_from_hf(text), dtype)
        vision = CLIPVisionConfig.from_hf(hf.get("vision_config") or {})
        layers = feature_layers_of(hf)
        strategy = hf.get("vision_feature_select_strategy", "default")
        if strategy not in ("default", "full"):
            raise ValueError(f"vision_feature_select_strategy: {strategy!r} is not 'default' or 'full'")
        model.vision_tower = CLIPVisionTower(vision, layers)
        model.multi_modal_projector = LlavaProjector(
            vision.hidden_size * len(layers), model.cfg.hidden_size, hf.get("projector_hidden_act", "gelu"),
            bool(hf.get("multimodal_projector_bias", True)))
        model.drop_cls = strategy == "default"
        model.image_token_id = int(hf.get("image_token_id", hf.get("image_token_index", 32000)))
        model.tokens_per_image = vision.num_patches + (0 if model.drop_cls else 1)
        return model

    @classmethod
    def config_from_hf(cls, text: dict):
        bias = bool(text.get("attention_bias", False))
        return base_config(text, qkv_bias=bias, o_bias=bias, mlp_bias=bool(text.get("mlp_bias", False)))

    def map_weight_name(self, name):
        name = self.rename_checkpoint(name)
        if name.startswith("vision_tower.") and not self.vision_tower.keeps_weight(name[len("vision_tower."):]):
            return None
        return super().map_weight_name(name)

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> projected features [B, tokens_per_image, text hidden]."""
        states = self.vision_tower(pixels.to(device=self.lm_device, dtype=self.dtype))
        if self.drop_cls:
            states = [s[:, 1:] for s in states]
        return self.multi_modal_projector(torch.cat(states, dim=-1))

    def encode_features(self, spans):
        # All images of the step in one tower call (they share one crop size).
        feats = self.image_features(torch.stack([s.data for s in spans]))
        return list(feats)


@attrs.define
class LlavaProcessor:
    """The family's half of the pipeline: the template's placeholder and what each image
    expands to (``tokens_per_image`` image tokens carrying one pixel tensor)."""
    image_processor: CLIPImageProcessor
    image_token_id: int
    tokens_per_image: int
    image_part: dict = attrs.field(factory=lambda: {"type": "image"})

    @classmethod
    def from_pretrained(cls, *, model, hf_config: dict, preprocessor_config: dict, tokenizer=None,
                        model_dir=None) -> "LlavaProcessor":
        proc = CLIPImageProcessor.from_config(preprocessor_config)
        size = model.vision_tower.cfg.image_size
        if proc.do_center_crop and proc.crop_size != (size, size):
            raise ValueError(f"preprocessor_config.json: crop_size {proc.crop_size} does not match the vision "
                             f"tower's image_size {size}")
        return cls(proc, model.image_token_id, model.tokens_per_image)

    def prepare(self, image) -> ImagePrompt:
        return ImagePrompt(self.tokens_per_image, self.image_processor(image))
