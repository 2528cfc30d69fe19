"""Hostile and malformed requests: each answers 4xx with an OpenAI error object naming the
field, while a good request running beside them completes."""
from __future__ import annotations

import json
import threading

import httpx
import pytest

from conftest import API_KEY, record

USER = [{"role": "user", "content": "Say hi."}]
CHAT = "/v1/chat/completions"
COMPL = "/v1/completions"


def chat(**kw) -> dict:
    return {"messages": USER, "max_tokens": 4, **kw}


def msg(**m) -> dict:
    return {"messages": [m], "max_tokens": 4}


def part(p) -> dict:
    return msg(role="user", content=[p])


DEEP = b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
DEEP_FIELD = json.dumps(chat(metadata=json.loads("[" * 200 + "]" * 200))).encode()
PNG = "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="

# (kind, method, route, body: dict | bytes | None, status, param the error must name)
CASES = [
    ("malformed JSON", "POST", CHAT, b'{"messages": [', 400, "body"),
    ("JSON array body", "POST", CHAT, b"[1, 2]", 400, "body"),
    ("JSON number body", "POST", CHAT, b"42", 400, "body"),
    ("empty body", "POST", CHAT, b"", 400, "body"),
    ("trailing garbage", "POST", CHAT, b'{"messages": []} xyz', 400, "body"),
    ("invalid UTF-8", "POST", CHAT, b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}', 400, "body"),
    ("raw NUL byte", "POST", CHAT, b'{"messages": [{"role": "user", "content": "a\x00b"}]}', 400, "body"),
    ("lone surrogate escape", "POST", CHAT, b'{"messages": [{"role": "user", "content": "\\ud800"}]}', 400,
     "messages[0].content"),
    ("deeply nested JSON", "POST", CHAT, DEEP, 400, "body"),
    ("deeply nested field", "POST", CHAT, DEEP_FIELD, 400, "body"),
    ("20 MB body", "POST", CHAT, b'{"messages": "' + b"x" * (20 << 20) + b'"}', 413, "body"),
    ("missing messages", "POST", CHAT, {"max_tokens": 4}, 400, "messages"),
    ("messages a number", "POST", CHAT, {"messages": 5}, 400, "messages"),
    ("empty messages", "POST", CHAT, {"messages": []}, 400, "messages"),
    ("message not an object", "POST", CHAT, {"messages": ["hi"]}, 400, "messages[0]"),
    ("missing role", "POST", CHAT, msg(content="x"), 400, "messages[0].role"),
    ("unknown role", "POST", CHAT, msg(role="wizard", content="x"), 400, "messages[0].role"),
    ("role not a string", "POST", CHAT, msg(role=5, content="x"), 400, "messages[0].role"),
    ("null content", "POST", CHAT, msg(role="user", content=None), 400, "messages[0].content"),
    ("missing content", "POST", CHAT, msg(role="user"), 400, "messages[0].content"),
    ("content a number", "POST", CHAT, msg(role="user", content=5), 400, "messages[0].content"),
    ("content an object", "POST", CHAT, msg(role="user", content={"text": "x"}), 400, "messages[0].content"),
    ("empty part list", "POST", CHAT, msg(role="user", content=[]), 400, "messages[0].content"),
    ("part not an object", "POST", CHAT, part("x"), 400, "messages[0].content[0]"),
    ("part text an object", "POST", CHAT, part({"type": "text", "text": {"a": 1}}), 400,
     "messages[0].content[0].text"),
    ("part without type", "POST", CHAT, part({"text": "x"}), 400, "messages[0].content[0].type"),
    ("unknown part type", "POST", CHAT, part({"type": "hologram", "data": "x"}), 400,
     "messages[0].content[0].type"),
    ("image part to a text model", "POST", CHAT, part({"type": "image_url", "image_url": {"url": PNG}}), 400,
     "messages[0].content"),
    ("max_tokens negative", "POST", CHAT, chat(max_tokens=-3), 400, "max_tokens"),
    ("max_tokens zero", "POST", CHAT, chat(max_tokens=0), 400, "max_tokens"),
    ("max_tokens huge", "POST", CHAT, chat(max_tokens=10**12), 400, "max_tokens"),
    ("max_tokens beyond int64", "POST", CHAT, chat(max_tokens=10**30), 400, "max_tokens"),
    ("max_tokens a string", "POST", CHAT, chat(max_tokens="10"), 400, "max_tokens"),
    ("max_tokens fractional", "POST", CHAT, chat(max_tokens=1.5), 400, "max_tokens"),
    ("max_tokens a bool", "POST", CHAT, chat(max_tokens=True), 400, "max_tokens"),
    # OpenAI's newer name for max_tokens; the error names the field it sets.
    ("max_completion_tokens negative", "POST", CHAT, chat(max_completion_tokens=-1), 400, "max_tokens"),
    ("temperature negative", "POST", CHAT, chat(temperature=-1), 400, "temperature"),
    ("temperature a string", "POST", CHAT, chat(temperature="hot"), 400, "temperature"),
    ("temperature NaN", "POST", CHAT, b'{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}',
     400, "temperature"),
    ("temperature Infinity", "POST", CHAT,
     b'{"messages": [{"role": "user", "content": "x"}], "temperature": Infinity}', 400, "temperature"),
    ("top_p above 1", "POST", CHAT, chat(top_p=1.5), 400, "top_p"),
    ("top_p zero", "POST", CHAT, chat(top_p=0), 400, "top_p"),
    ("top_k negative", "POST", CHAT, chat(top_k=-5), 400, "top_k"),
    ("min_p above 1", "POST", CHAT, chat(min_p=2), 400, "min_p"),
    ("presence_penalty out of range", "POST", CHAT, chat(presence_penalty=5), 400, "presence_penalty"),
    ("frequency_penalty out of range", "POST", CHAT, chat(frequency_penalty=-3), 400, "frequency_penalty"),
    ("repetition_penalty zero", "POST", CHAT, chat(repetition_penalty=0), 400, "repetition_penalty"),
    ("n zero", "POST", CHAT, chat(n=0), 400, "n"),
    ("n 10000", "POST", CHAT, chat(n=10_000), 400, "n"),
    ("n a string", "POST", CHAT, chat(n="2"), 400, "n"),
    ("logit_bias unknown id", "POST", CHAT, chat(logit_bias={"99999999": 1}), 400, "logit_bias"),
    ("logit_bias non-numeric", "POST", CHAT, chat(logit_bias={"5": "x"}), 400, "logit_bias"),
    ("logit_bias key not an id", "POST", CHAT, chat(logit_bias={"abc": 1}), 400, "logit_bias"),
    ("logit_bias out of range", "POST", CHAT, chat(logit_bias={"5": 1000}), 400, "logit_bias"),
    ("logit_bias a list", "POST", CHAT, chat(logit_bias=[1, 2]), 400, "logit_bias"),
    ("10000 stop strings", "POST", CHAT, chat(stop=[f"s{i}" for i in range(10_000)]), 400, "stop"),
    ("1 MB stop string", "POST", CHAT, chat(stop=["x" * (1 << 20)]), 400, "stop"),
    ("stop a number", "POST", CHAT, chat(stop=5), 400, "stop"),
    ("stop list of numbers", "POST", CHAT, chat(stop=[1]), 400, "stop"),
    ("empty stop string", "POST", CHAT, chat(stop=[""]), 400, "stop"),
    ("seed negative", "POST", CHAT, chat(seed=-1), 400, "seed"),
    ("seed a string", "POST", CHAT, chat(seed="x"), 400, "seed"),
    ("stream a string", "POST", CHAT, chat(stream="yes"), 400, "stream"),
    ("stream_options not an object", "POST", CHAT, chat(stream=True, stream_options=3), 400, "stream_options"),
    ("logprobs a string", "POST", CHAT, chat(logprobs="x"), 400, "logprobs"),
    ("top_logprobs too many", "POST", CHAT, chat(logprobs=True, top_logprobs=100), 400, "top_logprobs"),
    ("top_logprobs without logprobs", "POST", CHAT, chat(top_logprobs=2), 400, "top_logprobs"),
    ("ignore_eos a string", "POST", CHAT, chat(ignore_eos="no"), 400, "ignore_eos"),
    ("truncate_sequence a number", "POST", CHAT, chat(truncate_sequence=1), 400, "truncate_sequence"),
    ("prompt over the context", "POST", CHAT, msg(role="user", content="fox " * 20_000), 400, "messages"),
    ("model not a string", "POST", CHAT, chat(model=5), 400, "model"),
    ("unknown model", "POST", CHAT, chat(model="no-such-model"), 404, "model"),
    ("completion without prompt", "POST", COMPL, {"max_tokens": 3}, 400, "prompt"),
    ("completion prompt a number", "POST", COMPL, {"prompt": 5}, 400, "prompt"),
    ("completion best_of below n", "POST", COMPL, {"prompt": "x", "n": 3, "best_of": 2}, 400, "best_of"),
    ("completion echo a string", "POST", COMPL, {"prompt": "x", "echo": "y"}, 400, "echo"),
    ("embeddings to a text model", "POST", "/v1/embeddings", {"input": "hi"}, 400, "model"),
    ("unknown route", "POST", "/v1/no/such/route", {}, 404, None),
    ("wrong method", "GET", CHAT, None, 405, None),
    ("wrong API key", "POST", CHAT, chat(), 401, None),
    ("missing API key", "POST", CHAT, chat(), 401, None),
]


