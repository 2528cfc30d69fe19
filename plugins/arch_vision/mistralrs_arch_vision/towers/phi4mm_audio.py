"""Phi-4-multimodal's audio encoder (a conformer) and its projection into the text model.

Reference: transformers' ``Phi4MultimodalAudioEmbedding`` (``encoder`` =
``Phi4MultimodalAudioModel``, then ``up_proj_for_* -> GELU -> down_proj_for_*``).

Interface (for the family file)::

    enc = Phi4MMAudioEncoder.from_hf(config)      # the model's whole config.json, either layout
    load_module(enc, weights, map_name=Phi4MMAudioEncoder.map_weight_name)   # names relative
                                                  # to CHECKPOINT_PREFIX, either layout
    out = enc(features, mask, mode="speech")      # [B, T, n_mels] float, mask [B, T] bool or None
                                                  # -> [B, T', text_hidden], T' = ceil(T / 8)
    embeds = enc.encode([clip.features, ...], modes)   # -> one [num_tokens_i, text_hidden] per clip
    embeds = enc.encode_clips([clip, ...])        # the same from processors.phi4mm_audio's
                                                  # Phi4MMAudioClip (features, mode, num_tokens)

* ``config``: transformers 5 (``audio_config`` + ``hidden_size``) or Microsoft's original
  (``audio_processor.config`` + ``embd_layer.audio_embd_layer`` + ``hidden_size``).
* ``mode``: ``"speech"`` (audio-only prompts) or ``"vision"`` (the prompt also has images) picks
  the projection, as transformers does; a sequence gives one mode per clip.
* ``mask``: True on real frames, a prefix of each row (``processors.phi4mm_audio.pad_clips``);
  rows of padding in the output are zero.
* Weight names: both layouts keep the audio part under ``CHECKPOINT_PREFIX``
  (``model.embed_tokens_extend.audio_embed.``); ``map_weight_name`` takes the rest of the name
  and returns this module's name (Microsoft's ``net.0.linear`` / ``linear_q`` /
  ``audio_projection.speech.0`` ... renamed as transformers' conversion does), or None for a
  LoRA tensor.

Batching: every clip's output equals what transformers computes for that clip alone (its
single-clip path, ``mask=None``), whatever else is in the batch. Transformers' own batched path
does not: it adds its boolean padding mask to the attention bias as +1/0 instead of hiding the
padded keys, and its convolutions read the padded frames. Here the subsampling convolutions see
zeros past each clip's end (as a lone clip's zero padding), padded keys get -inf, and a clip
longer than 500 subsampled frames is cut into 500-frame windows of its own (attention stays
inside a window; the last window's zero rows are real keys, as transformers' unfolding leaves
them), so windows of different clips batch together.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mistralrs_core.layers.activations import get_activation
from mistralrs_core.layers.attention_backends import EncoderBatch, encoder_attention
from mistralrs_core.layers.linear import Embedding, Linear
from mistralrs_core.layers.norms import LayerNorm

CHECKPOINT_PREFIX = "model.embed_tokens_extend.audio_embed."
#: transformers hard-codes this window: longer sequences attend within 500-frame windows.
WINDOW = 500
MODES = ("speech", "vision")


@dataclass(frozen=True)
class Phi4MMAudioConfig:
    """The audio encoder's settings under transformers' ``Phi4MultimodalAudioConfig`` names
    (defaults equal its), plus the text model's ``text_hidden_size``."""
    hidden_size: int = 1024
    intermediate_size: int = 1536
    num_blocks: int = 24
    num_attention_heads: int = 16
    activation: str = "swish"
    chunk_size: int = -1
    left_chunk: int = 18
    ext_pw_out_channel: int = 1024
    depthwise_separable_out_channel: int = 1024
    depthwise_multiplier: int = 1
    kernel_size: int = 3
    conv_activation: str = "swish"
    input_size: int = 80
    conv_glu_type: str = "swish"
    time_reduction: int = 8
    bias_max_distance: int = 1000
    bias_symmetric: bool = False
    nemo_activation: str = "relu"
    nemo_conv_channels: int = 1024
    downsample_rate: int = 1
    text_hidden_size: int = 3072

    @classmethod
    def from_hf(cls, config: dict) -> "Phi4MMAudioConfig":
        if "text_hidden_size" not in config and not isinstance(config.get("hidden_size"), int):
            raise ValueError("phi4mm config: hidden_size (the text model's) is missing")
        if isinstance(config.get("audio_config"), dict):
            d = dict(config["audio_config"])
        elif isinstance(config.get("audio_processor"), dict):
            d = _from_original(config)
        else:
            raise ValueError("phi4mm config: no audio encoder settings (neither audio_config nor "
                             "audio_processor.config)")
        d.setdefault("text_hidden_size", config.get("text_hidden_size", config.get("hidden_size")))
        cfg = cls(**{k: d[k] for k in cls.__dataclass_fields__ if d.get(k) is not None})
        cfg._validate()
        return cfg

    def _validate(self) -> None:
        def bad(msg):
            raise ValueError(f"phi4mm audio_config: {msg}")
        if self.hidden_size % self.num_attention_heads:
            bad(f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads "
                f"{self.num_attention_heads}")
        if self.time_reduction < 2 or self.time_reduction & (self.time_reduction - 1):
            bad(f"time_reduction must be a power of two >= 2, got {self.time_reduction}")
        # The conformer's residual adds need these widths equal to hidden_size, as in transformers.
        for name in ("ext_pw_out_channel", "depthwise_separable_out_channel"):
            if getattr(self, name) != self.hidden_size:
                bad(f"{name} {getattr(self, name)} must equal hidden_size {self.hidden_size}")
        if self.downsample_rate != 1:
            bad(f"downsample_rate {self.downsample_rate} is not supported (transformers' projection "
                "reads the encoder output unreshaped; only 1 is published)")
        if self.kernel_size < 1:
            bad(f"kernel_size must be >= 1, got {self.kernel_size}")
        for name in ("activation", "conv_activation", "conv_glu_type", "nemo_activation"):
            _act(getattr(self, name), name)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def subsampling_steps(self) -> int:
        return int(math.log2(self.time_reduction))

    @property
    def nemo_final_size(self) -> int:
        """Mel bins left after the stride-2 convolutions (they halve the frequency axis too)."""
        n = self.input_size
        for _ in range(self.subsampling_steps):
            n = (n + 1) // 2
        return n

    def output_length(self, num_frames: int) -> int:
        n = int(num_frames)
        for _ in range(self.subsampling_steps):
            n = (n + 1) // 2
        return n


