"""Flux's diffusion transformer (diffusers' ``FluxTransformer2DModel`` names and config).

Text tokens (T5 states) and image tokens (packed 2x2 latent patches) first run through
double-stream blocks (each stream its own weights, one joint attention over text + image),
then through single-stream blocks over the concatenation. Every block is modulated by one
conditioning vector: timestep embedding (+ guidance embedding for guidance-distilled "dev"
checkpoints) + the projected CLIP pooled output. Positions are 3-axis ids (text: zeros;
image: (0, row, col)) turned into interleaved-pair rope over ``axes_dims_rope`` slices of
each head.

All projections are core ``Linear`` layers, so the quantization hook sees the DiT linears;
after load q/k/v (and, in single blocks, q/k/v + the MLP input) are fused into one matmul.

On a CPU that runs bf16/f16 through oneDNN the model is built with ``packed=True``: every
dense linear is prepacked at load (``layers/packed.py``) and the element-wise work that can
ride in a GEMM's epilogue does: the bias, the tanh-GELU after each MLP input projection, and
the sum of the single blocks' output projection over [attention; MLP] (two GEMMs, the second
adding onto the first, instead of a concatenation copy and one GEMM). For that the single
blocks keep q/k/v and the MLP input apart (the GELU applies to the MLP part only) and split
``proj_out`` by input columns. In bf16 these passes were ~20% of a step (tanh-GELU alone
~12%; bench/README.md ``diffusion.py``).
"""
from __future__ import annotations

import math

import attrs
import torch
import torch.nn.functional as F
from torch import nn

from mistralrs_core.layers.attention_backends import EncoderAttention
from mistralrs_core.layers.linear import Linear, fuse_linears
from mistralrs_core.layers.norms import RMSNorm
from mistralrs_core.layers.packed import PackedLinear

from mistralrs_core.loading.page_release import release_pages, release_tensor_pages


@attrs.frozen
class FluxConfig:
    patch_size: int = 1
    in_channels: int = 64
    out_channels: int | None = None
    num_layers: int = 19
    num_single_layers: int = 38
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 4096
    pooled_projection_dim: int = 768
    guidance_embeds: bool = False
    axes_dims_rope: tuple = (16, 56, 56)

    @classmethod
    def from_hf(cls, hf: dict) -> "FluxConfig":
        d = cls()
        kw = {f.name: hf.get(f.name, getattr(d, f.name)) for f in attrs.fields(cls)}
        kw["axes_dims_rope"] = tuple(kw["axes_dims_rope"])
        cfg = cls(**kw)
        if sum(cfg.axes_dims_rope) != cfg.attention_head_dim:
            raise ValueError(f"axes_dims_rope: {list(cfg.axes_dims_rope)} must sum to attention_head_dim "
                             f"({cfg.attention_head_dim})")
        return cfg

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def out_dim(self) -> int:
        return self.patch_size * self.patch_size * (self.out_channels or self.in_channels)


def _linear(layer: Linear, x: torch.Tensor, act: str | None = None) -> torch.Tensor:
    """``act(layer(x))`` with the bias (and, for a prepacked weight, the activation) folded
    into the matmul: one pass over the output instead of two or three."""
    q = layer.qmethod
    if isinstance(q, PackedLinear):
        return q.forward(x, layer.bias, act)
    out = F.linear(x, layer.weight, layer.bias) if q is None else layer(x)
    return F.gelu(out, approximate="tanh") if act == "gelu_tanh" else out


