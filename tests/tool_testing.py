"""Shared helpers of the tool tests: a scripted model.

``scripted(turns)`` registers a logits processor that makes any model emit ``turns[k]``
(then its end token) on the k-th assistant turn of a conversation, k = the number of tool
results the prompt holds. The model, engine, detokenizer, parser, loop and server all run
for real; only the choice of tokens is scripted, so the tests are deterministic even on a
random tiny model. Only requests whose first message is the ``SCRIPT`` system message are
scripted."""
from __future__ import annotations

import contextlib
import types

import torch

from mistralrs_core import plugins
from mistralrs_core.hookspecs import hookimpl

SCRIPT = {"role": "system", "content": "SCRIPT"}


def _turn(messages) -> int:
    """Tool results so far: tool messages, or their user-turn form for templates without
    a tool role (``formats.TOOL_RESULT_WORDS``)."""
    n = 0
    for m in messages:
        content = m.get("content") if isinstance(m, dict) else None
        if (isinstance(m, dict) and m.get("role") == "tool") or (
                isinstance(content, str) and content.startswith("The ") and " tool returned: " in content):
            n += 1
    return n


def _is_scripted(messages) -> bool:
    if not isinstance(messages, list) or not messages:
        return False
    first = messages[0]
    content = first.get("content") if isinstance(first, dict) else getattr(first, "content", None)
    return isinstance(content, str) and content.startswith("SCRIPT")


@contextlib.contextmanager
def scripted(turns: list[str]):
    def factory(request, tokenizer):
        messages = getattr(request, "messages", None)
        if not _is_scripted(messages):
            return None
        k = _turn(messages)
        text = turns[min(k, len(turns) - 1)]
        target = tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]

        def force(output_ids, logits):
            nxt = target[len(output_ids)] if len(output_ids) < len(target) else target[-1]
            out = torch.full_like(logits, float("-inf"))
            out[nxt] = 0.0
            return out
        return force

    hooks = types.SimpleNamespace(mistralrs_register_logits_processors=hookimpl(
        lambda register: register("scripted_turns", factory)))
    plugins.register_plugin(hooks, "scripted_turns_plugin")
    try:
        yield
    finally:
        plugins.reset()


def call_text(name: str, arguments: dict) -> str:
    import json
    # Compact: fewer tokens to force (the tiny tokenizer spends one per character here).
    body = json.dumps({"name": name, "arguments": arguments}, separators=(",", ":"))
    return f"<tool_call>{body}</tool_call>"


def tool(name: str, properties: dict | None = None, required=(), strict: bool = False) -> dict:
    params = {"type": "object", "properties": properties or {}, "required": list(required)}
    fn = {"name": name, "description": f"the {name} tool", "parameters": params}
    if strict:
        fn["strict"] = True
    return {"type": "function", "function": fn}


@contextlib.contextmanager
def running_server(runner):
    """The real server app (uvicorn, a loopback port) in this process, so scripted turns and
    in-process tool callbacks apply to what it serves."""
    import socket
    import threading
    import time

    import uvicorn

    from mistralrs_core.server.app import create_app
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(runner), host="127.0.0.1", port=port, log_level="warning",
                                           timeout_graceful_shutdown=1))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
