"""OpenAI-compatible HTTP server over a ``Runner`` (FastAPI + uvicorn).

``create_app(runner)`` builds the ASGI app; ``serve(runner, host=, port=)`` runs it.
Modules: ``app`` (assembly, auth), ``inference`` and ``admin`` (routes), ``context``
(routing, thread offloading), ``streaming`` (SSE with disconnect cancellation), ``wire``
(OpenAI JSON shapes), ``errors``, ``metrics``, ``responses_api`` and ``anthropic_api``
(OpenAI's Responses and Anthropic's Messages APIs, translated onto the chat route),
``web_ui`` (the page at ``/ui``), and for the CLI ``spec`` (flags/config ->
``Which``), ``loading`` and ``interactive``.
"""
__all__ = ["create_app", "serve"]


def __getattr__(name: str):
    # Lazy, so that `mistralrs run` (which uses spec/loading only) never imports FastAPI.
    if name in __all__:
        from mistralrs_core.server import app
        return getattr(app, name)
    raise AttributeError(name)
