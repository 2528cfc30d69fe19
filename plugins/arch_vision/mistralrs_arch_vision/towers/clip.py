"""The CLIP ViT vision tower (pre-LN transformer over [CLS] + patches), as LLaVa and
others use it: HF module names under the tower's prefix (``embeddings``, ``pre_layrnorm``,
``encoder.layers.N``, ``post_layernorm``).

Families ask for the hidden states of one or more layers (``vision_feature_layer``), so the
tower builds only the layers up to the deepest one asked for; the checkpoint's deeper
layers are dropped at load.
"""
from __future__ import annotations

import attrs
import torch
import torch.nn.functional as F
from torch import nn

from mistralrs_core.layers.attention_backends import EncoderBatch
from mistralrs_core.layers.norms import LayerNorm

from mistralrs_arch_vision.towers.compiled import maybe_compile_encoder
from mistralrs_arch_vision.towers.vit import ViTEncoder


@attrs.frozen
class CLIPVisionConfig:
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_layers: int = 12
    num_heads: int = 12
    image_size: int = 224
    patch_size: int = 32
    num_channels: int = 3
    layer_norm_eps: float = 1e-5
    hidden_act: str = "quick_gelu"

    @classmethod
    def from_hf(cls, vc: dict) -> "CLIPVisionConfig":
        """``vision_config`` of a checkpoint; absent keys take CLIPVisionConfig's defaults,
        as hub configs omit them."""
        d = cls()
        return cls(hidden_size=vc.get("hidden_size", d.hidden_size),
                   intermediate_size=vc.get("intermediate_size", d.intermediate_size),
                   num_layers=vc.get("num_hidden_layers", d.num_layers),
                   num_heads=vc.get("num_attention_heads", d.num_heads),
                   image_size=vc.get("image_size", d.image_size),
                   patch_size=vc.get("patch_size", d.patch_size),
                   num_channels=vc.get("num_channels", d.num_channels),
                   layer_norm_eps=vc.get("layer_norm_eps", d.layer_norm_eps),
                   hidden_act=vc.get("hidden_act", d.hidden_act))

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


def _param(*shape) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, device="meta"), requires_grad=False)


class _Weight(nn.Module):
    """A bare ``weight`` holder (position table, conv kernel) under its HF name."""

    def __init__(self, *shape):
        super().__init__()
        self.weight = _param(*shape)


class CLIPVisionEmbeddings(nn.Module):
    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        self.cfg = cfg
        self.class_embedding = _param(cfg.hidden_size)
        self.patch_embedding = _Weight(cfg.hidden_size, cfg.num_channels, cfg.patch_size, cfg.patch_size)
        self.position_embedding = _Weight(cfg.num_patches + 1, cfg.hidden_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, 1 + patches, hidden]."""
        p = self.cfg.patch_size
        patches = F.conv2d(pixels.to(self.patch_embedding.weight.dtype), self.patch_embedding.weight, stride=p)
        patches = patches.flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(patches.shape[0], 1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight


class CLIPVisionTower(nn.Module):
    """``hidden_states(pixels, layers)`` returns the states the reference lists as
    ``hidden_states[i]``: index 0 is the embeddings after ``pre_layrnorm``, index i the output
    of encoder layer i; negative indices count from the full depth of the checkpoint."""

    def __init__(self, cfg: CLIPVisionConfig, feature_layers: list[int]):
        super().__init__()
        self.cfg = cfg
        depth = cfg.num_layers
        self.feature_layers = [i if i >= 0 else depth + 1 + i for i in feature_layers]
        if not all(0 <= i <= depth for i in self.feature_layers):
            raise ValueError(f"vision_feature_layer: {feature_layers} is outside the tower's "
                             f"{depth} layers")
        self.built_layers = max(self.feature_layers)
        self.embeddings = CLIPVisionEmbeddings(cfg)
        self.pre_layrnorm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps)
        self.encoder = ViTEncoder(self.built_layers, cfg.hidden_size, cfg.intermediate_size, cfg.num_heads,
                                  cfg.layer_norm_eps, cfg.hidden_act)
        self.frozen = None   # a FrozenEncoder after ``compile_encoder``

    def compile_encoder(self) -> None:
        """Compile the encoder layers for this tower's one image size (see towers/compiled.py)."""
        self.frozen = maybe_compile_encoder(list(self.encoder.layers), tuple(sorted(set(self.feature_layers))),
                                            self.cfg.num_patches + 1, self.cfg.hidden_size)

    def keeps_weight(self, name: str) -> bool:
        """Whether a tower-relative checkpoint name is one this tower holds (the layers past
        the deepest feature layer and the unused ``post_layernorm`` are not built)."""
        if name.startswith("post_layernorm."):
            return False
        if name.startswith("encoder.layers."):
            return int(name.split(".")[2]) < self.built_layers
        return True

    def forward(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        """[B, C, H, W] -> the selected hidden states, each [B, 1 + patches, hidden]."""
        b = pixels.shape[0]
        h = self.pre_layrnorm(self.embeddings(pixels))
        n = h.shape[1]
        if self.frozen is not None and self.frozen.fits(h):
            states = dict(zip(self.frozen.keep, self.frozen(h)))
            return [states[i] for i in self.feature_layers]
        # Every image has the same number of tokens: the backend reshapes, no mask.
        batch = EncoderBatch.packed([n] * b)
        h = h.reshape(b * n, -1)
        wanted = set(self.feature_layers)
        states = {0: h} if 0 in wanted else {}
        for i, layer in enumerate(self.encoder.layers, start=1):
            h = layer(h, batch)
            if i in wanted:
                states[i] = h
        return [states[i].view(b, n, -1) for i in self.feature_layers]
