"""Okapi BM25 over a handful of passages: the cheap lexical prefilter that decides which
passages the embedding reranker sees."""
from __future__ import annotations

import math
import re
from collections import Counter

_WORD = re.compile(r"\w+", re.UNICODE)


def tokens(text: str) -> list[str]:
    return [w.lower() for w in _WORD.findall(text)]


def bm25_scores(query: str, docs: list[str], k1: float = 1.5, b: float = 0.75) -> list[float]:
    terms = set(tokens(query))
    bags = [Counter(tokens(d)) for d in docs]
    if not docs or not terms:
        return [0.0] * len(docs)
    lengths = [sum(bag.values()) for bag in bags]
    avg = max(sum(lengths) / len(docs), 1e-9)
    n = len(docs)
    scores = [0.0] * n
    for term in terms:
        df = sum(1 for bag in bags if term in bag)
        if df == 0:
            continue
        # The "+1" form keeps the weight positive for terms in most documents.
        idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
        for i, bag in enumerate(bags):
            tf = bag.get(term, 0)
            if tf:
                scores[i] += idf * tf * (k1 + 1) / (tf + k1 * (1 - b + b * lengths[i] / avg))
    return scores
