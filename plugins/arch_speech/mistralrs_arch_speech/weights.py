"""Checkpoint layouts -> the transformers 5 names our modules carry, as weights stream in.

Each function takes and returns a stream of ``(name, tensor)`` pairs and holds back only
what it must combine (a weight-norm pair, Dia's per-codebook embedding tables), so the
core ``WeightLoader`` still places one tensor at a time.
"""
from __future__ import annotations

import re
from typing import Iterable, Iterator

import torch

Stream = Iterable[tuple[str, torch.Tensor]]

# --------------------------------------------------------------------------- Dia, original release

_DENSE_IN = re.compile(r"\.(self_attention|cross_attention)\.(q_proj|k_proj|v_proj)\.weight$")
_DENSE_OUT = re.compile(r"\.(self_attention|cross_attention)\.o_proj\.weight$")
_CHANNEL_EMBED = re.compile(r"^decoder\.embeddings\.(\d+)\.weight$")


def dia_original_weights(stream: Stream, channels: int) -> Iterator[tuple[str, torch.Tensor]]:
    """The original ``nari-labs/Dia-1.6B`` tensors: DenseGeneral kernels stored input-first
    with their output split over axes (q/k/v ``[in, heads, head_dim]``, o ``[heads,
    head_dim, out]``, ``wi_fused`` ``[in, 2, hidden]`` with gate then up, ``logits_dense``
    ``[hidden, channels, vocab]``) and one embedding table per codebook."""
    tables: dict[int, torch.Tensor] = {}
    for name, t in stream:
        if _DENSE_IN.search(name) or name.endswith(".mlp.wi_fused.weight") or name == "decoder.logits_dense.weight":
            w = t.reshape(t.shape[0], -1).t().contiguous()
            if name.endswith("wi_fused.weight"):
                name = name.replace("wi_fused", "gate_up_proj")
            elif name == "decoder.logits_dense.weight":
                name = "logits_dense.weight"
            yield name, w
        elif _DENSE_OUT.search(name) or name.endswith(".mlp.wo.weight"):
            yield name.replace(".mlp.wo.", ".mlp.down_proj."), t.reshape(-1, t.shape[-1]).t().contiguous()
        elif (m := _CHANNEL_EMBED.match(name)):
            tables[int(m.group(1))] = t
            if len(tables) == channels:
                yield "decoder.embeddings.embed.weight", torch.cat([tables[c] for c in range(channels)])
                tables.clear()
        else:
            yield name, t
    if tables:
        raise ValueError(f"Dia weights: {len(tables)} of {channels} per-codebook embedding tables present")


# --------------------------------------------------------------------------- DAC

_G_SUFFIXES = (".weight_g", ".parametrizations.weight.original0")
_V_SUFFIXES = (".weight_v", ".parametrizations.weight.original1")


def fold_weight_norm(stream: Stream) -> Iterator[tuple[str, torch.Tensor]]:
    """``weight = g * v / ||v||`` (norm over every axis but the first, torch's default
    ``dim=0``, also for the transposed convolutions) for ``weight_g``/``weight_v`` pairs
    (``torch.nn.utils.weight_norm``) and ``parametrizations.weight.original0/1``."""
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in stream:
        part = next(((s, "g") for s in _G_SUFFIXES if name.endswith(s)), None) or \
            next(((s, "v") for s in _V_SUFFIXES if name.endswith(s)), None)
        if part is None:
            yield name, t
            continue
        suffix, which = part
        base = name[: -len(suffix)]
        pair = pending.setdefault(base, {})
        pair[which] = t
        if len(pair) == 2:
            del pending[base]
            g, v = pair["g"].float(), pair["v"].float()
            norm = v.flatten(1).norm(dim=1).view(-1, *([1] * (v.dim() - 1)))
            yield base + ".weight", (v * (g / norm)).to(pair["v"].dtype)
    if pending:
        raise ValueError(f"DAC weights: weight-norm pair incomplete for {sorted(pending)[:4]}")


_ORIG_DEC = re.compile(r"^decoder\.model\.(\d+)\.(.*)$")
_ORIG_RES = re.compile(r"^block\.(\d+)\.block\.(\d+)\.(.*)$")
_RES_PARTS = ("snake1", "conv1", "snake2", "conv2")


def dac_original_name(name: str, n_blocks: int) -> str | None:
    """The original DAC release's ``decoder.model.N...`` sequential names -> transformers'.
    ``n_blocks``: the number of upsampling blocks (``model.1 .. model.n``)."""
    m = _ORIG_DEC.match(name)
    if m is None:
        return name
    idx, rest = int(m.group(1)), m.group(2)
    if idx == 0:
        return "decoder.conv1." + rest
    if idx == n_blocks + 1:
        return "decoder.snake1." + rest
    if idx == n_blocks + 2:
        return "decoder.conv2." + rest
    if idx > n_blocks + 2:
        return None                   # tanh: no weights
    b = idx - 1
    if rest.startswith("block.0."):
        return f"decoder.block.{b}.snake1." + rest[len("block.0."):]
    if rest.startswith("block.1."):
        return f"decoder.block.{b}.conv_t1." + rest[len("block.1."):]
    r = _ORIG_RES.match(rest)
    if r is None:
        raise ValueError(f"DAC weights: unexpected tensor {name!r}")
    unit, part = int(r.group(1)) - 1, int(r.group(2))
    return f"decoder.block.{b}.res_unit{unit}.{_RES_PARTS[part]}.{r.group(3)}"


def dac_original_blocks(names: Iterable[str]) -> int:
    """How many upsampling blocks an original-layout DAC decoder has."""
    idx = {int(m.group(1)) for n in names if (m := _ORIG_DEC.match(n)) and m.group(2).startswith("block.1.")}
    return len(idx)


def is_dac_original(names: Iterable[str]) -> bool:
    return any(n.startswith("decoder.model.") for n in names)
