"""UQFF 1.2, upstream's quantized-model directory (``reference/uqff-format``).

A directory holds ``<stem>-<N>.uqff`` shards (safetensors files, ~10 GiB each), one
``residual.safetensors`` with the tensors that stayed dense (norms, unquantized layers),
and the model's assets (config, tokenizer, templates). In a shard every quantized layer
``<key>`` (its HF name, ``model.layers.0.self_attn.q_proj``) describes itself:

* ``<key>.weight.format``: u8 scalar, the family tag (0 GGUF, 1 unquantized, 2 HQQ, 3 FP8,
  4 AFQ, 5 F8Q8, 6 MXFP4, upstream's ``QuantizedSerdeType``);
* GGUF family: ``<key>.weight`` the raw ggml blocks as u8 [n bytes], ``<key>.weight.dtype``
  u32 scalar (the ggml type id) and ``<key>.weight.shape`` u32 [rank] (``[out, in]``);
* unquantized: ``<key>.weight`` a plain tensor;
* other families: what their class's ``to_uqff_tensors`` writes;
* ``<key>.bias`` when the layer has one.

Each shard also holds the version scalars ``uqff.version.{major,minor,patch}`` (u32). A
reader refuses another major version and a newer minor, as upstream does.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Iterable, Optional

import torch

VERSION = (1, 2, 0)
_VERSION_KEYS = ("uqff.version.major", "uqff.version.minor", "uqff.version.patch")
RESIDUAL = "residual.safetensors"
SHARD_BYTES = 10 << 30
ASSETS = ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json", "modules.json",
          "chat_template.jinja", "chat_template.json", "processor_config.json", "preprocessor_config.json",
          "special_tokens_map.json", "tokenizer.model")
FORMAT_GGUF, FORMAT_UNQUANT, FORMAT_HQQ, FORMAT_FP8, FORMAT_AFQ, FORMAT_F8Q8, FORMAT_MXFP4 = range(7)
_SHARD = re.compile(r"^(?P<stem>.+)-(?P<n>\d+)\.uqff$")


def _u32(v) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.uint32)


def _u8(v) -> torch.Tensor:
    return torch.tensor(v, dtype=torch.uint8)


# --------------------------------------------------------------------------- writing

def layer_tensors(key: str, method, bias: Optional[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The shard entries of one layer's quant method."""
    from ..qlinear import GGMLQuantMethod
    if isinstance(method, GGMLQuantMethod):
        if method.raw is None:
            raise ValueError(f"{key}: the layer keeps no ggml bytes to write")
        entries = _gguf_entries(method.raw.contiguous().cpu().reshape(-1).clone(), method.ggml_type,
                                [method.out_features, method.in_features])
        out = {f"{key}.{name}": t for name, t in entries.items()}
    else:
        to_uqff = getattr(method, "to_uqff_tensors", None)
        if to_uqff is None:
            raise ValueError(f"{key}: {type(method).__name__} cannot be written to UQFF (no to_uqff_tensors)")
        # the method's entries are named relative to the layer (``weight``, ``weight.scales`` ...)
        out = {f"{key}.{name}": t for name, t in to_uqff().items()}
    if bias is not None:
        out[f"{key}.bias"] = bias.detach().cpu().contiguous()
    return out


