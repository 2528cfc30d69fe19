"""The DAC (Descript Audio Codec) decoder: residual-VQ codes -> waveform.

Only the decoding half is built: per codebook an embedding lookup and a 1x1 projection,
summed into the latent, then the convolutional decoder (upsampling transposed convolutions,
dilated residual units with Snake activations, tanh). Module names follow transformers'
``DacModel``. The architecture is read off the checkpoint's tensors (widths, strides,
codebooks), so the transformers export and the original release's weights (no transformers
config) load the same way; weight-norm pairs are folded into plain weights as they stream
in (``weights.py``).
"""
from __future__ import annotations

import re

import attrs
import torch
from torch import nn


@attrs.define
class DacDecoderConfig:
    latent: int                  # quantizer output width (transformers: hidden_size)
    channels: int                # first decoder width (decoder_hidden_size)
    strides: list[int]           # upsampling ratios, in decoding order
    n_codebooks: int
    codebook_size: int
    codebook_dim: int
    sampling_rate: int = 44100

    @property
    def hop_length(self) -> int:
        n = 1
        for s in self.strides:
            n *= s
        return n

    @classmethod
    def from_shapes(cls, shapes: dict[str, tuple[int, ...]], sampling_rate: int) -> "DacDecoderConfig":
        """From the (transformers-named, weight-norm folded) tensor shapes."""
        try:
            channels, latent, _ = shapes["decoder.conv1.weight"]
        except KeyError:
            raise ValueError("DAC weights: no decoder.conv1 weight (not a DAC checkpoint?)") from None
        strides = []
        while f"decoder.block.{len(strides)}.conv_t1.weight" in shapes:
            strides.append(shapes[f"decoder.block.{len(strides)}.conv_t1.weight"][2] // 2)
        n_q = 0
        while f"quantizer.quantizers.{n_q}.codebook.weight" in shapes:
            n_q += 1
        if not strides or not n_q:
            raise ValueError("DAC weights: no decoder blocks or no quantizer codebooks found")
        size, dim = shapes["quantizer.quantizers.0.codebook.weight"]
        return cls(latent=latent, channels=channels, strides=strides, n_codebooks=n_q,
                   codebook_size=size, codebook_dim=dim, sampling_rate=sampling_rate)


class Snake(nn.Module):
    """x + sin(alpha x)^2 / alpha, per channel."""

    def __init__(self, channels: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.empty(1, channels, 1, device="meta"), requires_grad=False)
        self._inv_alpha: torch.Tensor | None = None

    def post_load(self) -> None:
        self._inv_alpha = (self.alpha + 1e-9).reciprocal()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inv = self._inv_alpha if self._inv_alpha is not None else (self.alpha + 1e-9).reciprocal()
        # One temporary, updated in place: the activations are [channels, samples] (up to
        # millions of values), so each fresh tensor is a page-faulting allocation. The same
        # operations in the same order as the out-of-place form, so the same values.
        t = torch.mul(self.alpha, x).sin_().pow_(2).mul_(inv)
        return t.add_(x)


def _conv(cin: int, cout: int, k: int, **kw) -> nn.Conv1d:
    return nn.Conv1d(cin, cout, k, device="meta", **kw).requires_grad_(False)


class ResidualUnit(nn.Module):
    def __init__(self, dim: int, dilation: int):
        super().__init__()
        self.snake1 = Snake(dim)
        self.conv1 = _conv(dim, dim, 7, dilation=dilation, padding=3 * dilation)
        self.snake2 = Snake(dim)
        self.conv2 = _conv(dim, dim, 1)

    def forward(self, x):
        return self.conv2(self.snake2(self.conv1(self.snake1(x)))).add_(x)


class DecoderBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.snake1 = Snake(cin)
        self.conv_t1 = nn.ConvTranspose1d(cin, cout, 2 * stride, stride=stride, padding=(stride + 1) // 2,
                                          device="meta").requires_grad_(False)
        self.res_unit1 = ResidualUnit(cout, 1)
        self.res_unit2 = ResidualUnit(cout, 3)
        self.res_unit3 = ResidualUnit(cout, 9)

    def forward(self, x):
        x = self.conv_t1(self.snake1(x))
        return self.res_unit3(self.res_unit2(self.res_unit1(x)))


class Decoder(nn.Module):
    def __init__(self, cfg: DacDecoderConfig):
        super().__init__()
        self.conv1 = _conv(cfg.latent, cfg.channels, 7, padding=3)
        width, blocks = cfg.channels, []
        for s in cfg.strides:
            blocks.append(DecoderBlock(width, width // 2, s))
            width //= 2
        self.block = nn.ModuleList(blocks)
        self.snake1 = Snake(width)
        self.conv2 = _conv(width, 1, 7, padding=3)

    def forward(self, x):
        x = self.conv1(x)
        for b in self.block:
            x = b(x)
        return torch.tanh(self.conv2(self.snake1(x)))


class Quantizer(nn.Module):
    def __init__(self, cfg: DacDecoderConfig):
        super().__init__()
        self.codebook = nn.Embedding(cfg.codebook_size, cfg.codebook_dim, device="meta").requires_grad_(False)
        self.out_proj = _conv(cfg.codebook_dim, cfg.latent, 1)


class ResidualQuantizer(nn.Module):
    def __init__(self, cfg: DacDecoderConfig):
        super().__init__()
        self.quantizers = nn.ModuleList(Quantizer(cfg) for _ in range(cfg.n_codebooks))


_DROP = re.compile(r"^encoder\.|\.in_proj\.")


class DacCodec(nn.Module):
    def __init__(self, cfg: DacDecoderConfig, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.cfg = cfg
        self.dtype = dtype
        self.quantizer = ResidualQuantizer(cfg)
        self.decoder = Decoder(cfg)

    @staticmethod
    def map_weight_name(name: str) -> str | None:
        # The encoding half is never run here.
        return None if _DROP.search(name) else name

    @torch.inference_mode()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, n_codebooks, frames] -> waveform [B, samples] in [-1, 1]."""
        if codes.shape[1] != self.cfg.n_codebooks:
            raise ValueError(f"DAC: {codes.shape[1]} codebooks given, the codec has {self.cfg.n_codebooks}")
        latent = 0
        for i, q in enumerate(self.quantizer.quantizers):
            latent = latent + q.out_proj(q.codebook(codes[:, i]).transpose(1, 2).to(self.dtype))
        return self.decoder(latent).squeeze(1).float()
