"""Where a Flux model's components live, and the renaming of Black Forest Labs' single files.

Two layouts are read:

* the diffusers folder: ``model_index.json``, ``transformer/``, ``vae/``, ``text_encoder/``
  (CLIP), ``text_encoder_2/`` (T5), ``tokenizer/``, ``tokenizer_2/``, ``scheduler/``;
* BFL's single files beside the same config folders: ``flux1-<variant>.safetensors`` (the
  transformer, fused q/k/v and q/k/v/MLP rows) and ``ae.safetensors`` (the autoencoder, its
  attention as 1x1 convolutions). A folder holding both layouts loads the diffusers one.

The single-file streams are renamed (and their fused rows split) on the fly into the
diffusers names the modules carry, one tensor at a time.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterable, Iterator

import attrs
import torch

from mistralrs_core.loading.safetensors_io import SafetensorsWeights

COMPONENTS = ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
#: what the hub download fetches (the diffusers layout only: a BFL repo holds both)
HUB_PATTERNS = ["model_index.json", *(f"{c}/*" for c in COMPONENTS)]


def read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{what}: {str(path)!r} is missing")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{what}: {str(path)!r} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{what}: {str(path)!r} must hold a JSON object")
    return value


def _has_weights(folder: Path) -> bool:
    return folder.is_dir() and any(folder.glob("*.safetensors"))


@attrs.frozen
class FluxFiles:
    root: Path
    transformer_weights: Path       # a folder (diffusers) or one file (BFL)
    transformer_bfl: bool
    vae_weights: Path
    vae_bfl: bool

    def folder(self, component: str) -> Path:
        return self.root / component

    def config(self, component: str, name: str = "config.json") -> dict:
        return read_json(self.root / component / name, f"{component} config")


def _single_transformer_file(root: Path) -> Path | None:
    files = sorted(p for p in root.glob("*.safetensors") if p.name != "ae.safetensors")
    flux = [p for p in files if p.name.startswith("flux")]
    picked = flux or files
    if len(picked) > 1:
        raise ValueError(f"model folder {str(root)!r}: several single-file transformers "
                         f"({', '.join(p.name for p in picked)}); keep one")
    return picked[0] if picked else None


def locate(root: Path) -> FluxFiles:
    """Find every component; each missing one is named in a ``FileNotFoundError``."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"model directory {str(root)!r} does not exist")
    missing = [c for c in ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2",
                           "scheduler") if not (root / c).is_dir()]
    if missing:
        raise FileNotFoundError(f"model folder {str(root)!r} lacks the component folder(s) {', '.join(missing)} "
                                "(a Flux model needs transformer/, vae/, text_encoder/, text_encoder_2/, "
                                "tokenizer/, tokenizer_2/ and scheduler/, the single-file layout keeping "
                                "at least their config files)")
    if _has_weights(root / "transformer"):
        tw, tbfl = root / "transformer", False
    else:
        single = _single_transformer_file(root)
        if single is None:
            raise FileNotFoundError(f"transformer: no weights in {str(root / 'transformer')!r} and no "
                                    f"flux1-*.safetensors in {str(root)!r}")
        tw, tbfl = single, True
    if _has_weights(root / "vae"):
        vw, vbfl = root / "vae", False
    elif (root / "ae.safetensors").is_file():
        vw, vbfl = root / "ae.safetensors", True
    else:
        raise FileNotFoundError(f"vae: no weights in {str(root / 'vae')!r} and no ae.safetensors in {str(root)!r}")
    for comp in ("text_encoder", "text_encoder_2"):
        if not _has_weights(root / comp):
            raise FileNotFoundError(f"{comp}: no safetensors weights in {str(root / comp)!r}")
    return FluxFiles(root, tw, tbfl, vw, vbfl)


# --------------------------------------------------------------------------- BFL transformer names

_DOUBLE = {
    "img_mod.lin": "norm1.linear", "txt_mod.lin": "norm1_context.linear",
    "img_attn.norm.query_norm.scale": "attn.norm_q.weight", "img_attn.norm.key_norm.scale": "attn.norm_k.weight",
    "txt_attn.norm.query_norm.scale": "attn.norm_added_q.weight",
    "txt_attn.norm.key_norm.scale": "attn.norm_added_k.weight",
    "img_attn.proj": "attn.to_out.0", "txt_attn.proj": "attn.to_add_out",
    "img_mlp.0": "ff.net.0.proj", "img_mlp.2": "ff.net.2",
    "txt_mlp.0": "ff_context.net.0.proj", "txt_mlp.2": "ff_context.net.2",
}
_SINGLE = {
    "linear2": "proj_out", "modulation.lin": "norm.linear",
    "norm.query_norm.scale": "attn.norm_q.weight", "norm.key_norm.scale": "attn.norm_k.weight",
}
_TOP = {
    "img_in": "x_embedder", "txt_in": "context_embedder",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer.linear": "proj_out",
}
_BLOCK = re.compile(r"^(double_blocks|single_blocks)\.(\d+)\.(.+?)(?:\.(weight|bias))?$")


