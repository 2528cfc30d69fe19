"""The Llama 4 vision tower: square tiles of ``image_size`` pixels, each cut into patches by an
unfold + bias-free linear, a class token appended (last), learned positions, a pre layer
norm, pre-norm encoder layers with 2-D rope over the patch grid (the class token unrotated),
a post layer norm, then the class token dropped and the vision adapter: pixel shuffle (each
2x2 block of patch vectors -> one vector, the layout below) and fc1-gelu-fc2-gelu.

Every tile has the same size, so tiles run as one padded-free batch [N, S, D]."""
from __future__ import annotations

import attrs
import torch
import torch.nn.functional as F
from torch import nn

from mistralrs_core.layers.linear import Linear
from mistralrs_core.layers.norms import LayerNorm


@attrs.frozen
class Llama4TowerConfig:
    hidden_size: int = 768
    intermediate_size: int = 5632
    num_layers: int = 34
    num_heads: int = 16
    image_size: int = 448
    patch_size: int = 14
    num_channels: int = 3
    rope_theta: float = 10000.0
    pixel_shuffle_ratio: float = 0.5
    projector_input_dim: int = 4096
    projector_output_dim: int = 4096
    norm_eps: float = 1e-5

    @classmethod
    def from_hf(cls, vc: dict) -> "Llama4TowerConfig":
        d = cls()
        rope = vc.get("rope_parameters") or {}
        return cls(hidden_size=vc.get("hidden_size", d.hidden_size),
                   intermediate_size=vc.get("intermediate_size", d.intermediate_size),
                   num_layers=vc.get("num_hidden_layers", d.num_layers),
                   num_heads=vc.get("num_attention_heads", d.num_heads),
                   image_size=vc.get("image_size", d.image_size), patch_size=vc.get("patch_size", d.patch_size),
                   num_channels=vc.get("num_channels", d.num_channels),
                   rope_theta=float(rope.get("rope_theta", vc.get("rope_theta", d.rope_theta))),
                   pixel_shuffle_ratio=float(vc.get("pixel_shuffle_ratio", d.pixel_shuffle_ratio)),
                   projector_input_dim=vc.get("projector_input_dim", d.projector_input_dim),
                   projector_output_dim=vc.get("projector_output_dim", d.projector_output_dim))

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def tokens_per_tile(self) -> int:
        """Feature rows one tile yields after the pixel shuffle."""
        return int(self.grid * self.pixel_shuffle_ratio) ** 2


