"""Gemma 3n's audio encoder: a USM-style conformer over log-mel frames.

Two strided convolutions (each followed by a group norm whose statistics accumulate over
time, so a frame never sees the future's) cut the frame rate by 4 and project to the model
width; conformer blocks (half-step feed-forward, local self-attention, a causal depthwise
convolution, half-step feed-forward) follow; the output keeps every ``conf_reduction_factor``-th
frame. Module names equal transformers' ``Gemma3nAudioEncoder`` (``subsample_conv_projection.
conv_0.conv``, ``conformer.N.attention.attn.q_proj`` ...), so checkpoint names need only their
``model.audio_tower.`` prefix stripped.

The attention is written over the whole clip rather than in transformers' blocks-with-context
form: its chunked mask reduces to a band (a query at frame i sees keys j with
``-(left - 1) <= j - i <= right``) and its shifted position term to ``q_i . E[i - j]``, so one
banded [T, T] score matrix gives the same numbers with plain matmuls (750 frames for 30 s).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

import torch
import torch.nn.functional as F
from torch import nn

from mistralrs_core.layers.linear import Linear
from mistralrs_core.layers.norms import RMSNorm


@dataclass(frozen=True)
class Gemma3nAudioConfig:
    """The fields of an HF ``Gemma3nAudioConfig``; defaults equal transformers'."""
    input_feat_size: int = 128
    hidden_size: int = 1536
    rms_norm_eps: float = 1e-6
    gradient_clipping: float = 10_000_000_000.0
    conf_attention_chunk_size: int = 12
    conf_attention_context_left: int = 13
    conf_attention_context_right: int = 0
    conf_attention_logit_cap: float = 50.0
    conf_num_attention_heads: int = 8
    conf_num_hidden_layers: int = 12
    conf_conv_kernel_size: int = 5
    conf_reduction_factor: int = 4
    conf_residual_weight: float = 0.5
    sscp_conv_channel_size: tuple[int, ...] = (128, 32)
    sscp_conv_group_norm_eps: float = 1e-3
    sscp_conv_kernel_size: tuple[tuple[int, int], ...] = ((3, 3), (3, 3))
    sscp_conv_stride_size: tuple[tuple[int, int], ...] = ((2, 2), (2, 2))

    @classmethod
    def from_hf(cls, audio_config: dict) -> "Gemma3nAudioConfig":
        kwargs = {}
        for name in cls.__dataclass_fields__:
            value = audio_config.get(name)
            if value is None:
                continue
            if name.startswith("sscp_conv_") and name.endswith(("kernel_size", "stride_size")):
                value = tuple(tuple(int(v) for v in pair) for pair in value)
            elif name == "sscp_conv_channel_size":
                value = tuple(int(v) for v in value)
            kwargs[name] = value
        cfg = cls(**kwargs)
        if cfg.hidden_size % cfg.conf_num_attention_heads:
            raise ValueError(f"audio_config: hidden_size {cfg.hidden_size} is not a multiple of "
                             f"conf_num_attention_heads {cfg.conf_num_attention_heads}")
        if len(cfg.sscp_conv_channel_size) != 2 or len(cfg.sscp_conv_kernel_size) != 2:
            raise ValueError("audio_config: the subsampling front end has exactly two convolutions")
        return cfg

    @property
    def time_stride(self) -> int:
        return math.prod(s[0] for s in self.sscp_conv_stride_size)


def _param(*shape) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, device="meta"), requires_grad=False)


class _Conv(nn.Module):
    """A bias-free convolution kernel under HF's ``conv`` / ``depthwise_conv1d`` name."""

    def __init__(self, *shape: int):
        super().__init__()
        self.weight = _param(*shape)


