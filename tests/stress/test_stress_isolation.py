"""Isolation between users: prefix-cache keys that Python tuple hashes cannot collide, the
API key on every route but /health (compared in constant time), loopback by default."""
from __future__ import annotations

import hmac
import inspect

import httpx
import pytest

from conftest import API_KEY
from mistralrs_core.engine.block_manager import BlockManager
from mistralrs_core.server import app as app_module

BLOCK = 32
WRAP = 2 ** 61 - 1   # CPython int hashes are taken modulo this prime


def _colliding_prompts() -> tuple[list[int], list[int]]:
    """Two different prompts of three blocks whose Python tuple hashes are equal, block by
    block and as wholes (each id of one is the other's plus 2**61 - 1, or -1 for -2)."""
    a = list(range(7, 7 + 3 * BLOCK))
    b = [t + WRAP for t in a]
    a[5], b[5] = -1, -2   # hash(-1) == hash(-2) == -2
    return a, b


def test_prompts_whose_tuple_hashes_collide_share_no_blocks():
    a, b = _colliding_prompts()
    assert a != b and hash(tuple(a)) == hash(tuple(b))
    for i in range(3):
        blk_a, blk_b = tuple(a[i * BLOCK:(i + 1) * BLOCK]), tuple(b[i * BLOCK:(i + 1) * BLOCK])
        assert hash((None, blk_a)) == hash((None, blk_b))   # what a tuple-hash key would have shared
    bm = BlockManager(16, BLOCK)
    blocks_a, hashes_a = bm.match_prefix(a + [1])
    bm.grow(blocks_a, len(a) + 1)
    bm.register_full_blocks(blocks_a, hashes_a, a + [1], len(a) + 1)
    blocks_b, hashes_b = bm.match_prefix(b + [1])
    assert blocks_b == [] and bm.hits == 0
    bm.grow(blocks_b, len(b) + 1)
    assert not set(blocks_a) & set(blocks_b)
    assert len(bm.match_prefix(a + [1])[0]) == 3   # control: the same prompt does hit


def _flat(routes):
    for route in routes:
        inner = getattr(route, "original_router", None) or getattr(route, "router", None)
        if inner is not None and not hasattr(route, "path"):
            yield from _flat(inner.routes)
        else:
            yield route


def _routes():
    """Every (method, path) the app serves, whichever module added it."""
    app = app_module.create_app(object(), api_key=API_KEY)
    for route in _flat(app.routes):
        methods = getattr(route, "methods", None) or ()
        for method in sorted(set(methods) - {"HEAD", "OPTIONS"}):
            yield method, route.path.replace("{model_id:path}", "x")


def test_every_route_but_health_requires_the_key(smol_server):
    from mistralrs_core.server.web_ui import PUBLIC_PATHS as PUBLIC_UI_PATHS
    seen = 0
    with httpx.Client(base_url=smol_server.url, timeout=30) as http:
        for method, path in _routes():
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {API_KEY}"},
                            {"Authorization": f"Bearer {API_KEY[:-1]}"}):
                r = http.request(method, path, headers=headers, json={})
                if path == "/health":
                    assert r.status_code == 200
                elif path in PUBLIC_UI_PATHS:
                    # The chat page's static files hold no data and a browser cannot send a
                    # bearer header when it opens a page; the API calls it makes need the key.
                    assert r.status_code in (200, 307, 405), (method, path, r.status_code)   # /ui redirects to /ui/
                else:
                    assert r.status_code == 401, (method, path, headers, r.status_code)
                    assert r.json()["error"]["code"] == "invalid_api_key"
                    assert r.headers["www-authenticate"] == "Bearer"
                seen += 1
        # The FastAPI docs routes and unknown paths are behind the key too.
        for path in ("/docs", "/openapi.json", "/v1/nope"):
            assert http.get(path).status_code == 401
        assert http.get("/v1/models", headers=smol_server.headers()).status_code == 200
    assert seen >= 4 * 12


def test_the_key_is_compared_in_constant_time(monkeypatch):
    calls = []
    real = hmac.compare_digest

    def spy(a, b):
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(app_module.hmac, "compare_digest", spy)
    auth = app_module.BearerAuth(None, API_KEY)

    async def send(msg):
        pass

    scope = {"type": "http", "path": "/v1/models", "headers": [(b"authorization", b"Bearer guess")]}
    import asyncio
    asyncio.run(auth(scope, None, send))
    assert calls == [(b"guess", API_KEY.encode())]


def test_the_server_binds_loopback_by_default(smol_server):
    from mistralrs_core.cli import parser
    assert inspect.signature(app_module.serve).parameters["host"].default == "127.0.0.1"
    assert parser().parse_args(["serve", "-m", "x"]).host is None   # None -> 127.0.0.1 (cli.main)
    # The running server's listening socket is on 127.0.0.1 only (/proc/net/tcp: hex, little-endian).
    try:
        rows = open("/proc/net/tcp").read().splitlines()[1:]
    except OSError:
        pytest.skip("no /proc/net/tcp")
    listening = [r.split()[1] for r in rows if r.split()[3] == "0A"]
    ours = [addr for addr in listening if int(addr.split(":")[1], 16) == smol_server.port]
    assert ours == ["0100007F:%04X" % smol_server.port]


def test_the_anthropic_clients_x_api_key_header_is_accepted_and_checked():
    import asyncio
    passed = []

    async def app(scope, receive, send):
        passed.append(scope["path"])

    sent = []

    async def send(msg):
        sent.append(msg)

    auth = app_module.BearerAuth(app, API_KEY)
    for headers, ok in (([(b"x-api-key", API_KEY.encode())], True), ([(b"x-api-key", b"guess")], False),
                        # An Authorization header decides on its own: a right x-api-key beside a
                        # wrong bearer token does not get in.
                        ([(b"authorization", b"Bearer guess"), (b"x-api-key", API_KEY.encode())], False)):
        passed.clear(), sent.clear()
        asyncio.run(auth({"type": "http", "path": "/v1/messages", "headers": headers}, None, send))
        assert bool(passed) == ok, headers
        if not ok:
            assert sent[0]["status"] == 401
