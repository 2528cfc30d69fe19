"""Regenerate data/tokenizer_reference.json: token ids from transformers' GGUF tokenizers.

    .venv/bin/python plugins/quant/tests/make_tokenizer_reference.py

transformers takes ~30 s to build these two tokenizers, too slow for every test run, so
the suite compares against this file and ``MISTRALRS_QUANT_LIVE_REFERENCE=1`` re-derives
it live.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))

from tokenizer_texts import TEXTS  # noqa: E402

OUT = Path(__file__).parent / "data" / "tokenizer_reference.json"


def reference_tokenizers() -> dict:
    from transformers import AutoTokenizer

    from mistralrs_quant.real_models import gemma3_gguf, smollm2_gguf
    out = {}
    for name, path in (("smollm2", smollm2_gguf()), ("gemma3", gemma3_gguf())):
        if path is not None:
            out[name] = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return out


def reference_ids(tok) -> dict:
    return {
        "with_special": [tok(t, add_special_tokens=True)["input_ids"] for t in TEXTS],
        "plain": [tok(t, add_special_tokens=False)["input_ids"] for t in TEXTS],
    }


def main() -> None:
    import transformers
    data = {"transformers": transformers.__version__, "texts": TEXTS, "models": {}}
    for name, tok in reference_tokenizers().items():
        data["models"][name] = reference_ids(tok)
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(json.dumps(data, ensure_ascii=False, indent=0))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
