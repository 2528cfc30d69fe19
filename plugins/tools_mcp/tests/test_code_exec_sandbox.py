"""Sandboxed execute_python (mistralrs_tools_mcp/code_exec, code_provider.py), for real: each
call is a separate process under the launcher's namespaces and rlimits. A computation's
output comes back; an infinite loop is killed at the timeout; allocating 4 GiB fails;
a socket to a server listening on the host's 127.0.0.1 fails; a fork bomb is contained
and leaves nothing behind; written files come back as File objects, and through the
Runner's loop via find_file."""
from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import types

import pytest
import torch

from mistralrs import ChatCompletionRequest, Runner, Which
from mistralrs_core import plugins
from mistralrs_core.api.enums import AgentPermission, NetworkMode
from mistralrs_core.api.tools import AgentToolApprovalDecision, CodeExecutionConfig, SandboxPolicy
from mistralrs_core.hookspecs import hookimpl
from mistralrs_tools_mcp.code_exec import sandbox
from mistralrs_tools_mcp.code_provider import CodeExecutionToolProvider
from mistralrs_tools_mcp.search.testing import register_tools_plugin

if not hasattr(os, "fork") or not os.path.exists("/proc/self/ns/pid"):
    pytest.skip("the sandbox needs Linux", allow_module_level=True)


@pytest.fixture(autouse=True)
def tools_plugin_registered():
    register_tools_plugin()
    yield


def tools(**kw):
    policy = kw.pop("policy", None)
    return CodeExecutionToolProvider().build({"code_execution_config": CodeExecutionConfig(
        timeout_secs=kw.pop("timeout_secs", 20), sandbox_policy=policy, **kw)})


def run(code, **kw):
    return tools(**kw).call("execute_python", {"code": code})


def test_namespaces_are_permitted_here():
    # What the other tests stand on; a machine without them gets refusals (tested below).
    out = run("import os; print('pid', os.getpid())")
    assert "exit code: 0" in out.content, out.content
    assert "pid 2\n" in out.content      # under PID 1 of its own PID namespace


def test_computation_output():
    out = run("import math\nprint(sum(i * i for i in range(10)), math.factorial(10))\n"
              "import sys; print('to stderr', file=sys.stderr)")
    assert out.content.startswith("exit code: 0\n")
    assert "stdout:\n285 3628800\n" in out.content and "stderr:\nto stderr" in out.content
    assert out.files == []


def test_infinite_loop_is_killed_at_the_timeout():
    t0 = time.monotonic()
    out = run("print('start', flush=True)\nwhile True:\n    pass", timeout_secs=2)
    took = time.monotonic() - t0
    assert out.content.startswith("Error: the code ran past the 2 s timeout and was killed.")
    assert "start" in out.content and 2 <= took < 6


def test_cpu_time_limit():
    out = run("while True:\n    pass", timeout_secs=30, policy=SandboxPolicy(max_cpu_secs=1))
    assert "exit: killed by SIGXCPU (CPU time limit)" in out.content


def test_allocating_4_gib_fails():
    out = run("x = bytearray(4 << 30)\nprint('allocated')")
    assert "MemoryError" in out.content and "allocated" not in out.content


@pytest.fixture
def host_server():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    accepted = []

    def serve():
        with contextlib.suppress(OSError):
            while True:
                conn, _ = srv.accept()
                accepted.append(conn)
    threading.Thread(target=serve, daemon=True).start()
    yield srv.getsockname()[1], accepted
    srv.close()


@pytest.mark.parametrize("network, error", [(NetworkMode.Loopback, "ConnectionRefusedError"),
                                            (NetworkMode.NoNetwork, "Network is unreachable")])
def test_socket_to_the_hosts_loopback_fails(host_server, network, error):
    port, accepted = host_server
    # The server is reachable from here...
    socket.create_connection(("127.0.0.1", port), timeout=2).close()
    time.sleep(0.1)
    assert len(accepted) == 1
    code = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=3)\nprint('connected')"
    out = run(code, policy=SandboxPolicy(network=network))
    # ...and not from the sandbox: its network namespace has no route to the host.
    assert error in out.content and "connected" not in out.content
    assert len(accepted) == 1


