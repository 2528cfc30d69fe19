"""Agentic sessions (the conversation a ``session_id`` continues) and the files tools produced.

A session is its messages as plain JSON: the request messages, the assistant turns (with
their tool calls) and the tool results, in order. A request naming a session is run on the
stored messages followed by its own; afterwards the session holds the whole exchange.
Exported sessions are JSON text, so they can be stored anywhere and imported into another
Runner, where the next answer is the one the original session would have given.
"""
from __future__ import annotations

import json
import threading
import uuid
from typing import Any

from mistralrs_core.api.responses import File

_FORMAT, _VERSION = "mistralrs-session", 1


def _fail(name: str, message: str):
    raise ValueError(f"{name}: {message}")


def _check_messages(name: str, messages: Any) -> list[dict]:
    if not isinstance(messages, list):
        _fail(name, "must be a list of messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            _fail(f"{name}[{i}]", "must be a message object with a 'role'")
    return messages


class SessionStore:
    """Sessions of the Runner's models: ``(model_id, session_id) -> messages``."""

    def __init__(self):
        self._sessions: dict[tuple[str, str], list[dict]] = {}
        self._lock = threading.Lock()

    def messages(self, model_id: str, session_id: str) -> list[dict]:
        with self._lock:
            return json.loads(json.dumps(self._sessions.get((model_id, session_id), [])))

    def store(self, model_id: str, session_id: str, messages: list[dict]) -> None:
        # A JSON round trip: what is stored is exactly what an export would restore.
        plain = json.loads(json.dumps(messages, ensure_ascii=False))
        with self._lock:
            self._sessions[(model_id, session_id)] = plain

    def export(self, model_id: str, session_id: str) -> str | None:
        with self._lock:
            messages = self._sessions.get((model_id, session_id))
            if messages is None:
                return None
            return json.dumps({"format": _FORMAT, "version": _VERSION, "session_id": session_id,
                               "messages": messages}, ensure_ascii=False)

    def import_(self, model_id: str, session_id: str, session_json: str) -> None:
        if not isinstance(session_id, str) or not session_id:
            _fail("session_id", "must be a non-empty string")
        if not isinstance(session_json, str):
            _fail("session_json", f"must be a JSON string, got {type(session_json).__name__}")
        try:
            data = json.loads(session_json)
        except json.JSONDecodeError as exc:
            _fail("session_json", f"is not valid JSON: {exc}")
        if not isinstance(data, dict) or data.get("format") != _FORMAT:
            _fail("session_json", f"is not an exported session (format {_FORMAT!r})")
        if data.get("version") != _VERSION:
            _fail("session_json", f"has version {data.get('version')!r}; this build reads version {_VERSION}")
        messages = _check_messages("session_json.messages", data.get("messages"))
        with self._lock:
            self._sessions[(model_id, session_id)] = messages

    def delete(self, model_id: str, session_id: str) -> bool:
        with self._lock:
            return self._sessions.pop((model_id, session_id), None) is not None

    def ids(self, model_id: str) -> list[str]:
        with self._lock:
            return [sid for (mid, sid) in self._sessions if mid == model_id]

    def forget_model(self, model_id: str) -> None:
        with self._lock:
            for key in [k for k in self._sessions if k[0] == model_id]:
                del self._sessions[key]


class FileStore:
    """Files produced by tools, by id, with their full bodies (a response may carry them
    truncated)."""

    def __init__(self):
        self._files: dict[str, File] = {}
        self._lock = threading.Lock()

    def add(self, file: File) -> File:
        if not isinstance(file, File):
            raise TypeError(f"a tool produced {type(file).__name__}, not a File")
        if not file.id:
            file.id = f"file-{uuid.uuid4().hex}"
        with self._lock:
            self._files[file.id] = file
        return file

    def find(self, file_id: str) -> File | None:
        with self._lock:
            return self._files.get(file_id)
