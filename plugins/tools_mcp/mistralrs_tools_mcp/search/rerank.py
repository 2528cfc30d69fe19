"""The embedding reranker: passages ordered by cosine similarity to the query, embedded by
the project's own embedding pipeline (``Which.Embedding``; EmbeddingGemma by default)."""
from __future__ import annotations

import math
import threading

# search_embedding_model names of built-in models (upstream: "embedding_gemma").
BUILT_IN = {"embedding_gemma": "google/embeddinggemma-300m", "embeddinggemma": "google/embeddinggemma-300m"}
# EmbeddingGemma's retrieval prompts (its model card's "query" and "document" prompts).
QUERY_PROMPT = "task: search result | query: "
DOC_PROMPT = "title: {title} | text: "


def resolve_model(name: str | None) -> str:
    if name is None:
        return BUILT_IN["embedding_gemma"]
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"search_embedding_model: must be a non-empty string, got {name!r}")
    return BUILT_IN.get(name.strip().lower(), name.strip())


class EmbeddingReranker:
    def __init__(self, model: str | None = None, *, device: str | None = None):
        from mistralrs_core.api.which import Embedding
        from mistralrs_core.loading.options import LoadOptions
        from mistralrs_core.runner import load_pipeline
        self.model_id = resolve_model(model)
        try:
            self.pipeline = load_pipeline(Embedding(model_id=self.model_id), LoadOptions(device=device),
                                          "search-reranker")
        except Exception as exc:
            raise ValueError(f"search_embedding_model: could not load the search reranker "
                             f"{self.model_id!r}: {type(exc).__name__}: {exc}") from exc

    def close(self) -> None:
        self.pipeline.shutdown()

    def embed(self, texts: list[str]) -> list[list[float]]:
        from mistralrs_core.api.requests import EmbeddingRequest
        box: dict = {}

        def work():
            try:
                box["out"] = self.pipeline.embed(EmbeddingRequest(input=texts, truncate_sequence=True))
            except BaseException as exc:   # re-raised in the caller's thread
                box["error"] = exc
        # A short-lived thread, as model loads do (mistralrs_core.runner.load_pipeline): the
        # OpenMP team a forward leaves in its thread would slow the engine's decode.
        t = threading.Thread(target=work, name="mistralrs-search-rerank")
        t.start()
        t.join()
        if "error" in box:
            raise box["error"]
        return box["out"]

    def scores(self, query: str, passages: list[tuple[str, str]]) -> list[float]:
        """Cosine similarity of each ``(title, text)`` passage to ``query``."""
        if not passages:
            return []
        vecs = self.embed([QUERY_PROMPT + query] + [DOC_PROMPT.format(title=t or "none") + x for t, x in passages])
        q = vecs[0]
        return [_cosine(q, v) for v in vecs[1:]]


def _cosine(a: list[float], b: list[float]) -> float:
    na = math.sqrt(sum(x * x for x in a))
    nb = math.sqrt(sum(x * x for x in b))
    return sum(x * y for x, y in zip(a, b)) / max(na * nb, 1e-12)
