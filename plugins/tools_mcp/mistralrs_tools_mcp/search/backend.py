"""The built-in search backend: a search-results page in HTML (DuckDuckGo's HTML endpoint
by default, as upstream), its results' pages fetched and reduced to readable text.

The base URL is configurable (``MISTRALRS_SEARCH_URL`` or ``HtmlSearchBackend(base_url=)``):
any endpoint that takes ``?q=<query>`` and answers a page in the same markup works, a
self-hosted proxy or a local test server included."""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import httpx

from mistralrs_tools_mcp.search.html_text import parse_results, readable_text

DEFAULT_URL = "https://html.duckduckgo.com/html/"
URL_ENV = "MISTRALRS_SEARCH_URL"
USER_AGENT = "mistralrs-python-search/0.1 (+https://github.com/EricLBuehler/mistral.rs)"


class HtmlSearchBackend:
    def __init__(self, base_url: str | None = None, *, max_results: int = 10, timeout: float = 10.0,
                 max_page_bytes: int = 2 << 20, max_content_chars: int = 20000, fetch_workers: int = 4):
        self.base_url = base_url or os.environ.get(URL_ENV) or DEFAULT_URL
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"{URL_ENV}: must be an http(s) URL, got {self.base_url!r}")
        self.max_results = max_results
        self.max_page_bytes = max_page_bytes
        self.max_content_chars = max_content_chars
        self.fetch_workers = fetch_workers
        self._client = httpx.Client(timeout=timeout, follow_redirects=True,
                                    headers={"User-Agent": USER_AGENT})

    def close(self) -> None:
        self._client.close()

    def search(self, query: str) -> list[dict]:
        """``[{title, description, url, content}]`` in the page's order; raises on a failed
        search request (the tool reports it), never on one failed page (its content is then
        the description)."""
        resp = self._client.get(self.base_url, params={"q": query})
        resp.raise_for_status()
        hits = parse_results(resp.text, str(resp.url))[: self.max_results]
        with ThreadPoolExecutor(max_workers=max(1, min(self.fetch_workers, len(hits) or 1))) as pool:
            contents = list(pool.map(self._page_text, [h.url for h in hits]))
        return [{"title": h.title, "description": h.description, "url": h.url,
                 "content": text or h.description} for h, text in zip(hits, contents)]

    def _page_text(self, url: str) -> str:
        try:
            with self._client.stream("GET", url) as resp:
                if resp.status_code >= 400:
                    return ""
                kind = resp.headers.get("content-type", "").split(";")[0].strip().lower()
                if kind and kind not in ("text/html", "application/xhtml+xml", "text/plain"):
                    return ""
                body = bytearray()
                for chunk in resp.iter_bytes():
                    body += chunk
                    if len(body) >= self.max_page_bytes:
                        break
                text = bytes(body[: self.max_page_bytes]).decode(resp.encoding or "utf-8", errors="replace")
        except (httpx.HTTPError, UnicodeError, LookupError):
            return ""
        if kind == "text/plain":
            return text[: self.max_content_chars]
        return readable_text(text)[1][: self.max_content_chars]
