"""MobileNetV5, Gemma 3n's image encoder (timm's ``mobilenetv5_300m_enc``), in plain torch.

A convolutional stem, four stages of MobileNet-V4 style blocks, and a multi-scale fusion
adapter (MSFA) that joins the last two stages' feature maps into one 16x16 map of 2048
channels; Gemma 3n reads that map as 256 soft tokens. The blocks:

* ``er`` edge residual (fused MBConv): a full kxk expansion conv, then a 1x1 projection;
* ``uir`` universal inverted residual: optional depthwise conv before the 1x1 expansion
  ("start"), between expansion and projection ("mid") and after the projection ("end"),
  with a per-channel layer scale;
* ``mqa`` mobile multi-query attention: every head shares one key and one value
  projection, and keys/values are taken from a depthwise strided conv of the input
  (``kv_stride``), so attention runs over a quarter of the positions.

Every norm is RMSNorm over the channels at each position; every activation is tanh-GELU.
Convolutions pad TensorFlow-style ("same": the odd pixel goes bottom/right) when the hub
config's variant asks for it, which matters for the strided ones.

Module names equal timm's (``conv_stem.conv``, ``blocks.S.I.pw_exp.bn``,
``blocks.S.I.attn.key.down_conv`` ..., ``msfa.ffn.pw_proj.conv``), so transformers'
checkpoint names load after dropping the ``timm_model.`` prefix (``map_weight_name``).
The architecture comes from the hub ``vision_config``: ``architecture`` names the variant and
``model_args`` may override timm's keyword arguments (``block_args`` in timm's decoded form,
``stem_size``, ``msfa_indices`` ...), which is how a scaled-down test variant is described.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from mistralrs_core.layers.attention_backends import EncoderBatch, encoder_attention

SUPPORTED_ARCHITECTURES = ("mobilenetv5_300m_enc",)


def _mobilenetv5_300m_arch() -> list[list[str]]:
    """The 300M encoder's stages as block strings (timm's notation: type, then r repeats,
    a/k/p start/mid/end kernel, s stride, e expansion, c channels, h heads, d key/value dim,
    v key/value stride)."""
    stage2_attn = ["mqa_r1_k3_h12_v2_s1_d64_c640", "uir_r1_a0_k0_s1_e2_c640"] * 14
    stage3_attn = ["mqa_r1_k3_h16_s1_d96_c1280", "uir_r1_a0_k0_s1_e2_c1280"] * 19
    return [
        ["er_r1_k3_s2_e4_c128"] + ["er_r1_k3_s1_e4_c128"] * 2,
        ["uir_r1_a3_k5_s2_e6_c256"] + ["uir_r1_a5_k0_s1_e4_c256", "uir_r1_a3_k0_s1_e4_c256"] * 2,
        ["uir_r1_a5_k5_s2_e6_c640"] + ["uir_r1_a5_k0_s1_e4_c640"] * 7 + ["uir_r1_a0_k0_s1_e1_c640"]
        + stage2_attn,
        ["uir_r1_a5_k5_s2_e6_c1280"] + stage3_attn,
    ]


# --------------------------------------------------------------------------- helpers
def make_divisible(value: float, divisor: int = 8, round_limit: float = 0.9) -> int:
    """timm's channel rounding: nearest multiple of ``divisor`` (at least one), bumped up
    a step when rounding down would lose more than 10%."""
    new = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if new < round_limit * value:
        new += divisor
    return new


_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "relu": F.relu,
    "relu6": F.relu6,
    "hard_swish": F.hardswish,
    "swish": F.silu,
    "silu": F.silu,
    "mish": F.mish,
}
# The block-string suffixes ``n<code>`` timm reads as activations.
_ACT_CODES = {"re": "relu", "r6": "relu6", "hs": "hard_swish", "sw": "swish", "mi": "mish"}


def _activation(name: str | None, default: str) -> Callable[[torch.Tensor], torch.Tensor]:
    name = default if name is None else name
    if name not in _ACTIVATIONS:
        raise ValueError(f"vision_config: activation {name!r} is not one of {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]


def _param(*shape) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, device="meta"), requires_grad=False)


def _same_pad(size: int, kernel: int, stride: int, dilation: int) -> int:
    return max((math.ceil(size / stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)


class Conv2d(nn.Module):
    """A convolution with timm's padding rules. ``pad_type="same"``: TensorFlow SAME, fixed
    when it is symmetric (stride 1, odd extent), else computed per input size with the odd
    pixel on the bottom/right; anything else: PyTorch-style ``((s-1) + d(k-1)) // 2``."""

    def __init__(self, in_chs: int, out_chs: int, kernel: int, stride: int = 1, dilation: int = 1,
                 groups: int = 1, bias: bool = False, pad_type: str = ""):
        super().__init__()
        if in_chs % groups or out_chs % groups:
            raise ValueError(f"vision_config: {in_chs}->{out_chs} channels do not split into {groups} groups")
        self.kernel, self.stride, self.dilation, self.groups = kernel, stride, dilation, groups
        self.weight = _param(out_chs, in_chs // groups, kernel, kernel)
        self.bias = _param(out_chs) if bias else None
        static = stride == 1 and (dilation * (kernel - 1)) % 2 == 0
        self.dynamic = pad_type == "same" and not static
        if pad_type == "same" and static:
            self.padding = dilation * (kernel - 1) // 2
        elif pad_type == "valid" or self.dynamic:
            self.padding = 0
        else:
            self.padding = ((stride - 1) + dilation * (kernel - 1)) // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dynamic:
            ph = _same_pad(x.shape[-2], self.kernel, self.stride, self.dilation)
            pw = _same_pad(x.shape[-1], self.kernel, self.stride, self.dilation)
            x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class RMSNorm2d(nn.Module):
    """RMSNorm over the channels of [B, C, H, W] at each position (eps 1e-6, weight only),
    computed in float32, optionally followed by the block's activation."""

    def __init__(self, channels: int, act: Callable | None = None, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.act = act
        self.weight = _param(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(1, keepdim=True) + self.eps)
        h = (h * self.weight.float().view(1, -1, 1, 1)).to(x.dtype)
        return self.act(h) if self.act is not None else h


class ConvNorm(nn.Module):
    """Conv -> RMSNorm2d (-> activation): timm's ``ConvNormAct`` (norm stored as ``bn``)."""

    def __init__(self, in_chs: int, out_chs: int, kernel: int, act: Callable | None, stride: int = 1,
                 dilation: int = 1, groups: int = 1, bias: bool = False, pad_type: str = ""):
        super().__init__()
        self.conv = Conv2d(in_chs, out_chs, kernel, stride, dilation, groups, bias, pad_type)
        self.bn = RMSNorm2d(out_chs, act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


class LayerScale2d(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.gamma = _param(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma.view(1, -1, 1, 1).to(x.dtype)


# --------------------------------------------------------------------------- block specs
@dataclass(frozen=True)
class BlockSpec:
    """One block of a stage, as timm's decoder reads a block string (or its decoded dict)."""
    kind: str                     # er | uir | mqa
    out_chs: int
    stride: int = 1
    act: str | None = None        # None: the model's activation
    exp_ratio: float = 1.0
    noskip: bool = False
    group_size: int | None = None  # None: the block type's default (depthwise / full)
    kernel: int = 3               # er: expansion kernel; mqa: key/value downsampling kernel
    pw_kernel: int = 1            # er: projection kernel
    force_in_chs: int = 0         # er
    start_kernel: int = 0         # uir
    mid_kernel: int = 0           # uir
    end_kernel: int = 0           # uir
    num_heads: int = 8            # mqa
    key_dim: int = 64             # mqa
    value_dim: int = 64           # mqa
    kv_stride: int = 1            # mqa
    dilation: int = 1             # set by the stage builder


def _kernel(value, what: str) -> int:
    if isinstance(value, str):
        if "." in value:
            raise ValueError(f"vision_config: mixed kernel sizes {value!r} ({what}) are not supported")
        value = int(value)
    if not isinstance(value, int):
        raise ValueError(f"vision_config: {what} must be one kernel size, got {value!r}")
    return value


def _spec_from_string(text: str) -> tuple[BlockSpec, int]:
    kind, *ops = text.split("_")
    opts: dict[str, str] = {}
    noskip = False
    for op in ops:
        if op == "noskip":
            noskip = True
        elif op == "skip":
            continue
        elif op.startswith("n") and op[1:] in _ACT_CODES:
            opts["n"] = _ACT_CODES[op[1:]]
        else:
            parts = re.split(r"(\d.*)", op)
            if len(parts) >= 2:
                opts[parts[0]] = parts[1]
    if float(opts.get("se", 0)) > 0:
        raise ValueError(f"vision_config: block {text!r}: squeeze-excite is not supported")
    common = dict(out_chs=int(opts["c"]), stride=int(opts["s"]), act=opts.get("n"), noskip=noskip,
                  group_size=int(opts["gs"]) if "gs" in opts else None)
    if kind == "er":
        spec = BlockSpec("er", kernel=_kernel(opts["k"], text), pw_kernel=_kernel(opts.get("p", 1), text),
                         exp_ratio=float(opts["e"]), force_in_chs=int(opts.get("fc", 0)), **common)
    elif kind == "uir":
        spec = BlockSpec("uir", start_kernel=_kernel(opts.get("a", 0), text), mid_kernel=_kernel(opts["k"], text),
                         end_kernel=_kernel(opts.get("p", 0), text), exp_ratio=float(opts["e"]), **common)
    elif kind == "mqa":
        dim = int(opts["d"])
        spec = BlockSpec("mqa", kernel=_kernel(opts["k"], text), num_heads=int(opts["h"]), key_dim=dim,
                         value_dim=dim, kv_stride=int(opts.get("v", 1)), **common)
    else:
        raise ValueError(f"vision_config: block type {kind!r} ({text!r}) is not part of MobileNetV5")
    return spec, int(opts["r"])


def _spec_from_dict(d: dict) -> BlockSpec:
    """timm's decoded block arguments (what ``model_args["block_args"]`` holds)."""
    kind = d.get("block_type")
    if float(d.get("se_ratio") or 0) > 0:
        raise ValueError(f"vision_config: block {d}: squeeze-excite is not supported")
    act = d.get("act_layer")
    if act is not None and not isinstance(act, str):
        raise ValueError(f"vision_config: block act_layer must be a name, got {act!r}")
    common = dict(out_chs=int(d["out_chs"]), stride=int(d["stride"]), act=act, noskip=bool(d.get("noskip", False)),
                  group_size=d.get("group_size"))
    if kind == "er":
        return BlockSpec("er", kernel=_kernel(d["exp_kernel_size"], "exp_kernel_size"),
                         pw_kernel=_kernel(d.get("pw_kernel_size", 1), "pw_kernel_size"),
                         exp_ratio=float(d["exp_ratio"]), force_in_chs=int(d.get("force_in_chs") or 0), **common)
    if kind == "uir":
        return BlockSpec("uir", start_kernel=_kernel(d.get("dw_kernel_size_start", 0), "dw_kernel_size_start"),
                         mid_kernel=_kernel(d.get("dw_kernel_size_mid", 3), "dw_kernel_size_mid"),
                         end_kernel=_kernel(d.get("dw_kernel_size_end", 0), "dw_kernel_size_end"),
                         exp_ratio=float(d.get("exp_ratio", 1.0)), **common)
    if kind == "mqa":
        return BlockSpec("mqa", kernel=_kernel(d.get("dw_kernel_size", 3), "dw_kernel_size"),
                         num_heads=int(d["num_heads"]), key_dim=int(d["key_dim"]),
                         value_dim=int(d["value_dim"]), kv_stride=int(d.get("kv_stride", 1)), **common)
    raise ValueError(f"vision_config: block type {kind!r} is not part of MobileNetV5")


def decode_stages(stages) -> list[list[BlockSpec]]:
    """Block strings or decoded dicts, stage by stage -> specs (repeats expanded)."""
    if not isinstance(stages, (list, tuple)) or not stages:
        raise ValueError("vision_config: block_args must be a non-empty list of stages")
    out = []
    for stage in stages:
        if not isinstance(stage, (list, tuple)) or not stage:
            raise ValueError("vision_config: every stage of block_args must be a non-empty list of blocks")
        specs = []
        for block in stage:
            if isinstance(block, str):
                spec, repeat = _spec_from_string(block)
                specs.extend([spec] * repeat)
            elif isinstance(block, dict):
                specs.append(_spec_from_dict(block))
            else:
                raise ValueError(f"vision_config: a block is a string or a dict, got {block!r}")
        out.append(specs)
    return out


# --------------------------------------------------------------------------- config
@dataclass(frozen=True)
class MobileNetV5Config:
    stages: tuple[tuple[BlockSpec, ...], ...]
    # Each stage's first stride as written, before strides past the output stride become
    # dilation: timm decides which stage outputs are feature maps from these.
    stage_strides: tuple[int, ...] = ()
    stem_size: int = 64
    stem_bias: bool = True
    in_chans: int = 3
    pad_type: str = "same"
    msfa_indices: tuple[int, ...] = (-2, -1)
    msfa_output_resolution: int = 16
    num_features: int = 2048   # fixed by timm's encoder, whatever the blocks
    layer_scale: bool = True
    act: str = "gelu_tanh"

    # timm keyword arguments that change the weights or the math; the ones listed in
    # _INERT only matter for training.
    _INERT = frozenset({"drop_rate", "drop_path_rate", "num_classes", "global_pool", "pretrained_cfg",
                        "pretrained_cfg_overlay", "num_features", "head_conv", "head_bias", "head_norm",
                        "se_from_exp", "out_indices"})

    @classmethod
    def from_hf(cls, vision_config: dict) -> "MobileNetV5Config":
        arch = vision_config.get("architecture") or "mobilenetv5_300m_enc"
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(f"vision_config.architecture {arch!r}: only {SUPPORTED_ARCHITECTURES} are supported")
        args = dict(vision_config.get("model_args") or {})
        for key in ("act_layer", "norm_layer", "aa_layer", "se_layer", "round_chs_fn", "features_only"):
            if args.get(key):
                raise ValueError(f"vision_config.model_args.{key} is not supported")
            args.pop(key, None)
        multiplier = float(args.pop("channel_multiplier", 1.0))
        group_size = args.pop("group_size", None)
        fix_stem = bool(args.pop("fix_stem", multiplier < 1.0))
        stages = decode_stages(args.pop("block_args", None) or _mobilenetv5_300m_arch())
        if group_size is not None:
            stages = [[s if s.group_size is not None else replace(s, group_size=int(group_size)) for s in st]
                      for st in stages]

        def round_chs(c: int) -> int:
            return make_divisible(c * multiplier) if multiplier else c

        stages = [[replace(s, out_chs=round_chs(s.out_chs),
                           force_in_chs=round_chs(s.force_in_chs) if s.force_in_chs else 0) for s in st]
                  for st in stages]
        stem = int(args.pop("stem_size", 64))
        kwargs = dict(
            stem_size=stem if fix_stem else round_chs(stem),
            stem_bias=bool(args.pop("stem_bias", True)),
            in_chans=int(args.pop("in_chans", 3)),
            pad_type=str(args.pop("pad_type", "same")),
            msfa_indices=tuple(int(i) for i in args.pop("msfa_indices", (-2, -1))),
            msfa_output_resolution=int(args.pop("msfa_output_resolution", 16)),
            layer_scale=args.pop("layer_scale_init_value", 1e-5) is not None,
        )
        unknown = sorted(k for k in args if k not in cls._INERT)
        if unknown:
            raise ValueError(f"vision_config.model_args: unsupported keys {unknown}")
        cfg = cls(stages=tuple(tuple(st) for st in _assign_strides(stages)),
                  stage_strides=tuple(st[0].stride for st in stages), **kwargs)
        hidden = vision_config.get("hidden_size")
        if hidden is not None and int(hidden) != cfg.num_features:
            raise ValueError(f"vision_config.hidden_size {hidden} must equal the MobileNetV5 encoder's "
                             f"{cfg.num_features} output channels")
        return cfg

    @property
    def num_tokens(self) -> int:
        return self.msfa_output_resolution ** 2


def _assign_strides(stages: list[list[BlockSpec]], output_stride: int = 32) -> list[list[BlockSpec]]:
    """timm's stage builder: only a stage's first block may stride; a stride that would take
    the total past ``output_stride`` becomes dilation of the following blocks instead."""
    current, dilation, out = 2, 1, []
    for stage in stages:
        built = []
        for i, spec in enumerate(stage):
            stride = spec.stride if i == 0 else 1
            if stride not in (1, 2):
                raise ValueError(f"vision_config: block stride {stride} must be 1 or 2")
            next_dilation = dilation
            if stride > 1:
                if current * stride > output_stride:
                    next_dilation, stride = dilation * stride, 1
                else:
                    current *= stride
            built.append(replace(spec, stride=stride, dilation=dilation))
            dilation = next_dilation
        out.append(built)
    return out


# --------------------------------------------------------------------------- blocks
def _groups(group_size: int | None, channels: int, default: int | None) -> int:
    size = default if group_size is None else group_size
    if not size:
        return 1
    if channels % size:
        raise ValueError(f"vision_config: group size {size} does not divide {channels} channels")
    return channels // size


class EdgeResidual(nn.Module):
    def __init__(self, spec: BlockSpec, in_chs: int, act: Callable, pad: str):
        super().__init__()
        mid = make_divisible((spec.force_in_chs or in_chs) * spec.exp_ratio)
        self.has_skip = in_chs == spec.out_chs and spec.stride == 1 and not spec.noskip
        self.conv_exp = Conv2d(in_chs, mid, spec.kernel, spec.stride, spec.dilation,
                               _groups(spec.group_size, mid, 0), pad_type=pad)
        self.bn1 = RMSNorm2d(mid, act)
        self.conv_pwl = Conv2d(mid, spec.out_chs, spec.pw_kernel, pad_type=pad)
        self.bn2 = RMSNorm2d(spec.out_chs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.bn2(self.conv_pwl(self.bn1(self.conv_exp(x))))
        return h + x if self.has_skip else h


class UniversalInvertedResidual(nn.Module):
    def __init__(self, spec: BlockSpec, in_chs: int, act: Callable, pad: str, layer_scale: bool):
        super().__init__()
        out = spec.out_chs
        self.has_skip = in_chs == out and spec.stride == 1 and not spec.noskip
        if spec.stride > 1 and not (spec.start_kernel or spec.mid_kernel or spec.end_kernel):
            raise ValueError("vision_config: a strided uir block needs a depthwise kernel")
        d = spec.dilation
        self.dw_start = None
        if spec.start_kernel:
            self.dw_start = ConvNorm(in_chs, in_chs, spec.start_kernel, None,
                                     stride=1 if spec.mid_kernel else spec.stride, dilation=d,
                                     groups=_groups(spec.group_size, in_chs, 1), pad_type=pad)
        mid = make_divisible(in_chs * spec.exp_ratio)
        self.pw_exp = ConvNorm(in_chs, mid, 1, act, pad_type=pad)
        self.dw_mid = None
        if spec.mid_kernel:
            self.dw_mid = ConvNorm(mid, mid, spec.mid_kernel, act, stride=spec.stride, dilation=d,
                                   groups=_groups(spec.group_size, mid, 1), pad_type=pad)
        self.pw_proj = ConvNorm(mid, out, 1, None, pad_type=pad)
        self.dw_end = None
        if spec.end_kernel:
            stride = spec.stride if not (spec.start_kernel or spec.mid_kernel) else 1
            self.dw_end = ConvNorm(out, out, spec.end_kernel, None, stride=stride, dilation=d,
                                   groups=_groups(spec.group_size, out, 1), pad_type=pad)
        self.layer_scale = LayerScale2d(out) if layer_scale else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.dw_start(x) if self.dw_start is not None else x
        h = self.pw_exp(h)
        if self.dw_mid is not None:
            h = self.dw_mid(h)
        h = self.pw_proj(h)
        if self.dw_end is not None:
            h = self.dw_end(h)
        if self.layer_scale is not None:
            h = self.layer_scale(h)
        return h + x if self.has_skip else h


class _Projection(nn.Module):
    """A named stage of a q/k/v/output path (``down_conv`` -> ``norm`` -> ``proj``)."""

    def __init__(self, dim: int, out: int, kernel: int, stride: int, dilation: int, pad: str):
        super().__init__()
        self.down_conv = self.norm = None
        if stride > 1:
            self.down_conv = Conv2d(dim, dim, kernel, stride, dilation, groups=dim, pad_type=pad)
            self.norm = RMSNorm2d(dim)
        self.proj = Conv2d(dim, out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.down_conv is not None:
            x = self.norm(self.down_conv(x))
        return self.proj(x)


class MultiQueryAttention2d(nn.Module):
    """Heads with their own queries over one shared key and value map, taken at
    ``kv_stride`` (timm's ``MultiQueryAttention2d`` without query strides, as MobileNetV5
    builds it). Channels of the query map are head-major (head h = channels h*k..h*k+k)."""

    def __init__(self, spec: BlockSpec, dim: int, pad: str):
        super().__init__()
        self.num_heads, self.key_dim, self.value_dim = spec.num_heads, spec.key_dim, spec.value_dim
        self.query = _Projection(dim, spec.num_heads * spec.key_dim, 1, 1, 1, pad)
        self.key = _Projection(dim, spec.key_dim, spec.kernel, spec.kv_stride, spec.dilation, pad)
        self.value = _Projection(dim, spec.value_dim, spec.kernel, spec.kv_stride, spec.dilation, pad)
        self.output = _Projection(spec.num_heads * spec.value_dim, spec.out_chs, 1, 1, 1, pad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        heads, kd, vd = self.num_heads, self.key_dim, self.value_dim
        # [B, heads*kd, H, W] -> [B, heads*H*W, 1, kd]: with one shared key/value head,
        # every (head, position) pair is just another query row of a single-head attention.
        q = self.query(x).reshape(b, heads, kd, h * w).transpose(2, 3).reshape(b, heads * h * w, 1, kd)
        k = self.key(x).flatten(2).transpose(1, 2).unsqueeze(2)      # [B, P, 1, kd]
        v = self.value(x).flatten(2).transpose(1, 2).unsqueeze(2)    # [B, P, 1, vd]
        o = encoder_attention(q, k, v, EncoderBatch.padded(), scale=kd ** -0.5)
        # [B, heads*H*W, 1, vd] -> [B, H, W, heads*vd] -> [B, heads*vd, H, W]
        o = o.reshape(b, heads, h * w, vd).transpose(1, 2).reshape(b, h, w, heads * vd).permute(0, 3, 1, 2)
        return self.output(o.contiguous())


class MobileAttention(nn.Module):
    def __init__(self, spec: BlockSpec, in_chs: int, pad: str, layer_scale: bool):
        super().__init__()
        self.has_skip = spec.stride == 1 and in_chs == spec.out_chs and not spec.noskip
        self.norm = RMSNorm2d(in_chs)
        self.attn = MultiQueryAttention2d(spec, in_chs, pad)
        self.layer_scale = LayerScale2d(spec.out_chs) if layer_scale else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.attn(self.norm(x))
        if self.layer_scale is not None:
            h = self.layer_scale(h)
        return h + x if self.has_skip else h


class MultiScaleFusionAdapter(nn.Module):
    """Nearest-upsample the tapped maps to the first (largest) one, concatenate channels,
    a 1x1 expand/project block (no skip, no layer scale), bring the map to the output grid
    (average pooling when it divides, else bilinear), RMSNorm."""

    def __init__(self, in_chs: int, out_chs: int, resolution: int, act: Callable, pad: str):
        super().__init__()
        self.resolution = resolution
        spec = BlockSpec("uir", out_chs=out_chs, exp_ratio=2.0, noskip=True)
        self.ffn = UniversalInvertedResidual(spec, in_chs, act, pad, layer_scale=False)
        self.norm = RMSNorm2d(out_chs)

    def forward(self, maps: list[torch.Tensor]) -> torch.Tensor:
        hh, ww = maps[0].shape[-2:]
        resized = [m if (m.shape[-2] >= hh and m.shape[-1] >= ww) else F.interpolate(m, size=(hh, ww), mode="nearest")
                   for m in maps]
        x = self.ffn(torch.cat(resized, dim=1))
        r = self.resolution
        if (hh, ww) != (r, r):
            if hh % r or ww % r:
                x = F.interpolate(x, size=(r, r), mode="bilinear")
            else:
                x = F.avg_pool2d(x, kernel_size=(hh // r, ww // r), stride=(hh // r, ww // r))
        return self.norm(x)


# --------------------------------------------------------------------------- tower
class MobileNetV5Tower(nn.Module):
    """Gemma 3n's vision tower: pixels [B, 3, H, W] -> soft tokens [B, res*res, 2048]
    (res = ``msfa_output_resolution``, 16: 256 tokens), in the tower's dtype. These are
    transformers' ``vision_tower(...).last_hidden_state`` flattened as
    ``Gemma3nModel.get_image_features`` does, before its sqrt(hidden) scaling and
    ``embed_vision``."""

    def __init__(self, cfg: MobileNetV5Config):
        super().__init__()
        self.cfg = cfg
        act = _activation(None, cfg.act)
        pad = cfg.pad_type
        self.conv_stem = ConvNorm(cfg.in_chans, cfg.stem_size, 3, act, stride=2, bias=cfg.stem_bias, pad_type=pad)
        in_chs = cfg.stem_size
        stages, stage_out = [], []
        for stage in cfg.stages:
            blocks = []
            for spec in stage:
                block_act = _activation(spec.act, cfg.act)
                if spec.kind == "er":
                    blocks.append(EdgeResidual(spec, in_chs, block_act, pad))
                elif spec.kind == "uir":
                    blocks.append(UniversalInvertedResidual(spec, in_chs, block_act, pad, cfg.layer_scale))
                else:
                    blocks.append(MobileAttention(spec, in_chs, pad, cfg.layer_scale))
                in_chs = spec.out_chs
            stages.append(nn.ModuleList(blocks))
            stage_out.append(in_chs)
        self.blocks = nn.ModuleList(stages)
        self.msfa_taps, msfa_in = self._msfa_taps(cfg, stage_out)
        self.msfa = MultiScaleFusionAdapter(msfa_in, cfg.num_features, cfg.msfa_output_resolution, act, pad)

    @staticmethod
    def _msfa_taps(cfg: MobileNetV5Config, stage_out: list[int]) -> tuple[frozenset[int], int]:
        """Which feature maps the MSFA fuses, by timm's rule: ``msfa_indices`` count over the
        feature list (the stem when the first block strides, then each stage that ends before
        a stride or the end), and each resolved index is taken as the position in
        [stem, stage 0, stage 1, ...]."""
        strides = cfg.stage_strides
        features = [cfg.stem_size] if strides[0] > 1 else []
        for i, out in enumerate(stage_out):
            if i + 1 == len(strides) or strides[i + 1] > 1:
                features.append(out)
        taps = []
        for idx in cfg.msfa_indices:
            j = len(features) + idx if idx < 0 else idx
            if not 0 <= j < len(features):
                raise ValueError(f"vision_config: msfa index {idx} outside the {len(features)} feature maps")
            taps.append(j)
        maps = [cfg.stem_size] + stage_out
        if max(taps) >= len(maps) or sum(maps[j] for j in taps) != sum(features[j] for j in taps):
            raise ValueError(f"vision_config: msfa_indices {cfg.msfa_indices} do not select stage outputs")
        return frozenset(taps), sum(features[j] for j in taps)

    @classmethod
    def from_hf(cls, vision_config: dict) -> "MobileNetV5Tower":
        """From config.json's ``vision_config`` (``architecture`` + optional ``model_args``)."""
        return cls(MobileNetV5Config.from_hf(vision_config))

    @property
    def num_tokens(self) -> int:
        """Soft tokens per image (Gemma 3n's ``vision_soft_tokens_per_image``)."""
        return self.cfg.num_tokens

    @property
    def hidden_size(self) -> int:
        return self.cfg.num_features

    def map_weight_name(self, name: str) -> str | None:
        """A name under transformers' ``vision_tower.`` (``timm_model.blocks.0.0...``) or a
        bare timm name -> this module's name."""
        return name[len("timm_model."):] if name.startswith("timm_model.") else name

    def keeps_weight(self, name: str) -> bool:
        """Every weight of the encoder is used (timm's encoder has no head)."""
        return True

    def feature_map(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> the MSFA output [B, 2048, res, res] (transformers'
        ``last_hidden_state``)."""
        if pixels.dim() != 4 or pixels.shape[1] != self.cfg.in_chans:
            raise ValueError(f"pixel_values must be [B, {self.cfg.in_chans}, H, W], got {tuple(pixels.shape)}")
        x = self.conv_stem(pixels.to(self.conv_stem.conv.weight.dtype))
        taps = [x] if 0 in self.msfa_taps else []
        for i, stage in enumerate(self.blocks, start=1):
            for block in stage:
                x = block(x)
            if i in self.msfa_taps:
                taps.append(x)
        return self.msfa(taps)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] (all images of a step) -> [B, res*res, 2048], row-major positions."""
        fmap = self.feature_map(pixels)
        return fmap.flatten(2).transpose(1, 2)
