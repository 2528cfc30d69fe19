"""The MCP client (mistralrs_tools_mcp.mcp) against real servers written with the ``mcp``
server library: a stdio process, streamable HTTP behind a bearer token, WebSocket behind
a bearer token. Tools register under their prefixes; calls go through every transport;
a server that fails to start, answers garbage, hangs or dies gives an error naming it
while the others keep working; max_concurrent_calls bounds calls across servers;
processes stop on close and at interpreter exit."""
import json
import logging
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from mistralrs import McpClientConfigPy, McpServerSourcePy
from mistralrs_tools_mcp.mcp.client import McpClient
from mistralrs_tools_mcp.mcp.connection import McpServerError
from mcp_harness import (GARBAGE_SERVER, TOKEN, listening_server, pid_alive, process_source,
                         server)


@pytest.fixture(scope="module")
def http_url():
    with listening_server("http", "web") as url:
        yield url


@pytest.fixture(scope="module")
def ws_url():
    with listening_server("ws", "live") as url:
        yield url


@pytest.fixture(scope="module")
def three(http_url, ws_url, tmp_path_factory):
    """One client over the three transports (process with env, work_dir and resources)."""
    work = tmp_path_factory.mktemp("mcp_work")
    client = McpClient(McpClientConfigPy(servers=[
        server("fs", process_source("fs", "--tools", "add,echo,fail,where", env={"MCP_TEST_VAR": "from-config"},
                                    work_dir=str(work)), tool_prefix="fs", resources=["note://*"]),
        server("web", McpServerSourcePy.Http(url=http_url, timeout_secs=20, headers={"X-Extra": "1"}),
               tool_prefix="web", bearer_token=TOKEN),
        server("live", McpServerSourcePy.WebSocket(url=ws_url, timeout_secs=20), tool_prefix="rt",
               bearer_token=TOKEN),
        server("off", process_source("off"), enabled=False),
    ], tool_timeout_secs=4))
    client.work_dir = work
    yield client
    client.close()


def names(client):
    return [d["function"]["name"] for d in client.tool_definitions()]


def test_tools_register_with_prefixes(three):
    got = names(three)
    assert got[:5] == ["fs_add", "fs_echo", "fs_fail", "fs_where", "fs_read_resource"]
    for prefix in ("web", "rt"):
        assert {f"{prefix}_{t}" for t in ("add", "echo", "slow", "hang", "crash", "fail", "where")} <= set(got)
    assert len(got) == 5 + 7 + 7 and three.servers() == {"fs": None, "web": None, "live": None}
    add = next(d for d in three.tool_definitions() if d["function"]["name"] == "web_add")["function"]
    assert add["description"] == "Add two integers."
    assert add["parameters"]["required"] == ["a", "b"]
    assert add["parameters"]["properties"]["a"]["type"] == "integer"


def test_each_transport_calls_its_server(three):
    assert three.call("fs_add", {"a": 2, "b": 3}).content == "5"
    assert three.call("web_echo", {"text": "hi"}).content == "web says: hi"
    assert three.call("rt_echo", {"text": "yo"}).content == "live says: yo"


def test_process_env_work_dir_and_args(three):
    where = json.loads(three.call("fs_where", {}).content)
    assert where["var"] == "from-config" and where["cwd"] == str(three.work_dir)
    assert three.call("fs_echo", {"text": "x"}).content == "fs says: x"    # --name fs came as args


def test_resources_matching_the_patterns(three):
    (tool,) = [d["function"] for d in three.tool_definitions() if d["function"]["name"] == "fs_read_resource"]
    assert tool["parameters"]["properties"]["uri"]["enum"] == ["note://greeting"]   # not secret://key
    assert three.call("fs_read_resource", {"uri": "note://greeting"}).content == "hello from fs"
    with pytest.raises(McpServerError, match=r"'Fs MCP' \(fs\): resource 'secret://key' matches none"):
        three.call("fs_read_resource", {"uri": "secret://key"})


def test_a_tool_error_is_a_result_naming_the_server(three):
    out = three.call("fs_fail", {}).content
    assert out.startswith("Error from MCP server 'Fs MCP' (fs):")


def test_a_hanging_call_times_out_and_the_server_keeps_serving(three):
    t0 = time.monotonic()
    with pytest.raises(McpServerError, match=r"'Live MCP' \(live\): tool 'hang' did not answer within 4 s"):
        three.call("rt_hang", {})
    assert time.monotonic() - t0 < 8
    assert three.call("rt_add", {"a": 1, "b": 1}).content == "2"


def test_max_concurrent_calls_bounds_calls_across_servers(http_url, ws_url):
    client = McpClient(McpClientConfigPy(servers=[
        server("a", McpServerSourcePy.Http(url=http_url), tool_prefix="a", bearer_token=TOKEN),
        server("b", McpServerSourcePy.WebSocket(url=ws_url), tool_prefix="b", bearer_token=TOKEN),
    ], max_concurrent_calls=2, tool_timeout_secs=20))
    try:
        spans = []

        def call(name):
            start, end = map(float, client.call(name, {"seconds": 0.3}).content.split())
            spans.append((start, end))
        threads = [threading.Thread(target=call, args=(n,)) for n in ["a_slow", "b_slow"] * 3]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert len(spans) == 6
        # The most calls running at once, as the servers saw them (one clock: same machine).
        peak = max(sum(1 for s, e in spans if s <= start < e) for start, _ in spans)
        assert peak == 2
    finally:
        client.close()


