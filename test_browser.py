"""The page, driven in a real Chromium by Playwright, against a real uvicorn.

Needs Debian's Chromium (`apt-get install chromium`): Playwright's own browser download is
not used. Without it these tests are skipped, except under CI=true, where they fail.
"""

import base64
import hashlib
import os
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import HERE, Server, free_port, require_program, start_server
from main import INDEX_HTML

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SCREENSHOT = HERE / "screenshot.png"
PAGE_HASH_KEY = "index.html sha256"
TAB_SIZE = {"width": 560, "height": 420}

try:
    from playwright.sync_api import Browser, Page, expect
except ImportError:  # pragma: no cover - the message below says what to do
    Browser = Page = expect = None


@pytest.fixture(scope="module")
def browser() -> Iterator["Browser"]:
    if expect is None:
        message = "playwright is not installed: pip install -r requirements.txt"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    executable = require_program(CHROMIUM, "install it with: apt-get install chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=executable, headless=True, args=CHROMIUM_ARGS
        )
        yield chromium
        chromium.close()


@pytest.fixture
def open_tab(browser: "Browser", server: Server) -> Iterator:
    """Open the page with a query string, in a fresh tab, and wait until it is connected."""
    contexts = []

    def open_page(query: str = "") -> "Page":
        context = browser.new_context(viewport=TAB_SIZE)
        contexts.append(context)
        page = context.new_page()
        page.goto(f"{server.http_url}/{query}")
        expect(page.locator("#status")).to_have_attribute("data-state", "connected")
        return page

    yield open_page
    for context in contexts:
        context.close()


def send(page: "Page", text: str) -> None:
    page.fill("#messageText", text)
    page.press("#messageText", "Enter")


def messages(page: "Page"):
    return page.locator("#messages li")


# --- Chat ------------------------------------------------------------------------------


def test_two_tabs_chat(open_tab, browser: "Browser") -> None:
    alice = open_tab("?endpoint=chat&client_id=1")
    bob = open_tab("?endpoint=chat&client_id=2")
    send(alice, "Hello Bob!")
    expect(messages(alice)).to_have_text(
        ["You wrote: Hello Bob!", "Client #1 says: Hello Bob!"]
    )
    expect(messages(bob)).to_have_text(["Client #1 says: Hello Bob!"])
    send(bob, "Hi Alice, this works on any port.")
    expect(messages(alice)).to_have_text(
        [
            "You wrote: Hello Bob!",
            "Client #1 says: Hello Bob!",
            "Client #2 says: Hi Alice, this works on any port.",
        ]
    )
    expect(messages(bob)).to_have_text(
        [
            "Client #1 says: Hello Bob!",
            "You wrote: Hi Alice, this works on any port.",
            "Client #2 says: Hi Alice, this works on any port.",
        ]
    )
    save_side_by_side(browser, [alice, bob], SCREENSHOT)


def save_side_by_side(browser: "Browser", pages: list["Page"], path: Path) -> None:
    """One picture of several tabs, for the README, rewritten only when the page changed.

    Chromium's anti-aliasing varies by a pixel from run to run, so the file records the
    SHA-256 of the index.html it shows (in a PNG text chunk) instead of being compared.
    """
    page_hash = (
        f"{PAGE_HASH_KEY}\0{hashlib.sha256(INDEX_HTML.read_bytes()).hexdigest()}"
    )
    images = "".join(
        f'<img src="data:image/png;base64,{base64.b64encode(page.screenshot()).decode()}">'
        for page in pages
    )
    width = TAB_SIZE["width"] * len(pages) + 8 * (len(pages) + 1)
    sheet = browser.new_page(
        viewport={"width": width, "height": TAB_SIZE["height"] + 16}
    )
    sheet.set_content(
        "<body style='margin:0;padding:8px;background:#ccc;display:flex;gap:8px'>"
        f"<style>img{{border:1px solid #888}}</style>{images}</body>"
    )
    picture = sheet.screenshot()
    sheet.close()
    if not (path.exists() and page_hash.encode() in path.read_bytes()):
        path.write_bytes(with_text_chunk(picture, page_hash.encode()))


def with_text_chunk(png: bytes, text: bytes) -> bytes:
    """The PNG with a tEXt chunk (keyword, NUL, text) right after its 33-byte header."""
    chunk = b"tEXt" + text
    length, crc = struct.pack(">I", len(text)), struct.pack(">I", zlib.crc32(chunk))
    return png[:33] + length + chunk + crc + png[33:]


def test_closing_a_tab_announces_leaving(open_tab) -> None:
    alice = open_tab("?endpoint=chat&client_id=1")
    bob = open_tab("?endpoint=chat&client_id=2")
    bob.close()
    expect(messages(alice)).to_have_text(["Client #2 left the chat"])


# --- Steps 1 and 2, and the controls ----------------------------------------------------------


def test_echo_step(open_tab) -> None:
    page = open_tab("?endpoint=echo")
    send(page, "hello")
    expect(messages(page)).to_have_text(["Message text was: hello"])


def test_client_id_step(open_tab) -> None:
    page = open_tab("?endpoint=client&client_id=7")
    send(page, "hello")
    expect(messages(page)).to_have_text(["Client #7 says: hello"])


def test_switching_endpoint_with_the_controls(open_tab) -> None:
    page = open_tab()  # no query: the first step, with a fresh id
    expect(page.locator("#endpoint")).to_have_value("echo")
    page.select_option("#endpoint", "client")
    page.fill("#clientId", "5")
    page.click("#connect")
    expect(page.locator("#status")).to_have_text("connected (/ws/5)")
    send(page, "switched")
    expect(messages(page)).to_have_text(["Client #5 says: switched"])


def test_disconnect_button_is_not_retried(open_tab) -> None:
    page = open_tab("?endpoint=echo")
    page.click("#disconnect")
    status = page.locator("#status")
    expect(status).to_have_text("disconnected (closed by the user)")
    page.wait_for_timeout(1500)  # longer than the first retry delay
    expect(status).to_have_text("disconnected (closed by the user)")


def test_markup_in_a_message_is_shown_as_text(open_tab) -> None:
    page = open_tab("?endpoint=echo")
    dialogs: list[str] = []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    send(page, "<img src=x onerror=alert(1)>")
    expect(messages(page)).to_have_text(
        ["Message text was: <img src=x onerror=alert(1)>"]
    )
    assert page.locator("#messages img").count() == 0
    assert dialogs == []


# --- The reader's --reload loop ------------------------------------------------------------------


def test_page_reconnects_after_a_server_restart(
    browser: "Browser", tmp_path: Path
) -> None:
    port = free_port()
    server = start_server(tmp_path / "first.log", port=port)
    page = browser.new_page()
    try:
        page.goto(f"{server.http_url}/?endpoint=chat&client_id=1")
        status = page.locator("#status")
        expect(status).to_have_attribute("data-state", "connected")

        server.stop()
        expect(status).to_have_attribute("data-state", "disconnected")
        expect(status).to_contain_text("retrying in")

        server = start_server(tmp_path / "second.log", port=port)
        expect(status).to_have_attribute("data-state", "connected", timeout=10_000)
        send(page, "back again")
        expect(messages(page)).to_have_text(
            ["You wrote: back again", "Client #1 says: back again"]
        )
    finally:
        page.close()
        server.stop()