def grid_rope_angles(cfg: Llama4TowerConfig) -> torch.Tensor:
    """[grid^2 + 1, head_dim / 2] angles, one per rotated (even, odd) pair: the first half of
    the pairs turn with the patch column + 1, the second half with the row + 1; the class
    token (last row) is not rotated."""
    hd = cfg.hidden_size // cfg.num_heads
    quarter = hd // 4
    freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd // 2, 2)[:quarter].float() / (hd // 2)))
    p = torch.arange(cfg.grid ** 2)
    col, row = (p % cfg.grid + 1).float(), (p // cfg.grid + 1).float()
    ang = torch.cat([col[:, None] * freq, row[:, None] * freq], dim=-1)
    return torch.cat([ang, torch.zeros(1, 2 * quarter)])


def rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [..., S, H, D] with (2i, 2i+1) as a complex number, times e^{i angle}; float32 math."""
    xf = x.float().unflatten(-1, (-1, 2))
    a, b = xf[..., 0], xf[..., 1]
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.stack([a * c - b * s, a * s + b * c], -1).flatten(-2).to(x.dtype)


class Llama4VisionAttention(nn.Module):
    def __init__(self, cfg: Llama4TowerConfig):
        super().__init__()
        d = cfg.hidden_size
        self.nh, self.hd = cfg.num_heads, d // cfg.num_heads
        self.q_proj, self.k_proj = Linear(d, d, bias=True), Linear(d, d, bias=True)
        self.v_proj, self.o_proj = Linear(d, d, bias=True), Linear(d, d, bias=True)

    def forward(self, x, cos, sin):
        n, s, _ = x.shape
        q, k, v = (p(x).view(n, s, self.nh, self.hd) for p in (self.q_proj, self.k_proj, self.v_proj))
        q, k = rotate_pairs(q, cos, sin), rotate_pairs(k, cos, sin)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           scale=self.hd ** -0.5)
        return self.o_proj(o.transpose(1, 2).reshape(n, s, -1))


class Llama4VisionMLP(nn.Module):
    def __init__(self, d_in: int, d_mid: int, d_out: int, bias: bool):
        super().__init__()
        self.fc1, self.fc2 = Linear(d_in, d_mid, bias=bias), Linear(d_mid, d_out, bias=bias)


class Llama4VisionLayer(nn.Module):
    def __init__(self, cfg: Llama4TowerConfig):
        super().__init__()
        self.input_layernorm = LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.self_attn = Llama4VisionAttention(cfg)
        self.post_attention_layernorm = LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.mlp = Llama4VisionMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_size, bias=True)

    def forward(self, x, cos, sin):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        h = self.post_attention_layernorm(x)
        return x + self.mlp.fc2(F.gelu(self.mlp.fc1(h)))


class Llama4VisionEncoder(nn.Module):
    def __init__(self, cfg: Llama4TowerConfig):
        super().__init__()
        self.layers = nn.ModuleList(Llama4VisionLayer(cfg) for _ in range(cfg.num_layers))


class PatchEmbedding(nn.Module):
    def __init__(self, cfg: Llama4TowerConfig):
        super().__init__()
        self.p = cfg.patch_size
        self.linear = Linear(cfg.num_channels * self.p * self.p, cfg.hidden_size)

    def forward(self, px: torch.Tensor) -> torch.Tensor:
        # unfold lays each patch out channel-major, as the checkpoint's linear expects
        return self.linear(F.unfold(px, kernel_size=self.p, stride=self.p).transpose(1, 2))


def pixel_shuffle(x: torch.Tensor, ratio: float) -> torch.Tensor:
    """[N, g*g, C] -> [N, (g r)^2, C / r^2], the reference's two transposed regroupings: the
    output row (i, j) concatenates, column-block first, the vectors of patch rows 2i, 2i+1 and
    patch columns 2j, 2j+1 (for r = 1/2)."""
    n, p, c = x.shape
    g = int(round(p ** 0.5))
    x = x.view(n, g, int(g * ratio), int(c / ratio)).transpose(1, 2)
    x = x.reshape(n, int(g * ratio), int(g * ratio), int(c / ratio ** 2)).transpose(1, 2)
    return x.reshape(n, -1, x.shape[-1])


class Llama4VisionAdapter(nn.Module):
    def __init__(self, cfg: Llama4TowerConfig):
        super().__init__()
        self.ratio = cfg.pixel_shuffle_ratio
        self.mlp = Llama4VisionMLP(cfg.intermediate_size, cfg.projector_input_dim, cfg.projector_output_dim,
                                   bias=False)

    def forward(self, x):
        x = pixel_shuffle(x, self.ratio)
        return F.gelu(self.mlp.fc2(F.gelu(self.mlp.fc1(x))))


class Llama4VisionTower(nn.Module):
    """``vision_model.`` of the checkpoint: tiles [N, C, S, S] -> [N, tokens_per_tile, proj out]."""

    def __init__(self, cfg: Llama4TowerConfig):
        super().__init__()
        self.cfg = cfg
        d, n = cfg.hidden_size, cfg.grid ** 2 + 1
        self.patch_embedding = PatchEmbedding(cfg)
        self.class_embedding = nn.Parameter(torch.empty(d, device="meta"), requires_grad=False)
        self.positional_embedding_vlm = nn.Parameter(torch.empty(n, d, device="meta"), requires_grad=False)
        self.layernorm_pre = LayerNorm(d, eps=cfg.norm_eps)
        self.layernorm_post = LayerNorm(d, eps=cfg.norm_eps)
        self.model = Llama4VisionEncoder(cfg)
        self.vision_adapter = Llama4VisionAdapter(cfg)

    def forward(self, tiles: torch.Tensor) -> torch.Tensor:
        h = self.patch_embedding(tiles)
        h = torch.cat([h, self.class_embedding.to(h.dtype).expand(h.shape[0], 1, -1)], dim=1)
        h = self.layernorm_pre(h + self.positional_embedding_vlm.to(h.dtype))
        ang = grid_rope_angles(self.cfg).to(h.device)
        cos, sin = ang.cos(), ang.sin()
        for layer in self.model.layers:
            h = layer(h, cos, sin)
        h = self.layernorm_post(h)[:, :-1]
        return self.vision_adapter(h)
