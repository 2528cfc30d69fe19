"""Tiny pre-quantized checkpoints (GPTQ, AWQ, FP8) written from a dense safetensors folder,
for tests and examples. Each writer also returns the dequantized weights, so a dense
folder holding exactly what the quantized one means can be written beside it.

The packing here follows each format's published layout (see ``formats/gptq.py``,
``formats/fp8.py``) and is written independently of the loaders' unpacking code: numpy
loops over bit fields, not torch shifts.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import torch

#: the projections a quantizer converts (embeddings, norms and lm_head stay dense, as
#: AutoGPTQ/AutoAWQ leave them)
PROJECTIONS = re.compile(r"\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj|experts\.\d+\.w[123])\.weight$")
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def _pack_rows(codes: np.ndarray, bits: int) -> np.ndarray:
    """codes [n·p, m] -> int32 [n, m]: row i·p + j at bit j·bits."""
    p = 32 // bits
    n = codes.shape[0] // p
    out = np.zeros((n, codes.shape[1]), dtype=np.uint64)
    for j in range(p):
        out |= codes[j::p].astype(np.uint64) << np.uint64(j * bits)
    return out.astype(np.uint32).view(np.int32)


def _pack_cols(codes: np.ndarray, bits: int, order=None) -> np.ndarray:
    """codes [n, m·p] -> int32 [n, m]: field k of word c holds column c·p + order[k]."""
    p = 32 // bits
    order = order or tuple(range(p))
    out = np.zeros((codes.shape[0], codes.shape[1] // p), dtype=np.uint64)
    for k in range(p):
        out |= codes[:, order[k]::p].astype(np.uint64) << np.uint64(k * bits)
    return out.astype(np.uint32).view(np.int32)


def _group_codes(w: np.ndarray, groups: np.ndarray, n_groups: int, bits: int):
    """Asymmetric min/max codes for w [out, in] with input i in group groups[i]:
    (codes [in, out], zeros [groups, out] in 1..2^bits-1, fp16 scales [groups, out])."""
    qmax = 2 ** bits - 1
    out_f = w.shape[0]
    scales = np.zeros((n_groups, out_f), np.float16)
    zeros = np.zeros((n_groups, out_f), np.int64)
    codes = np.zeros((w.shape[1], out_f), np.int64)
    for g in range(n_groups):
        cols = np.nonzero(groups == g)[0]
        blk = w[:, cols]
        lo, hi = np.minimum(blk.min(1), 0), np.maximum(blk.max(1), 0)
        s = np.maximum((hi - lo) / qmax, 1e-8).astype(np.float16)
        z = np.clip(np.round(-lo / s.astype(np.float32)), 1, qmax).astype(np.int64)
        q = np.clip(np.round(blk / s.astype(np.float32)[:, None]) + z[:, None], 0, qmax).astype(np.int64)
        scales[g], zeros[g], codes[cols] = s, z, q.T
    return codes, zeros, scales


def _convert(dense_dir: Path, out_dir: Path, quant_config: dict, convert) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file, save_file
    dense_dir, out_dir = Path(dense_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for f in dense_dir.iterdir():
        if f.is_file() and f.name not in ("model.safetensors", "config.json"):
            shutil.copy(f, out_dir / f.name)
    tensors = load_file(str(dense_dir / "model.safetensors"))
    packed, dequantized = {}, {}
    for name, t in tensors.items():
        if PROJECTIONS.search(name):
            prefix = name[:-len(".weight")]
            parts, deq = convert(t.float().numpy())
            packed.update({f"{prefix}.{k}": v for k, v in parts.items()})
            dequantized[name] = deq
        else:
            packed[name] = t
            dequantized[name] = t
    save_file(packed, str(out_dir / "model.safetensors"))
    cfg = json.loads((dense_dir / "config.json").read_text())
    cfg["quantization_config"] = quant_config
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=1))
    return dequantized


def write_dense(dense_dir: Path, out_dir: Path, tensors: dict[str, torch.Tensor]) -> Path:
    """A copy of ``dense_dir`` whose weights are ``tensors`` (e.g. a writer's dequantized ones)."""
    from safetensors.torch import save_file
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for f in Path(dense_dir).iterdir():
        if f.is_file() and f.name != "model.safetensors":
            shutil.copy(f, out_dir / f.name)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out_dir / "model.safetensors"))
    return out_dir


