"""Load, admission control, cancellation and the request timeout, through the real server."""
from __future__ import annotations

import asyncio
import json
import statistics
import threading
import time

import httpx

from conftest import record, size, wait_idle

CHAT = "/v1/chat/completions"
PROMPTS = [f"In one short sentence: what is {topic}?" for topic in
           ("Rust", "Python", "a compiler", "a GPU", "Paris", "the Moon", "a prime number", "an atom",
            "tea", "a river")]


def _body(prompt: str, stream: bool, max_tokens: int = 16) -> dict:
    return {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "temperature": 0,
            "stream": stream}


async def _stream_one(http: httpx.AsyncClient, prompt: str) -> dict:
    t0 = time.perf_counter()
    ttft, text, errors, status = None, [], [], None
    async with http.stream("POST", CHAT, json=_body(prompt, True)) as r:
        status = r.status_code
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            if "error" in event:
                errors.append(event["error"])
                continue
            for choice in event["choices"]:
                if ttft is None:
                    ttft = time.perf_counter() - t0
                text.append(choice["delta"].get("content") or "")
    return {"prompt": prompt, "status": status, "text": "".join(text), "ttft": ttft, "errors": errors}


def test_concurrent_streams_match_greedy_and_free_the_pool(smol_server):
    n = size(24, 200)
    with httpx.Client(base_url=smol_server.url, headers=smol_server.headers(), timeout=120) as http:
        expected = {p: http.post(CHAT, json=_body(p, False)).json()["choices"][0]["message"]["content"]
                    for p in PROMPTS}

    async def main():
        limits = httpx.Limits(max_connections=n + 10, max_keepalive_connections=n + 10)
        async with httpx.AsyncClient(base_url=smol_server.url, headers=smol_server.headers(), timeout=600,
                                     limits=limits) as http:
            return await asyncio.gather(*(_stream_one(http, PROMPTS[i % len(PROMPTS)]) for i in range(n)))

    t0 = time.perf_counter()
    results = asyncio.run(main())
    wall = time.perf_counter() - t0
    errors = [r for r in results if r["status"] != 200 or r["errors"]]
    mismatched = [r for r in results if r["text"] != expected[r["prompt"]]]
    ttfts = sorted(r["ttft"] for r in results if r["ttft"] is not None)
    eng = wait_idle(smol_server)
    p50 = statistics.median(ttfts)
    p99 = ttfts[min(len(ttfts) - 1, int(round(0.99 * (len(ttfts) - 1))))]
    record("load", requests=n, completed=len(ttfts), errors=len(errors), mismatched=len(mismatched),
           ttft_p50_s=round(p50, 3), ttft_p99_s=round(p99, 3), wall_s=round(wall, 2),
           kv_blocks_used_after=eng["kv_blocks_used"])
    assert not errors, errors[:3]
    assert not mismatched, [(r["prompt"], r["text"], expected[r["prompt"]]) for r in mismatched[:3]]
    assert len(ttfts) == n
    assert eng["kv_blocks_used"] == 0 and eng["running"] == 0 and eng["waiting"] == 0


def _long(stream: bool) -> dict:
    return {"messages": [{"role": "user", "content": "Tell me everything."}], "max_tokens": 1900,
            "ignore_eos": True, "temperature": 0, "stream": stream}