def _from_original(config: dict) -> dict:
    """Microsoft's ``audio_processor.config`` (+ ``embd_layer.audio_embd_layer``) renamed to
    transformers' fields; options transformers does not implement are refused rather than
    silently computed differently."""
    c = dict(config["audio_processor"].get("config") or {})
    name = config["audio_processor"].get("name", "cascades")
    if name != "cascades":
        raise ValueError(f"phi4mm audio_processor.name {name!r} is not supported (only 'cascades')")
    expect = {"input_layer": "nemo_conv", "causal": True, "batch_norm": False, "bias_in_glu": True,
              "ext_pw_kernel_size": 1, "attention_group_size": 1, "linear_glu_in_convm": False}
    for key, want in expect.items():
        if key in c and c[key] != want:
            raise ValueError(f"phi4mm audio_processor.config.{key}={c[key]!r} is not supported "
                             f"(only {want!r})")
    rel = c.get("relative_attention_bias_args") or {}
    if rel.get("type", "t5") != "t5":
        raise ValueError(f"phi4mm relative_attention_bias_args.type {rel.get('type')!r} is not supported (only 't5')")
    nemo = c.get("nemo_conv_settings") or {}
    for key, want in (("subsampling", "dw_striding"), ("is_causal", False)):
        if key in nemo and nemo[key] != want:
            raise ValueError(f"phi4mm nemo_conv_settings.{key}={nemo[key]!r} is not supported (only {want!r})")
    embd = ((config.get("embd_layer") or {}).get("audio_embd_layer") or {})
    out = {
        "hidden_size": c.get("attention_dim"),
        "num_attention_heads": c.get("attention_heads"),
        "intermediate_size": c.get("linear_units"),
        "num_blocks": c.get("num_blocks"),
        "activation": c.get("activation"),
        "chunk_size": c.get("chunk_size"),
        "left_chunk": c.get("left_chunk"),
        "ext_pw_out_channel": c.get("ext_pw_out_channel"),
        "depthwise_separable_out_channel": c.get("depthwise_seperable_out_channel",
                                                 c.get("depthwise_separable_out_channel")),
        "depthwise_multiplier": c.get("depthwise_multiplier"),
        "kernel_size": c.get("kernel_size"),
        "conv_activation": c.get("conv_activation"),
        "input_size": c.get("input_size"),
        "conv_glu_type": c.get("conv_glu_type"),
        "time_reduction": c.get("time_reduction"),
        "bias_max_distance": rel.get("t5_bias_max_distance"),
        "bias_symmetric": rel.get("t5_bias_symmetric"),
        "nemo_activation": nemo.get("activation"),
        "nemo_conv_channels": nemo.get("conv_channels"),
        "downsample_rate": embd.get("downsample_rate"),
    }
    if embd.get("n_embd") is not None:
        out["text_hidden_size"] = embd["n_embd"]
    return out


