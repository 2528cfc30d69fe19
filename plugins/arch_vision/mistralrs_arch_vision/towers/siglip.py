"""The SigLIP vision transformer and Gemma 3's projector from its patches to text embeddings.

Module names equal transformers' ``SiglipVisionModel`` (``embeddings.patch_embedding``,
``encoder.layers.N.self_attn.q_proj`` ...), so a checkpoint loads by name through
``mistralrs_core.loading.weights.load_module``. Families that nest the tower (Gemma 3 keeps it
at ``vision_tower.vision_model.*``) strip their prefix in their own ``map_weight_name``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mistralrs_core.layers.attention_backends import EncoderBatch, encoder_attention
from mistralrs_core.layers.linear import Embedding, Linear
from mistralrs_core.layers.norms import LayerNorm, RMSNorm

from mistralrs_arch_vision.towers.compiled import maybe_compile_encoder
from mistralrs_arch_vision.towers.vit import ViTEncoder, ViTMLP


def _side(value) -> int:
    """HF allows ``image_size``/``patch_size`` as an int or an (h, w) pair; SigLIP is square."""
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ValueError(f"vision_config: non-square size {value} is not supported")
        return int(value[0])
    return int(value)


@dataclass(frozen=True)
class SiglipTowerConfig:
    """The fields of an HF SigLIP ``vision_config``; defaults equal transformers'
    ``SiglipVisionConfig`` so a config.json that omits a default reads the same."""
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 16
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6
    vision_use_head: bool = True

    @classmethod
    def from_hf(cls, vision_config: dict) -> "SiglipTowerConfig":
        d = dict(vision_config)
        kwargs = {}
        for name in cls.__dataclass_fields__:
            if d.get(name) is not None:
                kwargs[name] = d[name]
        for name in ("image_size", "patch_size"):
            if name in kwargs:
                kwargs[name] = _side(kwargs[name])
        cfg = cls(**kwargs)
        if cfg.hidden_size % cfg.num_attention_heads:
            raise ValueError(f"vision_config: hidden_size {cfg.hidden_size} is not a multiple of "
                             f"num_attention_heads {cfg.num_attention_heads}")
        return cfg

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.patches_per_side ** 2

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


class PatchEmbedding(nn.Module):
    """A stride-``patch`` convolution (HF's ``nn.Conv2d``), parameters on meta until loaded."""

    def __init__(self, in_channels: int, out_channels: int, patch: int):
        super().__init__()
        self.patch = patch
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, patch, patch, device="meta"),
                                   requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_channels, device="meta"), requires_grad=False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return F.conv2d(pixel_values, self.weight, self.bias, stride=self.patch)


