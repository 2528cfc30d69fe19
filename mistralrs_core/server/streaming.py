"""Server-sent events from the Runner's blocking stream iterators.

Each ``next()`` blocks on the engine's queue, so it runs in a worker thread. A client that
goes away must cancel its generation at once (or its sequences keep their KV blocks until
``max_tokens``): the response watches for ``http.disconnect`` itself, whatever ASGI spec
version the server speaks, and the waiting worker is abandoned after ``stream.cancel()``,
which makes the engine finish the sequences and wakes that worker up.
"""
from __future__ import annotations

from typing import AsyncIterator, Callable

import anyio
import anyio.to_thread
from starlette.responses import StreamingResponse

_END = object()


def _next(it):
    try:
        return next(it)
    except StopIteration:
        return _END


async def iterate_in_threads(stream, limiter) -> AsyncIterator:
    """The items of a blocking iterator, each fetched in a worker thread."""
    cancel = getattr(stream, "cancel", None)
    finished = False
    try:
        while True:
            # Abandoning a blocked next() is only safe when cancel() will unblock it.
            item = await anyio.to_thread.run_sync(_next, stream, limiter=limiter,
                                                  abandon_on_cancel=cancel is not None)
            if item is _END:
                finished = True
                return
            yield item
    finally:
        if not finished:
            if cancel is not None:
                cancel()
            elif hasattr(stream, "close"):
                stream.close()


class EventStreamResponse(StreamingResponse):
    def __init__(self, events: AsyncIterator[bytes], on_disconnect: Callable[[], None] | None = None):
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.events = events
        self.on_disconnect = on_disconnect

    async def __call__(self, scope, receive, send) -> None:
        disconnected = completed = False
        async with anyio.create_task_group() as tg:
            async def watch() -> None:
                nonlocal disconnected
                while (await receive())["type"] != "http.disconnect":
                    pass
                # Servers also report a disconnect once the response is complete.
                disconnected = not completed
                tg.cancel_scope.cancel()

            tg.start_soon(watch)
            try:
                await send({"type": "http.response.start", "status": self.status_code,
                            "headers": self.raw_headers})
                async for data in self.events:
                    await send({"type": "http.response.body", "body": data, "more_body": True})
                completed = True   # before the send: the server may report the end as a disconnect
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            except OSError:  # ASGI >= 2.4 servers raise on send() once the client is gone
                disconnected = not completed
            finally:
                with anyio.CancelScope(shield=True):
                    await self.events.aclose()
                tg.cancel_scope.cancel()
        if disconnected and self.on_disconnect is not None:
            self.on_disconnect()
