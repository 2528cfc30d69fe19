"""One MCP server's session, alive on the client's event loop from ``start`` to ``stop``.

The SDK's transports and sessions are async context managers whose task groups must be
entered and left by one task; ``serve`` is that task. It connects, lists the server's
tools (and resources), reports readiness, then holds the session open while calls made
from other tasks share it (JSON-RPC requests are concurrent on one session)."""
from __future__ import annotations

import asyncio
import fnmatch
import json
import logging
import os
import tempfile
from contextlib import AsyncExitStack
from typing import Any

import anyio
import mcp_types as types
from mcp import ClientSession
from mcp.shared.exceptions import MCPError

from .transports import connect_timeout, open_transport

log = logging.getLogger("mistralrs")

# Pages of tools/list or resources/list followed before giving up on a paginating server.
MAX_PAGES = 100
# Characters of a process server's stderr quoted in its startup error.
STDERR_TAIL = 800


class McpServerError(RuntimeError):
    """A server failed (did not start, closed, timed out, answered with an error); the
    message names the server, so the model and the log can tell which one."""


def describe(exc: BaseException) -> str:
    """The leaf errors of an exception (the SDK's task groups wrap them in groups)."""
    if isinstance(exc, BaseExceptionGroup):
        return "; ".join(dict.fromkeys(describe(e) for e in exc.exceptions))
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, McpServerError):
        return str(exc)
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class ServerConnection:
    def __init__(self, config, default_timeout: float):
        self.config = config
        self.timeout = connect_timeout(config, default_timeout)
        self._http_error: str | None = None
        self.label = f"{config.name!r} ({config.id})" if config.name and config.name != config.id \
            else repr(config.id)
        self.tools: list[types.Tool] = []
        self.resources: list[types.Resource] = []
        self.session: ClientSession | None = None
        # Why the session is not (or no longer) usable; None while it is.
        self.failure: str | None = "not started"
        self._stop: asyncio.Event | None = None
        self._startup: anyio.CancelScope | None = None
        self._garbage: str | None = None
        self._errlog = tempfile.TemporaryFile(mode="w+", encoding="utf-8", errors="replace")

    # --- lifetime (runs on the loop) --------------------------------------------------
    async def serve(self, ready: asyncio.Future) -> None:
        """Connect, list, set ``ready``; then hold the session until ``stop``."""
        self._stop = asyncio.Event()
        try:
            async with AsyncExitStack() as stack:
                streams = await stack.enter_async_context(
                    open_transport(self.config, self._errlog, self._note_http_error))
                session = await stack.enter_async_context(
                    ClientSession(*streams, message_handler=self._on_message))
                with anyio.fail_after(self.timeout), anyio.CancelScope() as self._startup:
                    await session.initialize()
                    self.tools = await self._list(session.list_tools, "tools")
                    if self.config.resources:
                        self.resources = [r for r in await self._list(session.list_resources, "resources")
                                          if self.wants_resource(r.uri)]
                if self._startup.cancelled_caught:
                    raise McpServerError(f"it answered something that is not MCP ({self._garbage})")
                self.session, self.failure = session, None
                self._trim_errlog(keep_below=0)
                if not ready.done():
                    ready.set_result(None)
                await self._stop.wait()
        except BaseException as exc:
            reason = self._startup_reason(exc) if not ready.done() else describe(exc)
            self.failure = f"MCP server {self.label} {'failed to start' if not ready.done() else 'closed'}: {reason}"
            if not ready.done():
                ready.set_exception(McpServerError(self.failure))
            if isinstance(exc, asyncio.CancelledError):
                raise
        finally:
            self.session = None
            if self.failure is None:
                self.failure = f"MCP server {self.label} is closed"
            self._errlog.close()

    async def _on_message(self, message) -> None:
        if not isinstance(message, Exception):
            return
        # What the transport could not read as JSON-RPC. Before the handshake is done it
        # means this is no MCP server: fail now instead of at the timeout.
        self._garbage = " ".join(describe(message).split())[:240]
        if self.session is None and self._startup is not None:
            self._startup.cancel()
        else:
            log.warning("MCP server %s sent something that is not JSON-RPC: %s", self.label, self._garbage)

    def _trim_errlog(self, keep_below: int = 2**20) -> None:
        # Only startup errors quote the server's stderr; past startup it is kept small.
        # (The process shares the file's offset, so its next write lands at the start.)
        try:
            fd = self._errlog.fileno()
            if os.fstat(fd).st_size > keep_below:
                os.ftruncate(fd, 0)
                os.lseek(fd, 0, os.SEEK_SET)
        except (OSError, ValueError):   # closed already
            pass

    def _note_http_error(self, status: int, reason: str) -> None:
        self._http_error = f"HTTP {status} {reason}".strip()

    def stop(self) -> None:
        if self._stop is not None:
            self._stop.set()

    def _startup_reason(self, exc: BaseException) -> str:
        reason = describe(exc)
        if self._http_error:
            reason = f"{self._http_error} ({reason})"
        if self.config.source.transport == "process":
            try:
                self._errlog.seek(0)
                tail = self._errlog.read()[-STDERR_TAIL:].strip()
            except (OSError, ValueError):
                tail = ""
            if tail:
                reason += f"; its stderr ends with: {tail}"
        return reason

    @staticmethod
    async def _list(method, field: str) -> list:
        items, cursor = [], None
        for _ in range(MAX_PAGES):
            page = await method(params=types.PaginatedRequestParams(cursor=cursor) if cursor else None)
            items.extend(getattr(page, field))
            cursor = page.next_cursor
            if not cursor:
                break
        return items

    def wants_resource(self, uri: str) -> bool:
        # Glob patterns ("file://**", "note://*"): fnmatch's * already crosses "/".
        return any(fnmatch.fnmatchcase(str(uri), p) for p in self.config.resources or ())

    # --- calls (run on the loop) --------------------------------------------------------
    def _session(self) -> ClientSession:
        session = self.session
        if session is None:
            raise McpServerError(self.failure or f"MCP server {self.label} is not connected")
        return session

    async def call_tool(self, name: str, arguments: dict, timeout: float) -> tuple[str, list[str]]:
        """The tool's text and images (base64). A tool's own error (``isError``) is a
        result the model reads; a failed or timed-out exchange raises ``McpServerError``."""
        session = self._session()
        try:
            with anyio.fail_after(timeout):
                result = await session.call_tool(name, arguments)
        except TimeoutError:
            raise McpServerError(f"MCP server {self.label}: tool {name!r} did not answer within "
                                 f"{timeout:g} s") from None
        except MCPError as exc:
            self._note_closed(exc)
            raise McpServerError(f"MCP server {self.label}: tool {name!r}: {exc.error.message}") from None
        except Exception as exc:
            raise McpServerError(f"MCP server {self.label}: tool {name!r}: {describe(exc)}") from None
        self._trim_errlog()
        text, images = render_blocks(result.content)
        if not text and result.structured_content is not None:
            text = json.dumps(result.structured_content, ensure_ascii=False)
        if result.is_error:
            text = f"Error from MCP server {self.label}: {text or 'the tool failed'}"
        return text, images

    async def read_resource(self, uri: str, timeout: float) -> tuple[str, list[str]]:
        session = self._session()
        if not any(str(r.uri) == uri for r in self.resources) and not self.wants_resource(uri):
            raise McpServerError(f"MCP server {self.label}: resource {uri!r} matches none of "
                                 f"{self.config.resources}")
        try:
            with anyio.fail_after(timeout):
                result = await session.read_resource(uri)
        except TimeoutError:
            raise McpServerError(f"MCP server {self.label}: reading {uri!r} took over {timeout:g} s") from None
        except MCPError as exc:
            self._note_closed(exc)
            raise McpServerError(f"MCP server {self.label}: reading {uri!r}: {exc.error.message}") from None
        except Exception as exc:
            raise McpServerError(f"MCP server {self.label}: reading {uri!r}: {describe(exc)}") from None
        return render_blocks([types.EmbeddedResource(resource=c) for c in result.contents])

    def _note_closed(self, exc: MCPError) -> None:
        if exc.error.code == types.CONNECTION_CLOSED and self.session is not None:
            # The server went away mid-call: later calls fail at once, naming why.
            self.failure = f"MCP server {self.label} closed the connection"
            self.session = None
            self.stop()


