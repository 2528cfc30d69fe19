"""Images through the Responses and Messages APIs and the /ui page, against the real
server with a tiny random LLaVa: each API's image form reaches the model as the chat
route's image_url part (same answer as the chat route), and the page's image upload gets
a streamed answer."""
from __future__ import annotations

import base64

import anthropic
import pytest

from mistralrs_core.testing.browser import ask, headless_chromium, last_answer, open_chat_page
from mistralrs_core.testing.server import Server
from vision_testing import png_data_uri, random_image

IMAGE = png_data_uri(random_image(5))
QUESTION = "What is in this image?"


@pytest.fixture(scope="module")
def server(tiny_llava, tmp_path_factory):
    out, _, _ = tiny_llava
    log = tmp_path_factory.mktemp("srv") / "server.log"
    s = Server(["-m", str(out), "--kind", "vision", "--arch", "LLaVa", "--dtype", "f32"], log).wait()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def chat_answer(server):
    res = server.client().chat.completions.create(
        model="default", max_tokens=6, temperature=0,
        messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": IMAGE}},
                                               {"type": "text", "text": QUESTION}]}])
    return res.choices[0].message.content, res.usage.prompt_tokens


def test_responses_input_image(server, chat_answer):
    r = server.client().responses.create(
        model="default", max_output_tokens=6, temperature=0,
        input=[{"role": "user", "content": [{"type": "input_image", "image_url": IMAGE, "detail": "auto"},
                                            {"type": "input_text", "text": QUESTION}]}])
    assert (r.output_text, r.usage.input_tokens) == chat_answer


def test_messages_image_block(server, chat_answer):
    client = anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0)
    media, data = IMAGE[len("data:"):].split(";base64,")
    content = [{"type": "image", "source": {"type": "base64", "media_type": media, "data": data}},
               {"type": "text", "text": QUESTION}]
    m = client.messages.create(model="default", max_tokens=6, messages=[{"role": "user", "content": content}],
                               extra_body={"temperature": 0})
    assert (m.content[0].text, m.usage.input_tokens) == chat_answer
    # count_tokens counts the image's tokens too.
    counted = client.messages.count_tokens(model="default", messages=[{"role": "user", "content": content}])
    assert counted.input_tokens == chat_answer[1]


def test_web_ui_image_upload_streams_an_answer(server, chat_answer, tmp_path):
    png = tmp_path / "image.png"
    png.write_bytes(base64.b64decode(IMAGE.split(",", 1)[1]))
    with headless_chromium() as browser:
        open_chat_page(browser, server.url)
        ask(browser, QUESTION, temperature="0", max_tokens="6", image=str(png))
        answer = last_answer(browser)
        browser.save_screenshot(str(tmp_path / "vision.png"))
        assert browser.execute_script("return document.querySelector('.msg.error')") is None
    assert answer == chat_answer[0]
