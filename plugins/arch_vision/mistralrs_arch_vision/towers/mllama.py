"""Mllama's tiled ViT (``MllamaVisionModel``): an image arrives as ``max_num_tiles`` tiles of
``image_size`` (padding tiles past its real ones) plus the id of its tile layout.

Per tile: patch conv, a gated per-layout tile embedding, [CLS], a gated mix of a shared
position table and a per-layout per-tile table, LayerNorm. The tokens of all tiles then run
through a local transformer and, after a second gated tile embedding, a gated global one,
each over the whole image at once (tiles see each other). Tile token counts are padded to a
multiple of 8, as the reference does; its attention mask hides only padding keys from
padding queries, so real tokens DO attend padding tokens (reproduced for parity). The
output per token is the global transformer's state concatenated with the local one's
``intermediate_layers_indices`` states: [tiles, 1 + patches, hidden * (1 + len(indices))].
"""
from __future__ import annotations

import attrs
import torch
import torch.nn.functional as F
from torch import nn

from mistralrs_core.layers.activations import get_activation
from mistralrs_core.layers.attention_backends import EncoderBatch, encoder_attention
from mistralrs_core.layers.linear import Linear
from mistralrs_core.layers.norms import LayerNorm


DEFAULT_ASPECT_RATIOS = ((1, 1), (1, 2), (1, 3), (1, 4), (2, 1), (2, 2), (3, 1), (4, 1))


@attrs.frozen
class MllamaVisionConfig:
    hidden_size: int = 1280
    intermediate_size: int = 5120
    num_layers: int = 32
    num_global_layers: int = 8
    num_heads: int = 16
    num_channels: int = 3
    vision_output_dim: int = 7680
    image_size: int = 448
    patch_size: int = 14
    norm_eps: float = 1e-5
    max_num_tiles: int = 4
    hidden_act: str = "gelu"
    intermediate_layers_indices: tuple[int, ...] = (3, 7, 15, 23, 30)
    supported_aspect_ratios: tuple[tuple[int, int], ...] = DEFAULT_ASPECT_RATIOS

    @classmethod
    def from_hf(cls, vc: dict) -> "MllamaVisionConfig":
        d = cls()
        ratios = vc.get("supported_aspect_ratios") or d.supported_aspect_ratios
        return cls(hidden_size=vc.get("hidden_size", d.hidden_size),
                   intermediate_size=vc.get("intermediate_size", d.intermediate_size),
                   num_layers=vc.get("num_hidden_layers", d.num_layers),
                   num_global_layers=vc.get("num_global_layers", d.num_global_layers),
                   num_heads=vc.get("attention_heads", vc.get("num_attention_heads", d.num_heads)),
                   num_channels=vc.get("num_channels", d.num_channels),
                   vision_output_dim=vc.get("vision_output_dim", d.vision_output_dim),
                   image_size=vc.get("image_size", d.image_size),
                   patch_size=vc.get("patch_size", d.patch_size),
                   norm_eps=vc.get("norm_eps", d.norm_eps),
                   max_num_tiles=vc.get("max_num_tiles", d.max_num_tiles),
                   hidden_act=vc.get("hidden_act", d.hidden_act),
                   intermediate_layers_indices=tuple(vc.get("intermediate_layers_indices")
                                                     or d.intermediate_layers_indices),
                   supported_aspect_ratios=tuple(tuple(r) for r in ratios))

    @property
    def tokens_per_tile(self) -> int:
        """[CLS] + patches of one tile (what the text model's keys count per tile)."""
        return (self.image_size // self.patch_size) ** 2 + 1

    @property
    def max_aspect_ratio_id(self) -> int:
        return len(self.supported_aspect_ratios)


def _param(*shape) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, device="meta"), requires_grad=False)


class _Table(nn.Module):
    """An embedding table under its HF name (``...embedding.weight``)."""

    def __init__(self, rows: int, dim: int):
        super().__init__()
        self.weight = _param(rows, dim)


