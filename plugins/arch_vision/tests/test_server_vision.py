"""An image request through the real `mistralrs serve` with the official openai client,
streamed, and a broken image answered 400 while the server keeps serving."""
from __future__ import annotations

import openai
import pytest

from mistralrs_core.testing.server import Server
from vision_testing import png_data_uri, random_image


@pytest.fixture(scope="module")
def server(tiny_llava, tmp_path_factory):
    out, _, _ = tiny_llava
    log = tmp_path_factory.mktemp("srv") / "server.log"
    s = Server(["-m", str(out), "--kind", "vision", "--arch", "LLaVa", "--dtype", "f32"], log).wait()
    yield s
    s.stop()


def test_image_request_streams_through_the_openai_client(server, tiny_llava):
    _, ref, _ = tiny_llava
    client = server.client()
    messages = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": png_data_uri(random_image(3))}},
        {"type": "text", "text": "What is in this image?"}]}]
    full = client.chat.completions.create(model="default", messages=messages, max_tokens=6, temperature=0.0)
    chunks = list(client.chat.completions.create(model="default", messages=messages, max_tokens=6,
                                                 temperature=0.0, stream=True,
                                                 stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content and len(chunks) > 2
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens > 20   # the image's tokens count
    bad = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                                        {"type": "text", "text": "?"}]}]
    with pytest.raises(openai.BadRequestError, match="image_url"):
        client.chat.completions.create(model="default", messages=bad, max_tokens=2)
    again = client.chat.completions.create(model="default", messages=messages, max_tokens=6, temperature=0.0)
    assert again.choices[0].message.content == full.choices[0].message.content


def _wav_b64(seconds: float = 0.6, rate: int = 16000) -> str:
    import base64
    import io

    import numpy as np
    import soundfile
    t = np.arange(int(seconds * rate)) / rate
    buf = io.BytesIO()
    soundfile.write(buf, (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), rate, format="WAV")
    return base64.b64encode(buf.getvalue()).decode()


def test_audio_and_image_request_through_the_openai_client(tmp_path):
    """The spec's multimodal request (Phi-4-multimodal, `<|audio_1|><|image_1|>`) over HTTP:
    OpenAI's `input_audio` part and an `audio_url` part give the same answer as the Runner,
    streamed and not; a broken clip is a 400 naming the part while the server keeps serving."""
    from mistralrs import ChatCompletionRequest, ModelDType, Runner, VisionArchitecture, Which
    from tiny_phi4mm import write_tiny_phi4mm
    out, _, _ = write_tiny_phi4mm(tmp_path / "phi4mm")
    wav, image = _wav_b64(), png_data_uri(random_image(5, (40, 30)))

    def messages(audio_part):
        return [{"role": "user", "content": [audio_part, {"type": "image_url", "image_url": {"url": image}},
                                             {"type": "text", "text": "<|audio_1|><|image_1|> What do you hear?"}]}]
    openai_audio = {"type": "input_audio", "input_audio": {"data": wav, "format": "wav"}}
    url_audio = {"type": "audio_url", "audio_url": {"url": "data:audio/wav;base64," + wav}}
    runner = Runner(which=Which.VisionPlain(model_id=str(out), arch=VisionArchitecture.Phi4MM, dtype=ModelDType.F32))
    try:
        want = runner.send_chat_completion_request(ChatCompletionRequest(
            model="default", messages=messages(url_audio), max_tokens=6, temperature=0.0)).choices[0].message.content
    finally:
        runner.shutdown()
    srv = Server(["-m", str(out), "--kind", "vision", "--arch", "Phi4MM", "--dtype", "f32"], tmp_path / "srv.log").wait()
    try:
        client = srv.client()
        for part in (openai_audio, url_audio):
            r = client.chat.completions.create(model="default", messages=messages(part), max_tokens=6, temperature=0.0)
            assert r.choices[0].message.content == want
        chunks = list(client.chat.completions.create(model="default", messages=messages(openai_audio), max_tokens=6,
                                                     temperature=0.0, stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
        broken = {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}
        with pytest.raises(openai.BadRequestError, match="input_audio"):
            client.chat.completions.create(model="default", messages=messages(broken), max_tokens=2)
        again = client.chat.completions.create(model="default", messages=messages(url_audio), max_tokens=6,
                                               temperature=0.0)
        assert again.choices[0].message.content == want
    finally:
        srv.stop()