def _linear_add(layer: Linear, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """``layer(x) + other``, the sum in the GEMM's epilogue when the weight is prepacked."""
    q = layer.qmethod
    if isinstance(q, PackedLinear):
        return q.forward_add(x, other, layer.bias)
    return _linear(layer, x) + other


def _dense_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> Linear:
    """A ``Linear`` over a copy of ``weight`` (a column slice of another layer's)."""
    out = Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    out.weight = nn.Parameter(weight.contiguous().clone(), requires_grad=False)
    if bias is not None:
        out.bias = nn.Parameter(bias.detach(), requires_grad=False)
    return out


# --------------------------------------------------------------------------- embeddings

def timestep_features(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of (scaled) timesteps [B] -> [B, dim], cosines first."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class _MLPEmbedder(nn.Module):
    """linear_1 -> SiLU -> linear_2 (diffusers' TimestepEmbedding / PixArt text projection)."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = Linear(in_dim, dim, bias=True)
        self.linear_2 = Linear(dim, dim, bias=True)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


class _TimeTextEmbed(nn.Module):
    def __init__(self, cfg: FluxConfig):
        super().__init__()
        self.timestep_embedder = _MLPEmbedder(256, cfg.inner_dim)
        if cfg.guidance_embeds:
            self.guidance_embedder = _MLPEmbedder(256, cfg.inner_dim)
        self.text_embedder = _MLPEmbedder(cfg.pooled_projection_dim, cfg.inner_dim)

    def forward(self, timestep, guidance, pooled):
        emb = self.timestep_embedder(timestep_features(timestep).to(pooled.dtype))
        if guidance is not None:
            emb = emb + self.guidance_embedder(timestep_features(guidance).to(pooled.dtype))
        return emb + self.text_embedder(pooled)


def rope_freqs(ids: torch.Tensor, axes_dims: tuple, theta: float = 10000.0) -> torch.Tensor:
    """ids [S, n_axes] -> complex64 [S, sum(axes_dims) / 2]: cos + i sin of each interleaved
    pair's angle (angles in float64, as the reference computes them, then float32)."""
    parts = []
    pos = ids.double()
    for i, dim in enumerate(axes_dims):
        inv = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=ids.device) / dim))
        ang = torch.outer(pos[:, i], inv)
        parts.append(torch.complex(ang.cos().float(), ang.sin().float()))
    return torch.cat(parts, -1)


def _layer_norm(x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), eps=1e-6)


def _modulate(x, shift, scale):
    return torch.addcmul(shift[:, None], _layer_norm(x), 1 + scale[:, None])


class _Mod(nn.Module):
    """AdaLayerNormZero(-Single)'s projection: ``linear(silu(temb))`` cut into ``n`` chunks."""

    def __init__(self, dim: int, n: int):
        super().__init__()
        self.n = n
        self.linear = Linear(dim, n * dim, bias=True)

    def forward(self, temb_act):
        return _linear(self.linear, temb_act).chunk(self.n, dim=-1)


# --------------------------------------------------------------------------- attention

class _JointAttention(nn.Module):
    """Holds the HF-named projections; the blocks call them (fused after load)."""

    def __init__(self, cfg: FluxConfig, dual: bool):
        super().__init__()
        dim, hd = cfg.inner_dim, cfg.attention_head_dim
        self.to_q, self.to_k, self.to_v = (Linear(dim, dim, bias=True) for _ in range(3))
        self.norm_q, self.norm_k = RMSNorm(hd, 1e-6), RMSNorm(hd, 1e-6)
        if dual:
            self.add_q_proj, self.add_k_proj, self.add_v_proj = (Linear(dim, dim, bias=True) for _ in range(3))
            self.norm_added_q, self.norm_added_k = RMSNorm(hd, 1e-6), RMSNorm(hd, 1e-6)
            self.to_out = nn.ModuleList([Linear(dim, dim, bias=True)])
            self.to_add_out = Linear(dim, dim, bias=True)


_sdpa = EncoderAttention()


def _drop(owner: nn.Module, *names: str) -> None:
    """Remove layers whose rows now live in a fused copy. Their memory-mapped checkpoint
    pages were read by the copy; give them back, or they would stay resident beside it."""
    for name in names:
        release_pages(getattr(owner, name))
        delattr(owner, name)


def _attend(q, k, v):
    """q/k/v [B, S, H, D] over the joint sequence (q, k normalised and rotated) -> [B, S, H * D]."""
    out = _sdpa(q, k, v, None, scale=q.shape[-1] ** -0.5)
    return out.flatten(2).to(q.dtype)