def dense_layer_tensors(key: str, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {f"{key}.weight.format": _u8(FORMAT_UNQUANT), f"{key}.weight": weight.detach().cpu().contiguous()}
    if bias is not None:
        out[f"{key}.bias"] = bias.detach().cpu().contiguous()
    return out


def _gguf_entries(raw: torch.Tensor, ggml_type: int, shape: list[int]) -> dict[str, torch.Tensor]:
    """A GGUF-family layer's entries, relative to the layer: the block bytes, the family tag,
    the ggml type id and the shape ([out, in], or [E, out, in] for an expert stack)."""
    return {"weight.format": _u8(FORMAT_GGUF), "weight": raw, "weight.dtype": _u32(int(ggml_type)),
            "weight.shape": _u32(shape)}


class _ExpertStack:
    """One projection of all of a MoE layer's experts as upstream writes it: a single 3-D
    entry (``...experts.gate_proj``) instead of one per expert. GGUF family: the block bytes
    of expert e after expert e-1's, shape [E, out, in]; AFQ: ``weight`` [E, out, words],
    ``weight.scales`` / ``weight.biases`` [E, out, groups], one ``bits`` / ``group_size``
    (upstream 0.9.5's files; ``UqffQuantizedWeight.experts`` reads both back)."""

    def __init__(self, methods):
        self.methods = methods

    def to_uqff_tensors(self) -> dict[str, torch.Tensor]:
        from ..qlinear import GGMLQuantMethod
        m0 = self.methods[0]
        if type(m0) is GGMLQuantMethod:
            return _gguf_entries(torch.cat([m.raw.contiguous().cpu().reshape(-1) for m in self.methods]),
                                 m0.ggml_type, [len(self.methods), m0.out_features, m0.in_features])
        per_expert = [m.to_uqff_tensors() for m in self.methods]
        out = dict(per_expert[0])
        for name in _STACKED_TENSORS:
            out[name] = torch.stack([t[name].cpu() for t in per_expert])
        return out


_STACK_NAMES = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
#: an AFQ layer's per-row tensors, which upstream stacks along a leading expert dimension
_STACKED_TENSORS = ("weight", "weight.scales", "weight.biases")


def _stackable(methods) -> bool:
    """Every expert of one projection stored alike: GGML blocks of one type and shape, or
    AFQ of one width, group size and shape (upstream stacks only these two families: its
    ``IsqType::supports_stacked_gather``, and 0.9.5 refuses HQQ/FP8/F8Q8/MXFP4 experts)."""
    from ..formats.afq import AFQMethod
    from ..qlinear import GGMLQuantMethod
    kinds = {type(m) for m in methods}
    if kinds == {GGMLQuantMethod}:
        return all(m.raw is not None for m in methods) \
            and len({(m.ggml_type, m.out_features, m.in_features) for m in methods}) == 1
    if kinds == {AFQMethod}:
        return len({(m.bits, m.group_size, m.out_features, m.in_features) for m in methods}) == 1
    return False


def _stacked_experts(experts, quant):
    """Upstream's layout (one ``_ExpertStack`` per projection) when it can hold the layer:
    every projection ``_stackable``, no biases, no expert-parallel offset; else None (one
    entry per expert, below)."""
    if getattr(experts, "first", 0) or quant.gate_up_bias is not None or quant.down_bias is not None:
        return None
    # Under the checkpoint's prefix (``...block_sparse_moe.experts``), not our module path.
    match = re.match(r"^(?P<stack>.+)\.0\.[A-Za-z0-9_]+$", experts.part_names.get((0, "gate")) or "")
    if match is None:
        return None
    layer = match.group("stack")
    out = []
    for part, name in _STACK_NAMES.items():
        methods = [quant.parts.get((e, part)) for e in range(experts.num_experts)]
        if any(m is None for m in methods) or not _stackable(methods):
            return None
        out.append((f"{layer}.{name}", _ExpertStack(methods), None))
    return out


def _expert_layers(experts):
    """(name, method, bias) of a MoE layer's quantized experts. GGML and AFQ experts are
    written as upstream writes them, one 3-D stack per projection (``...experts.gate_proj``),
    so upstream's loader reads our files and ours reads its; other experts (HQQ, FP8, F8Q8,
    MXFP4, which upstream cannot quantize as experts at all) one entry per expert and part
    under the checkpoint's names (``...experts.3.w1``), which the reader's
    ``MoEWeightsMixin`` routes back into the same expert slots."""
    from mistralrs_core.layers.moe import QuantizedExperts
    quant = experts.quant
    layer = experts.__dict__.get("hf_name")
    if not isinstance(quant, QuantizedExperts):
        raise ValueError(f"{layer}: experts run by {type(quant).__name__} cannot be written to UQFF")
    stacked = _stacked_experts(experts, quant)
    if stacked is not None:
        yield from stacked
        return
    first, i = getattr(experts, "first", 0), experts.intermediate
    for (e, part), method in sorted(quant.parts.items()):
        name = experts.part_names.get((e + first, part))
        if name is None:
            raise ValueError(f"{layer}: expert {e + first} {part} has no checkpoint name to write it under")
        bias = quant.down_bias if part == "down" else quant.gate_up_bias
        if bias is not None:
            bias = bias[e] if part == "down" else bias[e, :i] if part == "gate" else bias[e, i:]
        yield name, method, bias


def _quantized_layers(model):
    """(HF layer name, quant method, bias) for every quantized layer; fused layers are split
    back into their checkpoint parts (GGML rows are whole blocks, so a row slice is exact)."""
    from mistralrs_core.layers.moe import MoEExperts
    for module in model.modules():
        if isinstance(module, MoEExperts):
            if module.quant is not None:
                yield from _expert_layers(module)
            continue
        method = getattr(module, "qmethod", None)
        if method is None:
            continue
        bias = getattr(module, "bias", None)
        parts = getattr(module, "fused_parts", None)
        if parts:
            from ..qlinear import GGMLQuantMethod
            if isinstance(method, GGMLQuantMethod) and method.raw is not None:
                def rows(start, stop):
                    return GGMLQuantMethod(method.raw[start:stop], method.ggml_type, cpp=False)
            elif hasattr(method, "slice_rows"):
                rows = method.slice_rows
            else:
                name = module.__dict__.get("hf_name") or parts[0][0]
                raise ValueError(f"{name}: a fused {type(method).__name__} cannot be split for UQFF")
            for part, start, stop in parts:
                if part is None:
                    continue
                yield part, rows(start, stop), None if bias is None else bias[start:stop]
        else:
            yield module.__dict__.get("hf_name"), method, bias


def _residual_tensors(model, quantized: set[str]) -> dict[str, torch.Tensor]:
    """Every dense parameter under its checkpoint name (fused dense layers split)."""
    from mistralrs_core.layers.moe import MoEExperts
    out: dict[str, torch.Tensor] = {}
    for module in model.modules():
        if isinstance(module, MoEExperts) and module.quant is None and _dense_experts(module, out):
            continue
        prefix = module.__dict__.get("hf_name")
        parts = getattr(module, "fused_parts", None)
        for attr, p in module.named_parameters(recurse=False):
            if p is None or p.device.type == "meta":
                continue
            if attr == "bias" and (prefix in quantized or (parts and getattr(module, "qmethod", None) is not None)):
                continue   # written next to the quantized weight
            t = p.detach().cpu()
            if parts:
                for part, start, stop in parts:
                    if part is not None:
                        out[f"{part}.{attr}"] = t[start:stop].contiguous()
            else:
                out[f"{prefix}.{attr}" if prefix else attr] = t.contiguous()
    return out


def _dense_experts(experts, out: dict) -> bool:
    """Dense expert stacks written one tensor per expert and part under the checkpoint's
    names (``<name>.weight`` / ``<name>.bias``), which every family's loader routes back
    (a stacked tensor would be read in the family's checkpoint layout, e.g. GPT-OSS's
    interleaved, transposed one). False when a name is unknown: the stacks are written."""
    first, i = getattr(experts, "first", 0), experts.intermediate
    keys = [(e, p) for e in range(experts.num_experts) for p in ("gate", "up", "down")]
    names = {k: experts.part_names.get((k[0] + first, k[1])) for k in keys}
    if any(n is None for n in names.values()) or experts.gate_up_proj is None \
            or experts.gate_up_proj.device.type == "meta":
        return False
    rows = {"gate": slice(0, i), "up": slice(i, 2 * i), "down": slice(None)}
    for (e, part), name in names.items():
        stack = experts.down_proj if part == "down" else experts.gate_up_proj
        bias = experts.down_proj_bias if part == "down" else experts.gate_up_proj_bias
        out[f"{name}.weight"] = stack.detach()[e, rows[part]].cpu().contiguous()
        if bias is not None:
            out[f"{name}.bias"] = bias.detach()[e, rows[part]].cpu().contiguous()
    return True


def write_uqff(model, target: str | Path, source_dir: Optional[Path], stem: str,
               shard_bytes: int = SHARD_BYTES) -> list[Path]:
    """Write ``model``'s quantized layers and residual as a UQFF directory; returns the
    shard paths. ``target``: a directory (shards ``<stem>-<N>.uqff`` there), or a file
    name ending in ``.uqff`` (``out/model.uqff``: directory ``out``, stem ``model``)."""
    from safetensors.torch import save_file
    target = Path(target).expanduser()
    if target.suffix == ".uqff":
        # A file name: its directory, and its stem without any "-<N>" shard number.
        m = _SHARD.match(target.name)
        directory, stem = target.parent, (m.group("stem") if m else target.stem)
    else:
        directory = target
    directory.mkdir(parents=True, exist_ok=True)
    meta = {"uqff.producer": "mistralrs-python", "uqff.producer.mistralrs.version": "0.1.0"}
    version = {k: _u32(v) for k, v in zip(_VERSION_KEYS, VERSION)}
    shards: list[dict] = [{}]
    size = 0
    quantized = set()
    for key, method, bias in _quantized_layers(model):
        entries = layer_tensors(key, method, bias)
        quantized.add(key)
        n = sum(t.numel() * t.element_size() for t in entries.values())
        if size and size + n > shard_bytes:
            shards.append({})
            size = 0
        shards[-1].update(entries)
        size += n
    paths = []
    for old in directory.glob(f"{stem}-*.uqff"):
        if _SHARD.match(old.name):
            old.unlink()
    for i, entries in enumerate(shards):
        path = directory / f"{stem}-{i}.uqff"
        save_file({**version, **entries}, str(path), metadata=meta)
        paths.append(path)
    save_file(_residual_tensors(model, quantized), str(directory / RESIDUAL), metadata={"format": "pt"})
    if source_dir is not None and Path(source_dir).resolve() != directory.resolve():
        for name in ASSETS:
            src = Path(source_dir) / name
            if src.is_file():
                shutil.copyfile(src, directory / name)
    return paths


# --------------------------------------------------------------------------- reading

def expand_shards(from_uqff, model_dir: Optional[Path]) -> list[Path]:
    """``from_uqff`` (a path, a list of paths, or paths joined by ';') -> every shard file:
    ``q4k-0.uqff`` brings its siblings ``q4k-1.uqff`` ... Relative names are looked up in
    the model directory when not found as given."""
    items = from_uqff if isinstance(from_uqff, (list, tuple)) else str(from_uqff).split(";")
    out: list[Path] = []
    for item in items:
        item = str(item).strip()
        if not item:
            continue
        p = Path(item).expanduser()
        if not p.is_file() and model_dir is not None and (model_dir / item).is_file():
            p = model_dir / item
        if not p.is_file():
            raise FileNotFoundError(f"from_uqff: no such UQFF file {item!r}"
                                    + (f" (also looked in {model_dir})" if model_dir is not None else ""))
        m = _SHARD.match(p.name)
        group = [p]
        if m is not None:
            group = sorted((q for q in p.parent.glob(f"{m.group('stem')}-*.uqff")
                            if (mm := _SHARD.match(q.name)) and mm.group("stem") == m.group("stem")),
                           key=lambda q: int(_SHARD.match(q.name).group("n")))
        for q in group:
            if q not in out:
                out.append(q)
    if not out:
        raise ValueError("from_uqff: no UQFF file given")
    return out


#: the 3-D expert stacks upstream writes for MoE layers (one entry per projection)
_STACKED_EXPERTS = re.compile(r"(?:^|\.)experts\.(?:gate_proj|up_proj|down_proj)$")


class UqffQuantizedWeight:
    """One layer read from a shard: its entries, turned into the method by the quant hook
    (``uqff_quant_method``) or dequantized when no layer can hold it packed."""

    def __init__(self, key: str, entries: dict[str, torch.Tensor], where: Path):
        self.key, self.entries, self.where = key, entries, where
        self.format = int(entries[f"{key}.weight.format"].item())
        named_stack = _STACKED_EXPERTS.search(key) is not None
        if self.format == FORMAT_GGUF:
            shape = entries[f"{key}.weight.shape"].to(torch.int64).tolist()
            if len(shape) != 2 and not (len(shape) == 3 and named_stack):
                raise ValueError(f"{where}: {key}: only 2-D GGUF entries (and 3-D expert stacks named "
                                 f"experts.gate_proj/up_proj/down_proj) are supported, shape {shape}")
            self.shape = tuple(shape)
            self.ggml_type = int(entries[f"{key}.weight.dtype"].item())
            self.stacked = len(shape) == 3
        else:
            weight = entries.get(f"{key}.weight")
            self.stacked = weight is not None and weight.dim() == 3 and self.format != FORMAT_UNQUANT
            if self.stacked and not (named_stack and self.format == FORMAT_AFQ):
                raise ValueError(f"{where}: {key}: a 3-D entry of UQFF format tag {self.format}; only GGUF and "
                                 "AFQ expert stacks named experts.gate_proj/up_proj/down_proj are supported "
                                 "(upstream stacks no other family)")

    def experts(self) -> list[tuple[str, "UqffQuantizedWeight"]]:
        """Upstream writes a MoE layer's experts as one 3-D entry per projection
        (``...experts.gate_proj``; GGUF: [E, out, in] blocks, expert e's rows after expert
        e-1's; AFQ: each of ``weight`` / ``weight.scales`` / ``weight.biases`` with a leading
        expert dimension): the per-expert layers, named as per-expert checkpoints name them
        (``...experts.<e>.gate_proj``), so the MoE layer takes them as its own writer's."""
        stack, part = self.key.rsplit(".", 1)
        names = [f"{stack}.{e}.{part}" for e in range(self._num_stacked())]
        if self.format != FORMAT_GGUF:
            per_row = {f"{self.key}.{t}" for t in _STACKED_TENSORS}
            return [(name, UqffQuantizedWeight(name, {
                name + k[len(self.key):]: (v[e] if k in per_row else v) for k, v in self.entries.items()}, self.where))
                for e, name in enumerate(names)]
        from ..formats import get_format
        n_exp, out, k = self.shape
        size = out * get_format(self.ggml_type).row_bytes(k)
        raw = self.entries[f"{self.key}.weight"].reshape(-1)
        if raw.numel() != n_exp * size:
            raise ValueError(f"{self.where}: {self.key}: {raw.numel()} bytes for {n_exp} experts of [{out}, {k}]")
        return [(name, UqffQuantizedWeight(name, {
            f"{name}.weight": raw[e * size:(e + 1) * size],
            f"{name}.weight.format": self.entries[f"{self.key}.weight.format"],
            f"{name}.weight.dtype": self.entries[f"{self.key}.weight.dtype"],
            f"{name}.weight.shape": torch.tensor([out, k], dtype=torch.int64)}, self.where))
            for e, name in enumerate(names)]

    def _num_stacked(self) -> int:
        if self.format == FORMAT_GGUF:
            return self.shape[0]
        sizes = {self.entries[f"{self.key}.{t}"].shape[0] for t in _STACKED_TENSORS
                 if f"{self.key}.{t}" in self.entries}
        if len(sizes) != 1 or any(self.entries[f"{self.key}.{t}"].dim() != 3 for t in _STACKED_TENSORS
                                  if f"{self.key}.{t}" in self.entries):
            raise ValueError(f"{self.where}: {self.key}: the stacked tensors disagree on the number of experts")
        return sizes.pop()

    def method(self, compute_dtype: torch.dtype, device, cpp_impl=None):
        if self.format == FORMAT_GGUF:
            from ..formats import get_format
            from ..qlinear import GGMLQuantMethod
            spec = get_format(self.ggml_type)
            raw = self.entries[f"{self.key}.weight"].reshape(self.shape[0], spec.row_bytes(self.shape[1]))
            if device is not None and torch.device(device).type != "cpu":
                raw = raw.to(device)
            return GGMLQuantMethod(raw, self.ggml_type, self.shape, compute_dtype=compute_dtype, cpp_impl=cpp_impl)
        cls = _FAMILY_CLASSES.get(self.format)
        if cls is None:
            raise ValueError(f"{self.where}: {self.key}: unknown UQFF format tag {self.format}")
        from .types import TYPES
        target = TYPES[cls].load_class()
        from_uqff = getattr(target, "from_uqff_tensors", None)
        if from_uqff is None:
            raise ValueError(f"{self.where}: {self.key}: {target.__name__} cannot read UQFF entries")
        prefix = f"{self.key}."
        mine = {k[len(prefix):]: (t if device is None else t.to(device))
                for k, t in self.entries.items() if k.startswith(prefix)}
        return from_uqff(mine)

    # Tensor parallelism (``mistralrs_core.distributed.packed``): a GGUF-family layer is
    # sharded as a GGUF file's blocks are (whole rows; columns at block boundaries), through
    # the same code, so both refuse the same splits. The other families slice their own
    # method (``take_rows`` / ``take_cols`` of AFQ, F8Q8, FP8 and HQQ).
    def _ggml_view(self):
        from ..formats import get_format
        from ..qlinear import GGUFQuantizedWeight
        if self.format != FORMAT_GGUF:
            raise ValueError(f"{self.where}: {self.key}: UQFF format tag {self.format} has no GGUF block view")
        row_bytes = get_format(self.ggml_type).row_bytes(self.shape[1])
        raw = self.entries[f"{self.key}.weight"].reshape(self.shape[0], row_bytes)
        return GGUFQuantizedWeight(raw, self.ggml_type, self.shape)

    def _from_view(self, view) -> "UqffQuantizedWeight":
        entries = dict(self.entries)
        entries[f"{self.key}.weight"] = view.raw.contiguous().reshape(-1)
        entries[f"{self.key}.weight.shape"] = torch.tensor(list(view.shape), dtype=torch.int64)
        return UqffQuantizedWeight(self.key, entries, self.where)

    def take_rows(self, ranges) -> "UqffQuantizedWeight":
        from mistralrs_core.distributed.packed import take_rows
        if self.format == FORMAT_GGUF:
            return self._from_view(take_rows(self._ggml_view(), ranges, f"{self.key}.weight"))
        return self._wrap(self._family_method().take_rows(ranges))

    def take_cols(self, start: int, stop: int) -> "UqffQuantizedWeight":
        from mistralrs_core.distributed.packed import take_cols
        if self.format == FORMAT_GGUF:
            return self._from_view(take_cols(self._ggml_view(), start, stop, f"{self.key}.weight"))
        return self._wrap(self._family_method().take_cols(start, stop))

    def _wrap(self, part) -> "UqffQuantizedWeight":
        # A part that is itself a layer of its family is written back as entries (then it
        # loads, and moves to its device, like any UQFF layer); HQQ's part is a view.
        to_entries = getattr(part, "to_uqff_tensors", None)
        if to_entries is not None:
            return UqffQuantizedWeight(self.key, {f"{self.key}.{k}": v for k, v in to_entries().items()},
                                       self.where)
        return _ShardOfLayer(self, part)

    def _family_method(self):
        if self.format == FORMAT_UNQUANT:
            raise ValueError(f"{self.where}: {self.key}: an unquantized UQFF entry is sharded as a tensor")
        try:
            return self.method(torch.float32, None)
        except ValueError as exc:
            raise ValueError(f"{self.where}: {self.key}: cannot be sharded for tensor parallelism: {exc}") from None

    def dequantize(self) -> torch.Tensor:
        if self.format == FORMAT_UNQUANT:
            return self.entries[f"{self.key}.weight"]
        return self.method(torch.float32, None).dequantize()


class _ShardOfLayer(UqffQuantizedWeight):
    """A tensor-parallel rank's part of an HQQ UQFF layer (``HQQShard``: the whole packed
    layer and the rows or columns this rank multiplies by)."""

    def __init__(self, whole: UqffQuantizedWeight, method):
        self.key, self.entries, self.where, self.format = whole.key, {}, whole.where, whole.format
        self._method = method
        self.shape = (method.out_features, method.in_features)

    def method(self, compute_dtype: torch.dtype, device, cpp_impl=None):
        return self._method if device is None else self._method.to(device)

    def take_rows(self, ranges):
        raise ValueError(f"{self.where}: {self.key}: a layer is sharded once")

    take_cols = take_rows

    def dequantize(self) -> torch.Tensor:
        return self._method.dequantize()


# Format tag -> an ISQ type of the family whose class reads it.
_FAMILY_CLASSES = {FORMAT_HQQ: "HQQ4", FORMAT_FP8: "FP8", FORMAT_AFQ: "AFQ4", FORMAT_F8Q8: "F8Q8"}


def _check_version(path: Path, tensors: dict) -> None:
    if not all(k in tensors for k in _VERSION_KEYS):
        raise ValueError(f"{path}: UQFF file has no version tag (pre-1.0 file); regenerate it")
    major, minor, patch = (int(tensors[k].item()) for k in _VERSION_KEYS)
    ours = ".".join(map(str, VERSION))
    if major != VERSION[0]:
        raise ValueError(f"{path}: UQFF version {major}.{minor}.{patch} is incompatible with this reader ({ours})")
    if minor > VERSION[1]:
        raise ValueError(f"{path}: UQFF version {major}.{minor}.{patch} was written by a newer producer than "
                         f"this reader ({ours}); upgrade")


def iter_uqff(shards: Iterable[Path]):
    """(name, tensor | UqffQuantizedWeight) for every layer of the shards: quantized
    layers as one ``<key>.weight`` item, unquantized entries as plain tensors."""
    from safetensors import safe_open
    for path in shards:
        try:
            f = safe_open(str(path), framework="pt")
        except Exception as exc:  # safetensors raises its own error types
            raise ValueError(f"{path}: not a UQFF (safetensors) file: {exc}") from None
        with f:
            names = list(f.keys())
            _check_version(path, {k: f.get_tensor(k) for k in _VERSION_KEYS if k in names})
            keys = [n[:-len(".weight.format")] for n in names if n.endswith(".weight.format")]
            for key in keys:
                prefix = f"{key}."
                entries = {n: f.get_tensor(n) for n in names if n.startswith(prefix)
                           and (n == f"{key}.weight" or n.startswith(f"{key}.weight."))}
                layer = UqffQuantizedWeight(key, entries, path)
                if layer.format == FORMAT_UNQUANT:
                    yield f"{key}.weight", entries[f"{key}.weight"]
                elif layer.stacked:
                    for name, expert in layer.experts():
                        yield f"{name}.weight", expert
                else:
                    yield f"{key}.weight", layer
                if f"{key}.bias" in names:
                    yield f"{key}.bias", f.get_tensor(f"{key}.bias")


def uqff_quant_method(quant_config, hf_name: str, module, weight):
    if not isinstance(weight, UqffQuantizedWeight):
        return None
    plan = quant_config.plan
    return weight.method(quant_config.compute_dtype or torch.float32, quant_config.device,
                         getattr(plan, "cpp_impl", None))


def shard_stem(isq_name: Optional[str]) -> str:
    return (isq_name or "uqff").lower()


def report(paths: list[Path]) -> str:
    return json.dumps([str(p) for p in paths])