class CumulativeGroupNorm(nn.Module):
    """Group norm with one group whose mean and variance at frame t are over frames 0..t
    (and every frequency and channel): streaming-safe, so a clip's first frames normalise the
    same whatever follows them. Input [B, T, F, C]."""

    def __init__(self, channels: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = _param(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        per_frame = x[0, 0].numel()
        count = torch.arange(1, x.shape[1] + 1, device=x.device, dtype=torch.float32).view(1, -1, 1, 1) * per_frame
        mean = x.sum(dim=(2, 3), keepdim=True).cumsum(dim=1) / count
        var = (x - mean).pow(2).sum(dim=(2, 3), keepdim=True).cumsum(dim=1) / count
        return ((x - mean) * torch.rsqrt(var + self.eps) * self.weight.float()).to(dtype)


class SSCPConvBlock(nn.Module):
    """Conv2d over (time, frequency), cumulative group norm, ReLU. Time is padded only at
    the end (kernel - 1 frames), frequency by one bin on each side, as the reference does."""

    def __init__(self, in_ch: int, out_ch: int, kernel: tuple[int, int], stride: tuple[int, int], eps: float):
        super().__init__()
        self.conv = _Conv(out_ch, in_ch, *kernel)
        self.norm = CumulativeGroupNorm(out_ch, eps)
        self.stride = stride
        self.padding = (1, 1, 0, kernel[0] - 1)       # (freq left, freq right, time top, time bottom)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.conv2d(F.pad(x, self.padding), self.conv.weight, stride=self.stride)   # [B, C, T, F]
        x = self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return torch.relu(x)


class SubSampleConvProjection(nn.Module):
    def __init__(self, cfg: Gemma3nAudioConfig):
        super().__init__()
        chans = (1,) + cfg.sscp_conv_channel_size
        freq = cfg.input_feat_size
        for i in range(2):
            (kh, kw), (_, sw) = cfg.sscp_conv_kernel_size[i], cfg.sscp_conv_stride_size[i]
            setattr(self, f"conv_{i}", SSCPConvBlock(chans[i], chans[i + 1], (kh, kw), cfg.sscp_conv_stride_size[i],
                                                     cfg.sscp_conv_group_norm_eps))
            freq = (freq + 2 - kw) // sw + 1
        self.input_proj_linear = Linear(chans[-1] * freq, cfg.hidden_size)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        x = self.conv_1(self.conv_0(mel.unsqueeze(1)))                   # [B, C, T', F']
        b, c, t, f = x.shape
        return self.input_proj_linear(x.permute(0, 2, 3, 1).reshape(b, t, f * c))


class RelativePositionEmbedding(nn.Module):
    def __init__(self, cfg: Gemma3nAudioConfig):
        super().__init__()
        self.pos_proj = Linear(cfg.hidden_size, cfg.hidden_size)
        self.channels = cfg.hidden_size

    def table(self, distances: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Projected sinusoids for query-minus-key distances: [len(distances), hidden]."""
        n = self.channels // 2
        step = math.log(1.0e4) / max(n - 1, 1)
        inv = torch.exp(torch.arange(n, device=distances.device, dtype=torch.float32) * -step)
        angle = distances.float().unsqueeze(-1) * inv
        signal = torch.cat([torch.sin(angle), torch.cos(angle)], dim=-1).to(dtype)
        return self.pos_proj(signal)


class LocalAttention(nn.Module):
    def __init__(self, cfg: Gemma3nAudioConfig):
        super().__init__()
        self.heads = cfg.conf_num_attention_heads
        self.head_dim = cfg.hidden_size // self.heads
        self.left = max(0, cfg.conf_attention_context_left - 1)
        self.right = cfg.conf_attention_context_right
        self.cap = cfg.conf_attention_logit_cap
        self.relative_position_embedding = RelativePositionEmbedding(cfg)
        self.per_dim_scale = _param(self.head_dim)
        self.q_proj = Linear(cfg.hidden_size, cfg.hidden_size)
        self.k_proj = Linear(cfg.hidden_size, cfg.hidden_size)
        self.v_proj = Linear(cfg.hidden_size, cfg.hidden_size)
        # The reference divides by softplus(0) so a zero-initialised per_dim_scale is neutral.
        self.q_scale = self.head_dim ** -0.5 / math.log(2.0)

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """x [B, T, D], valid [B, T] -> [B, T, D]."""
        b, t, _ = x.shape
        shape = (b, t, self.heads, self.head_dim)
        q = self.q_proj(x).view(shape) * (self.q_scale * F.softplus(self.per_dim_scale))
        k = self.k_proj(x).view(shape)
        v = self.v_proj(x).view(shape)
        q, k, v = (y.transpose(1, 2) for y in (q, k, v))                 # [B, N, T, H]
        # Distances i - j from -right to left; each (i, j) in the band reads its row.
        dist = torch.arange(-self.right, self.left + 1, device=x.device)
        emb = self.relative_position_embedding.table(dist, x.dtype).view(-1, self.heads, self.head_dim)
        pos = torch.einsum("bnih,fnh->bnif", q, emb)                     # [B, N, T, F]
        i = torch.arange(t, device=x.device)
        rel = i.view(-1, 1) - i.view(1, -1)                               # [T, T]: i - j
        band = (rel >= -self.right) & (rel <= self.left)
        pos = pos.gather(-1, (rel + self.right).clamp(0, dist.numel() - 1).expand(b, self.heads, t, t))
        logits = torch.matmul(q, k.transpose(-1, -2)) + pos
        logits = torch.tanh(logits / self.cap) * self.cap
        allowed = band.view(1, 1, t, t) & valid.view(b, 1, 1, t)
        logits = logits.masked_fill(~allowed, torch.finfo(logits.dtype).min)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32).to(v.dtype)
        return torch.matmul(probs, v).transpose(1, 2).reshape(b, t, -1)


class ConformerAttention(nn.Module):
    def __init__(self, cfg: Gemma3nAudioConfig):
        super().__init__()
        self.clip = cfg.gradient_clipping
        self.pre_attn_norm = RMSNorm(cfg.hidden_size, cast_before_scale=False)
        self.attn = LocalAttention(cfg)
        self.post = Linear(cfg.hidden_size, cfg.hidden_size)
        self.post_norm = RMSNorm(cfg.hidden_size, cast_before_scale=False)

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        h = self.attn(self.pre_attn_norm(x.clamp(-self.clip, self.clip)), valid)
        return x + self.post_norm(self.post(h).clamp(-self.clip, self.clip))


class ConformerFeedForward(nn.Module):
    def __init__(self, cfg: Gemma3nAudioConfig):
        super().__init__()
        self.clip = cfg.gradient_clipping
        self.scale = cfg.conf_residual_weight
        self.pre_layer_norm = RMSNorm(cfg.hidden_size, cast_before_scale=False)
        self.ffw_layer_1 = Linear(cfg.hidden_size, cfg.hidden_size * 4)
        self.ffw_layer_2 = Linear(cfg.hidden_size * 4, cfg.hidden_size)
        self.post_layer_norm = RMSNorm(cfg.hidden_size, cast_before_scale=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ffw_layer_2(F.silu(self.ffw_layer_1(self.pre_layer_norm(x.clamp(-self.clip, self.clip)))))
        return x + self.post_layer_norm(h.clamp(-self.clip, self.clip)) * self.scale


class LightConv1d(nn.Module):
    """GLU, a causal depthwise convolution over time, norm, SiLU, projection; residual."""

    def __init__(self, cfg: Gemma3nAudioConfig):
        super().__init__()
        d = cfg.hidden_size
        self.clip = cfg.gradient_clipping
        self.kernel = cfg.conf_conv_kernel_size
        self.pre_layer_norm = RMSNorm(d, eps=cfg.rms_norm_eps, cast_before_scale=False)
        self.linear_start = Linear(d, 2 * d)
        self.depthwise_conv1d = _Conv(d, 1, self.kernel)
        self.conv_norm = RMSNorm(d, eps=cfg.rms_norm_eps, cast_before_scale=False)
        self.linear_end = Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.glu(self.linear_start(self.pre_layer_norm(x)), dim=-1).transpose(1, 2)
        h = F.conv1d(F.pad(h, (self.kernel - 1, 0)), self.depthwise_conv1d.weight, groups=h.shape[1])
        h = self.conv_norm(h.transpose(1, 2).clamp(-self.clip, self.clip))
        return self.linear_end(F.silu(h)) + x


class ConformerBlock(nn.Module):
    def __init__(self, cfg: Gemma3nAudioConfig):
        super().__init__()
        self.clip = cfg.gradient_clipping
        self.ffw_layer_start = ConformerFeedForward(cfg)
        self.attention = ConformerAttention(cfg)
        self.lconv1d = LightConv1d(cfg)
        self.ffw_layer_end = ConformerFeedForward(cfg)
        self.norm = RMSNorm(cfg.hidden_size, cast_before_scale=False)

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        x = self.attention(self.ffw_layer_start(x), valid)
        x = self.lconv1d(x * valid.unsqueeze(-1).to(x.dtype))
        return self.norm(self.ffw_layer_end(x).clamp(-self.clip, self.clip))


class Gemma3nAudioEncoder(nn.Module):
    """Log-mel frames [B, T, n_mels] and their validity [B, T] -> encodings [B, T', hidden]
    (invalid frames zeroed) and the validity of each output frame [B, T']."""

    def __init__(self, cfg: Gemma3nAudioConfig):
        super().__init__()
        self.cfg = cfg
        self.subsample_conv_projection = SubSampleConvProjection(cfg)
        self.conformer = nn.ModuleList(ConformerBlock(cfg) for _ in range(cfg.conf_num_hidden_layers))

    @classmethod
    def from_hf(cls, audio_config: dict) -> "Gemma3nAudioEncoder":
        return cls(Gemma3nAudioConfig.from_hf(audio_config))

    def forward(self, mel: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.subsample_conv_projection(mel)
        # Each output frame takes the validity of the first input frame it starts at.
        idx = (torch.arange(x.shape[1], device=mel.device) * self.cfg.time_stride).clamp(max=valid.shape[1] - 1)
        valid = valid[:, idx]
        for block in self.conformer:
            x = block(x, valid)
        r = self.cfg.conf_reduction_factor
        if r > 1:
            x, valid = x[:, ::r], valid[:, ::r]
        return x.masked_fill(~valid.unsqueeze(-1), 0.0), valid

    @staticmethod
    def output_frames(mel_frames: int, cfg: Gemma3nAudioConfig) -> int:
        """How many encodings a clip of ``mel_frames`` frames gives."""
        t = mel_frames
        for (kh, _), (sh, _) in zip(cfg.sscp_conv_kernel_size, cfg.sscp_conv_stride_size):
            t = (t + kh - 1 - kh) // sh + 1
        return -(-t // cfg.conf_reduction_factor)


def encode_clips(encoder: Gemma3nAudioEncoder, clips, device, dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(encodings [T', D], valid [T']) per clip (``Gemma3nAudioFeatures``), in order.

    Clips of one length share a tower call. Clips of different lengths are not padded into
    one batch: the front end's convolutions read past a clip's last frame, so padding would
    change its last encodings, and an answer must not depend on what it was batched with."""
    out: list = [None] * len(clips)
    by_len: dict[int, list[int]] = {}
    for i, c in enumerate(clips):
        by_len.setdefault(len(c.mel), []).append(i)
    for idx in by_len.values():
        mel = torch.from_numpy(np.stack([clips[i].mel for i in idx])).to(device=device, dtype=dtype)
        valid = torch.from_numpy(np.stack([clips[i].valid for i in idx])).to(device)
        enc, ok = encoder(mel, valid)
        for k, i in enumerate(idx):
            out[i] = (enc[k], ok[k])
    return out
