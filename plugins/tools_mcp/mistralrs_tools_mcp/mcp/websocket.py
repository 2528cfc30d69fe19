"""MCP over WebSocket, as a transport for the ``mcp`` SDK's ``ClientSession``.

The SDK's 2.x line dropped its WebSocket client. Rather than pin 1.x (and lose 2.x's
fixes to the other transports), this adapter frames MCP the way 1.x did and other SDKs
do: the ``mcp`` subprotocol, one JSON-RPC message per text frame. ``message_streams``
turns any ``websockets`` connection, client or server side, into the two memory
streams the SDK's sessions and servers read and write.
"""
from __future__ import annotations

from contextlib import asynccontextmanager
from typing import AsyncIterator, Mapping

import anyio
import mcp_types as types
from mcp.shared.message import SessionMessage
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed
from websockets.typing import Subprotocol

SUBPROTOCOL = Subprotocol("mcp")
# A tool result may carry images or resource blobs: far more than websockets' 1 MiB default.
MAX_MESSAGE_BYTES = 64 * 2**20


@asynccontextmanager
async def message_streams(ws) -> AsyncIterator[tuple]:
    """``(read_stream, write_stream)`` over an open ``websockets`` connection. A frame that
    is not a JSON-RPC message reaches the reader as the exception (as the SDK's stdio
    transport does); the connection closing ends the read stream, which fails the
    requests still waiting on it."""
    read_writer, read_stream = anyio.create_memory_object_stream[SessionMessage | Exception](0)
    write_stream, write_reader = anyio.create_memory_object_stream[SessionMessage](0)

    async def reader() -> None:
        async with read_writer:
            try:
                async for frame in ws:
                    try:
                        message = types.jsonrpc_message_adapter.validate_json(frame, by_name=False)
                    except ValueError as exc:
                        await read_writer.send(exc)
                        continue
                    await read_writer.send(SessionMessage(message))
            except (ConnectionClosed, anyio.ClosedResourceError, anyio.BrokenResourceError):
                pass

    async def writer() -> None:
        async with write_reader:
            try:
                async for item in write_reader:
                    await ws.send(item.message.model_dump_json(by_alias=True, exclude_unset=True))
            except (ConnectionClosed, anyio.ClosedResourceError, anyio.BrokenResourceError):
                # The peer is gone: end the read side too, or a request would wait forever.
                await read_writer.aclose()

    async with anyio.create_task_group() as tg:
        tg.start_soon(reader)
        tg.start_soon(writer)
        try:
            yield read_stream, write_stream
        finally:
            tg.cancel_scope.cancel()
            read_stream.close()
            write_stream.close()


@asynccontextmanager
async def websocket_client(url: str, headers: Mapping[str, str] | None = None,
                           open_timeout: float | None = 30) -> AsyncIterator[tuple]:
    """Connect to ``url`` (ws:// or wss://) with ``headers`` on the opening handshake."""
    async with connect(url, subprotocols=[SUBPROTOCOL], additional_headers=dict(headers or {}),
                       open_timeout=open_timeout, max_size=MAX_MESSAGE_BYTES) as ws:
        async with message_streams(ws) as streams:
            yield streams
