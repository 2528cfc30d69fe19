"""Tool calling and the agentic loop.

* ``parsers``: tool calls out of generated text, per model family's native format;
* ``tool_specs``: a request's tools and tool choice, validated;
* ``formats``: a model's call format, how its template is given tools, forced-call grammars;
* ``calling``: one chat request's tool calling (prepare, parse, stream filter);
* ``loop``: the agentic loop (``Agent``), used by the Runner and so by the server;
* ``callbacks``: ``Runner(tool_callbacks=...)`` as a tool provider;
* ``sessions``: sessions (``session_id``) and the store of files tools produced.
"""
