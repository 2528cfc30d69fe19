"""The chat page at ``/ui``: static files shipped in the package (no build step, no CDN).

The page talks to the server's own public API (``/v1/models``, streamed
``/v1/chat/completions``), so it needs nothing here beyond serving three files. They are
served by name from a fixed table, never from a path the request chooses. The page itself
holds no secret, so it stays reachable without the API key; the page asks for the key and
sends it with its API calls.
"""
from __future__ import annotations

from importlib import resources

from fastapi import APIRouter
from fastapi.responses import RedirectResponse, Response

router = APIRouter()

_FILES = {"": ("index.html", "text/html; charset=utf-8"),
          "app.js": ("app.js", "text/javascript; charset=utf-8"),
          "style.css": ("style.css", "text/css; charset=utf-8")}
PUBLIC_PATHS = frozenset({"/ui"} | {f"/ui/{name}" for name in _FILES})


def _asset(name: str) -> bytes:
    return resources.files("mistralrs_core.server").joinpath("ui", name).read_bytes()


def _serve(key: str) -> Response:
    filename, media = _FILES[key]
    # no-cache: a page from an older server version must not outlive an upgrade.
    return Response(_asset(filename), media_type=media, headers={"Cache-Control": "no-cache"})


@router.get("/ui", include_in_schema=False)
async def page():
    # Relative asset URLs in the page resolve against /ui/.
    return RedirectResponse("/ui/", status_code=307)


@router.get("/ui/", include_in_schema=False)
async def index():
    return _serve("")


@router.get("/ui/app.js", include_in_schema=False)
async def script():
    return _serve("app.js")


@router.get("/ui/style.css", include_in_schema=False)
async def style():
    return _serve("style.css")
