"""The chat page at / in a real headless browser (Debian's chromium driven by Playwright for Python): it loads the
model list, streams a reply token by token, shows tokens/s, and the stop button ends the stream and frees the
server's slot. Skipped, with the reason, when chromium or playwright is missing, except under CI=true, where the
browser must be there (CI installs it): then every test here fails instead of skipping silently."""

import os
import time
from pathlib import Path

import pytest

CHROMIUM = Path(os.environ.get("CHOICELM_CHROMIUM", "/usr/bin/chromium"))
IN_CI = os.environ.get("CI", "").strip().lower() in ("true", "1")
try:
    from playwright import sync_api
except ImportError:
    sync_api = None
MISSING = (f"{CHROMIUM} is missing: install Debian's chromium (apt-get install -y chromium) to run the browser test"
           if not CHROMIUM.exists() else
           "playwright is not installed (pip install playwright; no `playwright install` needed, Debian's chromium is "
           "used)" if sync_api is None else None)


@pytest.fixture(autouse=True, scope="module")
def browser_is_available():
    """Before any other fixture of this module: skip where the browser is missing, but fail under CI=true."""
    if MISSING and IN_CI:
        pytest.fail(f"CI=true and the browser test cannot run: {MISSING}", pytrace=False)
    if MISSING:
        pytest.skip(MISSING)


import choicelm
from choicelm.text.chat_template import TURN_STOP, format_chat

from test_serve import httpx, make_checkpoint, running_server, slowed

# the flags a sandboxed root machine with a closed network needs (no background connections, no first-run UI)
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    run = make_checkpoint(tmp_path_factory.mktemp("web"), dict(block_size=512, n_layer=2, n_head=2, n_embd=32))
    return choicelm.load(run, "cpu")


@pytest.fixture(scope="module")
def server(lm):
    """The real server, its model slowed to >= 20 ms a step so a reply lasts long enough to be stopped."""
    # slowed(): decodes through the slowed forward (the fused fast step would bypass a patched forward)
    with running_server(slowed(choicelm.load(lm.checkpoint, "cpu"), 0.02), max_batch=4) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=FLAGS)
        yield b
        b.close()


@pytest.fixture()
def page(browser, server):
    page = browser.new_page()
    page.goto(server + "/")
    page.wait_for_function("document.getElementById('model').textContent.startsWith('model: run')")
    yield page
    page.close()


def reply_text(page) -> str:
    return page.locator(".assistant").last.text_content()


def test_page_streams_a_reply_equal_to_greedy_generation(page, lm):
    page.locator("#temperature").fill("0")
    assert page.locator("#temperature-value").text_content() == "0.00"
    page.fill("#max-tokens", "60")
    page.fill("#input", "hi")
    page.click("#send")
    page.wait_for_function("document.querySelectorAll('.assistant').length === 1 && "
                           "document.querySelector('.assistant').textContent.length > 0")
    first = reply_text(page)
    page.wait_for_function(f"document.querySelector('.assistant').textContent.length > {len(first)}")  # it grows
    page.wait_for_function("document.getElementById('status').textContent.startsWith('done')", timeout=30_000)
    expected = lm.generate(format_chat([], "hi"), max_new_tokens=60, temperature=0, stop=[TURN_STOP]).lstrip()
    assert reply_text(page) == expected and len(first) < len(expected)
    assert "done (length)" in page.locator("#status").text_content()
    assert page.locator("#speed").text_content().endswith("tokens/s")
    assert page.locator(".user").last.text_content() == "hi"


def test_stop_button_ends_the_stream_and_frees_the_slot(page, lm, server):
    page.locator("#temperature").fill("0")
    page.fill("#max-tokens", "400")
    page.fill("#input", "hi")
    page.click("#send")
    page.wait_for_function("(document.querySelector('.assistant') || {}).textContent?.length > 5")
    assert page.locator("#stop").is_enabled() and page.locator("#send").is_disabled()
    page.click("#stop")
    page.wait_for_function("document.getElementById('status').textContent === 'stopped'")
    assert page.locator("#send").is_enabled() and page.locator("#stop").is_disabled()
    stopped = reply_text(page)
    expected = lm.generate(format_chat([], "hi"), max_new_tokens=400, temperature=0, stop=[TURN_STOP]).lstrip()
    assert expected.startswith(stopped) and len(stopped) < len(expected)

    deadline = time.time() + 5
    while httpx.get(server + "/health").json()["running"] and time.time() < deadline:
        time.sleep(0.05)
    health = httpx.get(server + "/health").json()
    assert health["running"] == 0 and health["cancelled"] >= 1
    time.sleep(0.2)
    assert reply_text(page) == stopped  # nothing arrives after stop
