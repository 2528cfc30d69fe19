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
are averaged (the llama.cpp ``imatrix`` tool's statistic); MoE experts get one importance
per expert from the rows routed to it (``_ExpertStats``).
"""
from __future__ import annotations

import re
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
            # Per expert; an expert no calibration token reached reads as ones, as
            # llama.cpp's quantize tool reads such partial data.
            per = sums / np.maximum(counts, 1)[:, None]
            per[counts <= 0] = 1.0
            out[base] = per
        else:
            out[base] = sums.reshape(-1) / float(counts[0]) if counts[0] > 0 else np.ones(sums.size, np.float32)
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


_GGUF_EXPERTS = re.compile(r"^blk\.(?P<layer>\d+)\.ffn_(?P<part>gate|up|down)(?:_exps|\.(?P<e>\d+))(?:\.weight)?$")
# llama.cpp's names for a MoE layer's other matrices -> canonical HF names, which
# ``IsqPlan.imatrix_for`` matches to any family's spelling (``plan.moe_key``): the shared
# expert (Qwen2-MoE, DeepSeek, Granite, Llama4: ``ffn_*_shexp``), the router (``ffn_gate_inp``)
# and Qwen2-MoE's shared-expert gate (``ffn_gate_inp_shexp``).
_GGUF_MOE_OTHER = re.compile(r"^blk\.(?P<layer>\d+)\.(?P<part>ffn_(?:gate|up|down)_shexp|ffn_gate_inp|"
                             r"ffn_gate_inp_shexp)(?:\.weight)?$")
_MOE_OTHER_NAMES = {"ffn_gate_shexp": "mlp.shared_experts.gate_proj", "ffn_up_shexp": "mlp.shared_experts.up_proj",
                    "ffn_down_shexp": "mlp.shared_experts.down_proj", "ffn_gate_inp": "mlp.gate",
                    "ffn_gate_inp_shexp": "mlp.shared_expert_gate"}
_NUM_EXPERTS_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")


def _num_experts(hf: dict) -> int | None:
    cfg = hf.get("text_config") or hf
    return next((int(cfg[k]) for k in _NUM_EXPERTS_KEYS if cfg.get(k)), None)


def _expert_entries(m, vals: np.ndarray, hf: dict, where: str) -> dict[str, torch.Tensor]:
    """llama.cpp's ``blk.N.ffn_{gate,up,down}_exps`` (one 3-D tensor for all experts: a
    GGUF imatrix stores [E, n], the legacy format E*n values, expert after expert) or an
    older per-expert ``blk.N.ffn_gate.E`` -> one entry per expert, named as
    ``IsqPlan.imatrix_for`` matches them to any family's per-expert checkpoint names."""
    layer, part = int(m["layer"]), m["part"]
    prefix = f"model.layers.{layer}.mlp.experts"
    if m["e"] is not None:
        return {f"{prefix}.{m['e']}.{part}_proj": torch.from_numpy(np.ascontiguousarray(vals, np.float32).reshape(-1))}
    if vals.ndim == 2:
        rows = vals
    else:
        n_exp = _num_experts(hf)
        if not n_exp or vals.size % n_exp:
            raise ValueError(f"{where}: {m.string}: {vals.size} values do not split into the model's "
                             f"{n_exp} experts")
        rows = vals.reshape(n_exp, -1)
    return {f"{prefix}.{e}.{part}_proj": torch.from_numpy(np.ascontiguousarray(rows[e], np.float32))
            for e in range(rows.shape[0])}


def _to_hf(data: dict[str, np.ndarray], hf: dict, entry, where: str) -> dict[str, torch.Tensor]:
    """Keys -> HF layer names (``model.layers.0.self_attn.q_proj``)."""
    from ..gguf_names import hf_targets
    # A family llama.cpp names like Llama but we read no GGUF of (the MoE families) still has
    # Llama's block tensor names in its imatrix.
    archs = list(getattr(entry, "gguf_architectures", ()) or ()) or ["llama"]
    out: dict[str, torch.Tensor] = {}
    for key, vals in data.items():
        name = key[:-len(".weight")] if key.endswith(".weight") else key
        m = _GGUF_EXPERTS.match(key)
        if m is not None:
            out.update(_expert_entries(m, vals, hf, where))
            continue
        m = _GGUF_MOE_OTHER.match(key)
        if m is not None:
            out[f"model.layers.{m['layer']}.{_MOE_OTHER_NAMES[m['part']]}"] = torch.from_numpy(
                np.ascontiguousarray(vals, dtype=np.float32).reshape(-1))
            continue
        t = torch.from_numpy(np.ascontiguousarray(vals, dtype=np.float32))
        if key.startswith(("blk.", "token_embd", "output")):
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
    from mistralrs_core.layers.moe import MoEExperts, Router
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
        # Routers too: some families' ISQ quantizes them (``plan.QUANTIZED_ROUTERS``).
        if isinstance(module, (Linear, Router)):
            layers[id(module)] = module
            handles.append(module.register_forward_pre_hook(hook))
    experts = [_ExpertStats(m) for m in model.modules() if isinstance(m, MoEExperts)]
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
        for stats in experts:
            stats.remove()
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
    for stats in experts:
        out.update(stats.importance())
    return out


class _ExpertStats:
    """llama.cpp's imatrix statistic for one MoE layer's experts (its ``MUL_MAT_ID``
    branch): per expert, the squared input columns summed over the rows routed to that
    expert, divided by that expert's own row count. Gate and up read the layer input, down
    reads the activated product. An expert no token reached gets ones, as llama.cpp's
    quantize tool reads such partial data. Recorded by shadowing the module's
    ``expert_forward`` / ``activate`` on the instance, so the dense math itself is unchanged."""

    def __init__(self, experts):
        self.experts = experts
        self.sums: dict[tuple[int, str], torch.Tensor] = {}
        self.counts: dict[tuple[int, str], int] = {}
        self.current: list[int] = []
        forward, activate = experts.expert_forward, experts.activate

        def expert_forward(e, x):
            self.add(e, "in", x)
            self.current.append(e)
            try:
                return forward(e, x)
            finally:
                self.current.pop()

        def act(gate_up):
            y = activate(gate_up)
            if self.current:
                self.add(self.current[-1], "mid", y)
            return y

        experts.expert_forward, experts.activate = expert_forward, act

    def add(self, e: int, where: str, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).double()
        s = (x * x).sum(0)
        key = (e, where)
        self.sums[key] = s if key not in self.sums else self.sums[key] + s
        self.counts[key] = self.counts.get(key, 0) + x.shape[0]

    def remove(self) -> None:
        self.experts.__dict__.pop("expert_forward", None)
        self.experts.__dict__.pop("activate", None)

    def importance(self) -> dict[str, torch.Tensor]:
        ex = self.experts
        out = {}
        width = {"in": ex.hidden, "mid": ex.intermediate}
        for (e, part), name in ex.part_names.items():
            where = "mid" if part == "down" else "in"
            key = (e - getattr(ex, "first", 0), where)
            if self.counts.get(key):
                out[name] = (self.sums[key] / self.counts[key]).float()
            else:
                out[name] = torch.ones(width[where])
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
