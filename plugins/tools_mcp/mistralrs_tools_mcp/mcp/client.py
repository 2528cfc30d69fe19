"""``McpClient``: the configured servers, their tools under the names the model sees, and
synchronous calls for the agentic loop's threads.

All sessions live on one event loop in one daemon thread the client owns; ``call`` hands
a coroutine to it and waits. ``max_concurrent_calls`` is one semaphore on that loop, so
it bounds calls across every server; ``tool_timeout_secs`` bounds each call."""
from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import re
import threading
import weakref
from typing import Any

import attrs

from .connection import McpServerError, ServerConnection, describe

log = logging.getLogger("mistralrs")

# Upstream's defaults when McpClientConfigPy leaves them None.
DEFAULT_TOOL_TIMEOUT_SECS = 30
DEFAULT_MAX_CONCURRENT_CALLS = 10
# How long close() lets servers wind down (a process gets the SDK's grace, then a kill).
CLOSE_WAIT_SECS = 10.0
# OpenAI-style function names: what tool lists and call grammars accept.
_NAME_OK = re.compile(r"[^A-Za-z0-9_-]")
READ_RESOURCE = "read_resource"


@attrs.define
class RegisteredTool:
    name: str                 # what the model calls
    server_id: str
    remote: str | None        # the server's own tool name; None: the read_resource tool
    definition: dict


class _LoopThread:
    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="mcp-client", daemon=True)
        self.thread.start()

    def submit(self, coro) -> concurrent.futures.Future:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(CLOSE_WAIT_SECS)
        if not self.thread.is_alive():
            self.loop.close()


class McpClient:
    """Connects every enabled server of ``config`` (a ``McpClientConfigPy``) at once. A
    server that fails to start is logged (naming it) and left out; the others serve."""

    def __init__(self, config):
        self.config = config
        self.tool_timeout = float(config.tool_timeout_secs or DEFAULT_TOOL_TIMEOUT_SECS)
        self._connections = {s.id: ServerConnection(s, self.tool_timeout) for s in config.servers if s.enabled}
        self._tools: dict[str, RegisteredTool] = {}
        self._closed = False
        self._lock = threading.Lock()
        self._loop = _LoopThread()
        self._semaphore = self._loop.submit(
            _make_semaphore(config.max_concurrent_calls or DEFAULT_MAX_CONCURRENT_CALLS)).result()
        self._tasks: list[concurrent.futures.Future] = []
        # Interpreter exit stops the servers too (a process server must not outlive us).
        # (weakref.finalize also runs at exit, unless close() ran it first.)
        self._finalizer = weakref.finalize(self, _shutdown, self._loop, self._connections, self._tasks)
        try:
            self._start()
        except BaseException:
            self.close()
            raise

    # --- startup ------------------------------------------------------------------------
    def _start(self) -> None:
        started = {}
        for sid, conn in self._connections.items():
            ready = self._loop.submit(_new_future()).result()
            task = self._loop.submit(conn.serve(ready))
            self._tasks.append(task)
            started[sid] = (ready, task)
        for sid, (ready, task) in started.items():
            conn = self._connections[sid]
            try:
                # serve() bounds the handshake itself; this bounds a transport stuck opening.
                self._loop.submit(_wait(ready, conn.timeout + 5)).result()
            except Exception as exc:
                if not isinstance(exc, McpServerError):
                    task.cancel()
                    conn.failure = f"MCP server {conn.label} failed to start: {describe(exc)}"
                log.warning("%s", conn.failure)
                continue
            if self.config.auto_register_tools:
                self._register(conn)

    def _register(self, conn: ServerConnection) -> None:
        prefix = conn.config.tool_prefix
        entries = []
        for t in conn.tools:
            params = t.input_schema or {"type": "object", "properties": {}}
            strict = closed_objects(params)
            if schema_constrains(strict):
                params = strict
            entries.append((t.name, t.name, {"type": "function", "function": {
                "name": "", "description": t.description or t.title or t.name, "parameters": params,
                "strict": params is strict}}))
        if conn.resources:
            uris = [str(r.uri) for r in conn.resources]
            entries.append((READ_RESOURCE, None, {"type": "function", "function": {
                "name": "", "description": f"Read a resource of MCP server {conn.config.name or conn.config.id}. "
                                           f"Available: {', '.join(uris)}",
                "parameters": {"type": "object", "additionalProperties": False, "required": ["uri"],
                               "properties": {"uri": {"type": "string", "enum": uris}}},
                "strict": True}}))
        for remote_name, remote, definition in entries:
            name = _NAME_OK.sub("_", f"{prefix}_{remote_name}" if prefix else remote_name)[:64]
            other = self._tools.get(name)
            if other is not None:
                log.warning("MCP server %s: tool %r is already registered by MCP server %r; "
                            "set tool_prefix to tell them apart", conn.label, name, other.server_id)
                continue
            definition["function"]["name"] = name
            self._tools[name] = RegisteredTool(name, conn.config.id, remote, definition)

    # --- the provider's duck type -------------------------------------------------------
    def tool_definitions(self) -> list[dict]:
        return [t.definition for t in self._tools.values()]

    def can_call(self, name: str) -> bool:
        return name in self._tools

    def call(self, name: str, arguments: dict) -> Any:
        from mistralrs_core.tools import ToolOutput
        tool = self._tools[name]
        if self._closed:
            raise McpServerError(f"MCP server {self._connections[tool.server_id].label}: the client is closed")
        if not isinstance(arguments, dict):
            raise ValueError(f"arguments of {name!r}: must be a JSON object, got {type(arguments).__name__}")
        try:
            text, images = self._loop.submit(self._call(tool, arguments)).result()
        except concurrent.futures.CancelledError:
            # close() cancels the calls still waiting when it stops the loop.
            raise McpServerError(f"MCP server {self._connections[tool.server_id].label}: "
                                 f"the client closed during the call") from None
        return ToolOutput(text, images_base64=images)

    async def _call(self, tool: RegisteredTool, arguments: dict) -> tuple[str, list[str]]:
        conn = self._connections[tool.server_id]
        async with self._semaphore:
            if tool.remote is None:
                return await conn.read_resource(str(arguments.get("uri", "")), self.tool_timeout)
            return await conn.call_tool(tool.remote, arguments, self.tool_timeout)

    # --- state and shutdown -------------------------------------------------------------
    def servers(self) -> dict[str, str | None]:
        """Server id -> None when connected, else why not (``enabled=False`` ones are absent)."""
        return {sid: c.failure for sid, c in self._connections.items()}

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._finalizer()