class SiglipEmbeddings(nn.Module):
    def __init__(self, cfg: SiglipTowerConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embedding = PatchEmbedding(cfg.num_channels, cfg.hidden_size, cfg.patch_size)
        self.position_embedding = Embedding(cfg.num_patches, cfg.hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, num_patches, D] (row-major patch order, as HF's flatten)."""
        h, w = pixel_values.shape[-2:]
        if h != self.cfg.image_size or w != self.cfg.image_size:
            # The learned positions cover exactly image_size / patch_size patches a side;
            # other sizes would need interpolated positions, which no supported family uses.
            raise ValueError(f"SigLIP tower expects {self.cfg.image_size}x{self.cfg.image_size} images, "
                             f"got {h}x{w}")
        dtype = self.patch_embedding.weight.dtype
        patches = self.patch_embedding(pixel_values.to(dtype)).flatten(2).transpose(1, 2)
        positions = torch.arange(self.cfg.num_patches, device=patches.device)
        return patches + self.position_embedding(positions).to(patches.dtype)


class PoolingAttention(nn.Module):
    """The parameters of torch's ``nn.MultiheadAttention`` as HF's head stores them
    (``in_proj_weight`` [3D, D] stacked q/k/v, ``out_proj``), computed by the encoder backend."""

    def __init__(self, cfg: SiglipTowerConfig):
        super().__init__()
        d = cfg.hidden_size
        self.num_heads = cfg.num_attention_heads
        self.head_dim = cfg.head_dim
        self.in_proj_weight = nn.Parameter(torch.empty(3 * d, d, device="meta"), requires_grad=False)
        self.in_proj_bias = nn.Parameter(torch.empty(3 * d, device="meta"), requires_grad=False)
        self.out_proj = Linear(d, d, bias=True)

    def forward(self, query: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """query [B, Sq, D] attends over x [B, S, D]."""
        wq, wk, wv = self.in_proj_weight.chunk(3)
        bq, bk, bv = self.in_proj_bias.chunk(3)
        b, sq, _ = query.shape
        q = F.linear(query, wq, bq).view(b, sq, self.num_heads, self.head_dim)
        k = F.linear(x, wk, bk).view(b, x.shape[1], self.num_heads, self.head_dim)
        v = F.linear(x, wv, bv).view(b, x.shape[1], self.num_heads, self.head_dim)
        out = encoder_attention(q, k, v, EncoderBatch.padded(), scale=self.head_dim ** -0.5)
        return self.out_proj(out.reshape(b, sq, -1))


class SiglipPoolingHead(nn.Module):
    """SigLIP's attention-pooling head: a learned probe reads the patches -> one vector per image."""

    def __init__(self, cfg: SiglipTowerConfig):
        super().__init__()
        self.probe = nn.Parameter(torch.empty(1, 1, cfg.hidden_size, device="meta"), requires_grad=False)
        self.attention = PoolingAttention(cfg)
        self.layernorm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = ViTMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.attention(self.probe.to(x.dtype).expand(x.shape[0], -1, -1), x)
        h = h + self.mlp(self.layernorm(h))
        return h[:, 0]


class SiglipVisionTower(nn.Module):
    """SigLIP ViT: patches -> pre-norm encoder layers -> ``post_layernorm`` (-> pooling head).

    Args:
        cfg: the tower's config (``SiglipTowerConfig.from_hf(config["vision_config"])``).
        use_head: build the attention-pooling head; default ``cfg.vision_use_head``
            (Gemma 3's tower has none).
        num_layers: build only the first ``num_layers`` encoder layers, for a family that reads
            an intermediate layer and never needs the rest (their weights are then dropped
            at load); default all of them.
    """

    ignored_weight_suffixes = ("position_ids",)

    def __init__(self, cfg: SiglipTowerConfig, use_head: bool | None = None, num_layers: int | None = None,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        self.cfg = cfg
        self.dtype = dtype
        self.num_layers = cfg.num_hidden_layers if num_layers is None else num_layers
        if not 0 <= self.num_layers <= cfg.num_hidden_layers:
            raise ValueError(f"num_layers {num_layers} outside [0, {cfg.num_hidden_layers}]")
        self.embeddings = SiglipEmbeddings(cfg)
        self.encoder = ViTEncoder(self.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads,
                                  cfg.layer_norm_eps, cfg.hidden_act)
        self.post_layernorm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.head = SiglipPoolingHead(cfg) if (cfg.vision_use_head if use_head is None else use_head) else None
        self.frozen = None   # a FrozenEncoder after ``compile_encoder``

    def compile_encoder(self, feature_layer: int | None = None) -> None:
        """Compile the encoder layers ``forward(..., feature_layer)`` runs, for this tower's
        one image size (see towers/compiled.py)."""
        n = self.num_layers if feature_layer is None else self._layers_for(feature_layer)
        self.frozen = maybe_compile_encoder(list(self.encoder.layers), (n,), self.cfg.num_patches,
                                            self.cfg.hidden_size)

    def map_weight_name(self, name: str) -> str | None:
        """Checkpoint name -> module name: standalone SigLIP checkpoints nest the tower under
        ``vision_model.`` next to a text model we do not build; a head or layers we did not
        build are dropped."""
        if name.startswith("vision_model."):
            name = name[len("vision_model."):]
        elif name.startswith(("text_model.", "logit_scale", "logit_bias")):
            return None
        if name.startswith("head.") and self.head is None:
            return None
        if name.startswith("encoder.layers."):
            if int(name.split(".", 3)[2]) >= self.num_layers:
                return None
        return name

    def _layers_for(self, feature_layer: int) -> int:
        """How many encoder layers HF's ``hidden_states[feature_layer]`` has passed through
        (index 0 is the embeddings; negative indices count from the end)."""
        total = self.cfg.num_hidden_layers
        n = feature_layer if feature_layer >= 0 else total + 1 + feature_layer
        if not 0 <= n <= total:
            raise ValueError(f"feature_layer {feature_layer} outside [-{total + 1}, {total}]")
        if n > self.num_layers:
            raise ValueError(f"feature_layer {feature_layer} needs {n} layers but only "
                             f"{self.num_layers} were built")
        return n

    def forward(self, pixel_values: torch.Tensor, feature_layer: int | None = None) -> torch.Tensor:
        """Patch features of a batch of same-size images.

        Args:
            pixel_values: [B, C, image_size, image_size], processed as the family's image
                processor does.
            feature_layer: None for HF's ``last_hidden_state`` (every layer, then
                ``post_layernorm``); an int k for HF's ``hidden_states[k]`` (after k layers,
                no final norm; -1 is the last layer's output, -2 the one before, as LLaVA's
                ``vision_feature_layer``).
        Returns:
            [B, num_patches, hidden_size] in the tower's dtype.
        """
        if pixel_values.dim() != 4:
            raise ValueError(f"pixel_values must be [B, C, H, W], got {tuple(pixel_values.shape)}")
        n = self.num_layers if feature_layer is None else self._layers_for(feature_layer)
        if feature_layer is None and self.num_layers != self.cfg.num_hidden_layers:
            raise ValueError("last_hidden_state needs every layer; this tower was built with "
                             f"{self.num_layers} of {self.cfg.num_hidden_layers}")
        x = self.embeddings(pixel_values)
        if self.frozen is not None and n in self.frozen.keep and self.frozen.fits(x):
            x = self.frozen(x)[self.frozen.keep.index(n)]
            return self.post_layernorm(x) if feature_layer is None else x
        # Every image has the same patch count: the backend runs the batch as one padded call
        # with no mask.
        batch = EncoderBatch.padded()
        for layer in self.encoder.layers[:n]:
            x = layer(x, batch)
        return self.post_layernorm(x) if feature_layer is None else x

    def pool(self, last_hidden_state: torch.Tensor) -> torch.Tensor:
        """HF's ``pooler_output``: [B, hidden_size] from ``forward``'s last hidden state."""
        if self.head is None:
            raise ValueError("this SigLIP tower was built without its pooling head")
        return self.head(last_hidden_state)


class Gemma3MultiModalProjector(nn.Module):
    """Gemma 3: SigLIP patches -> ``mm_tokens_per_image`` soft tokens in the text model's space.

    Average-pools the square patch grid down to sqrt(mm_tokens_per_image) a side, normalises
    with Gemma's RMSNorm (x * (1 + w), in float32), and multiplies by
    ``mm_input_projection_weight`` [vision_hidden, text_hidden] (stored input-major, so it is
    a plain matmul, not a Linear). Checkpoint names: ``multi_modal_projector.*``."""

    def __init__(self, vision_hidden: int, text_hidden: int, patches_per_side: int,
                 mm_tokens_per_image: int, eps: float = 1e-6):
        super().__init__()
        tokens_per_side = int(round(mm_tokens_per_image ** 0.5))
        if tokens_per_side ** 2 != mm_tokens_per_image or patches_per_side % tokens_per_side:
            raise ValueError(f"mm_tokens_per_image {mm_tokens_per_image} must be a square whose side "
                             f"divides the {patches_per_side}-patch grid")
        self.patches_per_side = patches_per_side
        self.kernel = patches_per_side // tokens_per_side
        self.mm_input_projection_weight = nn.Parameter(
            torch.empty(vision_hidden, text_hidden, device="meta"), requires_grad=False)
        self.mm_soft_emb_norm = RMSNorm(vision_hidden, eps=eps, offset=1.0)

    @classmethod
    def from_hf(cls, config: dict) -> "Gemma3MultiModalProjector":
        """From a Gemma 3 config.json (``vision_config``, ``text_config``, ``mm_tokens_per_image``)."""
        vision = SiglipTowerConfig.from_hf(config.get("vision_config") or {})
        text_hidden = (config.get("text_config") or {}).get("hidden_size", 2304)  # Gemma3TextConfig default
        return cls(vision.hidden_size, text_hidden, vision.patches_per_side,
                   config.get("mm_tokens_per_image") or 256, eps=vision.layer_norm_eps)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        """[B, patches_per_side**2, vision_hidden] -> [B, mm_tokens_per_image, text_hidden]."""
        b, n, d = patches.shape
        side = self.patches_per_side
        if n != side * side:
            raise ValueError(f"expected {side * side} patches per image, got {n}")
        grid = patches.transpose(1, 2).reshape(b, d, side, side)
        pooled = F.avg_pool2d(grid, kernel_size=self.kernel, stride=self.kernel).flatten(2).transpose(1, 2)
        normed = self.mm_soft_emb_norm(pooled)
        return torch.matmul(normed, self.mm_input_projection_weight).to(patches.dtype)
