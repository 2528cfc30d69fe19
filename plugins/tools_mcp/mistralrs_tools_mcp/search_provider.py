"""``Runner(enable_search=..., search_callback=..., search_embedding_model=...)``: the web
search tool, offered to requests that set ``web_search_options``.

* ``enable_search=True`` loads the embedding reranker (``search_embedding_model``:
  "embedding_gemma", the default, or a local folder / hub id of an embedding model the
  project loads) and, without a callback, searches with the built-in HTML backend;
* ``search_callback(query) -> [{title, description, url, content}]`` replaces the backend
  (with or without ``enable_search``; without it there is no reranker and the callback's
  order, BM25-prefiltered, stands).
"""
from __future__ import annotations

from typing import Any, Mapping

from mistralrs_core.api.enums import SearchContextSize
from mistralrs_core.tools import ToolProvider

from mistralrs_tools_mcp.search.engine import TOOL, TOOL_NAME, SearchEngine


class SearchTools:
    request_fields = ("web_search_options",)
    call_with_request = True

    def __init__(self, engine: SearchEngine, backend=None):
        self.engine = engine
        self._backend = backend

    def tool_definitions(self) -> list[dict]:
        return []

    def request_tool_definitions(self, req) -> list[dict]:
        options = getattr(req, "web_search_options", None)
        if options is None:
            return []
        if options.search_description:
            fn = dict(TOOL["function"], description=options.search_description)
            return [dict(TOOL, function=fn)]
        return [TOOL]

    def can_call(self, name: str) -> bool:
        return name == TOOL_NAME

    def call(self, name: str, arguments: dict, request=None) -> str:
        options = getattr(request, "web_search_options", None)
        size = getattr(options, "search_context_size", None) or SearchContextSize.Medium
        return self.engine.run(arguments.get("query"), size.value)

    def close(self) -> None:
        for part in (self._backend, self.engine.reranker):
            close = getattr(part, "close", None)
            if callable(close):
                close()


class SearchToolProvider(ToolProvider):
    accepts = ("enable_search", "search_callback", "search_embedding_model")

    def build(self, args: Mapping[str, Any]) -> SearchTools:
        enable = args.get("enable_search", False)
        if not isinstance(enable, bool):
            raise ValueError(f"enable_search: must be a bool, got {enable!r}")
        callback = args.get("search_callback")
        if callback is not None and not callable(callback):
            raise ValueError(f"search_callback: must be callable (query -> list of dicts), "
                             f"got {type(callback).__name__}")
        model = args.get("search_embedding_model")
        if model is not None and not enable:
            raise ValueError("search_embedding_model: selects the reranker that enable_search=True "
                             "loads; set enable_search=True too")
        reranker = None
        if enable:
            from mistralrs_tools_mcp.search.rerank import EmbeddingReranker
            reranker = EmbeddingReranker(model)
        backend = None
        if callback is None:
            from mistralrs_tools_mcp.search.backend import HtmlSearchBackend
            backend = HtmlSearchBackend()
            search = backend.search
        else:
            search = callback
        return SearchTools(SearchEngine(search, reranker), backend)
