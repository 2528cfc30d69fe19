"""The Responses API's memory: the newest responses (bounded), each with the conversation
it ends, which ``previous_response_id`` continues, and while it runs what cancels it."""
from __future__ import annotations

import asyncio
from collections import OrderedDict

from fastapi import Request

from mistralrs_core.server.errors import APIError

STORE_LIMIT = 1024


class Stored:
    """One response: its public object (updated live while it runs), the conversation it
    ends (for ``previous_response_id``), and while running what cancels it."""

    def __init__(self, response: dict, history: list[dict], store: bool):
        self.response = response
        self.history = history
        self.store = store
        self.stream = None
        self.task: asyncio.Task | None = None
        self.cancelled = False
        self.done = asyncio.Event()

    @property
    def running(self) -> bool:
        return self.response["status"] in ("queued", "in_progress")

    def cancel(self) -> None:
        self.cancelled = True
        if self.stream is not None:
            self.stream.cancel()


class ResponseStore:
    """The newest ``limit`` responses; running ones are never evicted (there are at most as
    many as open requests)."""

    def __init__(self, limit: int = STORE_LIMIT):
        self.limit = limit
        self._items: OrderedDict[str, Stored] = OrderedDict()

    def put(self, rec: Stored) -> None:
        self._items[rec.response["id"]] = rec
        over = len(self._items) - self.limit
        for rid in [k for k, v in self._items.items() if not v.running][:max(over, 0)]:
            del self._items[rid]

    def get(self, rid: str, param: str = "response_id") -> Stored:
        rec = self._items.get(rid)
        if rec is None:
            raise APIError(404, f"Response with id '{rid}' not found.", param=param,
                           code="response_not_found")
        return rec

    def finished(self, rec: Stored) -> None:
        rec.done.set()
        if not rec.store:
            self._items.pop(rec.response["id"], None)

    def delete(self, rid: str) -> None:
        self._items.pop(rid, None)

    def __len__(self) -> int:
        return len(self._items)


def store_of(request: Request) -> ResponseStore:
    # Made on first use, so that app.py only has to mount the router.
    app_state = request.app.state
    if getattr(app_state, "responses", None) is None:
        app_state.responses = ResponseStore()
    return app_state.responses