def _ns_processes(ns):
    n = 0
    for entry in os.listdir("/proc"):
        with contextlib.suppress(OSError):
            if entry.isdigit() and os.readlink(f"/proc/{entry}/ns/pid") == ns:
                n += 1
    return n


def test_fork_bomb_is_contained():
    code = ("import os, time\nprint(os.readlink('/proc/self/ns/pid'), flush=True)\n"
            "while True:\n    try:\n        os.fork()\n    except OSError:\n        time.sleep(0.01)\n")
    t0 = time.monotonic()
    out = run(code, timeout_secs=20, policy=SandboxPolicy(max_procs=16))
    assert out.content.startswith("Error: the code started more than 16 processes and was killed.")
    assert time.monotonic() - t0 < 10
    ns = out.content.split("stdout:\n", 1)[1].split("\n", 1)[0]
    assert ns.startswith("pid:[") and ns != os.readlink("/proc/self/ns/pid")
    deadline = time.monotonic() + 5      # the kernel tears the namespace down
    while _ns_processes(ns) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _ns_processes(ns) == 0        # nothing of it is left running


def test_output_is_truncated_and_file_size_limited():
    out = run("import sys\nsys.stdout.write('x' * 200000)\nprint('END')")
    assert "characters cut" in out.content and out.content.count("x") < 20000 and "END" in out.content
    out = run("open('big.bin', 'wb').write(b'0' * (3 << 20))", policy=SandboxPolicy(max_file_sz_mb=1))
    # Python ignores SIGXFSZ, so the write past the limit fails instead.
    assert "OSError: [Errno 27] File too large" in out.content


def test_written_files_come_back(tmp_path):
    code = ("import os\nos.makedirs('out', exist_ok=True)\nopen('out/result.csv', 'w').write('a,b\\n1,2\\n')\n"
            "open('blob.bin', 'wb').write(bytes(range(256)))\nos.symlink('/etc/passwd', 'link')\nprint(os.getcwd())")
    out = run(code, working_directory=str(tmp_path))
    assert "exit code: 0" in out.content
    files = {f.name: f for f in out.files}
    assert set(files) == {"out/result.csv", "blob.bin"}      # links are never followed
    csv = files["out/result.csv"]
    assert csv.text == "a,b\n1,2\n" and csv.mime_type == "text/csv" and csv.bytes == 8 and csv.source.tool == "execute_python"
    blob = files["blob.bin"]
    assert blob.is_binary() and blob.bytes == 256 and blob.text is None
    # A per-call directory under working_directory, kept there.
    cwd = out.content.split("stdout:\n", 1)[1].split("\n", 1)[0]
    assert os.path.dirname(cwd) == str(tmp_path) and os.path.isfile(os.path.join(cwd, "out/result.csv"))


def test_refusals_and_permissions():
    out = sandbox.run("print(1)", "/no/such/python", sandbox.limits_from(CodeExecutionConfig()), None)
    assert out.content.startswith("Error: code execution refused: cannot start the interpreter '/no/such/python'")
    assert "denied by the permission" in run("print(1)", permission=AgentPermission.Deny).content
    seen = []

    def approve(approval):
        seen.append(approval)
        return AgentToolApprovalDecision.deny("not today") if "secret" in approval.code else True
    assert "exit code: 0" in run("print(1)", permission=AgentPermission.Ask, approval_callback=approve).content
    assert run("print('secret')", permission=AgentPermission.Ask,
               approval_callback=approve).content == "Error: code execution was denied: not today"
    assert [a.tool.label for a in seen] == ["execute_python"] * 2
    assert "no approval callback" in run("print(1)", permission=AgentPermission.Ask).content


