"""The real `mistralrs serve` in a subprocess, driven by the official openai client and raw
httpx: OpenAI shapes, SSE framing, errors, 64 concurrent streams, disconnect cancellation,
multi-model config, auth."""
from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest

from mistralrs_core.testing.server import Server
from mistralrs_core.testing.tiny import write_random_llama

CHAT = [{"role": "user", "content": "Tell me a story about the Rust type system."}]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_random_llama(tmp_path_factory.mktemp("srv") / "tiny")


@pytest.fixture(scope="module")
def config_server(model_dir, tmp_path_factory):
    """Two models from one TOML config, behind an API key (started first so that both
    servers boot while the other tests' fixtures are prepared)."""
    d = tmp_path_factory.mktemp("cfg")
    (d / "models.toml").write_text(
        f'default_model_id = "b"\n[runtime]\nmax_seqs = 4\nseed = 0\n'
        f'[[models]]\nmodel_id = "{model_dir}"\nname = "a"\nkind = "text"\ndtype = "f32"\n'
        f'[[models]]\nmodel_id = "{model_dir}"\nname = "b"\narch = "llama"\nprefix_cache_n = 0\n')
    srv = Server(["--config", str(d / "models.toml"), "--api-key", "sekrit"], d / "log.txt", api_key="sekrit")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory, config_server):
    srv = Server(["-m", str(model_dir), "--max-seqs", "32", "--seed", "0", "--dtype", "f32"],
                 tmp_path_factory.mktemp("log") / "log.txt")
    yield srv.wait()
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return server.client()


def greedy(client, content=None, **kw):
    kw.setdefault("max_tokens", 12)
    messages = [{"role": "user", "content": content}] if content else CHAT
    return client.chat.completions.create(model="default", messages=messages, temperature=0, **kw)


# --- OpenAI client -------------------------------------------------------------

def test_models_and_health(server, client, model_dir):
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    ids = [m.id for m in client.models.list().data]
    assert ids == [str(model_dir)]
    assert client.models.retrieve(str(model_dir)).id == str(model_dir)


def test_chat(client, model_dir):
    res = greedy(client, max_tokens=8)
    assert res.object == "chat.completion" and res.model == str(model_dir)
    choice = res.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert res.usage.completion_tokens <= 8
    assert res.usage.total_tokens == res.usage.prompt_tokens + res.usage.completion_tokens


