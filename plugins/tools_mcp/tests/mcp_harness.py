"""Real MCP servers for the tests (mcp_servers/tools_server.py, written with the ``mcp``
server library) and configs pointing at them."""
from __future__ import annotations

import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

from mistralrs import McpServerConfigPy, McpServerSourcePy

SERVERS = Path(__file__).parent / "mcp_servers"
TOOLS_SERVER = str(SERVERS / "tools_server.py")
GARBAGE_SERVER = str(SERVERS / "garbage_server.py")
TOKEN = "s3cret-token"


def process_source(name: str, *extra: str, **kw) -> McpServerSourcePy.Process:
    return McpServerSourcePy.Process(command=sys.executable,
                                     args=[TOOLS_SERVER, "stdio", "--name", name, *extra], **kw)


def server(id: str, source, **kw) -> McpServerConfigPy:
    return McpServerConfigPy(id=id, name=f"{id.title()} MCP", source=source, **kw)


@contextmanager
def listening_server(transport: str, name: str, *extra: str, token: str | None = TOKEN):
    """Starts tools_server.py over ``http``, ``sse`` or ``ws`` on 127.0.0.1; yields its URL."""
    cmd = [sys.executable, TOOLS_SERVER, transport, "--name", name, *extra]
    if token is not None:
        cmd += ["--token", token]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        if not line.startswith("PORT "):
            raise RuntimeError(f"{transport} test server did not start: {line!r}")
        port = int(line.split()[1])
        yield {"http": f"http://127.0.0.1:{port}/mcp", "sse": f"http://127.0.0.1:{port}/sse",
               "ws": f"ws://127.0.0.1:{port}"}[transport]
    finally:
        proc.kill()
        proc.wait(10)
        proc.stdout.close()


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"   # a zombie has exited
    except FileNotFoundError:
        return False