class TileEmbedding(nn.Module):
    """``MllamaPrecomputedAspectRatioEmbedding``: one vector per (layout, tile), gated."""

    def __init__(self, cfg: MllamaVisionConfig):
        super().__init__()
        self.cfg = cfg
        self.embedding = _Table(cfg.max_aspect_ratio_id + 1, cfg.max_num_tiles * cfg.hidden_size)
        self.gate = _param(1)

    def forward(self, h: torch.Tensor, ratio_ids: torch.Tensor) -> torch.Tensor:
        """h [B, tiles, n, hidden]."""
        e = self.embedding.weight[ratio_ids].view(-1, self.cfg.max_num_tiles, 1, self.cfg.hidden_size)
        return h + e * self.gate.tanh()


class GatedPositionEmbedding(nn.Module):
    """``MllamaPrecomputedPositionEmbedding``: (1 - tanh g) * shared + tanh g * per-layout."""

    def __init__(self, cfg: MllamaVisionConfig):
        super().__init__()
        self.cfg = cfg
        n = cfg.tokens_per_tile
        self.embedding = _param(n, cfg.hidden_size)
        self.gate = _param(1)
        self.tile_embedding = _Table(cfg.max_aspect_ratio_id + 1, cfg.max_num_tiles * n * cfg.hidden_size)

    def forward(self, h: torch.Tensor, ratio_ids: torch.Tensor) -> torch.Tensor:
        c, g = self.cfg, self.gate.tanh()
        h = h + (1 - g) * self.embedding.view(1, 1, c.tokens_per_tile, c.hidden_size)
        tiles = self.tile_embedding.weight[ratio_ids].view(-1, c.max_num_tiles, c.tokens_per_tile, c.hidden_size)
        return h + g * tiles


class MllamaVisionAttention(nn.Module):
    def __init__(self, cfg: MllamaVisionConfig):
        super().__init__()
        d = cfg.hidden_size
        self.heads, self.head_dim = cfg.num_heads, d // cfg.num_heads
        self.q_proj = Linear(d, d)
        self.k_proj = Linear(d, d)
        self.v_proj = Linear(d, d)
        self.o_proj = Linear(d, d)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """x [B, S, hidden]; bias [B, 1, S, S] additive."""
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.heads, self.head_dim)
        k = self.k_proj(x).view(b, s, self.heads, self.head_dim)
        v = self.v_proj(x).view(b, s, self.heads, self.head_dim)
        out = encoder_attention(q, k, v, EncoderBatch.padded(), scale=self.head_dim ** -0.5, bias=bias)
        return self.o_proj(out.reshape(b, s, -1))


class MllamaVisionMLP(nn.Module):
    def __init__(self, cfg: MllamaVisionConfig):
        super().__init__()
        self.act = get_activation(cfg.hidden_act)
        self.fc1 = Linear(cfg.hidden_size, cfg.intermediate_size, bias=True)
        self.fc2 = Linear(cfg.intermediate_size, cfg.hidden_size, bias=True)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class MllamaVisionLayer(nn.Module):
    def __init__(self, cfg: MllamaVisionConfig, gated: bool):
        super().__init__()
        self.gated = gated
        self.self_attn = MllamaVisionAttention(cfg)
        self.mlp = MllamaVisionMLP(cfg)
        self.input_layernorm = LayerNorm(cfg.hidden_size, cfg.norm_eps)
        self.post_attention_layernorm = LayerNorm(cfg.hidden_size, cfg.norm_eps)
        if gated:
            self.gate_attn = _param(1)
            self.gate_ffn = _param(1)

    def forward(self, x, bias):
        a = self.self_attn(self.input_layernorm(x), bias)
        x = x + (self.gate_attn.tanh() * a if self.gated else a)
        m = self.mlp(self.post_attention_layernorm(x))
        return x + (self.gate_ffn.tanh() * m if self.gated else m)


