"""Files a call wrote in its working directory -> ``File`` objects (the Runner's file store
keeps them for ``find_file``; the response carries them, small bodies inline)."""
from __future__ import annotations

import base64
import mimetypes
import os
import uuid

from mistralrs_core.api.responses import File, FileSource

MAX_FILES = 32
MAX_TOTAL_BYTES = 64 << 20
PREVIEW_CHARS = 200


def collect(root: str, tool: str, round_: int = 0) -> tuple[list[File], list[str]]:
    """``(files, notes)``: regular files under ``root`` (links are never followed: the sandbox
    could point one anywhere), in path order, within the count and size budgets; ``notes``
    say what was left out."""
    found, notes, total = [], [], 0
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames.sort()
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            if os.path.islink(path) or not os.path.isfile(path):
                continue
            if rel.split(os.sep)[0] == "__pycache__":
                continue
            size = os.path.getsize(path)
            if len(found) >= MAX_FILES or total + size > MAX_TOTAL_BYTES:
                notes.append(f"{rel} ({size} bytes) left out: over the {MAX_FILES} files / "
                             f"{MAX_TOTAL_BYTES >> 20} MiB returned per call")
                continue
            with open(path, "rb") as fh:
                data = fh.read()
            total += len(data)
            found.append(_file(rel, data, tool, round_))
    return found, notes


def _file(rel: str, data: bytes, tool: str, round_: int) -> File:
    mime = mimetypes.guess_type(rel)[0] or "application/octet-stream"
    ext = os.path.splitext(rel)[1].lstrip(".").lower() or None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None and mime == "application/octet-stream":
        mime = "text/plain"
    return File(id=f"file-{uuid.uuid4().hex}", name=rel, format=ext, mime_type=mime, bytes=len(data),
                source=FileSource(tool=tool, round=round_), text=text,
                data_base64=None if text is not None else base64.b64encode(data).decode("ascii"),
                preview=text[:PREVIEW_CHARS] if text is not None else None)
