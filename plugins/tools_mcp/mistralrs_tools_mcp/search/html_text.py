"""HTML -> search results and readable text, on the standard library's ``html.parser``
(no third-party parser is a dependency: pages are reduced to text, never rendered)."""
from __future__ import annotations

import re
from html.parser import HTMLParser
from urllib.parse import parse_qs, urljoin, urlparse

import attrs

# Content that is never prose: its text is skipped with everything inside it.
_SKIP = frozenset({"script", "style", "noscript", "template", "svg", "canvas", "iframe",
                   "nav", "header", "footer", "aside", "form", "button", "select", "head"})
# Elements whose boundaries are line breaks in the text.
_BLOCK = frozenset({"p", "div", "section", "article", "main", "br", "li", "ul", "ol", "tr", "table",
                    "h1", "h2", "h3", "h4", "h5", "h6", "pre", "blockquote", "dd", "dt", "hr", "td", "th"})
# Elements void of content: no end tag follows them.
_VOID = frozenset({"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta",
                   "source", "track", "wbr"})


@attrs.define
class SearchHit:
    title: str
    description: str
    url: str


def _classes(attrs_: list[tuple[str, str | None]]) -> set[str]:
    for k, v in attrs_:
        if k == "class" and v:
            return set(v.split())
    return set()


def _attr(attrs_: list[tuple[str, str | None]], name: str) -> str | None:
    for k, v in attrs_:
        if k == name:
            return v
    return None


def _clean(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def result_url(href: str, base_url: str) -> str:
    """A result link as the page gives it -> the target URL (redirect links of the
    ``.../l/?uddg=<target>`` form, as DuckDuckGo's HTML page has, are unwrapped)."""
    url = urljoin(base_url, href.strip())
    target = parse_qs(urlparse(url).query).get("uddg")
    return target[0] if target else url


class _ResultsParser(HTMLParser):
    """Results of a DuckDuckGo-style HTML page: an element of class ``result`` holds a link
    of class ``result__a`` (title, href), a ``result__snippet`` and a ``result__url``."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.results: list[dict] = []
        self._stack: list[tuple[str, set[str]]] = []
        self._field: str | None = None
        self._field_depth = 0

    def handle_starttag(self, tag, attrs_):
        cls = _classes(attrs_)
        if tag in _VOID:
            return
        self._stack.append((tag, cls))
        if "result" in cls:
            self.results.append({"title": "", "description": "", "url": "", "href": None, "depth": len(self._stack)})
        if not self.results or self._field is not None:
            return
        if "result__a" in cls:
            self.results[-1]["href"] = _attr(attrs_, "href")
            self._field = "title"
        elif "result__snippet" in cls:
            self._field = "description"
        elif "result__url" in cls:
            self._field = "url"
            if self.results[-1]["href"] is None:
                self.results[-1]["href"] = _attr(attrs_, "href")
        if self._field is not None:
            self._field_depth = len(self._stack)

    def handle_endtag(self, tag):
        if tag in _VOID:
            return
        # Pop to the matching open tag (real pages leave some unclosed).
        for i in range(len(self._stack) - 1, -1, -1):
            if self._stack[i][0] == tag:
                del self._stack[i:]
                break
        if self._field is not None and len(self._stack) < self._field_depth:
            self._field = None

    def handle_data(self, data):
        if self._field is not None and self.results:
            self.results[-1][self._field] += data


def parse_results(html: str, base_url: str) -> list[SearchHit]:
    parser = _ResultsParser()
    parser.feed(html)
    parser.close()
    hits, seen = [], set()
    for r in parser.results:
        title, description = _clean(r["title"]), _clean(r["description"])
        shown = _clean(r["url"])
        href = r["href"] or (shown if "://" in shown else (f"https://{shown}" if shown else ""))
        if not title or not href:
            continue
        url = result_url(href, base_url)
        if urlparse(url).scheme not in ("http", "https") or url in seen:
            continue
        seen.add(url)
        hits.append(SearchHit(title, description, url))
    return hits


class _TextParser(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.title = ""
        self._in_title = False
        self._skip = 0
        self._main = 0
        self.all: list[str] = []
        self.main: list[str] = []

    def handle_starttag(self, tag, attrs_):
        if tag == "title":
            self._in_title = True
        if tag in _SKIP and tag not in _VOID:
            self._skip += 1
        if tag in ("main", "article"):
            self._main += 1
        if tag in _BLOCK:
            self._newline()

    def handle_startendtag(self, tag, attrs_):
        if tag in _BLOCK:
            self._newline()

    def handle_endtag(self, tag):
        if tag == "title":
            self._in_title = False
        if tag in _SKIP and self._skip:
            self._skip -= 1
        if tag in ("main", "article") and self._main:
            self._main -= 1
        if tag in _BLOCK:
            self._newline()

    def _newline(self):
        self.all.append("\n")
        if self._main:
            self.main.append("\n")

    def handle_data(self, data):
        if self._in_title:
            self.title += data
            return
        if self._skip:
            return
        self.all.append(data)
        if self._main:
            self.main.append(data)


def _lines(parts: list[str]) -> str:
    lines = (_clean(line) for line in "".join(parts).split("\n"))
    return "\n".join(line for line in lines if line)


def readable_text(html: str) -> tuple[str, str]:
    """``(title, text)`` of a page: the text of its ``main``/``article`` element when it has
    one, else of the whole body, without scripts, styles, navigation, headers, footers and
    forms; one line per block."""
    parser = _TextParser()
    parser.feed(html)
    parser.close()
    main = _lines(parser.main)
    return _clean(parser.title), (main if main else _lines(parser.all))
