"""What every route needs: the served Runner, request parsing, model routing, and a way to
call the blocking Runner without stalling the event loop."""
from __future__ import annotations

import functools
import json
import time
from typing import Any, Callable

import anyio
import anyio.to_thread
from fastapi import Request

from mistralrs_core.engine.cancel import CancelToken, bound
from mistralrs_core.server.errors import APIError, from_exception, unknown_model
from mistralrs_core.server.metrics import Metrics

# Request bodies beyond this are refused before they are read whole (a base64 image or
# two fit; a body meant to exhaust memory does not).
MAX_BODY_BYTES = 16 << 20
# No request needs deeper JSON (tool schemas included); deeper is an attack on recursion.
MAX_JSON_DEPTH = 100


class ServerState:
    def __init__(self, runner, *, api_key: str | None = None, max_threads: int = 256,
                 max_body_bytes: int = MAX_BODY_BYTES):
        self.runner = runner
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes
        self.metrics = Metrics()
        self.created = int(time.time())
        self._max_threads = max_threads
        self._limiter = None

    @property
    def limiter(self):
        # A CapacityLimiter belongs to the running event loop, so it is made on first use.
        # Every open stream parks one worker in next(); anyio's default of 40 would stall
        # streams beyond the 40th.
        if self._limiter is None:
            self._limiter = anyio.CapacityLimiter(self._max_threads)
        return self._limiter

    async def run(self, fn: Callable, *args, **kwargs) -> Any:
        return await anyio.to_thread.run_sync(functools.partial(fn, *args, **kwargs), limiter=self.limiter)

    async def run_until_disconnect(self, request: Request, route: str, fn: Callable, *args, **kwargs) -> Any:
        """``run``, cancelling the engine work ``fn`` submits if the client disconnects first
        (a non-streamed answer nobody will read must not hold its sequences)."""
        token = CancelToken()

        def work():
            with bound(token):
                return fn(*args, **kwargs)

        async def watch() -> None:
            # The body was read already: the next message is the disconnect.
            while (await request.receive())["type"] != "http.disconnect":
                pass
            self.metrics.disconnects.inc(route)
            token.cancel()

        outcome: dict = {}
        async with anyio.create_task_group() as tg:
            tg.start_soon(watch)
            try:
                outcome["value"] = await anyio.to_thread.run_sync(work, limiter=self.limiter)
            except Exception as exc:   # raised outside the group, not as an ExceptionGroup
                outcome["error"] = exc
            tg.cancel_scope.cancel()
        if "error" in outcome:
            raise outcome["error"]
        return outcome["value"]

    def resolve_model(self, name: Any) -> str:
        """The Runner model id a request's ``model`` field routes to."""
        models = self.runner.list_models()
        if name is None or (name == "default" and "default" not in models):
            default = self.runner.get_default_model_id()
            if default is None:
                raise APIError(404, "no model is loaded", param="model", code="model_not_found")
            return default
        if not isinstance(name, str):
            raise APIError(400, f"model: must be a string, got {name!r}", param="model")
        if name not in models:
            raise unknown_model(name)
        return name


def state(request: Request) -> ServerState:
    return request.app.state.server


async def read_body(request: Request) -> bytes:
    """The body, refused with 413 as soon as it is known to exceed the server's limit
    (by its Content-Length, or while it arrives), never buffered beyond it."""
    limit = request.app.state.server.max_body_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(int(declared), limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(size, limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(size: int, limit: int) -> APIError:
    return APIError(413, f"body: {size} bytes or more, over the server's limit of {limit} bytes",
                    param="body", code="request_too_large")


async def read_json(request: Request) -> dict:
    raw = await read_body(request)
    try:
        body = json.loads(raw or b"null")
    except ValueError as exc:   # UnicodeDecodeError (invalid UTF-8) included
        raise APIError(400, f"body: not valid JSON ({exc})", param="body") from None
    except RecursionError:
        raise APIError(400, "body: JSON nested too deeply", param="body") from None
    if not isinstance(body, dict):
        raise APIError(400, f"body: must be a JSON object, got {type(body).__name__}", param="body")
    bad = _unencodable(body, "", 0)
    if bad is not None:
        # JSON escapes can spell lone surrogates (\ud800), which no tokenizer can encode.
        raise APIError(400, f"{bad}: not valid Unicode text (a lone surrogate escape)", param=bad)
    return body


def _unencodable(value: Any, path: str, depth: int) -> str | None:
    """The path (``messages[0].content``) of the first string that is not valid Unicode."""
    if depth > MAX_JSON_DEPTH:
        raise APIError(400, f"body: JSON nested deeper than {MAX_JSON_DEPTH} levels", param="body")
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path or "body"
        return None
    if isinstance(value, dict):
        items = ((f"{path}.{k}" if path else str(k), v) for k, v in value.items())
        keys = [k for k in value if isinstance(k, str)]
        bad_key = next((k for k in keys if _unencodable(k, "", depth) is not None), None)
        if bad_key is not None:
            return path or "body"
    elif isinstance(value, list):
        items = ((f"{path}[{i}]", v) for i, v in enumerate(value))
    else:
        return None
    for sub, v in items:
        found = _unencodable(v, sub, depth + 1)
        if found is not None:
            return found
    return None


def openai_errors(route: Callable) -> Callable:
    """Every failure of ``route`` leaves as an OpenAI error object with its status."""
    @functools.wraps(route)
    async def wrapper(*args, **kwargs):
        try:
            return await route(*args, **kwargs)
        except Exception as exc:
            return from_exception(exc).response()
    return wrapper
