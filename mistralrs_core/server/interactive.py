"""``mistralrs run``: a terminal chat with streamed answers, or one answer with ``-i``."""
from __future__ import annotations

import sys
from typing import TextIO

from mistralrs_core.api.requests import ChatCompletionRequest

HELP = "Commands: /clear forgets the conversation, /exit quits (Ctrl-D too); Ctrl-C stops an answer."


def stream_answer(runner, messages: list[dict], sampling: dict, out: TextIO) -> str:
    """Print the model's reply to ``messages`` as it is generated; return its text.
    Ctrl-C stops the generation and keeps what was printed."""
    stream = runner.send_chat_completion_request(
        ChatCompletionRequest(messages=list(messages), stream=True, **sampling))
    parts: list[str] = []
    try:
        for chunk in stream:
            for choice in chunk.choices:
                text = choice.delta.content or ""
                if text:
                    parts.append(text)
                    out.write(text)
                    out.flush()
    except KeyboardInterrupt:
        stream.close()   # cancels the generation and frees its KV blocks
    out.write("\n")
    out.flush()
    return "".join(parts)


def chat_loop(runner, sampling: dict, *, system: str | None = None, inp: TextIO = sys.stdin,
              out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    base = [{"role": "system", "content": system}] if system else []
    history = list(base)
    interactive = inp.isatty()
    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
    print(HELP, file=err)
    while True:
        try:
            line = input("> ") if interactive else _read_line(inp, out)
        except (EOFError, KeyboardInterrupt):
            out.write("\n")
            return 0
        cmd = line.strip()
        if not cmd:
            continue
        if cmd in ("/exit", "/quit"):
            return 0
        if cmd == "/clear":
            history = list(base)
            print("(conversation cleared)", file=err)
            continue
        if cmd == "/help":
            print(HELP, file=err)
            continue
        history.append({"role": "user", "content": line})
        try:
            reply = stream_answer(runner, history, sampling, out)
        except (ValueError, NotImplementedError) as exc:   # e.g. the conversation outgrew the context
            history.pop()
            print(f"error: {exc}", file=err)
            continue
        history.append({"role": "assistant", "content": reply})


def _read_line(inp: TextIO, out: TextIO) -> str:
    out.write("> ")
    out.flush()
    line = inp.readline()
    if not line:
        raise EOFError
    return line.rstrip("\n")