def write_gptq(dense_dir, out_dir, *, bits: int = 4, group_size: int = 32, desc_act: bool = False,
               seed: int = 0) -> dict[str, torch.Tensor]:
    """GPTQ (v1 layout: zeros stored minus one). With ``desc_act`` each input gets a
    shuffled group (``g_idx`` no longer ``i // group_size``), as act-order checkpoints have."""
    rng = np.random.default_rng(seed)

    def convert(w):
        in_f = w.shape[1]
        n_groups = -(-in_f // group_size)
        groups = np.arange(in_f) // group_size
        if desc_act:
            groups = groups[rng.permutation(in_f)]
        codes, zeros, scales = _group_codes(w, groups, n_groups, bits)
        parts = {"qweight": torch.from_numpy(_pack_rows(codes, bits)),
                 "qzeros": torch.from_numpy(_pack_cols(zeros - 1, bits)),
                 "scales": torch.from_numpy(scales),
                 "g_idx": torch.from_numpy(groups.astype(np.int32))}
        deq = (codes - zeros[groups]).astype(np.float32) * scales.astype(np.float32)[groups]
        return parts, torch.from_numpy(np.ascontiguousarray(deq.T))
    return _convert(dense_dir, out_dir, {"quant_method": "gptq", "bits": bits, "group_size": group_size,
                                         "desc_act": desc_act, "sym": False, "checkpoint_format": "gptq"}, convert)


def write_awq(dense_dir, out_dir, *, group_size: int = 32) -> dict[str, torch.Tensor]:
    """AWQ GEMM (4-bit, interleaved column order, zeros stored as is)."""
    def convert(w):
        in_f = w.shape[1]
        groups = np.arange(in_f) // group_size
        codes, zeros, scales = _group_codes(w, groups, -(-in_f // group_size), 4)
        parts = {"qweight": torch.from_numpy(_pack_cols(codes, 4, AWQ_ORDER)),
                 "qzeros": torch.from_numpy(_pack_cols(zeros, 4, AWQ_ORDER)),
                 "scales": torch.from_numpy(scales)}
        deq = (codes - zeros[groups]).astype(np.float32) * scales.astype(np.float32)[groups]
        return parts, torch.from_numpy(np.ascontiguousarray(deq.T))
    return _convert(dense_dir, out_dir, {"quant_method": "awq", "bits": 4, "group_size": group_size,
                                         "version": "gemm", "zero_point": True}, convert)


def write_fp8(dense_dir, out_dir, *, block: tuple[int, int] | None = (128, 128)) -> dict[str, torch.Tensor]:
    """FP8 E4M3 with ``weight_scale_inv``: per ``block`` (DeepSeek-V3) or per tensor."""
    def convert(w):
        t = torch.from_numpy(w)
        if block is None:
            s = t.abs().max() / 448.0
            q = (t / s).clamp(-448, 448).to(torch.float8_e4m3fn)
            scale = s.reshape(1)
            deq = q.float() * s
        else:
            br, bc = block
            rows, cols = -(-t.shape[0] // br), -(-t.shape[1] // bc)
            scale = torch.empty(rows, cols)
            q = torch.empty(t.shape, dtype=torch.float8_e4m3fn)
            deq = torch.empty(t.shape)
            for i in range(rows):
                for j in range(cols):
                    blk = t[i * br:(i + 1) * br, j * bc:(j + 1) * bc]
                    s = blk.abs().max().clamp_min(1e-12) / 448.0
                    scale[i, j] = s
                    qb = (blk / s).clamp(-448, 448).to(torch.float8_e4m3fn)
                    q[i * br:(i + 1) * br, j * bc:(j + 1) * bc] = qb
                    deq[i * br:(i + 1) * br, j * bc:(j + 1) * bc] = qb.float() * s
        return {"weight": q, "weight_scale_inv": scale.float()}, deq
    qc = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic"}
    if block is not None:
        qc["weight_block_size"] = list(block)
    return _convert(dense_dir, out_dir, qc, convert)