def _norm_rope(xs: list[torch.Tensor], weights: list[torch.Tensor], eps: float,
               freqs: torch.Tensor) -> torch.Tensor:
    """RMS-normalise each x [B, S_i, H, D] with its weight, join them along S and rotate each
    (even, odd) pair by its position's angle: [B, sum S_i, H, D] in the inputs' dtype.
    Float32 from the norm's statistics to the rotation, rounded once at the end; the rotation
    is one complex multiply. Six passes over q or k where the textbook form (rms_norm, then
    x * cos + rotate_pairs(x) * sin) took ~11 and ~2.7x the time for bf16 on CPU."""
    parts = []
    for x, w in zip(xs, weights):
        # rsqrt(mean(x^2) + eps) from one float32 reduction pass (the norm) over [..., 1]
        # scalars; x * r promotes to a new float32 tensor (x itself is never written).
        r = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=torch.float32)
        r = r.square_().div_(x.shape[-1]).add_(eps).rsqrt_()
        parts.append(torch.mul(x, r).mul_(w.float()))
    x = parts[0] if len(parts) == 1 else torch.cat(parts, 1)
    pairs = torch.view_as_complex(x.view(*x.shape[:-1], -1, 2)) * freqs[None, :, None, :]
    return torch.view_as_real(pairs).flatten(-2).to(xs[0].dtype)


class FluxTransformerBlock(nn.Module):
    """Double-stream block: image and text streams with their own weights, joint attention."""

    def __init__(self, cfg: FluxConfig):
        super().__init__()
        dim = cfg.inner_dim
        self.heads, self.head_dim = cfg.num_attention_heads, cfg.attention_head_dim
        self.norm1 = _Mod(dim, 6)
        self.norm1_context = _Mod(dim, 6)
        self.attn = _JointAttention(cfg, dual=True)
        self.ff = _FeedForward(dim)
        self.ff_context = _FeedForward(dim)
        self.qkv: Linear | None = None
        self.add_qkv: Linear | None = None

    def post_load(self):
        a = self.attn
        self.qkv = fuse_linears([a.to_q, a.to_k, a.to_v])
        self.add_qkv = fuse_linears([a.add_q_proj, a.add_k_proj, a.add_v_proj])
        if self.qkv is not None and self.add_qkv is not None:
            _drop(a, "to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")

    def _project(self, x, fused, parts):
        b, s, _ = x.shape
        if fused is not None:
            return _linear(fused, x).view(b, s, 3, self.heads, self.head_dim).unbind(2)
        return tuple(_linear(p, x).view(b, s, self.heads, self.head_dim) for p in parts)

    def forward(self, img, txt, temb_act, rope):
        a = self.attn
        shift, scale, gate, shift_mlp, scale_mlp, gate_mlp = self.norm1(temb_act)
        c_shift, c_scale, c_gate, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(temb_act)
        q, k, v = self._project(_modulate(img, shift, scale), self.qkv,
                                (getattr(a, "to_q", None), getattr(a, "to_k", None), getattr(a, "to_v", None)))
        cq, ck, cv = self._project(_modulate(txt, c_shift, c_scale), self.add_qkv,
                                   (getattr(a, "add_q_proj", None), getattr(a, "add_k_proj", None),
                                    getattr(a, "add_v_proj", None)))
        n_txt = txt.shape[1]
        eps = a.norm_q.eps
        out = _attend(_norm_rope([cq, q], [a.norm_added_q.weight, a.norm_q.weight], eps, rope),
                      _norm_rope([ck, k], [a.norm_added_k.weight, a.norm_k.weight], eps, rope),
                      torch.cat([cv, v], 1))
        txt_out, img_out = out[:, :n_txt], out[:, n_txt:]
        img = torch.addcmul(img, gate[:, None], _linear(a.to_out[0], img_out))
        img = torch.addcmul(img, gate_mlp[:, None], self.ff(_modulate(img, shift_mlp, scale_mlp)))
        txt = torch.addcmul(txt, c_gate[:, None], _linear(a.to_add_out, txt_out))
        txt = torch.addcmul(txt, c_gate_mlp[:, None], self.ff_context(_modulate(txt, c_shift_mlp, c_scale_mlp)))
        if txt.dtype == torch.float16:
            txt = txt.clip(-65504, 65504)
        return img, txt