def _act(name: str, field: str = "activation"):
    if name == "sigmoid":
        return torch.sigmoid
    try:
        return get_activation(name)
    except ValueError:
        raise ValueError(f"phi4mm audio_config: unsupported {field} {name!r}") from None


# --- weight names -------------------------------------------------------------------------------
_ORIGINAL_NAMES = [
    (re.compile(r"^encoder\.encoders\.(\d+)\.feed_forward_(in|out)\.net\.0\.linear\."),
     r"encoder.encoders.\1.feed_forward_\2.gate_up_proj."),
    (re.compile(r"^encoder\.encoders\.(\d+)\.feed_forward_(in|out)\.net\.2\."),
     r"encoder.encoders.\1.feed_forward_\2.down_proj."),
    (re.compile(r"^encoder\.encoders\.(\d+)\.self_attn\.linear_(q|k|v)\."), r"encoder.encoders.\1.self_attn.\2_proj."),
    (re.compile(r"^encoder\.encoders\.(\d+)\.self_attn\.linear_out\."), r"encoder.encoders.\1.self_attn.o_proj."),
    (re.compile(r"^audio_projection\.speech\.0\."), "up_proj_for_speech."),
    (re.compile(r"^audio_projection\.speech\.2\."), "down_proj_for_speech."),
    (re.compile(r"^audio_projection\.vision\.0\."), "up_proj_for_vision_speech."),
    (re.compile(r"^audio_projection\.vision\.2\."), "down_proj_for_vision_speech."),
]


def map_weight_name(name: str) -> str | None:
    """A checkpoint name below ``CHECKPOINT_PREFIX`` (either layout) -> this module's name;
    None for LoRA tensors (the original checkpoint keeps them beside the base weights)."""
    if "lora" in name:
        return None
    name = name.replace("base_layer.", "")
    for pattern, repl in _ORIGINAL_NAMES:
        new, n = pattern.subn(repl, name)
        if n:
            return new
    return name


# --- layers ---------------------------------------------------------------------------------------
def _param(*shape) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, device="meta"), requires_grad=False)


