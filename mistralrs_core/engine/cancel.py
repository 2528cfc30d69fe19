"""Cancelling a blocking Runner call from outside the thread that waits in it.

A non-streamed request blocks its worker thread until the answer is complete, and the
Runner hands back no handle before then. The caller binds a ``CancelToken`` to the call
(``with bound(token): runner.send_chat_completion_request(...)``); every request group the
call submits registers its engine cancel with the token, so ``token.cancel()`` from any
thread (the server, when the HTTP client disconnects) frees those sequences at the next step.
"""
from __future__ import annotations

import contextlib
import contextvars
import threading
from typing import Callable, Iterator

_current: contextvars.ContextVar["CancelToken | None"] = contextvars.ContextVar("mistralrs_cancel", default=None)


class CancelToken:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._hooks: list[Callable[[], None]] = []
        self.cancelled = False

    def add(self, hook: Callable[[], None]) -> None:
        with self._lock:
            if not self.cancelled:
                self._hooks.append(hook)
                return
        hook()   # cancelled before the work got this far: cancel it at once

    def cancel(self) -> None:
        with self._lock:
            if self.cancelled:
                return
            self.cancelled = True
            hooks, self._hooks = self._hooks, []
        for hook in hooks:
            hook()


@contextlib.contextmanager
def bound(token: CancelToken) -> Iterator[CancelToken]:
    reset = _current.set(token)
    try:
        yield token
    finally:
        _current.reset(reset)


def on_cancel(hook: Callable[[], None]) -> None:
    """Run ``hook`` when the token bound to this call is cancelled (no token: never)."""
    token = _current.get()
    if token is not None:
        token.add(hook)