class _Proj(nn.Module):
    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.proj = Linear(dim_in, dim_out, bias=True)


class _FeedForward(nn.Module):
    """net.0.proj -> tanh-GELU -> net.2 (diffusers' FeedForward layout)."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.ModuleList([_Proj(dim, dim * mult), nn.Identity(), Linear(dim * mult, dim, bias=True)])

    def forward(self, x):
        return _linear(self.net[2], _linear(self.net[0].proj, x, "gelu_tanh"))


class FluxSingleTransformerBlock(nn.Module):
    """Single-stream block over [text; image]: parallel attention and MLP branches."""

    def __init__(self, cfg: FluxConfig, mlp_ratio: float = 4.0, packed: bool = False):
        super().__init__()
        dim = cfg.inner_dim
        self.dim, self.mlp_dim = dim, int(dim * mlp_ratio)
        self.heads, self.head_dim = cfg.num_attention_heads, cfg.attention_head_dim
        self.packed = packed
        self.norm = _Mod(dim, 3)
        self.proj_mlp = Linear(dim, self.mlp_dim, bias=True)
        self.proj_out = Linear(dim + self.mlp_dim, dim, bias=True)
        self.attn = _JointAttention(cfg, dual=False)
        self.linear1: Linear | None = None
        self.qkv: Linear | None = None
        self.out_attn: Linear | None = None     # packed: proj_out's attention columns (with the bias)
        self.out_mlp: Linear | None = None      # packed: proj_out's MLP columns

    def post_load(self):
        a = self.attn
        if self.packed:
            self.qkv = fuse_linears([a.to_q, a.to_k, a.to_v])
            if self.qkv is not None:
                _drop(a, "to_q", "to_k", "to_v")
            if self.proj_out.qmethod is None:
                w, dim = self.proj_out.weight, self.dim
                self.out_attn = _dense_linear(w[:, :dim], self.proj_out.bias)
                self.out_mlp = _dense_linear(w[:, dim:], None)
                _drop(self, "proj_out")
            return
        # One matmul for q, k, v and the MLP input, as the original checkpoints store it.
        self.linear1 = fuse_linears([a.to_q, a.to_k, a.to_v, self.proj_mlp])
        if self.linear1 is not None:
            _drop(a, "to_q", "to_k", "to_v")
            _drop(self, "proj_mlp")

    def forward(self, x, temb_act, rope):
        shift, scale, gate = self.norm(temb_act)
        h = _modulate(x, shift, scale)
        b, s, dim = h.shape
        if self.linear1 is not None:
            qkv, mlp = _linear(self.linear1, h).split([3 * dim, self.mlp_dim], dim=-1)
            q, k, v = qkv.view(b, s, 3, self.heads, self.head_dim).unbind(2)
            mlp = F.gelu(mlp, approximate="tanh")
        else:
            if self.qkv is not None:
                q, k, v = _linear(self.qkv, h).view(b, s, 3, self.heads, self.head_dim).unbind(2)
            else:
                a = self.attn
                q, k, v = (_linear(p, h).view(b, s, self.heads, self.head_dim) for p in (a.to_q, a.to_k, a.to_v))
            mlp = _linear(self.proj_mlp, h, "gelu_tanh")
        a = self.attn
        q = _norm_rope([q], [a.norm_q.weight], a.norm_q.eps, rope)
        k = _norm_rope([k], [a.norm_k.weight], a.norm_k.eps, rope)
        attn = _attend(q, k, v)
        if self.out_attn is not None and self.out_mlp is not None:
            out = _linear_add(self.out_mlp, mlp, _linear(self.out_attn, attn))
        else:
            out = _linear(self.proj_out, torch.cat([attn, mlp], dim=2))
        x = torch.addcmul(x, gate[:, None], out)
        if x.dtype == torch.float16:
            x = x.clip(-65504, 65504)
        return x


class _NormOut(nn.Module):
    """AdaLayerNormContinuous: ``linear(silu(temb))`` -> (scale, shift), in that order."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = Linear(dim, 2 * dim, bias=True)

    def forward(self, x, temb_act):
        scale, shift = _linear(self.linear, temb_act.to(x.dtype)).chunk(2, dim=-1)
        return torch.addcmul(shift[:, None], _layer_norm(x), (1 + scale)[:, None])


