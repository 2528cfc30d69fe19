"""A real MCP server for the tests, written with the ``mcp`` server library.

    python tools_server.py stdio|http|ws [--token T] [--name N] [--tools add,echo,...]

``http`` (streamable HTTP), ``sse`` (the older HTTP+SSE transport) and ``ws`` listen on 127.0.0.1, on a free port they print as
``PORT <n>``; with ``--token`` they answer 401 to a request without ``Authorization:
Bearer <T>``. The WebSocket side uses the client's own framing adapter (the SDK has no
WebSocket server either)."""
import argparse
import asyncio
import json
import os
import socket
import sys
import time
from typing import Annotated

from pydantic import Field

from mcp.server.mcpserver import MCPServer

TOOLS = ("add", "echo", "slow", "hang", "crash", "fail", "where")


def build(name: str, tools) -> MCPServer:
    server = MCPServer(name, log_level="WARNING")

    def add(a: int, b: int) -> str:
        """Add two integers."""
        return str(a + b)

    def echo(text: Annotated[str, Field(min_length=1, max_length=24)]) -> str:
        """Repeat the text back, tagged with this server's name."""
        return f"{name} says: {text}"

    async def slow(seconds: float) -> str:
        """Sleep, then report when the call started and ended."""
        start = time.time()
        await asyncio.sleep(seconds)
        return f"{start:.6f} {time.time():.6f}"

    async def hang() -> str:
        """Never answers."""
        await asyncio.sleep(3600)
        return "unreachable"

    def crash() -> str:
        """Kills the server process mid-call."""
        os._exit(3)

    def fail() -> str:
        """Raises: the result is an MCP tool error."""
        raise ValueError("the input was bad")

    def where() -> str:
        """This process: its pid, working directory and MCP_TEST_VAR."""
        return json.dumps({"pid": os.getpid(), "cwd": os.getcwd(), "var": os.environ.get("MCP_TEST_VAR")})

    for fn in (add, echo, slow, hang, crash, fail, where):
        if fn.__name__ in tools:
            server.tool()(fn)

    @server.resource("note://greeting")
    def greeting() -> str:
        return f"hello from {name}"

    @server.resource("secret://key")
    def secret() -> str:
        return "not for the model"

    return server


def _listening_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    # Listening before the port is announced: a client that connects while the server is
    # still starting waits in the backlog instead of being refused.
    sock.listen(64)
    return sock


def _announce(port: int) -> None:
    print(f"PORT {port}", flush=True)


async def serve_http(server: MCPServer, token, sse: bool = False) -> None:
    import uvicorn
    app = server.sse_app() if sse else server.streamable_http_app()

    async def guarded(scope, receive, send):
        if scope["type"] == "http" and token is not None:
            sent = dict(scope["headers"]).get(b"authorization", b"").decode()
            if sent != f"Bearer {token}":
                await send({"type": "http.response.start", "status": 401,
                            "headers": [(b"content-type", b"text/plain"), (b"www-authenticate", b"Bearer")]})
                await send({"type": "http.response.body", "body": b"missing or wrong bearer token"})
                return
        await app(scope, receive, send)

    sock = _listening_socket()
    _announce(sock.getsockname()[1])
    await uvicorn.Server(uvicorn.Config(guarded, log_level="warning")).serve(sockets=[sock])


async def serve_ws(server: MCPServer, token) -> None:
    from websockets.asyncio.server import serve

    from mistralrs_tools_mcp.mcp.websocket import MAX_MESSAGE_BYTES, SUBPROTOCOL, message_streams
    low = server._lowlevel_server   # the SDK runs any stream pair through its low-level server

    async def handler(ws):
        async with message_streams(ws) as (read, write):
            await low.run(read, write, low.create_initialization_options())

    def check(connection, request):
        if token is not None and request.headers.get("Authorization") != f"Bearer {token}":
            return connection.respond(401, "missing or wrong bearer token\n")
        return None

    sock = _listening_socket()
    async with serve(handler, sock=sock, subprotocols=[SUBPROTOCOL], process_request=check,
                     max_size=MAX_MESSAGE_BYTES):
        _announce(sock.getsockname()[1])
        await asyncio.Future()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("transport", choices=("stdio", "http", "sse", "ws"))
    ap.add_argument("--token")
    ap.add_argument("--name", default="tools")
    ap.add_argument("--tools", default=",".join(TOOLS))
    args = ap.parse_args()
    server = build(args.name, set(args.tools.split(",")))
    if args.transport == "stdio":
        server.run("stdio")
    elif args.transport in ("http", "sse"):
        asyncio.run(serve_http(server, args.token, sse=args.transport == "sse"))
    else:
        asyncio.run(serve_ws(server, args.token))


if __name__ == "__main__":
    sys.exit(main())
