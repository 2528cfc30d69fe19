"""The FastAPI application and how it is served."""
from __future__ import annotations

import contextlib
import hmac
import signal

from fastapi import FastAPI, Request
from starlette.exceptions import HTTPException as StarletteHTTPException

from mistralrs_core.server import admin, anthropic_api, inference, responses_api, sessions, web_ui
from mistralrs_core.server.context import MAX_BODY_BYTES, ServerState
from mistralrs_core.server.errors import APIError
from mistralrs_core.server.metrics import MetricsMiddleware

# The chat page holds no secret; it asks for the key and sends it with its API calls.
OPEN_PATHS = frozenset({"/health"}) | web_ui.PUBLIC_PATHS


class BearerAuth:
    """401 unless the key matches; /health (and the chat page's static files) stay open.
    The key comes as ``Authorization: Bearer <key>`` (OpenAI clients) or, when there is no
    Authorization header, as ``x-api-key: <key>`` (what the Anthropic client's ``api_key=``
    sends)."""

    def __init__(self, app, key: str):
        self.app = app
        self.key = key.encode()

    def _presented(self, headers: dict) -> bytes | None:
        auth = headers.get(b"authorization")
        if auth is not None:
            scheme, _, token = auth.partition(b" ")
            return token.strip() if scheme.lower() == b"bearer" else None
        token = headers.get(b"x-api-key")
        return token.strip() if token is not None else None

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            token = self._presented(dict(scope["headers"]))
            # compare_digest: the time taken must not reveal how much of the key matched.
            if token is None or not hmac.compare_digest(token, self.key):
                err = APIError(401, "Incorrect API key provided. Send it as 'Authorization: Bearer <key>' "
                                    "(or 'x-api-key: <key>').", code="invalid_api_key")
                return await err.response({"WWW-Authenticate": "Bearer"})(scope, receive, send)
        await self.app(scope, receive, send)


ROUTERS = (inference.router, admin.router, sessions.router, responses_api.router, anthropic_api.router,
           web_ui.router)


def route_paths() -> list[str]:
    return sorted({r.path for router in ROUTERS for r in router.routes})


def create_app(runner, *, api_key: str | None = None, max_threads: int = 256,
               max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    """An OpenAI-compatible app serving ``runner`` (routes by the request's ``model``)."""
    app = FastAPI(title="mistralrs for Python", version="0.1.0")
    app.state.server = ServerState(runner, api_key=api_key, max_threads=max_threads,
                                   max_body_bytes=max_body_bytes)
    for router in ROUTERS:
        app.include_router(router)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        # Unknown routes and wrong methods answer in the same error shape as everything else.
        return APIError(exc.status_code, str(exc.detail), code=None).response(getattr(exc, "headers", None))

    if api_key:
        app.add_middleware(BearerAuth, key=api_key)
    # Added last, so outermost: 401s and unknown routes are counted too.
    routes = set(route_paths())
    app.add_middleware(MetricsMiddleware, metrics=app.state.server.metrics, routes=routes)
    return app


def _draining_server(config):
    """uvicorn's server, except that SIGTERM means "drain and exit 0": uvicorn finishes the
    in-flight requests (up to ``timeout_graceful_shutdown``), then raises the signal again,
    which would kill the process before the Runner shuts down, with a failure status."""
    import uvicorn

    class DrainingServer(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            with super().capture_signals():
                yield
                self._captured_signals = [s for s in self._captured_signals if s != signal.SIGTERM]
    return DrainingServer(config)


def serve(runner, *, host: str = "127.0.0.1", port: int = 1234, api_key: str | None = None,
          log_level: str = "info", drain_timeout: float = 30.0, max_body_bytes: int = MAX_BODY_BYTES) -> None:
    """Serve ``runner`` until SIGTERM/SIGINT (blocking). On SIGTERM the server stops
    accepting connections and lets in-flight requests finish for up to ``drain_timeout``
    seconds (then cancels them), and returns normally."""
    import uvicorn

    app = create_app(runner, api_key=api_key, max_body_bytes=max_body_bytes)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=log_level == "debug",
                            timeout_graceful_shutdown=drain_timeout)
    _draining_server(config).run()
