"""A server's configured source (``McpServerSourcePy.Http / Process / WebSocket``) opened
as the ``mcp`` SDK's pair of message streams."""
from __future__ import annotations

import os
from contextlib import AsyncExitStack, asynccontextmanager
from typing import IO, AsyncIterator
from urllib.parse import urlsplit

import httpx2
from mcp.client.sse import sse_client
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import MCP_DEFAULT_SSE_READ_TIMEOUT, create_mcp_http_client

from .websocket import websocket_client

# Without timeout_secs, connecting and each HTTP exchange are bounded as the SDK's defaults.
DEFAULT_TIMEOUT_SECS = 30.0


def request_headers(server) -> dict[str, str]:
    """The source's ``headers`` plus ``Authorization: Bearer <bearer_token>``; the token
    wins over a hand-written Authorization header (it is the field meant for it)."""
    headers = dict(server.source.headers or {})
    if server.bearer_token:
        for key in [k for k in headers if k.lower() == "authorization"]:
            del headers[key]
        headers["Authorization"] = f"Bearer {server.bearer_token}"
    return headers


def connect_timeout(server, tool_timeout: float | None = None) -> float:
    """Bound on connecting and the handshake: the source's ``timeout_secs``; a process
    (which has none) gets 30 s, or the tool timeout when that is longer (a process may
    take as long to start as a tool to answer)."""
    return float(getattr(server.source, "timeout_secs", None)
                 or max(tool_timeout or 0.0, DEFAULT_TIMEOUT_SECS))


def _is_legacy_sse(url: str) -> bool:
    # The 2024-11-05 HTTP+SSE transport lives at a GET endpoint conventionally named /sse;
    # everything else speaks streamable HTTP (whose responses may themselves be SSE).
    return urlsplit(url).path.rstrip("/").endswith("/sse")


@asynccontextmanager
async def open_transport(server, errlog: IO, on_http_error=None) -> AsyncIterator[tuple]:
    """``(read_stream, write_stream)`` for ``server`` (a ``McpServerConfigPy``). A process
    server's stderr goes to ``errlog``; ``on_http_error(status, reason)`` hears an HTTP
    server's error statuses (the SDK's errors leave them out: "401" is the useful part)."""
    source = server.source
    kind = source.transport
    if kind == "process":
        # As a shell would start it: the Runner's environment plus the configured variables.
        env = {**os.environ, **(source.env or {})}
        params = StdioServerParameters(command=source.command, args=list(source.args),
                                       env=env, cwd=source.work_dir)
        async with stdio_client(params, errlog=errlog) as streams:
            yield streams
    elif kind == "websocket":
        async with websocket_client(source.url, request_headers(server),
                                    open_timeout=connect_timeout(server)) as streams:
            yield streams
    elif kind == "http":
        timeout = connect_timeout(server)
        headers = request_headers(server)
        if _is_legacy_sse(source.url):
            async with sse_client(source.url, headers=headers, timeout=timeout,
                                  sse_read_timeout=max(timeout, MCP_DEFAULT_SSE_READ_TIMEOUT)) as streams:
                yield streams
            return
        async with AsyncExitStack() as stack:
            # Responses may stream (SSE) for as long as a tool runs: the read timeout is
            # the SDK's long one; tool_timeout_secs bounds each call instead.
            http = create_mcp_http_client(
                headers=headers, timeout=httpx2.Timeout(timeout, read=max(timeout, MCP_DEFAULT_SSE_READ_TIMEOUT)))
            if on_http_error is not None:
                async def note_status(response: httpx2.Response) -> None:
                    if response.status_code >= 400:
                        on_http_error(response.status_code, response.reason_phrase)
                http.event_hooks["response"].append(note_status)
            http = await stack.enter_async_context(http)
            streams = await stack.enter_async_context(streamable_http_client(source.url, http_client=http))
            yield streams
    else:
        raise ValueError(f"McpServerConfigPy.source: unknown transport {kind!r}")