def test_admission_control_answers_503_with_retry_after_at_once(tiny_server):
    # Two batch slots and a queue of two: of 10 long requests at most 4 are taken.
    statuses, lock = [], threading.Lock()

    def one():
        t0 = time.perf_counter()
        try:
            with httpx.stream("POST", tiny_server.url + CHAT, json=_long(True), timeout=30) as r:
                elapsed = time.perf_counter() - t0
                if r.status_code == 200:
                    for _ in r.iter_lines():
                        break       # admitted: leave (the disconnect cancels it)
                    entry = (200, None, elapsed, None)
                else:
                    r.read()
                    entry = (r.status_code, r.headers.get("retry-after"), elapsed, r.json()["error"])
        except httpx.HTTPError as exc:
            entry = (None, None, None, repr(exc))
        with lock:
            statuses.append(entry)

    threads = [threading.Thread(target=one) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    refused = [s for s in statuses if s[0] == 503]
    admitted = [s for s in statuses if s[0] == 200]
    assert len(statuses) == 10 and len(refused) + len(admitted) == 10, statuses
    assert 1 <= len(admitted) <= 4 and len(refused) >= 6
    for status, retry_after, elapsed, err in refused:
        assert retry_after == "1" and err["code"] == "overloaded" and elapsed < 5
    eng = wait_idle(tiny_server)
    assert eng["kv_blocks_used"] == 0 and eng["running"] == 0

    # A flood: memory stays bounded (refused requests hold nothing; admitted ones are few).
    rss_before = _rss(tiny_server)

    async def flood(n):
        async def one(http):
            async with http.stream("POST", CHAT, json=_long(True)) as r:
                return r.status_code
        limits = httpx.Limits(max_connections=n)
        async with httpx.AsyncClient(base_url=tiny_server.url, timeout=60, limits=limits) as http:
            return await asyncio.gather(*(one(http) for _ in range(n)))

    codes = asyncio.run(flood(size(100, 1000)))
    # Admitted streams leave at once (their slots free again), so more than 4 may get in over time.
    assert set(codes) <= {200, 503} and codes.count(503) >= len(codes) // 2
    eng = wait_idle(tiny_server)
    assert eng["kv_blocks_used"] == 0 and eng["running"] == 0 and eng["waiting"] == 0
    grown = _rss(tiny_server) - rss_before
    record("admission", flood=len(codes), refused=codes.count(503), rss_growth_mb=round(grown / 2**20, 1))
    assert grown < 100 << 20


def _rss(server) -> int:
    for line in open(f"/proc/{server.proc.pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def test_non_streamed_client_that_leaves_frees_its_sequence(tiny_server):
    wait_idle(tiny_server)
    before = tiny_server.status()["engine"]["generated_tokens"]
    try:
        httpx.post(tiny_server.url + CHAT, json=_long(False), timeout=0.5)
    except httpx.TimeoutException:
        pass   # the client gave up and closed its connection
    eng = wait_idle(tiny_server, timeout=5)
    assert eng["running"] == 0 and eng["kv_blocks_used"] == 0
    assert eng["generated_tokens"] - before < 1900
    assert 'mistralrs_client_disconnects_total{route="/v1/chat/completions"}' in \
        httpx.get(tiny_server.url + "/metrics").text


def test_streamed_client_that_leaves_mid_stream_frees_its_sequence(tiny_server):
    wait_idle(tiny_server)
    with httpx.stream("POST", tiny_server.url + CHAT, json=_long(True), timeout=30) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
    eng = wait_idle(tiny_server, timeout=5)
    assert eng["running"] == 0 and eng["kv_blocks_used"] == 0


def test_request_timeout_ends_long_requests_with_a_clear_error(timeout_server):
    t0 = time.perf_counter()
    r = httpx.post(timeout_server.url + CHAT, json=_long(False), timeout=30)
    elapsed = time.perf_counter() - t0
    if r.status_code == 200:   # a machine fast enough to finish 1900 tokens in 1 s
        assert elapsed < 1.5
        return
    err = r.json()["error"]
    assert r.status_code == 504 and err["code"] == "request_timeout" and "timed out" in err["message"]
    assert 0.9 < elapsed < 10
    with httpx.stream("POST", timeout_server.url + CHAT, json=_long(True), timeout=30) as s:
        events = [line for line in s.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]" and "timed out" in events[-2]
    eng = wait_idle(timeout_server)
    assert eng["running"] == 0 and eng["kv_blocks_used"] == 0