class Conv(nn.Module):
    """Weights of an ``nn.Conv1d``/``nn.Conv2d`` (names ``weight``/``bias``), on meta until loaded."""

    def __init__(self, in_ch: int, out_ch: int, kernel: tuple[int, ...], groups: int = 1):
        super().__init__()
        self.groups = groups
        self.weight = _param(out_ch, in_ch // groups, *kernel)
        self.bias = _param(out_ch)


class Activation(nn.Module):
    """A parameterless slot so module indices equal transformers' ``nn.Sequential``."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


class MeanVarianceNorm(nn.Module):
    def __init__(self, cfg: Phi4MMAudioConfig):
        super().__init__()
        self.global_mean = _param(cfg.input_size)
        self.global_invstd = _param(cfg.input_size)

    def forward(self, x):
        return (x - self.global_mean) * self.global_invstd


class ConvSubsampling(nn.Module):
    """NeMo's depthwise-striding subsampling: log2(time_reduction) stride-2 3x3 convolutions
    over (time, mel) — a full one, then depthwise + pointwise pairs — and a linear layer on the
    flattened channels x mel bins."""

    def __init__(self, cfg: Phi4MMAudioConfig):
        super().__init__()
        ch, act = cfg.nemo_conv_channels, _act(cfg.nemo_activation)
        layers: list[nn.Module] = [Conv(1, ch, (3, 3)), Activation(act)]
        for _ in range(cfg.subsampling_steps - 1):
            layers += [Conv(ch, ch, (3, 3), groups=ch), Conv(ch, ch, (1, 1)), Activation(act)]
        self.conv = nn.ModuleList(layers)
        self.out = Linear(ch * cfg.nemo_final_size, cfg.hidden_size, bias=True)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """x [B, T, n_mels] (zero past each length) -> [B, T', hidden]."""
        h = x.unsqueeze(1)
        for layer in self.conv:
            if isinstance(layer, Activation):
                h = layer(h)
                # A lone clip's next convolution reads zero padding past its end; the batch's
                # longer rows put activations of padding there instead.
                keep = torch.arange(h.shape[2], device=h.device)[None, :] < lengths[:, None]
                h = h * keep[:, None, :, None].to(h.dtype)
                continue
            k = layer.weight.shape[-1]
            stride = 2 if k == 3 else 1
            h = F.conv2d(h, layer.weight, layer.bias, stride=stride, padding=k // 2, groups=layer.groups)
            if stride == 2:
                lengths = (lengths + 1) // 2
        b, _, t, _ = h.shape
        return self.out(h.transpose(1, 2).reshape(b, t, -1))


class RelativeAttentionBias(nn.Module):
    """T5-style learned bias per (clipped) key-minus-query distance and head."""

    def __init__(self, cfg: Phi4MMAudioConfig):
        super().__init__()
        self.max_distance = cfg.bias_max_distance
        self.symmetric = cfg.bias_symmetric
        self.num_buckets = self.max_distance * (1 if self.symmetric else 2)
        self.bias_values = Embedding(self.num_buckets, cfg.num_attention_heads)

    def forward(self, n: int, device) -> torch.Tensor:
        """[1, heads, n, n]."""
        pos = torch.arange(n, device=device)
        rel = (pos[None, :] - pos[:, None]).clamp(-self.max_distance, self.max_distance - 1)
        # Symmetric: distance max_distance has no bucket (transformers indexes past its table
        # there and fails); it shares the farthest one.
        idx = rel.abs().clamp_max(self.num_buckets - 1) if self.symmetric else rel + self.num_buckets // 2
        return self.bias_values(idx).permute(2, 0, 1).unsqueeze(0)


class FeedForward(nn.Module):
    def __init__(self, cfg: Phi4MMAudioConfig):
        super().__init__()
        self.layer_norm = LayerNorm(cfg.hidden_size)
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=True)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=True)
        self.act = _act(cfg.activation)

    def forward(self, x):
        up, gate = self.gate_up_proj(self.layer_norm(x)).chunk(2, dim=-1)
        return self.down_proj(up * self.act(gate))


class SelfAttention(nn.Module):
    def __init__(self, cfg: Phi4MMAudioConfig):
        super().__init__()
        d = cfg.hidden_size
        self.heads, self.head_dim = cfg.num_attention_heads, cfg.head_dim
        self.q_proj = Linear(d, d, bias=True)
        self.k_proj = Linear(d, d, bias=True)
        self.v_proj = Linear(d, d, bias=True)
        self.o_proj = Linear(d, d, bias=True)

    def forward(self, x, batch: EncoderBatch, bias: torch.Tensor):
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.heads, self.head_dim)
        k = self.k_proj(x).view(b, s, self.heads, self.head_dim)
        v = self.v_proj(x).view(b, s, self.heads, self.head_dim)
        out = encoder_attention(q, k, v, batch, scale=self.head_dim ** -0.5, bias=bias)
        return self.o_proj(out.reshape(b, s, -1))