def _split_name(name: str) -> tuple[str, str]:
    """'a.b.weight' -> ('a.b', '.weight'); a ``.scale`` leaf stays in the stem."""
    for leaf in (".weight", ".bias"):
        if name.endswith(leaf):
            return name[: -len(leaf)], leaf
    return name, ""


def bfl_transformer_weights(weights: Iterable[tuple[str, torch.Tensor]], inner_dim: int,
                            ) -> Iterator[tuple[str, torch.Tensor]]:
    """BFL transformer names -> diffusers names (fused rows split, the final modulation's
    (shift, scale) halves put in diffusers' (scale, shift) order)."""
    for name, t in weights:
        stem, leaf = _split_name(name)
        m = _BLOCK.match(name)
        if m:
            kind, idx, rest = m.group(1), m.group(2), m.group(3)
            if kind == "double_blocks":
                prefix = f"transformer_blocks.{idx}."
                if rest in ("img_attn.qkv", "txt_attn.qkv"):
                    parts = (("attn.to_q", "attn.to_k", "attn.to_v") if rest.startswith("img")
                             else ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"))
                    for part, chunk in zip(parts, t.split(inner_dim, dim=0)):
                        yield prefix + part + leaf, chunk
                    continue
                target = _DOUBLE.get(rest)
            else:
                prefix = f"single_transformer_blocks.{idx}."
                if rest == "linear1":
                    sizes = [inner_dim, inner_dim, inner_dim, t.shape[0] - 3 * inner_dim]
                    for part, chunk in zip(("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), t.split(sizes, 0)):
                        yield prefix + part + leaf, chunk
                    continue
                target = _SINGLE.get(rest)
            if target is None:
                raise ValueError(f"single-file transformer: unexpected tensor {name!r}")
            # ``.scale`` norm weights carry no leaf; their target names the parameter.
            yield prefix + (target if target.endswith(".weight") else target + leaf), t
            continue
        if stem == "final_layer.adaLN_modulation.1":
            shift, scale = t.chunk(2, dim=0)
            yield "norm_out.linear" + leaf, torch.cat([scale, shift], 0)
            continue
        target = _TOP.get(stem)
        if target is None:
            raise ValueError(f"single-file transformer: unexpected tensor {name!r}")
        yield target + leaf, t


# --------------------------------------------------------------------------- BFL autoencoder names

_AE_RESNET = {"nin_shortcut": "conv_shortcut"}
_AE_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}


def bfl_vae_weights(weights: Iterable[tuple[str, torch.Tensor]], num_up_blocks: int,
                    ) -> Iterator[tuple[str, torch.Tensor]]:
    """``ae.safetensors`` decoder names -> diffusers' (the encoder half is skipped; BFL numbers
    up blocks from the output side)."""
    for name, t in weights:
        if not name.startswith("decoder."):
            continue
        rest = name[len("decoder."):]
        parts = rest.split(".")
        if parts[0] == "mid":
            if parts[1] in ("block_1", "block_2"):
                idx = 0 if parts[1] == "block_1" else 1
                layer = _AE_RESNET.get(parts[2], parts[2])
                out = f"decoder.mid_block.resnets.{idx}.{layer}.{parts[3]}"
            elif parts[1] == "attn_1":
                out = f"decoder.mid_block.attentions.0.{_AE_ATTN[parts[2]]}.{parts[3]}"
                if parts[2] != "norm" and parts[3] == "weight":
                    t = t.reshape(t.shape[0], t.shape[1])
            else:
                raise ValueError(f"ae.safetensors: unexpected tensor {name!r}")
        elif parts[0] == "up":
            block = num_up_blocks - 1 - int(parts[1])
            if parts[2] == "block":
                layer = _AE_RESNET.get(parts[4], parts[4])
                out = f"decoder.up_blocks.{block}.resnets.{parts[3]}.{layer}.{parts[5]}"
            elif parts[2] == "upsample":
                out = f"decoder.up_blocks.{block}.upsamplers.0.conv.{parts[4]}"
            else:
                raise ValueError(f"ae.safetensors: unexpected tensor {name!r}")
        elif parts[0] == "norm_out":
            out = f"decoder.conv_norm_out.{parts[1]}"
        elif parts[0] in ("conv_in", "conv_out"):
            out = f"decoder.{rest}"
        else:
            raise ValueError(f"ae.safetensors: unexpected tensor {name!r}")
        yield out, t


def open_weights(path: Path) -> SafetensorsWeights:
    return SafetensorsWeights(path)
