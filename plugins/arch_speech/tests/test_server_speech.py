"""POST /v1/audio/speech through the real `mistralrs serve` with the official openai client:
WAV and raw PCM, the same seed stream as the Runner, concurrent requests, bad input."""
from __future__ import annotations

import io
import json
import threading
import wave

import httpx
import numpy as np
import openai
import pytest

from mistralrs import Runner, SpeechLoaderType, Which
from mistralrs_core.server import wire
from mistralrs_core.testing.server import Server

import tiny_dia

TEXT = "[S1] Hello there. [S2] Hi! How are you?"


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("speech_srv")
    dia = tiny_dia.write_dia(tiny_dia.make_reference_dia(), root / "dia")
    dac = tiny_dia.write_dac(tiny_dia.make_reference_dac(), root / "dac")
    return str(dia), str(dac), root


@pytest.fixture(scope="module")
def served(dirs):
    """The server, and what a Runner with the same seed produces for its first six requests
    (computed while the server starts)."""
    dia, dac, root = dirs
    cfg = root / "serve.json"
    cfg.write_text(json.dumps({"runtime": {"seed": 7}, "models": [
        {"model_id": dia, "name": "dia", "kind": "speech", "arch": "Dia", "dac_model_id": dac, "dtype": "f32"}]}))
    s = Server(["--config", str(cfg)], root / "server.log")
    try:
        r = Runner(which=Which.Speech(model_id=dia, arch=SpeechLoaderType.Dia, dac_model_id=dac, dtype="f32"),
                   seed=7)
        try:
            local = [r.generate_audio(TEXT) for _ in range(6)]
        finally:
            r.shutdown()
        s.wait()
        yield s, local
    finally:
        s.stop()


def _read_wav(data: bytes):
    with wave.open(io.BytesIO(data), "rb") as w:
        return w.getframerate(), w.getnchannels(), w.getsampwidth(), w.readframes(w.getnframes())


def test_speech_route_with_the_openai_client(served):
    server, local = served
    client = server.client()
    wav = client.audio.speech.create(model="dia", voice="alloy", input=TEXT, response_format="wav").content
    rate, channels, width, frames = _read_wav(wav)
    assert (rate, channels, width) == (24000, 1, 2)
    assert frames == wire.pcm16(local[0].pcm)          # same seed, same first request
    assert len(frames) // 2 == len(local[0].pcm) > 0

    pcm = client.audio.speech.create(model="dia", voice="alloy", input=TEXT, response_format="pcm")
    assert pcm.response.headers["x-sample-rate"] == "24000"
    assert pcm.content == wire.pcm16(local[1].pcm)

    out = [None] * 4

    def work(i):
        out[i] = client.audio.speech.create(model="dia", voice="alloy", input=TEXT, response_format="wav").content

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    got = sorted(_read_wav(w)[3] for w in out)
    assert got == sorted(wire.pcm16(x.pcm) for x in local[2:6])
    assert np.frombuffer(got[0], "<i2").size > 0
    engine = server.status("dia")["engine"]
    assert engine["max_running"] >= 2 and engine["running"] == 0
    metrics = httpx.get(server.url + "/metrics").text
    assert 'mistralrs_engine_steps_total{model="dia"}' in metrics


def test_bad_speech_requests_are_400(served):
    server, _ = served
    client = server.client()
    with pytest.raises(openai.BadRequestError, match="input"):
        client.audio.speech.create(model="dia", voice="alloy", input="")
    with pytest.raises(openai.BadRequestError, match="prompt"):
        client.audio.speech.create(model="dia", voice="alloy", input="   ")
    with pytest.raises(openai.BadRequestError, match="response_format"):
        client.audio.speech.create(model="dia", voice="alloy", input=TEXT, response_format="mp3")
    with pytest.raises(openai.BadRequestError, match="at most 96"):
        client.audio.speech.create(model="dia", voice="alloy", input="y" * 200)
