"""Driving the /ui chat page in a real headless browser for tests: Debian's chromium and
chromedriver through selenium (no browser download). ``make install`` installs chromium;
a missing browser is an error, not a reason to skip."""
from __future__ import annotations

import os
import shutil
from contextlib import contextmanager

CHROMIUM = os.environ.get("MISTRALRS_TEST_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = (os.environ.get("MISTRALRS_TEST_CHROMEDRIVER") or shutil.which("chromedriver")
                or "/usr/bin/chromedriver")


@contextmanager
def headless_chromium(width: int = 1100, height: int = 800):
    for path in (CHROMIUM, CHROMEDRIVER):
        if not os.path.exists(path):
            raise RuntimeError(f"{path} is missing: the web UI tests need Debian's chromium and chromium-driver "
                               f"(`make install` installs them; or apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                f"--window-size={width},{height}"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(driver, script: str, timeout: float = 120):
    """Until ``script`` (JavaScript with a ``return``) gives something truthy; that value."""
    from selenium.webdriver.support.ui import WebDriverWait
    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(lambda d: d.execute_script(script))


def open_chat_page(driver, url: str) -> None:
    """Load ``url + "/ui"``, wait for the model list, and count changes to the messages
    (``window.updates``: each streamed piece is one)."""
    driver.get(url + "/ui")
    wait_for(driver, "return document.getElementById('model').options.length > 0", 30)
    driver.execute_script("""
        window.updates = 0;
        new MutationObserver(() => window.updates++).observe(
            document.getElementById('messages'), {subtree: true, characterData: true, childList: true});""")


def ask(driver, text: str, temperature: str = "0", max_tokens: str = "32", image: str | None = None) -> None:
    """Type ``text`` (and attach the image file ``image``) with these settings, and send."""
    driver.execute_script("""
        document.getElementById('temperature').value = arguments[0];
        document.getElementById('max-tokens').value = arguments[1];""", temperature, max_tokens)
    if image is not None:
        driver.find_element("id", "image").send_keys(image)
        wait_for(driver, "return !document.getElementById('attachment').hidden", 10)
    prompt = driver.find_element("id", "prompt")
    prompt.clear()
    prompt.send_keys(text)
    driver.find_element("id", "send").click()


def last_answer(driver) -> str:
    """The last assistant answer once it has finished streaming."""
    wait_for(driver, "const a = [...document.querySelectorAll('.msg.assistant')].pop();"
                     "return a && !a.classList.contains('streaming')")
    return driver.execute_script("return [...document.querySelectorAll('.msg.assistant')].pop().textContent")