class _Encoder(nn.Module):
    def __init__(self, cfg: MllamaVisionConfig, num_layers: int, gated: bool):
        super().__init__()
        self.layers = nn.ModuleList([MllamaVisionLayer(cfg, gated) for _ in range(num_layers)])


class _Conv(nn.Module):
    def __init__(self, cfg: MllamaVisionConfig):
        super().__init__()
        self.weight = _param(cfg.hidden_size, cfg.num_channels, cfg.patch_size, cfg.patch_size)


class MllamaVisionTower(nn.Module):
    """HF names under ``vision_model.``."""

    def __init__(self, cfg: MllamaVisionConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embedding = _Conv(cfg)
        self.class_embedding = _param(cfg.hidden_size)
        self.gated_positional_embedding = GatedPositionEmbedding(cfg)
        self.pre_tile_positional_embedding = TileEmbedding(cfg)
        self.post_tile_positional_embedding = TileEmbedding(cfg)
        self.layernorm_pre = LayerNorm(cfg.hidden_size)
        self.layernorm_post = LayerNorm(cfg.hidden_size)
        self.transformer = _Encoder(cfg, cfg.num_layers, gated=False)
        self.global_transformer = _Encoder(cfg, cfg.num_global_layers, gated=True)

    def _bias(self, tile_mask: torch.Tensor, padded: int, dtype) -> torch.Tensor:
        """[B, 1, S, S]: a large negative where query AND key are padding (padding tiles,
        or the per-tile pad to a multiple of 8), the reference's mask exactly."""
        real = self.cfg.tokens_per_tile
        tok = tile_mask.bool()[:, :, None].expand(-1, -1, padded).clone()
        tok[:, :, real:] = False
        pad = ~tok.reshape(tok.shape[0], -1)
        both = pad[:, :, None] & pad[:, None, :]
        return torch.zeros(both.shape, dtype=dtype, device=both.device).masked_fill(
            both, torch.finfo(dtype).min)[:, None]

    def forward(self, pixels: torch.Tensor, ratio_ids: torch.Tensor, tile_mask: torch.Tensor) -> torch.Tensor:
        """pixels [B, tiles, C, H, W], ratio_ids [B], tile_mask [B, tiles] ->
        [B, tiles, 1 + patches, hidden * (1 + len(intermediate_layers_indices))]."""
        c = self.cfg
        b, tiles = pixels.shape[:2]
        w = self.patch_embedding.weight
        x = F.conv2d(pixels.reshape(b * tiles, *pixels.shape[2:]).to(w.dtype), w, stride=c.patch_size)
        x = x.flatten(2).transpose(1, 2).reshape(b, tiles, -1, c.hidden_size)
        x = self.pre_tile_positional_embedding(x, ratio_ids)
        x = torch.cat([self.class_embedding.expand(b, tiles, 1, -1), x], dim=2)
        x = self.layernorm_pre(self.gated_positional_embedding(x, ratio_ids))
        n = x.shape[2]
        padded = n + (-n) % 8
        x = F.pad(x, (0, 0, 0, padded - n))
        bias = self._bias(tile_mask, padded, x.dtype)
        x = x.reshape(b, tiles * padded, -1)
        wanted = set(c.intermediate_layers_indices)
        kept = {}
        for i, layer in enumerate(self.transformer.layers):
            x = layer(x, bias)
            if i in wanted:
                kept[i] = x
        x = self.layernorm_post(x).view(b, tiles, padded, -1)
        x = self.post_tile_positional_embedding(x, ratio_ids).reshape(b, tiles * padded, -1)
        for layer in self.global_transformer.layers:
            x = layer(x, bias)
        inter = torch.stack([kept[i] for i in c.intermediate_layers_indices], dim=-1)
        inter = inter.reshape(b, tiles, padded, -1)[:, :, :n]
        return torch.cat([x.view(b, tiles, padded, -1)[:, :, :n], inter], dim=-1)
