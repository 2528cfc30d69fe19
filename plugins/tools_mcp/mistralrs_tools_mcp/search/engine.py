"""One search: the query's results (from ``search_callback`` or the built-in backend), cut
into passages, BM25-prefiltered, reranked by embeddings, and budgeted by the request's
``search_context_size`` into the tool result the model reads (text, with its sources)."""
from __future__ import annotations

from typing import Any, Callable, Mapping

from mistralrs_tools_mcp.search.bm25 import bm25_scores

TOOL_NAME = "search_the_web"
TOOL = {"type": "function", "function": {
    "name": TOOL_NAME, "strict": True,
    "description": ("Search the web for a query and read the most relevant parts of the pages found. "
                    "Use it when the question needs current or external information."),
    "parameters": {"type": "object", "additionalProperties": False, "required": ["query"],
                   "properties": {"query": {"type": "string", "minLength": 1,
                                            "description": "What to search the web for."}}}}}

# search_context_size -> (results kept, characters of page text in the tool result).
BUDGETS = {"low": (3, 2000), "medium": (5, 6000), "high": (10, 16000)}
PREFILTER = 32          # passages the embedding reranker sees
PASSAGE_CHARS = 600
_FIELDS = ("title", "description", "url", "content")


def check_results(results: Any) -> list[dict]:
    """What ``search_callback`` returned, checked: a list of dicts of strings."""
    if not isinstance(results, (list, tuple)):
        raise ValueError(f"search_callback: must return a list of dicts, got {type(results).__name__}")
    out = []
    for i, r in enumerate(results):
        if not isinstance(r, Mapping):
            raise ValueError(f"search_callback: result {i} must be a dict with keys {list(_FIELDS)}, "
                             f"got {type(r).__name__}")
        item = {}
        for k in _FIELDS:
            v = r.get(k, "")
            if v is None:
                v = ""
            if not isinstance(v, str):
                raise ValueError(f"search_callback: result {i}[{k!r}] must be a string, got {type(v).__name__}")
            item[k] = v
        out.append(item)
    return out


def passages_of(text: str, limit: int = PASSAGE_CHARS) -> list[str]:
    """Paragraphs packed into passages of at most ``limit`` characters (a longer paragraph
    is cut at word boundaries)."""
    out, cur = [], ""
    for para in (p.strip() for p in text.split("\n")):
        if not para:
            continue
        while len(para) > limit:
            cut = para.rfind(" ", 0, limit)
            cut = cut if cut > limit // 2 else limit
            if cur:
                out.append(cur)
                cur = ""
            out.append(para[:cut].strip())
            para = para[cut:].strip()
        if cur and len(cur) + 1 + len(para) > limit:
            out.append(cur)
            cur = ""
        cur = f"{cur}\n{para}" if cur else para
    if cur:
        out.append(cur)
    return out


class SearchEngine:
    def __init__(self, search: Callable[[str], Any], reranker=None):
        self._search = search
        self.reranker = reranker

    def rank(self, query: str, results: list[dict]):
        """``(ranked, passages)``: ``ranked`` is ``[(result index, [passage indices in
        relevance order])]``, most relevant result first; ``passages`` is
        ``[(result index, title, text)]``."""
        passages: list[tuple[int, str, str]] = []
        for i, r in enumerate(results):
            head = " ".join(x for x in (r["description"],) if x)
            body = passages_of(r["content"]) or ([head] if head else [r["title"]])
            passages.extend((i, r["title"], p) for p in body)
        lexical = bm25_scores(query, [f"{t}\n{p}" for _, t, p in passages])
        order = sorted(range(len(passages)), key=lambda k: -lexical[k])[:PREFILTER]
        if self.reranker is not None and order:
            semantic = self.reranker.scores(query, [(passages[k][1], passages[k][2]) for k in order])
            by = dict(zip(order, semantic))
            order = sorted(order, key=lambda k: -by[k])
        ranked: dict[int, list[int]] = {}
        for k in order:
            ranked.setdefault(passages[k][0], []).append(k)
        # Results no kept passage speaks for still come last, in their given order.
        for i in range(len(results)):
            ranked.setdefault(i, [])
        return list(ranked.items()), passages

    def search(self, query: str, context_size: str = "medium") -> list[dict]:
        """The kept results, most relevant first: ``{source, title, url, description,
        content}`` with ``content`` the result's most relevant passages in page order,
        within the context size's budget."""
        if not isinstance(query, str) or not query.strip():
            raise ValueError("query: must be a non-empty string")
        results = check_results(self._search(query))
        n_keep, budget = BUDGETS.get(context_size, BUDGETS["medium"])
        if not results:
            return []
        ranked, passages = self.rank(query, results)
        ranked = ranked[:n_keep]
        share = budget // len(ranked)
        out = []
        for rank, (i, ks) in enumerate(ranked):
            r = results[i]
            taken, used = [], 0
            for k in ks:
                text = passages[k][2]
                if used + len(text) > share and taken:
                    break
                taken.append(k)
                used += len(text)
            content = "\n".join(passages[k][2] for k in sorted(taken))[:share]
            out.append({"source": rank + 1, "title": r["title"], "url": r["url"],
                        "description": r["description"], "content": content})
        return out

    def run(self, query: str, context_size: str = "medium") -> str:
        """The tool result: plain text (small models read it better than JSON), each
        result numbered with its URL, then the list of sources to cite."""
        found = self.search(query, context_size)
        if not found:
            return f"No web results for: {query}"
        blocks = [f"Web results for: {query}"]
        for r in found:
            blocks.append(f"[{r['source']}] {r['title']}\nURL: {r['url']}\n{r['content'] or r['description']}")
        blocks.append("Sources:\n" + "\n".join(f"[{r['source']}] {r['title']} - {r['url']}" for r in found))
        return "\n\n".join(blocks)
