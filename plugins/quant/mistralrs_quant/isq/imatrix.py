"""Importance matrices: per layer, one weight per input column (the mean square of that
column's activations over a calibration text), which llama.cpp's quantizers use to weight
the rounding error (``csrc/ggml_quantize.cpp``).

Read formats:

* llama.cpp's legacy ``.imatrix``: int32 entry count, then per entry an int32 name length,
  the name (a GGUF tensor name, ``blk.0.attn_q.weight``), int32 ncall, int32 nval and nval
  float32 sums; the importance is sum / ncall (as llama.cpp's quantize tool reads it);
* llama.cpp's GGUF-based imatrix (a GGUF file): ``<name>.in_sum2`` and ``<name>.counts``,
  importance = in_sum2 / counts;
* upstream's ``.cimatrix``: u64 entry count, then per entry a u64 key length, the key
  (the layer's name), a u64 value count and the float32 values, used as they are.

GGUF tensor names are mapped to HF layer names with the family's GGUF name table.

``calibration_file``: the model is loaded dense (float32) once, the text is run through it
in windows of ``CALIBRATION_CTX`` tokens, and every linear layer's input columns' squares
are averaged (the llama.cpp ``imatrix`` tool's statistic).
"""
from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import torch

CALIBRATION_CTX = 512


class _Reader:
    def __init__(self, data: bytes, where: str):
        self.data, self.pos, self.where = data, 0, where

    def take(self, fmt: str):
        n = struct.calcsize(fmt)
        if self.pos + n > len(self.data):
            raise ValueError(f"{self.where}: truncated imatrix file (at byte {self.pos})")
        out = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += n
        return out[0] if len(out) == 1 else out

    def raw(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise ValueError(f"{self.where}: truncated imatrix file (at byte {self.pos})")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out


def read_legacy_imatrix(path: Path) -> dict[str, np.ndarray]:
    r = _Reader(path.read_bytes(), str(path))
    n = r.take("<i")
    if n <= 0 or n > 1_000_000:
        raise ValueError(f"{path}: not an imatrix file (entry count {n})")
    out = {}
    for _ in range(n):
        name = r.raw(r.take("<i")).decode("utf-8", "replace")
        ncall, nval = r.take("<i"), r.take("<i")
        vals = np.frombuffer(r.raw(4 * nval), dtype="<f4").astype(np.float32)
        out[name] = vals / ncall if ncall > 0 else vals
    return out


def read_gguf_imatrix(path: Path) -> dict[str, np.ndarray]:
    from gguf import GGUFReader
    reader = GGUFReader(str(path))
    tensors = {t.name: np.asarray(t.data, dtype=np.float32) for t in reader.tensors}
    out = {}
    for name, sums in tensors.items():
        if not name.endswith(".in_sum2"):
            continue
        base = name[:-len(".in_sum2")]
        counts = tensors.get(f"{base}.counts")
        if counts is None:
            raise ValueError(f"{path}: {base}.in_sum2 has no {base}.counts")
        counts = counts.reshape(-1)
        if sums.ndim == 2 and sums.shape[0] == counts.size and counts.size > 1:
            out[base] = sums / np.maximum(counts, 1)[:, None]   # per expert
        else:
            out[base] = sums.reshape(-1) / max(float(counts[0]), 1.0)
    return out


def read_cimatrix(path: Path) -> dict[str, np.ndarray]:
    r = _Reader(path.read_bytes(), str(path))
    out = {}
    for _ in range(r.take("<Q")):
        key = r.raw(r.take("<Q")).decode("utf-8", "replace")
        n = r.take("<Q")
        out[key] = np.frombuffer(r.raw(4 * n), dtype="<f4").astype(np.float32)
    return out


def write_cimatrix(path: Path, data: dict[str, torch.Tensor]) -> None:
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(data)))
        for key, vals in data.items():
            k = key.encode()
            v = np.ascontiguousarray(vals.detach().cpu().float().numpy(), dtype="<f4")
            f.write(struct.pack("<Q", len(k)) + k + struct.pack("<Q", v.size) + v.tobytes())


