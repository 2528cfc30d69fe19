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