def test_failed_servers_are_named_and_the_others_keep_working(http_url, ws_url, caplog):
    caplog.set_level(logging.WARNING, logger="mistralrs")
    client = McpClient(McpClientConfigPy(servers=[
        server("ok", process_source("ok", "--tools", "add"), tool_prefix="ok"),
        server("missing", McpServerSourcePy.Process(command="/nonexistent/mcp-server")),
        server("garbage", McpServerSourcePy.Process(command=sys.executable, args=[GARBAGE_SERVER])),
        server("quits", McpServerSourcePy.Process(command=sys.executable,
                                                  args=["-c", "import sys; sys.exit('no config file found')"])),
        server("anon", McpServerSourcePy.Http(url=http_url, timeout_secs=10), tool_prefix="anon"),
        server("wsanon", McpServerSourcePy.WebSocket(url=ws_url, timeout_secs=10), tool_prefix="wsanon"),
    ], tool_timeout_secs=2))
    try:
        status = client.servers()
        assert status["ok"] is None and names(client) == ["ok_add"]
        assert "'Missing MCP' (missing) failed to start: FileNotFoundError" in status["missing"]
        assert "'Garbage MCP' (garbage) failed to start: it answered something that is not MCP" in status["garbage"]
        assert "'Quits MCP' (quits) failed to start:" in status["quits"]
        assert status["quits"].endswith("its stderr ends with: no config file found")
        assert "'Anon MCP' (anon) failed to start: HTTP 401" in status["anon"]
        assert "'Wsanon MCP' (wsanon) failed to start:" in status["wsanon"] and "HTTP 401" in status["wsanon"]
        logged = caplog.text
        assert all(f"({sid}) failed to start" in logged for sid in ("missing", "garbage", "quits", "anon", "wsanon"))
        assert client.call("ok_add", {"a": 20, "b": 22}).content == "42"
    finally:
        client.close()


def test_a_server_dying_mid_call(http_url):
    client = McpClient(McpClientConfigPy(servers=[
        server("doomed", process_source("doomed", "--tools", "crash,add"), tool_prefix="d"),
        server("web", McpServerSourcePy.Http(url=http_url), tool_prefix="w", bearer_token=TOKEN),
    ], tool_timeout_secs=10))
    try:
        t0 = time.monotonic()
        with pytest.raises(McpServerError, match=r"'Doomed MCP' \(doomed\): tool 'crash': Connection closed"):
            client.call("d_crash", {})
        assert time.monotonic() - t0 < 5      # noticed at once, not at the timeout
        with pytest.raises(McpServerError, match=r"'Doomed MCP' \(doomed\) closed the connection"):
            client.call("d_add", {"a": 1, "b": 2})
        assert client.call("w_add", {"a": 1, "b": 2}).content == "3"
    finally:
        client.close()


def test_interpreter_exit_stops_the_process_server():
    script = textwrap.dedent(f"""
        import json, sys
        from mistralrs_core.api.tools import McpClientConfigPy, McpServerConfigPy, McpServerSourcePy
        from mistralrs_tools_mcp.mcp.client import McpClient
        src = McpServerSourcePy.Process(command=sys.executable,
                                        args=[{process_source('p').args[0]!r}, "stdio", "--tools", "where"])
        client = McpClient(McpClientConfigPy(servers=[McpServerConfigPy(id="p", name="p", source=src)]))
        print(json.loads(client.call("where", {{}}).content)["pid"], flush=True)
        # no close(): exiting must stop the server
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    pid = int(out.stdout.split()[-1])
    deadline = time.monotonic() + 5
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pid_alive(pid)


def test_same_names_without_prefix_keep_the_first_and_close_stops_processes(caplog):
    caplog.set_level(logging.WARNING, logger="mistralrs")
    client = McpClient(McpClientConfigPy(servers=[
        server("one", process_source("one", "--tools", "echo,where")),
        server("two", process_source("two", "--tools", "echo,add")),
    ]))
    try:
        assert names(client) == ["echo", "where", "add"]
        assert client.call("echo", {"text": "a"}).content == "one says: a"
        assert "tool 'echo' is already registered by MCP server 'one'" in caplog.text
        pid = json.loads(client.call("where", {}).content)["pid"]
        assert pid_alive(pid)
    finally:
        client.close()
    assert not pid_alive(pid)
    with pytest.raises(McpServerError, match="the client is closed"):
        client.call("where", {})


def test_the_older_http_sse_transport():
    with listening_server("sse", "old", "--tools", "echo") as url:
        client = McpClient(McpClientConfigPy(servers=[
            server("old", McpServerSourcePy.Http(url=url, timeout_secs=20), bearer_token=TOKEN)]))
        try:
            assert client.call("echo", {"text": "still here"}).content == "old says: still here"
        finally:
            client.close()


def test_auto_register_tools_off_offers_nothing():
    client = McpClient(McpClientConfigPy(servers=[server("p", process_source("p", "--tools", "add"))],
                                         auto_register_tools=False))
    try:
        assert client.tool_definitions() == [] and not client.can_call("add")
        assert client.servers() == {"p": None}
    finally:
        client.close()