def _to_hf(data: dict[str, np.ndarray], hf: dict, entry, where: str) -> dict[str, torch.Tensor]:
    """Keys -> HF layer names (``model.layers.0.self_attn.q_proj``)."""
    from ..gguf_names import hf_targets
    archs = list(getattr(entry, "gguf_architectures", ()) or ())
    out: dict[str, torch.Tensor] = {}
    for key, vals in data.items():
        name = key[:-len(".weight")] if key.endswith(".weight") else key
        t = torch.from_numpy(np.ascontiguousarray(vals, dtype=np.float32))
        if key.startswith(("blk.", "token_embd", "output")) and archs:
            targets = hf_targets(archs[0], key if key.endswith(".weight") else f"{key}.weight", hf) or []
            for target in targets:
                out[target.name.rpartition(".")[0]] = t
        else:
            out[name] = t
    if not out:
        raise ValueError(f"{where}: the imatrix names no layer of this model")
    return out


def load_imatrix(path_str: str, hf: dict, entry) -> dict[str, torch.Tensor]:
    """HF layer name -> float32 importance [in_features] from any of the three formats."""
    path = Path(path_str).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"imatrix: no such file {path_str!r}")
    head = path.read_bytes()[:4]
    if path.suffix == ".cimatrix":
        data = read_cimatrix(path)
    elif head == b"GGUF":
        data = read_gguf_imatrix(path)
    else:
        data = read_legacy_imatrix(path)
    return _to_hf(data, hf, entry, str(path))


@torch.inference_mode()
def collect_imatrix(model, token_ids: list[int], ctx: int = CALIBRATION_CTX) -> dict[str, torch.Tensor]:
    """Mean squared input column of every linear layer over ``token_ids`` (run in windows
    of ``ctx`` tokens, each a fresh sequence), keyed by HF layer name; a fused layer gives
    its value to each of its parts (they share their input)."""
    from mistralrs_core.layers.linear import Linear
    from mistralrs_core.testing.parity import SingleSequence

    sums: dict[int, torch.Tensor] = {}
    counts: dict[int, int] = {}
    handles = []

    def hook(module, args):
        x = args[0].reshape(-1, args[0].shape[-1]).double()
        key = id(module)
        s = (x * x).sum(0)
        sums[key] = s if key not in sums else sums[key] + s
        counts[key] = counts.get(key, 0) + x.shape[0]

    layers = {}
    for module in model.modules():
        if isinstance(module, Linear):
            layers[id(module)] = module
            handles.append(module.register_forward_pre_hook(hook))
    # The fused decoder step would bypass the layers' forward.
    fast, model.fast_forward = model.fast_forward, None
    try:
        for start in range(0, len(token_ids), ctx):
            chunk = token_ids[start:start + ctx]
            if len(chunk) < 2:
                continue
            SingleSequence(model, block_size=16, num_blocks=len(chunk) // 16 + 2).step(chunk)
    finally:
        for h in handles:
            h.remove()
        model.fast_forward = fast
    out: dict[str, torch.Tensor] = {}
    for key, s in sums.items():
        module = layers[key]
        value = (s / counts[key]).float()
        parts = getattr(module, "fused_parts", None)
        if parts:
            for part, _, _ in parts:
                if part is not None:
                    out[part] = value
        elif module.__dict__.get("hf_name"):
            out[module.hf_name] = value
    return out


def imatrix_from_calibration(model_dir: Path, which, calibration_file: str, hf: dict, entry) -> dict:
    """Load the model dense, run the calibration text through it, return the imatrix."""
    from mistralrs_core.loading.model_loader import build_text_model
    from mistralrs_core.tokenization.tokenizer import Tokenizer
    path = Path(calibration_file).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"calibration_file: no such file {calibration_file!r}")
    text = path.read_text(encoding="utf-8", errors="replace")
    tokenizer = Tokenizer.from_dir(model_dir, tokenizer_json=getattr(which, "tokenizer_json", None))
    ids = tokenizer.encode(text, add_special_tokens=True)
    if len(ids) < 2:
        raise ValueError(f"calibration_file: {calibration_file!r} holds too little text to calibrate on")
    model, _ = build_text_model(model_dir, arch=which.arch, dtype=torch.float32, device="cpu")
    try:
        return collect_imatrix(model, list(ids))
    finally:
        del model