def render_blocks(blocks) -> tuple[str, list[str]]:
    """MCP content blocks as the text the model reads plus base64 images."""
    texts, images = [], []
    for block in blocks:
        if isinstance(block, types.TextContent):
            texts.append(block.text)
        elif isinstance(block, types.ImageContent):
            images.append(block.data)
            texts.append(f"[image {block.mime_type}]")
        elif isinstance(block, types.AudioContent):
            texts.append(f"[audio {block.mime_type}, about {len(block.data) * 3 // 4} bytes]")
        elif isinstance(block, types.EmbeddedResource):
            res = block.resource
            if isinstance(res, types.TextResourceContents):
                texts.append(res.text)
            elif (res.mime_type or "").startswith("image/"):
                images.append(res.blob)
                texts.append(f"[image {res.mime_type} {res.uri}]")
            else:
                texts.append(f"[binary resource {res.uri} ({res.mime_type or 'unknown type'})]")
        elif isinstance(block, types.ResourceLink):
            texts.append(f"[resource {block.uri}" + (f": {block.description}]" if block.description else "]"))
        else:
            texts.append(json.dumps(_dump(block), ensure_ascii=False))
    return "\n".join(texts), images


def _dump(block: Any) -> Any:
    dump = getattr(block, "model_dump", None)
    return dump(mode="json", by_alias=True, exclude_none=True) if callable(dump) else str(block)