def _send(http: httpx.Client, kind: str, method: str, route: str, body) -> httpx.Response:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    if kind == "wrong API key":
        headers = {"Authorization": f"Bearer {API_KEY}x"}
    elif kind == "missing API key":
        headers = {}
    if isinstance(body, dict):
        return http.request(method, route, json=body, headers=headers)
    if body is not None:
        headers["Content-Type"] = "application/json"
    return http.request(method, route, content=body, headers=headers)


def test_at_least_50_kinds():
    assert len({c[0] for c in CASES}) == len(CASES) >= 50


def test_bad_input_is_4xx_naming_the_field_while_good_requests_run(smol_server):
    good: dict = {}

    def good_request():
        body = {"messages": USER, "max_tokens": 48, "temperature": 0, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", smol_server.url + CHAT, json=body, headers=smol_server.headers(),
                          timeout=120) as r:
            good["status"] = r.status_code
            good["events"] = [line for line in r.iter_lines() if line.startswith("data: ")]

    worker = threading.Thread(target=good_request)
    worker.start()
    failures = []
    with httpx.Client(base_url=smol_server.url, timeout=60) as http:
        for kind, method, route, body, status, param in CASES:
            r = _send(http, kind, method, route, body)
            try:
                err = r.json()["error"]
            except (ValueError, KeyError, TypeError):
                failures.append(f"{kind}: {r.status_code} without an error object: {r.text[:200]!r}")
                continue
            if r.status_code != status:
                failures.append(f"{kind}: status {r.status_code}, expected {status}: {err}")
            elif set(err) != {"message", "type", "param", "code"}:
                failures.append(f"{kind}: error object {err}")
            elif param is not None and not (err["param"] or "").startswith(param):
                failures.append(f"{kind}: param {err['param']!r}, expected {param!r}: {err['message'][:200]}")
    worker.join(120)
    assert not failures, "\n".join(failures)
    assert good["status"] == 200 and good["events"][-1] == "data: [DONE]"
    # 48 tokens, one event each (the last also carries usage), and no error event.
    assert not any('"error"' in e for e in good["events"])
    record("bad_input", kinds=len(CASES), failures=len(failures))
