"""Gate weights on disk: ``{gate_model_id}/gate.safetensors`` with ``moe_gate.{N}.weight``
[experts, hidden] and ``moe_gate.{N}.bias`` [experts] per AnyMoE layer N (upstream's names).
Safetensors only; no pickle."""
from __future__ import annotations

from pathlib import Path

import torch

FIELD = "anymoe_config.gate_model_id"
FILE = "gate.safetensors"


def gate_tensors(layers) -> dict[str, torch.Tensor]:
    out = {}
    for layer in layers:
        out[f"moe_gate.{layer.layer}.weight"] = layer.moe_gate.weight.detach().float().cpu().contiguous()
        out[f"moe_gate.{layer.layer}.bias"] = layer.moe_gate.bias.detach().float().cpu().contiguous()
    return out


def save_gates(tensors: dict[str, torch.Tensor], gate_model_id: str) -> Path:
    from safetensors.torch import save_file
    directory = Path(gate_model_id).expanduser()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / FILE
        save_file(tensors, str(path), metadata={"format": "pt"})
    except OSError as exc:
        raise ValueError(f"{FIELD}: cannot write the trained gate to {gate_model_id!r}: "
                         f"{exc.strerror or exc}") from None
    return path


def read_gates(gate_model_id: str, token_source: str = "cache") -> dict[str, torch.Tensor]:
    """The tensors of a saved gate: a local ``.safetensors`` file, a directory, or a hub repo
    holding exactly one ``.safetensors`` file (``gate.safetensors`` preferred)."""
    from mistralrs_core.loading.safetensors_io import SafetensorsWeights
    p = Path(gate_model_id).expanduser()
    try:
        if p.is_file():
            files = [p]
        else:
            from mistralrs_core.loading.resolve import resolve_model_dir
            directory = resolve_model_dir(gate_model_id, token_source=token_source,
                                          allow_patterns=["*.safetensors"])
            files = [directory / FILE] if (directory / FILE).is_file() else sorted(directory.glob("*.safetensors"))
            if len(files) != 1:
                raise ValueError(f"expected one .safetensors file in {str(directory)!r}, found {len(files)}")
        weights = SafetensorsWeights(files)
        return {n: weights.get(n) for n in weights.names()}
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"{FIELD}: cannot read a gate from {gate_model_id!r}: {exc}") from None


def install_gates(layers, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Copy saved gate weights into the AnyMoE layers, checking every name and shape."""
    for layer in layers:
        for attr in ("weight", "bias"):
            name = f"moe_gate.{layer.layer}.{attr}"
            target = getattr(layer.moe_gate, attr)
            value = tensors.get(name)
            if value is None:
                raise ValueError(f"{FIELD}: {source!r} has no {name} (its gate layers: "
                                 f"{sorted({n.split('.')[1] for n in tensors if n.startswith('moe_gate.')})})")
            if tuple(value.shape) != tuple(target.shape):
                raise ValueError(f"{FIELD}: {name} in {source!r} has shape {tuple(value.shape)}, expected "
                                 f"{tuple(target.shape)} ({layer.num_experts} experts x hidden size)")
            with torch.no_grad():
                target.copy_(value.to(target.dtype))