class FluxTransformer2DModel(nn.Module):
    def __init__(self, cfg: FluxConfig, packed: bool = False):
        """``packed``: the weights will be prepacked for a CPU (``prepack`` after loading);
        the single blocks then keep the layout whose element-wise work fits GEMM epilogues."""
        super().__init__()
        self.cfg = cfg
        self.packed = packed
        dim = cfg.inner_dim
        self.time_text_embed = _TimeTextEmbed(cfg)
        self.context_embedder = Linear(cfg.joint_attention_dim, dim, bias=True)
        self.x_embedder = Linear(cfg.in_channels, dim, bias=True)
        self.transformer_blocks = nn.ModuleList([FluxTransformerBlock(cfg) for _ in range(cfg.num_layers)])
        self.single_transformer_blocks = nn.ModuleList(
            [FluxSingleTransformerBlock(cfg, packed=packed) for _ in range(cfg.num_single_layers)])
        self.norm_out = _NormOut(dim)
        self.proj_out = Linear(dim, cfg.out_dim, bias=True)

    @property
    def dtype(self) -> torch.dtype:
        return self.proj_out.bias.dtype

    def prepack(self) -> int:
        """Prepack the dense half-precision linears for oneDNN (after loading); the number
        packed. The replaced weights' checkpoint pages are handed back."""
        from mistralrs_core.layers.packed import prepack_linears
        # The packed copies replace the weights, but the checkpoint pages the packing read
        # stay mapped (other tensors of the file are still in use) and so resident: hand them
        # back block by block, so that load peaks at the packed model plus one block.
        n = 0
        for part in (*self.transformer_blocks, *self.single_transformer_blocks, self.time_text_embed,
                     self.context_embedder, self.x_embedder, self.norm_out, self.proj_out):
            # Held here, so still mapped when their pages are released after the packing.
            weights = [m.weight for m in part.modules() if isinstance(m, Linear) and m.weight is not None]
            n += prepack_linears(part)
            release_tensor_pages(*weights)
            del weights
        return n

    def rope(self, txt_ids: torch.Tensor, img_ids: torch.Tensor) -> torch.Tensor:
        """Complex rotations [S, head_dim / 2] over [text; image] positions; the same for every
        step of a generation."""
        return rope_freqs(torch.cat([txt_ids, img_ids], 0), self.cfg.axes_dims_rope)

    def forward(self, hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids=None,
                txt_ids=None, guidance=None, rope=None):
        """hidden_states [B, N, in_channels] packed latents; encoder_hidden_states [B, T, joint_dim];
        pooled [B, pooled_dim]; timestep [B] in [0, 1] (sigma); guidance [B] or None.
        ``rope``: precomputed ``self.rope(txt_ids, img_ids)`` (else built from the ids)."""
        img = self.x_embedder(hidden_states)
        dtype = img.dtype
        t = timestep.to(dtype) * 1000
        g = guidance.to(dtype) * 1000 if guidance is not None and self.cfg.guidance_embeds else None
        temb = self.time_text_embed(t, g, pooled_projections)
        txt = self.context_embedder(encoder_hidden_states)
        if rope is None:
            rope = self.rope(txt_ids, img_ids)
        temb_act = F.silu(temb)
        for blk in self.transformer_blocks:
            img, txt = blk(img, txt, temb_act, rope)
        n_txt = txt.shape[1]
        x = torch.cat([txt, img], 1)
        for blk in self.single_transformer_blocks:
            x = blk(x, temb_act, rope)
        img = x[:, n_txt:]
        return self.proj_out(self.norm_out(img, temb_act))