def test_chat_stream_matches_non_stream(client):
    full = greedy(client, extra_body={"ignore_eos": True})
    chunks = list(greedy(client, stream=True, stream_options={"include_usage": True},
                         extra_body={"ignore_eos": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert all(c.usage is None for c in chunks[:-1])


def test_sampling_fields(client):
    two = client.chat.completions.create(model="default", messages=CHAT, n=2, max_completion_tokens=3,
                                         temperature=1.0, seed=7)
    assert [c.index for c in two.choices] == [0, 1] and two.usage.completion_tokens <= 6
    again = client.chat.completions.create(model="default", messages=CHAT, n=2, max_completion_tokens=3,
                                           temperature=1.0, seed=7)
    assert [c.message.content for c in again.choices] == [c.message.content for c in two.choices]
    lp = greedy(client, max_tokens=4, logprobs=True, top_logprobs=2).choices[0].logprobs.content
    assert len(lp) == 4 and all(len(e.top_logprobs) == 2 and e.logprob <= 0 for e in lp)
    assert lp[0].top_logprobs[0].logprob >= lp[0].top_logprobs[1].logprob
    base = greedy(client, max_tokens=12, extra_body={"ignore_eos": True}).choices[0].message.content
    stop = base[3:5]
    if stop.strip():
        res = greedy(client, max_tokens=12, stop=[stop, "\x00never"], extra_body={"ignore_eos": True})
        assert res.choices[0].finish_reason == "stop" and stop not in res.choices[0].message.content
        single = greedy(client, max_tokens=12, stop=stop, extra_body={"ignore_eos": True})
        assert single.choices[0].message.content == res.choices[0].message.content


def test_completions(client):
    res = client.completions.create(model="default", prompt="Once upon a time", max_tokens=6, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert res.object == "text_completion" and res.usage.completion_tokens == 6
    chunks = list(client.completions.create(model="default", prompt="Once upon a time", max_tokens=6,
                                            temperature=0, stream=True, extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks) == res.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"


# --- errors ----------------------------------------------------------------------

def test_invalid_value_is_400_with_param(client):
    with pytest.raises(openai.BadRequestError) as e:
        greedy(client, max_tokens=-3)
    assert e.value.status_code == 400
    assert e.value.body["param"] == "max_tokens" and "max_tokens" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="default", messages=[{"role": "wizard", "content": "x"}])
    assert e.value.body["param"].startswith("messages[0]")


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="no-such-model", messages=CHAT)
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"


def test_prompt_over_context_is_400(client):
    with pytest.raises(openai.BadRequestError) as e:
        greedy(client, content="fox " * 3000)
    assert e.value.body["code"] == "context_length_exceeded"


def test_other_errors_are_openai_objects(server):
    r = httpx.post(server.url + "/v1/chat/completions", content=b"{not json")
    assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = httpx.get(server.url + "/v1/nope")
    assert r.status_code == 404 and "error" in r.json()
    r = httpx.post(server.url + "/v1/embeddings", json={"input": "hi"})
    assert r.status_code == 400 and "not an embedding model" in r.json()["error"]["message"]
    r = httpx.post(server.url + "/v1/images/generations", json={"prompt": "a cat"})
    assert r.status_code == 400 and "diffusion" in r.json()["error"]["message"]
    r = httpx.post(server.url + "/v1/audio/speech", json={"input": "hello"})
    assert r.status_code == 400 and "speech" in r.json()["error"]["message"]
    grammar = {"type": "regex", "value": "a("}   # does not compile
    r = httpx.post(server.url + "/v1/chat/completions", json={"messages": CHAT, "grammar": grammar})
    assert r.status_code == 400 and r.json()["error"]["param"] == "grammar"
    search = {"search_context_size": "low"}       # a capability no installed plugin provides
    r = httpx.post(server.url + "/v1/chat/completions", json={"messages": CHAT, "web_search_options": search})
    assert r.status_code == 400 and r.json()["error"]["param"] == "web_search_options"


# --- SSE, concurrency, cancellation ---------------------------------------------------

def test_sse_framing(server):
    body = {"messages": CHAT, "max_tokens": 5, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    for ev in events[:-2]:
        assert ev.startswith("data: ") and "\n" not in ev
        assert json.loads(ev[len("data: "):])["object"] == "chat.completion.chunk"


def test_64_concurrent_streams(server, client):
    prompts = [f"Story number {i} about a compiler." for i in range(8)]
    expected = {p: greedy(client, p, extra_body={"ignore_eos": True}).choices[0].message.content
                for p in prompts}

    async def one(http: httpx.AsyncClient, prompt: str) -> tuple[str, str, str | None]:
        body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": 12, "temperature": 0,
                "ignore_eos": True, "stream": True}
        text, finish, lines = [], None, []
        async with http.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                lines.append(line)
                if line.startswith("data: {"):
                    choice = json.loads(line[6:])["choices"][0]
                    text.append(choice["delta"]["content"] or "")
                    finish = choice["finish_reason"] or finish
        assert lines[-2:] == ["data: [DONE]", ""] or lines[-1] == "data: [DONE]"
        return prompt, "".join(text), finish

    async def main():
        limits = httpx.Limits(max_connections=80)
        async with httpx.AsyncClient(base_url=server.url, timeout=60, limits=limits) as http:
            return await asyncio.gather(*(one(http, prompts[i % 8]) for i in range(64)))

    results = asyncio.run(main())
    assert len(results) == 64
    for prompt, text, finish in results:
        assert finish == "length" and text == expected[prompt]


def test_disconnect_cancels_and_frees_kv(server):
    gen_before = server.status()["engine"]["generated_tokens"]
    body = {"messages": CHAT, "max_tokens": 1900, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert got[0].startswith("data: ")
        assert server.status()["engine"]["kv_blocks_used"] > 0
    # Leaving the block closed the connection mid-stream.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        eng = server.status()["engine"]
        if eng["kv_blocks_used"] == 0 and eng["running"] == 0:
            break
        time.sleep(0.05)
    assert eng["kv_blocks_used"] == 0 and eng["running"] == 0 and eng["waiting"] == 0
    assert eng["generated_tokens"] - gen_before < 1900
    metrics = httpx.get(server.url + "/metrics").text
    assert 'mistralrs_client_disconnects_total{route="/v1/chat/completions"}' in metrics
    assert "mistralrs_kv_cache_blocks_used{" in metrics and "mistralrs_active_streams 0" in metrics


def test_metrics(server):
    text = httpx.get(server.url + "/metrics").text
    assert "# TYPE mistralrs_http_requests_total counter" in text
    assert 'mistralrs_http_requests_total{route="/v1/chat/completions",status="200"}' in text
    assert 'mistralrs_http_requests_total{route="/v1/chat/completions",status="400"}' in text
    assert "mistralrs_http_request_duration_seconds_bucket{" in text
    assert "mistralrs_prompt_tokens_total{" in text and "mistralrs_completion_tokens_total{" in text
    assert "mistralrs_queue_depth{" in text and "mistralrs_running_sequences{" in text
    assert "mistralrs_kv_cache_blocks_total{" in text


# --- multi-model config + auth --------------------------------------------------

def test_auth(config_server):
    srv = config_server.wait()
    assert httpx.get(srv.url + "/health").status_code == 200
    for key in ("wrong", None):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        r = httpx.get(srv.url + "/v1/models", headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        srv.client("wrong").models.list()
    assert len(srv.client().models.list().data) == 2


def test_config_multi_model_routing_and_unload(config_server):
    srv = config_server.wait()
    c = srv.client()
    models = {m.id: m for m in c.models.list().data}
    assert set(models) == {"a", "b"} and models["b"].model_extra["default"] is True
    assert greedy(c, max_tokens=2).model == "b"
    assert c.chat.completions.create(model="a", messages=CHAT, max_tokens=2).model == "a"
    h = srv.headers()
    r = httpx.post(srv.url + "/v1/models/unload", json={"model_id": "a"}, headers=h)
    assert r.status_code == 200 and r.json()["status"] == "unloaded"
    assert srv.status("a")["engine"] is None
    # A request to an unloaded model reloads it.
    assert c.chat.completions.create(model="a", messages=CHAT, max_tokens=2).model == "a"
    assert srv.status("a")["status"] == "loaded"
    r = httpx.post(srv.url + "/v1/models/reload", json={"model_id": "a"}, headers=h)
    assert r.status_code == 200 and r.json()["status"] == "loaded"
    r = httpx.post(srv.url + "/v1/models/status", json={"model_id": "zzz"}, headers=h)
    assert r.status_code == 404
