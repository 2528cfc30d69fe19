"""The chat page at /ui in a real headless browser (Debian's chromium + chromedriver,
driven by selenium) against the real server with the bundled SmolLM2: the answer streams
in, Stop aborts it, an attached image travels as an image_url part. Screenshots go to the
test's tmp dir. Chromium is a test requirement (`make install` installs it): a missing
browser fails the test rather than skipping it."""
from __future__ import annotations

import base64
import time
from importlib import resources

import httpx
import pytest
from starlette.testclient import TestClient

from mistralrs_core.server.app import create_app
from mistralrs_core.testing.browser import ask, headless_chromium, last_answer, open_chat_page, wait_for
from mistralrs_core.testing.server import Server, smollm2_args

# A 1x1 PNG.
PNG = ("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg==")


def test_page_and_assets_ship_in_the_package():
    ui = resources.files("mistralrs_core.server").joinpath("ui")
    assert {p.name for p in ui.iterdir()} >= {"index.html", "app.js", "style.css"}
    html = ui.joinpath("index.html").read_text()
    # No CDN, no build step: everything the page loads is one of our files.
    assert "http://" not in html and "https://" not in html
    assert 'src="app.js"' in html and 'href="style.css"' in html


def test_page_is_served_without_the_api_key_and_the_api_is_not():
    with TestClient(create_app(runner=None, api_key="sekrit")) as client:
        r = client.get("/ui", follow_redirects=False)
        assert r.status_code == 307 and r.headers["location"] == "/ui/"
        page = client.get("/ui/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert client.get("/ui/app.js").headers["content-type"].startswith("text/javascript")
        assert client.get("/ui/style.css").headers["content-type"].startswith("text/css")
        assert client.get("/ui/secret.txt").status_code == 401   # not a page file: behind the key
        assert client.get("/v1/models").status_code == 401


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = Server(smollm2_args(), tmp_path_factory.mktemp("ui") / "log.txt")
    yield srv.wait()
    srv.stop()


@pytest.fixture(scope="module")
def browser():
    with headless_chromium() as driver:
        driver.set_script_timeout(120)
        yield driver


def test_prompt_streams_an_answer(browser, server, tmp_path):
    open_chat_page(browser, server.url)
    assert browser.title == "mistralrs chat"
    models = browser.execute_script("return [...document.getElementById('model').options].map(o => o.value)")
    assert models == [m["id"] for m in httpx.get(server.url + "/v1/models").json()["data"]]
    ask(browser, "What is the capital of France?", "0", "32")
    answer = last_answer(browser)
    browser.save_screenshot(str(tmp_path / "answer.png"))
    assert "Paris" in answer
    # The bubble grew piece by piece (several updates after the empty bubble was added).
    assert browser.execute_script("return window.updates") >= 4
    assert "tok/s" in browser.find_element("id", "status").text
    assert (tmp_path / "answer.png").stat().st_size > 1000


def test_stop_aborts_the_stream(browser, server, tmp_path):
    open_chat_page(browser, server.url)
    ask(browser, "Write a very long story about a dragon who learns to fly.", "0.7", "2000")
    wait_for(browser, "const a = document.querySelector('.msg.assistant');"
                      "return a && a.textContent.length > 20")
    browser.find_element("id", "stop").click()
    wait_for(browser, "return document.getElementById('status').textContent === 'stopped'", 30)
    browser.save_screenshot(str(tmp_path / "stopped.png"))
    text = browser.execute_script("return document.querySelector('.msg.assistant').textContent")
    assert browser.find_element("id", "send").is_enabled() and not browser.find_element("id", "stop").is_enabled()
    # The server cancels the generation when the browser drops the connection.
    eng = server.status()["engine"]
    for _ in range(300):
        if eng["running"] == 0:
            break
        time.sleep(0.05)
        eng = server.status()["engine"]
    assert eng["running"] == 0 and len(text) > 20


def test_image_upload_is_sent_as_an_image_url_part(browser, server, tmp_path):
    png = tmp_path / "dot.png"
    png.write_bytes(base64.b64decode(PNG))
    open_chat_page(browser, server.url)
    ask(browser, "What is in this picture?", "0", "8", image=str(png))
    # SmolLM2 is a text model: the server refuses the image part, naming it; a vision model
    # would answer (the page sends the same request shape either way).
    wait_for(browser, "return document.querySelector('.msg.error') !== null")
    error = browser.find_element("css selector", ".msg.error").text
    assert "image_url" in error and "vision model" in error
    assert browser.execute_script("return document.querySelector('.msg.user img').src").startswith(
        "data:image/png;base64,")
    assert not browser.find_element("id", "attachment").is_displayed()   # sent, so detached
    browser.save_screenshot(str(tmp_path / "image.png"))