def closed_objects(schema: Any) -> Any:
    """``schema`` with ``additionalProperties: false`` on each object that lists its
    properties and says nothing of others, as OpenAI's strict mode has it. JSON Schema's
    default (anything else allowed) lets a small model add keys until max_tokens; the
    properties the server declared are what it reads."""
    if isinstance(schema, list):
        return [closed_objects(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: closed_objects(v) if k not in ("const", "enum", "default", "examples") else v
           for k, v in schema.items()}
    if (out.get("type") == "object" and isinstance(out.get("properties"), dict)
            and "additionalProperties" not in out and "patternProperties" not in out):
        out["additionalProperties"] = False
    return out


def schema_constrains(schema: dict) -> bool:
    """Whether the model's calls can be held to ``schema`` (the tool is then offered as
    ``strict``). A server checks arguments against its input schema anyway, so holding
    the model to it only spares failed calls; a schema constrained decoding cannot
    compile is offered loose instead of failing every request that offers the tool."""
    import llguidance
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema))
        return llguidance.LLMatcher.validate_grammar(grammar, None) == ""
    except Exception:   # llguidance raises ValueError/RuntimeError on schemas it rejects
        return False


async def _make_semaphore(n: int) -> asyncio.Semaphore:
    return asyncio.Semaphore(n)


async def _new_future() -> asyncio.Future:
    return asyncio.get_running_loop().create_future()


async def _wait(future: asyncio.Future, timeout: float) -> None:
    await asyncio.wait_for(asyncio.shield(future), timeout)


def _shutdown(loop: _LoopThread, connections: dict, tasks: list) -> None:
    """Stop every session (closing a process server's stdin, then killing it after the
    SDK's grace period), then the loop. Holds no reference to the client (a finalizer)."""
    async def stop_all():
        for conn in connections.values():
            conn.stop()
        pending = [asyncio.wrap_future(t) for t in tasks]
        if pending:
            _, late = await asyncio.wait(pending, timeout=CLOSE_WAIT_SECS)
            for t in late:
                t.cancel()
        # Calls still waiting (for the semaphore, or on a session that ignored the stop)
        # end now: a caller must not wait on a loop that is about to stop.
        me = asyncio.current_task()
        rest = [t for t in asyncio.all_tasks() if t is not me]
        for t in rest:
            t.cancel()
        if rest:
            await asyncio.wait(rest, timeout=CLOSE_WAIT_SECS)
    if loop.loop.is_closed():
        return
    done = loop.submit(stop_all())
    if threading.current_thread() is loop.thread:
        # Collected on the loop's own thread: it cannot wait for itself.
        done.add_done_callback(lambda _: loop.loop.call_soon_threadsafe(loop.loop.stop))
        return
    try:
        done.result(CLOSE_WAIT_SECS + 5)
    except Exception as exc:   # shutting down regardless
        log.warning("MCP client: stopping the servers: %s", describe(exc))
    loop.stop()