@pytest.mark.parametrize("config, field", [
    ("nope", "code_execution_config"),
    (CodeExecutionConfig(python_path="no-such-python-xyz"), "code_execution_config.python_path"),
    (CodeExecutionConfig(timeout_secs=0), "code_execution_config.timeout_secs"),
    (CodeExecutionConfig(sandbox_policy=SandboxPolicy(max_procs=0)), "code_execution_config.sandbox_policy.max_procs"),
])
def test_bad_config(config, field):
    with pytest.raises(ValueError, match=f"^{field}:"):
        CodeExecutionToolProvider().build({"code_execution_config": config})


# --- through the Runner: the loop runs the call, the file reaches find_file -------------

@contextlib.contextmanager
def scripted(turns):
    """The tiny random model emits ``turns[k]`` on the k-th assistant turn (k = tool results
    so far); everything else (template, parser, loop, tools) is real."""
    def factory(request, tokenizer):
        messages = getattr(request, "messages", None)
        # (the template may append the tools to the system message)
        if not isinstance(messages, list) or not messages or not str(messages[0].get("content")).startswith("SCRIPT"):
            return None
        k = sum(1 for m in messages if m.get("role") == "tool"
                or " tool returned: " in str(m.get("content")))
        target = tokenizer.encode(turns[min(k, len(turns) - 1)], add_special_tokens=False) + [tokenizer.eos_token_id]

        def force(output_ids, logits):
            out = torch.full_like(logits, float("-inf"))
            out[target[min(len(output_ids), len(target) - 1)]] = 0.0
            return out
        return force
    name = "code_exec_script"
    plugins.register_plugin(types.SimpleNamespace(mistralrs_register_logits_processors=hookimpl(
        lambda register: register(name, factory))), name)
    try:
        yield
    finally:
        plugins.get_plugin_manager().unregister(name=name)
        plugins.register_plugin(object(), "code_exec_refresh")   # refreshes the tables


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from mistralrs_core.testing.tiny import write_tiny_test_family
    return write_tiny_test_family(tmp_path_factory.mktemp("tiny"), hidden=32, layers=1, heads=2, kv_heads=1)


def test_runner_runs_the_call_and_find_file_returns_the_file(tiny):
    register_tools_plugin()
    runner = Runner(which=Which.Plain(model_id=str(tiny), dtype="F32"),
                    code_execution_config=CodeExecutionConfig(timeout_secs=20))
    try:
        code = "open('r.txt','w').write(str(6*7))"
        # Strict tools are constrained to the call format's exact spacing: script it so.
        call = "<tool_call>\n" + json.dumps({"name": "execute_python", "arguments": {"code": code}}) + "\n</tool_call>"
        with scripted([call, "Done."]):
            res = runner.send_chat_completion_request(ChatCompletionRequest(
                messages=[{"role": "system", "content": "SCRIPT"}, {"role": "user", "content": "compute"}],
                enable_code_execution=True, max_tokens=len(call) + 10))
        (record,) = res.agentic_tool_calls
        assert record.name == "execute_python" and "exit code: 0" in record.result_content
        (fid,) = record.file_ids
        (f,) = res.files
        assert f.id == fid and f.name == "r.txt"
        found = runner.find_file(fid)
        assert found.text == "42" and found.source.tool == "execute_python"
        assert res.choices[0].message.content == "Done."
        # Without enable_code_execution the tool is not offered.
        plain = runner._agent._with_provider_tools(ChatCompletionRequest(messages=[{"role": "user", "content": "x"}]))
        assert not plain.tool_schemas
    finally:
        runner.shutdown()


def test_enable_code_execution_needs_a_configured_runner(tiny):
    runner = Runner(which=Which.Plain(model_id=str(tiny), dtype="F32"))
    try:
        with pytest.raises(ValueError, match=r"^enable_code_execution: this Runner has no code execution; "
                                             r"build it with Runner\(code_execution_config=...\)"):
            runner.send_chat_completion_request(ChatCompletionRequest(
                messages=[{"role": "user", "content": "x"}], enable_code_execution=True, max_tokens=2))
    finally:
        runner.shutdown()