class GluPointwise(nn.Module):
    def __init__(self, cfg: Phi4MMAudioConfig):
        super().__init__()
        self.width = cfg.ext_pw_out_channel
        self.ext_pw_conv_1d = Conv(cfg.hidden_size, 2 * self.width, (1,))
        self.b1 = _param(1, self.width, 1)
        self.b2 = _param(1, self.width, 1)
        self.act = _act(cfg.conv_glu_type)

    def forward(self, x):
        """[B, S, D] -> [B, D, S] (channels first for the depthwise convolution)."""
        h = F.conv1d(x.transpose(1, 2), self.ext_pw_conv_1d.weight, self.ext_pw_conv_1d.bias)
        return (h[:, : self.width] + self.b1) * self.act(h[:, self.width:] + self.b2)


class DepthwiseSeparable(nn.Module):
    def __init__(self, cfg: Phi4MMAudioConfig):
        super().__init__()
        d, mult = cfg.hidden_size, cfg.depthwise_multiplier
        self.dw_conv = Conv(d, d * mult, (cfg.kernel_size,), groups=d)
        self.pw_conv = Conv(d * mult, cfg.depthwise_separable_out_channel, (1,))


class ConvModule(nn.Module):
    """LayerNorm -> GLU pointwise conv -> causal depthwise conv (left padding only, so a frame
    never reads later, possibly padded, frames) -> pointwise -> activation -> pointwise."""

    def __init__(self, cfg: Phi4MMAudioConfig):
        super().__init__()
        self.kernel = cfg.kernel_size
        self.layer_norm = LayerNorm(cfg.hidden_size)
        self.glu = GluPointwise(cfg)
        self.dw_sep_conv_1d = DepthwiseSeparable(cfg)
        self.act = _act(cfg.conv_activation)
        self.ext_pw_conv_1d = Conv(cfg.hidden_size, cfg.ext_pw_out_channel, (1,))

    def forward(self, x):
        h = self.glu(self.layer_norm(x))
        dw, pw = self.dw_sep_conv_1d.dw_conv, self.dw_sep_conv_1d.pw_conv
        h = F.conv1d(F.pad(h, (self.kernel - 1, 0)), dw.weight, dw.bias, groups=dw.groups)
        h = F.conv1d(h, pw.weight, pw.bias)
        h = F.conv1d(self.act(h), self.ext_pw_conv_1d.weight, self.ext_pw_conv_1d.bias)
        return h.transpose(1, 2)


class ConformerLayer(nn.Module):
    def __init__(self, cfg: Phi4MMAudioConfig):
        super().__init__()
        self.feed_forward_in = FeedForward(cfg)
        self.self_attn = SelfAttention(cfg)
        self.conv = ConvModule(cfg)
        self.feed_forward_out = FeedForward(cfg)
        self.layer_norm_att = LayerNorm(cfg.hidden_size)
        self.layer_norm = LayerNorm(cfg.hidden_size)

    def forward(self, x, batch: EncoderBatch, bias: torch.Tensor):
        x = x + 0.5 * self.feed_forward_in(x)
        x = x + self.self_attn(self.layer_norm_att(x), batch, bias)
        x = x + self.conv(x)
        x = x + 0.5 * self.feed_forward_out(x)
        return self.layer_norm(x)


