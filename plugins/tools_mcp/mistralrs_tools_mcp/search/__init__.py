"""Web search for the agentic loop: the ``search_the_web`` tool.

* ``html_text``: search-result pages and documents (HTML) -> results and readable text;
* ``backend``: the built-in backend (an HTML search page over httpx, then the pages);
* ``bm25``: the lexical prefilter;
* ``rerank``: the embedding reranker on the project's embedding pipeline;
* ``engine``: a query -> ranked, budgeted results -> the tool result the model reads.
"""
