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

from mistralrs_core.server.errors import APIError, from_exception, unknown_model
from mistralrs_core.server.metrics import Metrics


class ServerState:
    def __init__(self, runner, *, api_key: str | None = None, max_threads: int = 256):
        self.runner = runner
        self.api_key = api_key
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


async def read_json(request: Request) -> dict:
    raw = await request.body()
    try:
        body = json.loads(raw or b"null")
    except ValueError as exc:
        raise APIError(400, f"body: not valid JSON ({exc})") from None
    if not isinstance(body, dict):
        raise APIError(400, f"body: must be a JSON object, got {type(body).__name__}")
    return body


def openai_errors(route: Callable) -> Callable:
    """Every failure of ``route`` leaves as an OpenAI error object with its status."""
    @functools.wraps(route)
    async def wrapper(*args, **kwargs):
        try:
            return await route(*args, **kwargs)
        except Exception as exc:
            return from_exception(exc).response()
    return wrapper