class ConformerEncoder(nn.Module):
    """transformers' ``Phi4MultimodalAudioModel`` (names equal), one clip per row."""

    def __init__(self, cfg: Phi4MMAudioConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder_embedding = MeanVarianceNorm(cfg)
        self.embed = ConvSubsampling(cfg)
        self.relative_attention_bias_layer = RelativeAttentionBias(cfg)
        self.encoders = nn.ModuleList(ConformerLayer(cfg) for _ in range(cfg.num_blocks))

    def chunk_mask(self, n: int, device) -> torch.Tensor:
        """[n, n] float: 1 where a query's chunk window (its chunk and ``left_chunk`` before it)
        holds the key, else 0. The reference adds its boolean streaming mask to the bias, so
        this is a +1 bias, not a mask; with ``chunk_size`` <= 0 it is 1 everywhere."""
        if self.cfg.chunk_size <= 0:
            return torch.ones(n, n, device=device)
        chunk = torch.arange(n, device=device) // self.cfg.chunk_size
        q, k = chunk[:, None], chunk[None, :]
        return ((k >= q - self.cfg.left_chunk) & (k <= q)).float()

    def forward(self, features: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """features [B, T, n_mels] (any padding), lengths [B] real frames -> ([B, T', hidden]
        with rows past each clip's output length undefined, output lengths)."""
        dtype = self.encoder_embedding.global_mean.dtype
        keep = torch.arange(features.shape[1], device=features.device)[None, :] < lengths[:, None]
        x = self.encoder_embedding(features.to(dtype)) * keep[..., None].to(dtype)
        x = self.embed(x, lengths)
        out_lens = [self.cfg.output_length(n) for n in lengths.tolist()]

        # Rows of attention: a clip of <= WINDOW frames is one row whose keys are its frames;
        # a longer clip is zero-padded to whole windows, each a row whose keys are all WINDOW
        # frames (the zero rows included), as transformers' unfolding computes a lone clip.
        rows: list[tuple[int, int, int, int]] = []          # (clip, start, row length, real keys)
        for i, n in enumerate(out_lens):
            if n <= WINDOW:
                rows.append((i, 0, n, n))
            else:
                rows += [(i, s, WINDOW, WINDOW) for s in range(0, n, WINDOW)]
        width = max(r[2] for r in rows)
        if len(rows) == len(out_lens) and x.shape[1] == width:
            h = x       # no window cut: rows are the clips (padded frames are masked keys)
        else:
            h = x.new_zeros(len(rows), width, x.shape[-1])
            for r, (i, s, _, _) in enumerate(rows):
                take = min(out_lens[i], s + WINDOW) - s
                h[r, :take] = x[i, s:s + take]
        real = torch.tensor([r[3] for r in rows], device=x.device)
        key_mask = torch.arange(width, device=x.device)[None, :] < real[:, None]
        batch = EncoderBatch.padded(None if bool(key_mask.all()) else key_mask)
        bias = (self.relative_attention_bias_layer(width, x.device)
                + self.chunk_mask(width, x.device)[None, None].to(x.dtype)).to(x.dtype)
        for layer in self.encoders:
            h = layer(h, batch, bias)

        out = x.new_zeros(x.shape[0], max(out_lens), h.shape[-1])
        for r, (i, s, _, _) in enumerate(rows):
            take = min(out_lens[i], s + WINDOW) - s
            out[i, s:s + take] = h[r, :take]
        return out, out_lens


class Phi4MMAudioEncoder(nn.Module):
    """Conformer encoder + the speech / vision-speech projections to the text width; module
    names equal transformers' ``Phi4MultimodalAudioEmbedding``."""

    map_weight_name = staticmethod(map_weight_name)

    def __init__(self, cfg: Phi4MMAudioConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = ConformerEncoder(cfg)
        d_in, d = cfg.hidden_size * cfg.downsample_rate, cfg.text_hidden_size
        self.up_proj_for_speech = Linear(d_in, d, bias=True)
        self.down_proj_for_speech = Linear(d, d, bias=True)
        self.up_proj_for_vision_speech = Linear(d_in, d, bias=True)
        self.down_proj_for_vision_speech = Linear(d, d, bias=True)

    @classmethod
    def from_hf(cls, config: dict) -> "Phi4MMAudioEncoder":
        return cls(Phi4MMAudioConfig.from_hf(config))

    def output_length(self, num_frames: int) -> int:
        return self.cfg.output_length(num_frames)

    def project(self, h: torch.Tensor, mode: str) -> torch.Tensor:
        if mode == "speech":
            up, down = self.up_proj_for_speech, self.down_proj_for_speech
        elif mode == "vision":
            up, down = self.up_proj_for_vision_speech, self.down_proj_for_vision_speech
        else:
            raise ValueError(f"audio projection mode must be one of {MODES}, got {mode!r}")
        return down(F.gelu(up(h)))

    def forward(self, features: torch.Tensor, mask: torch.Tensor | None = None,
                mode: str | Sequence[str] = "speech") -> torch.Tensor:
        """features [B, T, n_mels] float, mask [B, T] bool (True: real frame; a prefix of each
        row) or None (all real) -> [B, ceil(T / time_reduction), text_hidden]; each row past its
        clip's output length is zero."""
        if features.dim() != 3 or features.shape[-1] != self.cfg.input_size:
            raise ValueError(f"audio features must be [B, T, {self.cfg.input_size}], got {tuple(features.shape)}")
        b, t, _ = features.shape
        if b == 0 or t == 0:
            raise ValueError(f"audio features are empty: shape {tuple(features.shape)}")
        if mask is None:
            lengths = torch.full((b,), t, dtype=torch.long, device=features.device)
        else:
            if tuple(mask.shape) != (b, t):
                raise ValueError(f"audio mask must be [{b}, {t}], got {tuple(mask.shape)}")
            mask = mask.to(device=features.device, dtype=torch.bool)
            lengths = mask.sum(1)
            prefix = torch.arange(t, device=mask.device)[None, :] < lengths[:, None]
            if not bool((prefix == mask).all()):
                raise ValueError("audio mask must mark a prefix of each row (padding at the end)")
            if bool((lengths == 0).any()):
                raise ValueError("an audio clip in the batch has no frames")
        modes = [mode] * b if isinstance(mode, str) else list(mode)
        if len(modes) != b:
            raise ValueError(f"got {len(modes)} projection modes for {b} clips")
        for m in modes:
            if m not in MODES:
                raise ValueError(f"audio projection mode must be one of {MODES}, got {m!r}")
        h, out_lens = self.encoder(features, lengths)
        out = h.new_zeros(b, h.shape[1], self.cfg.text_hidden_size)
        for m in MODES:
            rows = [i for i, x in enumerate(modes) if x == m]
            if rows:
                out[rows] = self.project(h[rows], m)
        keep = torch.arange(h.shape[1], device=h.device)[None, :] < torch.tensor(out_lens, device=h.device)[:, None]
        return out * keep[..., None].to(out.dtype)

    def encode_clips(self, clips) -> list[torch.Tensor]:
        """``encode`` for the feature extractor's ``Phi4MMAudioClip``s (features, mode and
        token count of each)."""
        return self.encode([c.features for c in clips], [c.mode for c in clips], [c.num_tokens for c in clips])

    def encode(self, clips: Sequence[torch.Tensor], modes: str | Sequence[str] = "speech",
               num_tokens: Sequence[int] | None = None) -> list[torch.Tensor]:
        """One batched call for several clips' features ([n_i, n_mels] each) -> one
        [num_tokens_i, text_hidden] embedding per clip (``num_tokens`` defaults to the encoder's
        output length, which the feature extractor's count equals)."""
        if not clips:
            return []
        device = self.encoder.encoder_embedding.global_mean.device
        longest = max(int(c.shape[0]) for c in clips)
        feats = torch.zeros(len(clips), longest, self.cfg.input_size, device=device)
        mask = torch.zeros(len(clips), longest, dtype=torch.bool, device=device)
        for i, c in enumerate(clips):
            if c.dim() != 2 or c.shape[-1] != self.cfg.input_size or c.shape[0] == 0:
                raise ValueError(f"audio clip {i}: features must be [n > 0, {self.cfg.input_size}], "
                                 f"got {tuple(c.shape)}")
            feats[i, : c.shape[0]] = c.to(device)
            mask[i, : c.shape[0]] = True
        out = self(feats, mask, modes)
        counts = ([self.output_length(int(c.shape[0])) for c in clips] if num_tokens is None
                  else [int(n) for n in num_tokens])
        for i, (c, n) in enumerate(zip(clips, counts)):
            if not 0 < n <= self.output_length(int(c.shape[0])):
                raise ValueError(f"audio clip {i}: {n} tokens asked of {self.output_length(int(c.shape[0]))} "
                                 "encoder frames")
        return [out[i, :n] for i, n in enumerate(counts)]
