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
import torch.nn.functional as F
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

    def post_load(self) -> None:
        # Shaped [1, C, 1, 1] for the decoder's [B, C, 1, T] activations.
        self._alpha4 = self.alpha.detach()[..., None]
        self._inv_alpha4 = (self._alpha4 + 1e-9).reciprocal()

    def forward(self, x: torch.Tensor, scratch: "_Scratch") -> torch.Tensor:
        """x [B, C, 1, T] (channels-last). The output goes to ``scratch``'s buffer for its
        shape: activations are up to millions of values, and a fresh tensor that size is a
        page-faulting allocation. The same operations in the same order as the out-of-place
        form, so the same values."""
        t = torch.mul(self._alpha4, x, out=scratch.like(x))
        t.sin_().pow_(2).mul_(self._inv_alpha4)
        return t.add_(x)


class _Scratch:
    """One reusable buffer per activation shape for one ``decode`` call: a Snake's output is
    dead once the convolution after it has read it, so the next Snake of that shape can
    write into the same memory."""

    def __init__(self):
        self._bufs: dict[tuple, torch.Tensor] = {}

    def like(self, x: torch.Tensor) -> torch.Tensor:
        key = (tuple(x.shape), x.dtype, x.device)
        buf = self._bufs.get(key)
        if buf is None:
            buf = self._bufs[key] = torch.empty_like(x, memory_format=torch.channels_last)
        return buf


class Conv(nn.Module):
    """A 1-D convolution (``nn.Conv1d``'s parameter names and shapes in the checkpoint) run
    as a 2-D one over [B, C, 1, T] activations in channels-last memory: oneDNN convolves
    that layout directly instead of converting layouts before and after every call (the
    whole decoder: ~18% less CPU time), and a 1x1 convolution becomes a matmul over the
    channels (torch would send it to its slow reference convolution)."""

    def __init__(self, cin: int, cout: int, k: int, dilation: int = 1, padding: int = 0):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cout, cin, k, device="meta"), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(cout, device="meta"), requires_grad=False)
        self.k, self.dilation, self.padding = k, dilation, padding

    def post_load(self) -> None:
        w = self.weight.detach()
        if w.dim() == 3:
            w = w[:, :, 0].contiguous() if self.k == 1 else w[:, :, None].contiguous(memory_format=torch.channels_last)
            self.weight = nn.Parameter(w, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.k == 1:
            # Channels-last [B, C, 1, T] is [B, 1, T, C] in memory: a matmul over C.
            return F.linear(x.permute(0, 2, 3, 1), self.weight, self.bias).permute(0, 3, 1, 2)
        return F.conv2d(x, self.weight, self.bias, 1, (0, self.padding), (1, self.dilation))


class ConvTranspose(nn.Module):
    """``nn.ConvTranspose1d``'s parameters run as a 2-D transposed convolution over
    channels-last [B, C, 1, T] activations (as ``Conv``)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cin, cout, 2 * stride, device="meta"), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(cout, device="meta"), requires_grad=False)
        self.stride, self.padding = stride, (stride + 1) // 2

    def post_load(self) -> None:
        w = self.weight.detach()
        if w.dim() == 3:
            self.weight = nn.Parameter(w[:, :, None].contiguous(memory_format=torch.channels_last),
                                       requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv_transpose2d(x, self.weight, self.bias, (1, self.stride), (0, self.padding))


class ResidualUnit(nn.Module):
    def __init__(self, dim: int, dilation: int):
        super().__init__()
        self.snake1 = Snake(dim)
        self.conv1 = Conv(dim, dim, 7, dilation=dilation, padding=3 * dilation)
        self.snake2 = Snake(dim)
        self.conv2 = Conv(dim, dim, 1)

    def forward(self, x, scratch):
        return self.conv2(self.snake2(self.conv1(self.snake1(x, scratch)), scratch)).add_(x)


class DecoderBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.snake1 = Snake(cin)
        self.conv_t1 = ConvTranspose(cin, cout, stride)
        self.res_unit1 = ResidualUnit(cout, 1)
        self.res_unit2 = ResidualUnit(cout, 3)
        self.res_unit3 = ResidualUnit(cout, 9)

    def forward(self, x, scratch):
        x = self.conv_t1(self.snake1(x, scratch))
        return self.res_unit3(self.res_unit2(self.res_unit1(x, scratch), scratch), scratch)


class Decoder(nn.Module):
    def __init__(self, cfg: DacDecoderConfig):
        super().__init__()
        self.conv1 = Conv(cfg.latent, cfg.channels, 7, padding=3)
        width, blocks = cfg.channels, []
        for s in cfg.strides:
            blocks.append(DecoderBlock(width, width // 2, s))
            width //= 2
        self.block = nn.ModuleList(blocks)
        self.snake1 = Snake(width)
        self.conv2 = Conv(width, 1, 7, padding=3)

    def forward(self, x):
        """x [B, latent, 1, T] (best channels-last) -> [B, 1, T * hop]."""
        scratch = _Scratch()
        x = self.conv1(x.contiguous(memory_format=torch.channels_last))
        for b in self.block:
            x = b(x, scratch)
        return torch.tanh(self.conv2(self.snake1(x, scratch)))[:, :, 0]


class Quantizer(nn.Module):
    def __init__(self, cfg: DacDecoderConfig):
        super().__init__()
        self.codebook = nn.Embedding(cfg.codebook_size, cfg.codebook_dim, device="meta").requires_grad_(False)
        self.out_proj = nn.Conv1d(cfg.codebook_dim, cfg.latent, 1, device="meta").requires_grad_(False)


class ResidualQuantizer(nn.Module):
    def __init__(self, cfg: DacDecoderConfig):
        super().__init__()
        self.quantizers = nn.ModuleList(Quantizer(cfg) for _ in range(cfg.n_codebooks))
    def post_load(self) -> None:
        # The codebooks' 1x1 output projections side by side: the latent (their sum) is one
        # matmul over the concatenated code embeddings.
        qs = self.quantizers
        self._proj = (torch.cat([q.out_proj.weight.detach()[:, :, 0] for q in qs], 1),
                      torch.stack([q.out_proj.bias.detach() for q in qs]).sum(0))

    def latent(self, codes: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """codes [B, n_codebooks, T] -> the latent [B, latent, 1, T], channels-last."""
        emb = torch.cat([q.codebook(codes[:, i]) for i, q in enumerate(self.quantizers)], -1).to(dtype)
        w, b = self._proj
        return F.linear(emb, w.to(dtype), b.to(dtype))[:, None].permute(0, 3, 1, 2)


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
        return self.decoder(self.quantizer.latent(codes, self.dtype)).squeeze(1).float()
