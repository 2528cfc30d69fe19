"""Sentence embeddings and cosine similarity with ``Which.Embedding``.

Runs offline on a tiny RANDOM Qwen3-Embedding model written to a temporary folder, so
the numbers are meaningless but the whole path runs; point ``model_id`` at a real one
(e.g. "Qwen/Qwen3-Embedding-0.6B" or "google/embeddinggemma-300m") for real vectors.

    python examples/embeddings.py
"""
from __future__ import annotations

import math
import tempfile
from pathlib import Path

from mistralrs import EmbeddingArchitecture, EmbeddingRequest, Runner, Which
from mistralrs_core.testing.tiny import write_random_qwen3_embedding


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        model = write_random_qwen3_embedding(Path(tmp) / "qwen3-embedding")
        runner = Runner(which=Which.Embedding(model_id=str(model), arch=EmbeddingArchitecture.Qwen3Embedding))
        texts = ["The cat sat on the mat.", "A cat was sitting on a mat.", "Stock markets fell sharply."]
        vectors = runner.send_embedding_request(EmbeddingRequest(input=texts))
        print(f"{len(vectors)} vectors of {len(vectors[0])} dimensions (L2 norm {math.hypot(*vectors[0]):.3f})")
        for i in range(len(texts)):
            for j in range(i + 1, len(texts)):
                print(f"cos({i}, {j}) = {cosine(vectors[i], vectors[j]):+.3f}")
        runner.shutdown()


if __name__ == "__main__":
    main()
