"""The page, driven in a real Chromium by Playwright, against a real uvicorn.

Needs a Chromium (see `browser` in conftest.py): Playwright's own browser download is not
used. Without one these tests are skipped, except under CI=true, where they fail.
"""

import base64
import contextlib
import datetime
import hashlib
import json
import re
import socket
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from conftest import (
    HERE,
    TAKEN_OVER,
    Server,
    expect,
    free_port,
    open_client,
    run,
    start_server,
    wait_for_log,
)

SCREENSHOT = HERE / "screenshot.png"
PAGE_HASH_KEY = "index.html sha256"
TAB_SIZE = {"width": 560, "height": 420}

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page
else:
    Browser = Page = object


# Longer than any delay before the page tries again (5 s at most, jitter included).
ALL_RETRY_DELAYS_MS = 10_000


@pytest.fixture
def open_tab(browser: "Browser", server: Server) -> Iterator:
    """Open the page with a query string, in a fresh tab, and wait until it is connected.

    With `clock`, the page's timers run only when the test moves its clock on (`page.
    clock.run_for`): a retry the page should not make is shown not to be due, at once.
    With `port`, the page is loaded from there (a proxy in front of the server). With
    `count_closes`, `window.closedSockets` counts the close events its sockets had.
    """
    contexts = []

    def open_page(
        query: str = "",
        connected: bool = True,
        clock: bool = False,
        port: int | None = None,
        count_closes: bool = False,
        cookies: tuple[dict, ...] = (),
    ) -> "Page":
        context = browser.new_context(viewport=TAB_SIZE)
        contexts.append(context)
        if cookies:
            context.add_cookies(list(cookies))
        page = context.new_page()
        if count_closes:
            page.add_init_script(COUNT_CLOSES)
        if clock:
            # Paused from the start: installed alone, the fake clock also runs on by
            # itself, and a retry could come while a test looks at the one before.
            start = datetime.datetime.now()
            page.clock.install(time=start)
            page.clock.pause_at(start + datetime.timedelta(seconds=1))
        page.goto(f"http://127.0.0.1:{port or server.port}/{query}")
        if connected:
            expect(page.locator("#status")).to_have_attribute("data-state", "connected")
        return page

    yield open_page
    for context in contexts:
        context.close()


# Counted before the page's own onclose runs, in the same event.
COUNT_CLOSES = """
window.closedSockets = 0;
window.WebSocket = class extends window.WebSocket {
  constructor(...args) {
    super(...args);
    this.addEventListener("close", () => { window.closedSockets += 1; });
  }
};
"""


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
    page = (HERE / "index.html").read_bytes()
    page_hash = f"{PAGE_HASH_KEY}\0{hashlib.sha256(page).hexdigest()}"
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


def test_anonymous_chat_in_two_tabs(open_tab) -> None:
    alice = open_tab("?endpoint=anonymous")
    bob = open_tab("?endpoint=anonymous")
    expect(alice.locator("h1")).to_have_text("Step 3: Chat, anonymous")
    send(alice, "Hello, whoever you are")
    for page in (alice, bob):
        expect(messages(page)).to_have_text(["Someone said: Hello, whoever you are"])
    bob.close()
    expect(messages(alice)).to_have_text(
        ["Someone said: Hello, whoever you are", "A user left the chat"]
    )


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


@pytest.mark.parametrize("endpoint", ["nonsense", "toString", "__proto__"])
def test_a_link_to_no_step_opens_the_first(open_tab, endpoint: str) -> None:
    # "toString" and "__proto__" are in every JavaScript object, though no step's name.
    page = open_tab(f"?endpoint={endpoint}")
    expect(page.locator("#endpoint")).to_have_value("echo")
    send(page, "hello")
    expect(messages(page)).to_have_text(["Message text was: hello"])


def test_disconnect_button_is_not_retried(open_tab) -> None:
    page = open_tab("?endpoint=echo", clock=True, count_closes=True)
    page.click("#disconnect")
    status = page.locator("#status")
    expect(status).to_have_text("disconnected (closed by the user)")
    page.wait_for_function("window.closedSockets === 1")  # its onclose has run
    page.clock.run_for(ALL_RETRY_DELAYS_MS)  # a retry would have started: "connecting"
    expect(status).to_have_text("disconnected (closed by the user)")


def test_heading_and_fields_follow_the_step(open_tab) -> None:
    page = open_tab("?endpoint=echo")
    expect(page.locator("h1")).to_have_text("Step 1: Echo")
    expect(page.locator("#clientId")).to_be_hidden()
    expect(page.locator("#itemId")).to_be_hidden()
    page.select_option("#endpoint", "chat")
    expect(page.locator("h1")).to_have_text("Step 3: Chat")
    expect(page.locator("#clientId")).to_be_visible()
    page.select_option("#endpoint", "items")
    expect(page.locator("h1")).to_have_text("Step 4: Depends")
    expect(page.locator("#itemId")).to_be_visible()
    expect(page.locator("#token")).to_be_visible()
    expect(page.locator("#clientId")).to_be_hidden()


@pytest.mark.parametrize("written", ["abc", "07", "-0"])  # the server takes 7, -7
def test_a_client_id_that_is_not_a_number_is_caught_on_the_page(
    open_tab, server: Server, written: str
) -> None:
    page = open_tab(f"?endpoint=chat&client_id={written}", connected=False, clock=True)
    status = page.locator("#status")
    caught = (
        f'disconnected (client id must be a whole number, such as 7, not "{written}")'
    )
    expect(status).to_have_text(caught)
    page.clock.run_for(ALL_RETRY_DELAYS_MS)  # nor is it tried again later
    expect(status).to_have_text(caught)
    # A handshake from this page, after any it would have tried before.
    page.fill("#clientId", "7")
    page.click("#connect")
    wait_for_log(server, '"WebSocket /chat/7" [accepted]')
    assert f"/chat/{written}" not in server.log()  # no handshake was even tried


@pytest.mark.parametrize(
    ("query", "path"),
    [("endpoint=rooms&room=lobby", "/rooms/lobby/"), ("endpoint=chat", "/chat/")],
)
def test_a_client_id_past_what_javascript_holds_exactly_is_caught_on_the_page(
    open_tab, server: Server, query: str, path: str
) -> None:
    page = open_tab(f"?{query}&client_id=9007199254740993", connected=False)
    expect(page.locator("#status")).to_have_text(
        "disconnected (client id must be at most 9007199254740991 either way, "
        "not 9007199254740993)"
    )
    page.fill("#clientId", "9007199254740991")
    page.click("#connect")
    wait_for_log(server, f'"WebSocket {path}9007199254740991" [accepted]')
    assert server.log().count(f"WebSocket {path}") == 1  # none tried before


def test_no_favicon_request(open_tab, server: Server) -> None:
    page = open_tab("?endpoint=echo")
    # Chromium asks a site for /favicon.ico once a page without a <link rel="icon">
    # has loaded: this one, then one that has none, where it asks (or has asked).
    page.goto(f"{server.http_url}/no-such-page")
    wait_for_log(server, "GET /favicon.ico")
    log = server.log()
    assert log.index("GET /no-such-page") < log.index("GET /favicon.ico"), log


def test_a_refused_handshake_is_given_up_after_a_few_attempts(
    open_tab, server: Server
) -> None:
    # Step 4 without a token: the server refuses every handshake.
    page = open_tab(
        "?endpoint=items&item_id=foo&token=",
        connected=False,
        clock=True,
        count_closes=True,
    )
    status = page.locator("#status")
    expect(status).to_contain_text("retrying in")
    # Each refusal, then the time until the next attempt: 0.5 s, doubling each time,
    # less up to half of it at random (the README's back-off, with its jitter).
    for attempt, (low_s, high_s) in enumerate([(0.25, 0.5), (0.5, 1), (1, 2), (2, 4)]):
        waiting = status.inner_text()
        found = re.search(r"retrying in (\d+\.\d) s", waiting)
        assert found is not None, waiting
        delay_ms = float(found[1]) * 1000  # as shown: to 50 ms
        assert low_s * 1000 - 50 <= delay_ms <= high_s * 1000 + 50, found[0]
        # And it waits that long: not 100 ms less, and no more than 100 ms more. Two
        # delays may read the same: the attempts are counted by their closes.
        page.clock.run_for(int(delay_ms) - 100)
        expect(status).to_have_text(waiting)
        assert page.evaluate("window.closedSockets") == attempt + 1
        page.clock.run_for(200)
        closed = f"window.closedSockets === {attempt + 2}"
        page.wait_for_function(closed, polling=50, timeout=5000)
    gave_up = (
        "gave up after 5 attempts: the server refused the connection, or is not "
        "running. Press Connect to try again"
    )
    expect(status).to_contain_text(gave_up)
    page.clock.run_for(ALL_RETRY_DELAYS_MS)  # no sixth attempt is due
    expect(status).to_contain_text(gave_up)
    wait_for_log(server, '"WebSocket /items/foo/ws" 403', count=5)
    assert server.log().count('"WebSocket /items/foo/ws" 403') == 5


# Chromium keeps up to 4 KB a cookie, and sends a host's cookies in one Cookie line: these
# make 12 KB, past the 8 KiB a line of a WebSocket handshake may hold (websockets' rule).
BIG_COOKIES, COOKIE_BYTES = 3, 4000


def test_a_page_whose_cookies_are_too_big_for_a_handshake_is_told_it_was_refused(
    open_tab, server: Server
) -> None:
    # uvicorn 0.54 logged a 431 and sent nothing: the page said "connecting" for good.
    cookie = {"value": "a" * COOKIE_BYTES, "url": server.http_url}
    cookies = tuple({"name": f"c{n}", **cookie} for n in range(BIG_COOKIES))
    page = open_tab("?endpoint=chat&client_id=1", connected=False, cookies=cookies)
    expect(page.locator("#status")).to_contain_text(
        "code 1006: connection lost or refused; retrying in"
    )
    wait_for_log(server, "431 Request Header Fields Too Large")


def test_depends_step_from_its_link(open_tab) -> None:
    page = open_tab("?endpoint=items&item_id=foo&token=some-key-token")
    expect(page.locator("#status")).to_have_text("connected (/items/foo/ws)")
    send(page, "Hello")
    expect(messages(page)).to_have_text(
        [
            "Session cookie or query token value is: some-key-token",
            "Message text was: Hello, for item ID: foo",
        ]
    )


def test_a_second_tab_with_the_same_id_takes_over(open_tab) -> None:
    first = open_tab("?endpoint=chat&client_id=7", clock=True)
    open_tab("?endpoint=chat&client_id=7")
    status = first.locator("#status")
    expected = f"disconnected (code 4000: {TAKEN_OVER}; press Connect to take it back)"
    expect(status).to_have_text(expected)
    first.clock.run_for(ALL_RETRY_DELAYS_MS)  # no retry is due: it would take it back
    expect(status).to_have_text(expected)
    send(first, "hi")  # the reason, and what to do, stay in sight
    expect(status).to_have_text(f"{expected[:-1]}; not connected: message not sent)")


@pytest.mark.parametrize(
    ("query", "path", "wrapped"),
    [
        ("endpoint=chat&client_id=1", "/chat/1", 0),
        ("endpoint=rooms&room=lobby&client_id=1", "/rooms/lobby/1", 11),
    ],
)
def test_a_message_too_long_for_the_server_is_kept_not_sent(
    open_tab, query: str, path: str, wrapped: int
) -> None:
    # Sent, the server would close the connection with 1009, and the text would be gone.
    page = open_tab(f"?{query}", count_closes=True)
    over = 65537 - wrapped  # one byte over, in UTF-8, as sent; in characters, far less
    too_long = "é" * (over // 2) + "x" * (over % 2)
    send(page, too_long)
    expect(page.locator("#status")).to_have_text(
        f"connected ({path}; message over 65536 bytes: not sent)"
    )
    assert page.input_value("#messageText") == too_long
    send(page, "still here")
    expect(messages(page).last).to_contain_text("still here")
    assert page.evaluate("window.closedSockets") == 0


def test_a_message_goes_the_way_of_the_step_connected_not_of_the_menu(
    open_tab,
) -> None:
    # The menu changed, not yet applied: "hi" sent bare to a room was closed with 1007.
    page = open_tab("?endpoint=rooms&room=lobby&client_id=1", count_closes=True)
    page.select_option("#endpoint", "echo")
    send(page, "hi")
    expect(messages(page)).to_have_text(["Client #1: hi"])
    assert page.evaluate("window.closedSockets") == 0


LONG_SENDERS, LONG_CHARACTERS = 20, 60_000  # one message each: a flood counts its KiB


def test_a_tab_lets_the_oldest_go_once_its_messages_grow_long_too(
    open_tab, server: Server
) -> None:
    page = open_tab("?endpoint=chat&client_id=1")

    async def long_messages() -> None:
        async with contextlib.AsyncExitStack() as stack:
            for sender in range(10, 10 + LONG_SENDERS):
                client = await stack.enter_async_context(
                    open_client(f"{server.ws_url}/chat/{sender}")
                )
                await client.send(f"{sender} " + "x" * LONG_CHARACTERS)

    run(long_messages())
    last = f"Client #{10 + LONG_SENDERS - 1} says: {10 + LONG_SENDERS - 1} "
    expect(messages(page).filter(has_text=last)).to_have_count(1)
    shown = sum(map(len, messages(page).all_text_contents()))
    assert (
        shown <= page.evaluate("MAX_SHOWN_CHARACTERS") < LONG_SENDERS * LONG_CHARACTERS
    )


def test_markup_in_a_message_is_shown_as_text(open_tab) -> None:
    page = open_tab("?endpoint=echo")
    send(page, "<img src=x onerror=alert(1)>")
    expect(messages(page)).to_have_text(
        ["Message text was: <img src=x onerror=alert(1)>"]
    )
    # Shown as text: no element was made of it, so no script of it could run.
    assert page.locator("#messages img").count() == 0


# The page's own bound, MAX_SHOWN_MESSAGES in index.html.
MAX_SHOWN_MESSAGES = 1000
SENDERS = range(2, 13)  # a burst of 100 each, as flood control allows: 1,100 in all


def room_frame(text: str) -> str:
    return json.dumps({"text": text})


@pytest.mark.parametrize(
    ("query", "path", "frame", "ids_kept"),
    [
        ("?endpoint=chat&client_id=1", "/chat/{}", str, 0),
        (
            "?endpoint=rooms&room=lobby&client_id=1",
            "/rooms/lobby/{}",
            room_frame,
            MAX_SHOWN_MESSAGES,
        ),
    ],
    ids=["chat", "rooms"],
)
def test_a_tab_shows_its_latest_messages_and_lets_the_oldest_go(
    open_tab, server: Server, query: str, path: str, frame, ids_kept: int
) -> None:
    page = open_tab(query)

    async def senders_of_100_each() -> None:
        async with contextlib.AsyncExitStack() as stack:
            clients = [
                await stack.enter_async_context(
                    open_client(server.ws_url + path.format(sender))
                )
                for sender in SENDERS
            ]
            for sender, client in zip(SENDERS, clients):
                for n in range(100):
                    text = f"{sender}-{n}"
                    await client.send(frame(text))
            for client in clients:  # until each has had the last sender's last
                while f"{SENDERS[-1]}-99" not in await client.recv():
                    pass

    run(senders_of_100_each())
    shown = messages(page)
    expect(shown.filter(has_text=f"{SENDERS[-1]}-99")).to_have_count(1)
    expect(shown).to_have_count(MAX_SHOWN_MESSAGES)
    texts = shown.all_text_contents()
    assert not any(text.endswith(f" {SENDERS[0]}-0") for text in texts)
    # What a room page keeps of the ids it has shown goes with the messages.
    assert page.evaluate("shownIds.size") == ids_kept


# --- Step 5: rooms ------------------------------------------------------------------------

MISSED = (
    "Some messages may be missing: the room no longer holds where this page left off"
)


def test_rooms_two_tabs_in_one_room_and_one_in_another(open_tab) -> None:
    alice = open_tab("?endpoint=rooms&room=lobby&client_id=1")
    expect(alice.locator("h1")).to_have_text("Step 5: Rooms")
    expect(alice.locator("#members")).to_have_text("#1")
    bob = open_tab("?endpoint=rooms&room=lobby&client_id=2")
    carol = open_tab("?endpoint=rooms&room=kitchen&client_id=3")
    expect(alice.locator("#members")).to_have_text("#1, #2")
    expect(bob.locator("#members")).to_have_text("#1, #2")
    expect(carol.locator("#members")).to_have_text("#3")
    send(alice, "Hello, lobby")
    send(carol, "Hello, kitchen")
    for page in (alice, bob):
        expect(messages(page)).to_have_text(["Client #1: Hello, lobby"])
    expect(messages(carol)).to_have_text(["Client #3: Hello, kitchen"])
    bob.close()
    expect(alice.locator("#members")).to_have_text("#1")
    # A tab joining later gets the room's history.
    dave = open_tab("?endpoint=rooms&room=lobby&client_id=4")
    expect(messages(dave)).to_have_text(["Client #1: Hello, lobby"])


# Every text the element with this id shows from now on, in order.
SHOWN_TEXTS = """(id) => {
  const shown = [];
  const element = document.getElementById(id);
  new MutationObserver(() => shown.push(element.textContent))
    .observe(element, { childList: true, characterData: true, subtree: true });
  return shown;
}"""


def test_a_room_message_leaves_the_members_line_as_it_was(open_tab) -> None:
    # A message does not change who is here: the line was sorted and written anew.
    alice = open_tab("?endpoint=rooms&room=lobby&client_id=1")
    expect(alice.locator("#members")).to_have_text("#1")
    shown = alice.evaluate_handle(SHOWN_TEXTS, "members")
    send(alice, "hi")
    expect(messages(alice)).to_have_text(["Client #1: hi"])
    assert shown.evaluate("shown => shown.length") == 0


class Network:
    """A TCP proxy in front of the server, whose connections can be cut as a network
    failure cuts them: each side's TCP connection reset, no WebSocket close frame."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.up = threading.Event()
        self.up.set()
        self.hung = threading.Event()  # what comes is dropped, and nothing closes
        self.dead: set[socket.socket] = set()  # what comes on these is dropped
        self.slowed: set[socket.socket] = set()  # what comes on these waits SLOWED_S
        self.slow_from_now = False  # new connections are slowed too
        self.connections: list[socket.socket] = []
        self.lock = threading.Lock()
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self) -> None:
        while True:
            try:
                near, _ = self.listener.accept()
            except OSError:
                return  # closed
            self.up.wait()  # while down, a new connection waits, as over a dead link
            far = socket.create_connection(("127.0.0.1", self.server.port))
            with self.lock:
                self.connections += [near, far]
                if self.slow_from_now:
                    self.slowed |= {near, far}
            for source, sink in ((near, far), (far, near)):
                threading.Thread(
                    target=self.relay, args=(source, sink), daemon=True
                ).start()

    def relay(self, source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                if source in self.slowed:
                    time.sleep(SLOWED_S)
                if not self.hung.is_set() and source not in self.dead:
                    sink.sendall(data)

    def down(self) -> None:
        """Every connection reset; new ones wait until `back`."""
        self.up.clear()
        with self.lock:
            cut, self.connections = self.connections, []
        for sock in cut:
            # SO_LINGER 0: close() sends a reset. Shutting reads first wakes the thread
            # reading it, which would otherwise hold the socket open.
            sock.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
            )
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RD)
            sock.close()

    def hang(self) -> None:
        """Nothing gets through, and nothing tells either side: a link gone dead."""
        self.hung.set()

    def hang_those_open(self) -> None:
        """The connections open now go dead, as one NAT mapping lost: new ones work."""
        with self.lock:
            self.dead = set(self.connections)

    def slow_those_open(self) -> None:
        """What the connections open now carry, either way, waits SLOWED_S."""
        with self.lock:
            self.slowed = set(self.connections)

    def back(self) -> None:
        self.hung.clear()
        self.up.set()

    def close(self) -> None:
        self.listener.close()
        self.down()
        self.back()


SLOWED_S = 1.0  # by Network.slow_those_open


@pytest.fixture
def network(server: Server) -> Iterator[Network]:
    proxy = Network(server)
    yield proxy
    proxy.close()


@pytest.mark.parametrize(
    "before", [["before"], []], ids=["after-a-message", "before-any-message"]
)
def test_rooms_page_back_from_a_dropped_connection_asks_for_what_it_missed(
    open_tab, network: Network, server: Server, before: list[str]
) -> None:
    # Before any message, the page's `since` is the welcome's last_id.
    alice = open_tab("?endpoint=rooms&room=lobby&client_id=1")
    bob = open_tab("?endpoint=rooms&room=lobby&client_id=2", port=network.port)
    for text in before:
        send(alice, text)
    expect(messages(bob)).to_have_text([f"Client #1: {text}" for text in before])
    # Open is not welcomed: cut before the welcome, and bob has no `since` yet.
    expect(bob.locator("#members")).to_have_text("#1, #2")
    network.down()
    expect(bob.locator("#status")).to_contain_text("code 1006")  # no close frame
    # While bob is away, more than a welcome without `since` holds (50).
    away = [f"away {i}" for i in range(60)]
    alice.evaluate(
        "texts => texts.forEach((text) => socket.send(JSON.stringify({ text })))", away
    )
    expect(messages(alice)).to_have_count(len(before) + len(away))
    network.back()
    expect(bob.locator("#status")).to_have_attribute("data-state", "connected")
    send(alice, "after")
    said = [*before, *away, "after"]
    expect(messages(bob)).to_have_text([f"Client #1: {text}" for text in said])
    assert "/rooms/lobby/2?since=" in server.log()


@pytest.mark.parametrize(
    ("endpoint", "shown"),
    [("rooms&room=lobby", "Not delivered"), ("chat", "Not confirmed")],
    ids=["room", "chat"],
)
def test_a_message_sent_into_a_dead_connection_is_shown_as_such(
    open_tab, network: Network, endpoint: str, shown: str
) -> None:
    # The page sees nothing wrong until the link is reset: its box is cleared all the
    # same. A room's welcome, back, shows it never arrived; the chat, no "You wrote".
    page = open_tab(f"?endpoint={endpoint}&client_id=2", port=network.port)
    send(page, "before")
    expect(messages(page).last).to_contain_text("before")
    network.hang()
    send(page, "into the void")
    expect(page.locator("#messageText")).to_have_value("")
    network.down()
    network.back()
    expect(page.locator("#status")).to_have_attribute("data-state", "connected")
    expect(page.locator("#messages li.missed")).to_have_text(
        [f"{shown}: into the void"]
    )


CONFIRM_TIMEOUT_MS = 12_000  # index.html's
RETIRING_WAIT_MS = 12_000  # index.html's


@pytest.mark.parametrize(
    ("endpoint", "shown"),
    [("rooms&room=lobby", "Not delivered"), ("chat", "Not confirmed")],
    ids=["room", "chat"],
)
def test_a_connection_that_confirms_nothing_is_replaced_and_its_message_reported(
    open_tab, network: Network, server: Server, endpoint: str, shown: str
) -> None:
    # A link that carries nothing and tells nobody: the page stayed "connected" on it
    # for good, and what was sent into it was never reported.
    alice = open_tab(f"?endpoint={endpoint}&client_id=1")
    page = open_tab(f"?endpoint={endpoint}&client_id=2", port=network.port, clock=True)
    handshakes = server.log().count("[accepted]")
    replaced = lambda: page.clock.run_for(CONFIRM_TIMEOUT_MS)
    sent_into_a_dead_link_then(page, network, replaced)
    wait_for_log(server, "[accepted]", count=handshakes + 1)
    send(alice, "after")  # on the new connection, after a room's welcome
    expect(messages(page).last).to_contain_text("after")
    page.clock.run_for(RETIRING_WAIT_MS)
    expect(page.locator("#messages li.missed")).to_have_text(
        [f"{shown}: into the void"]
    )


def test_a_connection_still_bringing_messages_is_not_taken_for_dead(
    open_tab, network: Network, server: Server
) -> None:
    # Its "You wrote" behind what a slow link still brings: replaced at 12 s, the
    # connection's messages after the new one opened were never shown.
    alice = open_tab("?endpoint=chat&client_id=1")
    page = open_tab("?endpoint=chat&client_id=2", port=network.port, clock=True)
    handshakes = server.log().count("[accepted]")
    with network.lock:  # what the page sends now is lost: its "You wrote" never comes
        network.dead = {network.connections[-2]}  # the page's side of the WebSocket
    send(page, "hello")
    for second in range(CONFIRM_TIMEOUT_MS // 1000 + 3):
        send(alice, f"second {second}")
        expect(messages(page).last).to_have_text(f"Client #1 says: second {second}")
        page.clock.run_for(1000)
    assert server.log().count("[accepted]") == handshakes  # not replaced
    expect(page.locator("#status")).to_have_text("connected (/chat/2)")


def sent_into_a_dead_link_then(
    page: "Page", network: Network, replace: Callable[[], None]
) -> None:
    """Sends "into the void" into the page's connection, gone dead alone; then the page
    replaces it (`replace`), and the new one is open."""
    network.hang_those_open()
    send(page, "into the void")
    replace()
    expect(page.locator("#status")).to_have_attribute("data-state", "connected")


@pytest.mark.parametrize(
    ("since", "notices", "unconfirmed"),
    [("'0-1'", [MISSED], []), ("null", [], ["Not confirmed: mine"])],
    ids=["unplaceable-since", "no-since"],
)
def test_a_room_message_the_welcome_cannot_account_for_is_not_called_undelivered(
    open_tab, network: Network, since: str, notices: list[str], unconfirmed: list[str]
) -> None:
    # Delivered, and then past what a welcome without `since` holds (the latest 50): the
    # page said "Not delivered", where it cannot know; nor does the welcome (a page
    # whose first welcome never came). One with a `since` the room cannot place holds
    # all the room does: "mine" is in it, and confirmed.
    alice = open_tab("?endpoint=rooms&room=lobby&client_id=1")
    page = open_tab(
        "?endpoint=rooms&room=lobby&client_id=2", port=network.port, clock=True
    )
    with network.lock:  # what the server sends on it is lost; what the page sends goes
        network.dead = {network.connections[-1]}  # the server's side of the WebSocket
    send(page, "mine")
    expect(messages(alice)).to_have_text(["Client #2: mine"])
    later = [f"later {i}" for i in range(51)]
    alice.evaluate(
        "texts => texts.forEach((text) => socket.send(JSON.stringify({ text })))", later
    )
    expect(messages(alice)).to_have_count(1 + len(later))
    page.evaluate(f"lastId = {since}")
    page.clock.run_for(CONFIRM_TIMEOUT_MS)  # "mine" unconfirmed: replaced
    expect(messages(page).last).to_have_text("Client #1: later 50")  # welcomed
    expect(page.locator("#messages li.missed")).to_have_text(notices)
    page.clock.run_for(RETIRING_WAIT_MS)
    expect(page.locator("#messages li.missed")).to_have_text([*notices, *unconfirmed])


@pytest.mark.parametrize("endpoint", ["rooms&room=lobby", "chat"])
def test_a_message_in_flight_when_the_user_disconnects_is_reported(
    open_tab, network: Network, endpoint: str
) -> None:
    # No welcome comes after Disconnect to say what became of it: a room's was unsaid.
    page = open_tab(f"?endpoint={endpoint}&client_id=2", port=network.port)
    network.hang()
    send(page, "in flight")
    page.click("#disconnect")
    expect(page.locator("#status")).to_have_text("disconnected (closed by the user)")
    expect(page.locator("#messages li.missed")).to_have_text(
        ["Not confirmed: in flight"]
    )


@pytest.mark.parametrize("endpoint", ["rooms&room=lobby", "chat"])
def test_a_message_in_flight_when_another_tab_takes_over_is_reported(
    open_tab, network: Network, endpoint: str
) -> None:
    # Taken over (4000), a room's page is welcomed no more: its message was unsaid.
    page = open_tab(f"?endpoint={endpoint}&client_id=2", port=network.port)
    with network.lock:  # what the page sends on it is lost
        network.dead = {network.connections[-2]}  # the page's side of the WebSocket
    send(page, "in flight")
    open_tab(f"?endpoint={endpoint}&client_id=2")
    expect(page.locator("#status")).to_contain_text("code 4000")
    expect(page.locator("#messages li.missed")).to_have_text(
        ["Not confirmed: in flight"]
    )


def shown_before_and_past_settling(page: "Page", shown: list[str]) -> None:
    """These messages, and still only these past SETTLE_MS, when what was not delivered
    is shown."""
    expect(messages(page)).to_have_text(shown)
    page.clock.run_for(10_000)
    expect(messages(page)).to_have_text(shown)


def test_a_room_message_sent_before_the_welcome_is_not_shown_as_undelivered(
    open_tab,
) -> None:
    # Held by the server until the page is let in, it comes after the welcome, live.
    page = open_tab("?endpoint=rooms&room=lobby&client_id=1", clock=True)
    page.evaluate(
        """() => {
          connectNow();
          socket.addEventListener("open", () => {
            messageText.value = "on open";
            sendMessage(new Event("submit"));
          });
        }"""
    )
    shown_before_and_past_settling(page, ["Client #1: on open"])


def test_a_chat_message_on_a_connection_replaced_by_connect_is_not_lost_unsaid(
    open_tab, network: Network
) -> None:
    # The replaced connection's messages are settled when it closes, not forgotten.
    page = open_tab("?endpoint=chat&client_id=2", port=network.port)
    send(page, "before")
    expect(messages(page)).to_have_text(["You wrote: before", "Client #2 says: before"])
    network.hang()
    send(page, "into the void")
    page.click("#connect")
    network.down()
    network.back()
    expect(page.locator("#status")).to_have_attribute("data-state", "connected")
    expect(page.locator("#messages li.missed")).to_have_text(
        ["Not confirmed: into the void"]
    )


def send_then_connect_as(page: "Page", text: str, client_id: int) -> None:
    """Send, then connect under another id, in one turn of the page's event loop: the
    answer to what was sent comes after the new connection has begun."""
    page.evaluate(
        """([text, clientId]) => {
          messageText.value = text;
          sendMessage(new Event("submit"));
          clientIdInput.value = clientId;
          connectNow();
        }""",
        [text, str(client_id)],
    )


def test_the_copy_of_a_room_message_confirms_it_under_another_id_since(
    open_tab,
) -> None:
    # Sent as #7, its copy names #7, whatever id the page has connected with since.
    page = open_tab("?endpoint=rooms&room=lobby&client_id=7", clock=True)
    send_then_connect_as(page, "hello", client_id=8)
    expect(page.locator("#status")).to_have_text("connected (/rooms/lobby/8)")
    shown_before_and_past_settling(page, ["Client #7: hello"])


def room_tab_through(open_tab, network: Network, client_id: int) -> "Page":
    """A page in the lobby, through `network`, on a clock the test moves."""
    query = f"?endpoint=rooms&room=lobby&client_id={client_id}"
    return open_tab(query, port=network.port, clock=True)


def test_the_same_text_sent_again_after_a_reconnect_leaves_the_lost_one_reported(
    open_tab, network: Network
) -> None:
    # The copy of the second confirms the second, sent on its connection: the first,
    # sent into the dead one, is the one reported.
    page = room_tab_through(open_tab, network, client_id=2)
    network.hang()
    send(page, "ok")
    network.down()
    network.back()
    expect(page.locator("#status")).to_contain_text("code 1006")  # seen: it retries
    page.clock.run_for(1000)  # the first retry, at 0.5 s at most
    expect(page.locator("#status")).to_have_attribute("data-state", "connected")
    send(page, "ok")
    expect(messages(page)).to_have_text(["Client #2: ok"])
    page.clock.run_for(10_000)  # past SETTLE_MS after the welcome
    expect(page.locator("#messages li.missed")).to_have_text(["Not delivered: ok"])


def test_chat_messages_on_a_connection_connect_replaces_show_until_the_new_one_opens(
    open_tab, network: Network
) -> None:
    # The chat keeps nothing for a page that comes back: what the old connection gets
    # before the new one opens is shown, not dropped.
    alice = open_tab("?endpoint=chat&client_id=1")
    bob = open_tab("?endpoint=chat&client_id=2", port=network.port)
    network.up.clear()  # a new connection waits; the open one goes on
    bob.click("#connect")
    expect(bob.locator("#status")).to_have_text("connecting")
    send(alice, "meanwhile")
    # Before the new one opens: one that comes after, on a slow link, is not shown.
    expect(messages(bob)).to_have_text(["Client #1 says: meanwhile"])
    network.up.set()
    expect(bob.locator("#status")).to_have_attribute("data-state", "connected")
    send(alice, "after")
    expect(messages(bob)).to_have_text(
        ["Client #1 says: meanwhile", "Client #1 says: after"]
    )


HANDSHAKE_TIMEOUT_MS = 10_000  # index.html's


UNANSWERED = "no answer in 10 s: the server is busy, or cannot start (see its log)"


def test_a_handshake_that_never_gets_through_is_given_up_and_tried_again(
    open_tab, network: Network
) -> None:
    # The network takes the connection, and carries nothing of it: the page stayed
    # "connecting" for good, and never tried again. Then, as under --reload while
    # main.py cannot be imported, it gave up after 5 tries: fixed, it stayed away.
    page = open_tab("?endpoint=chat&client_id=1", port=network.port, clock=True)
    network.up.clear()  # a new connection waits; the open one goes on
    page.click("#connect")
    status = page.locator("#status")
    expect(status).to_have_text("connecting")
    page.clock.run_for(HANDSHAKE_TIMEOUT_MS)
    expect(status).to_contain_text(f"{UNANSWERED}; retrying")
    for _ in range(6):
        page.clock.run_for(HANDSHAKE_TIMEOUT_MS + ALL_RETRY_DELAYS_MS)
        expect(status).not_to_contain_text("gave up")
    for _ in range(HANDSHAKE_TIMEOUT_MS // 1000):  # to a wait: the next try is whole
        if "retrying" in status.inner_text():
            break
        page.clock.run_for(1000)
    network.up.set()
    page.clock.run_for(ALL_RETRY_DELAYS_MS)
    expect(status).to_have_text("connected (/chat/1)")


def say_around_a_replacement(
    alice: "Page",
    bob: "Page",
    network: Network,
    server: Server,
    path: str,
    texts: tuple[str, str, str],
) -> None:
    """Bob's Connect replaces its connection, through `network`: alice says the first
    text before the new one is in, the second once it is in but before its open reaches
    bob (both of bob's connections get it), the third once it is open, then "the end"."""
    accepted = f'"WebSocket {path}" [accepted]'
    accepted_before = server.log().count(accepted)
    network.slow_from_now = True  # the new connection's bytes wait SLOWED_S each way
    bob.click("#connect")
    send(alice, texts[0])
    wait_for_log(server, accepted, count=accepted_before + 1)
    send(alice, texts[1])
    expect(bob.locator("#status")).to_have_attribute("data-state", "connected")
    send(alice, texts[2])
    send(alice, "the end")  # once shown, all before it are
    expect(messages(bob).filter(has_text="the end")).to_have_count(1)


@pytest.mark.parametrize(
    ("endpoint", "new_id", "path", "says"),
    [
        ("anonymous", None, "/chat/", "Someone said"),
        ("chat", "3", "/chat/3", "Client #2 says"),
    ],
    ids=["anonymous", "under-another-id"],
)
def test_chat_messages_while_connect_replaces_a_connection_are_shown_once(
    open_tab,
    network: Network,
    server: Server,
    endpoint: str,
    new_id: str | None,
    path: str,
    says: str,
) -> None:
    # Said before the new connection is in, only the old one gets it: it was not shown
    # under another id. Said once it is in, before its open reaches the page, both get
    # it: the anonymous chat showed it twice.
    alice = open_tab(f"?endpoint={endpoint}&client_id=2")
    bob = open_tab(f"?endpoint={endpoint}&client_id=1", port=network.port)
    if new_id is not None:
        bob.fill("#clientId", new_id)
    texts = ("before it is in", "once it is in", "after")
    say_around_a_replacement(alice, bob, network, server, path, texts)
    said = [f"{says}: {text}" for text in texts]
    shown = [text for text in messages(bob).all_inner_texts() if text in said]
    assert shown == said


def test_the_same_text_said_again_while_connect_replaces_a_connection_is_not_lost(
    open_tab, network: Network, server: Server
) -> None:
    # Each "same" the old connection showed stood for one the new one got: the last,
    # said once the new one was open, was skipped too, never shown. (A notice that the
    # old one left, between them, would have ended the skipping.)
    alice = open_tab("?endpoint=anonymous")
    bob = open_tab("?endpoint=anonymous", port=network.port)
    with network.lock:  # what bob sends on it is lost: the server never hears it leave
        network.dead = {network.connections[-2]}  # its side of bob's WebSocket
    say_around_a_replacement(alice, bob, network, server, "/chat/", ("same",) * 3)
    shown = messages(bob).all_inner_texts()
    assert shown.count("Someone said: same") >= 3  # maybe one twice: none unshown


def test_a_welcome_on_a_connection_replaced_while_it_opened_is_not_shown(
    open_tab, network: Network
) -> None:
    # Connect pressed twice: the first new connection, replaced before it opened, is
    # welcomed all the same; only the newest one's welcome says what was missed.
    page = open_tab("?endpoint=rooms&room=lobby&client_id=1", port=network.port)
    network.up.clear()  # new connections wait
    page.evaluate("lastId = '0-1'")  # an id no room has: each welcome says missed
    page.click("#connect")
    page.click("#connect")
    network.up.set()
    expect(page.locator("#status")).to_have_attribute("data-state", "connected")
    page.wait_for_timeout(1000)  # both welcomes in
    expect(page.locator("#messages li.missed")).to_have_text([MISSED])


@pytest.mark.parametrize(
    ("endpoint", "shown", "settled_ms"),
    [("rooms&room=lobby", "Not delivered", 13_000), ("chat", "Not confirmed", 13_000)],
    ids=["room", "chat"],
)
def test_a_message_sent_into_a_connection_gone_dead_alone_is_shown_as_such(
    open_tab, network: Network, endpoint: str, shown: str, settled_ms: int
) -> None:
    # Only this connection's link is dead: the browser waits 60 s for its close to
    # be answered. The page reports it RETIRING_WAIT_MS after the new one's welcome, in
    # a room; after the new one opened, in the chat.
    page = open_tab(f"?endpoint={endpoint}&client_id=2", port=network.port, clock=True)
    sent_into_a_dead_link_then(page, network, lambda: page.click("#connect"))
    page.wait_for_timeout(500)  # a room's welcome in
    page.clock.run_for(settled_ms)
    expect(page.locator("#messages li.missed")).to_have_text(
        [f"{shown}: into the void"]
    )


def test_a_chat_message_confirmed_after_connect_under_another_id_is_not_reported(
    open_tab, network: Network
) -> None:
    # Closed as the new connection opens, the old one would drop its "You wrote".
    bob = open_tab("?endpoint=chat&client_id=1", port=network.port, count_closes=True)
    network.slow_those_open()
    send(bob, "hello")
    bob.fill("#clientId", "3")
    bob.click("#connect")
    expect(bob.locator("#status")).to_have_text("connected (/chat/3)")
    bob.wait_for_function("window.closedSockets === 1")  # the old one, and its report
    expect(messages(bob)).to_have_text(
        ["Client #1 says: hello", "Client #1 left the chat"]
    )


def test_a_connection_waiting_for_its_you_wrote_lets_the_others_wait_their_turn(
    open_tab, network: Network
) -> None:
    # Each replaced connection waits on its own clock: the first one's end closes none
    # that a connection still opening has yet to take over.
    alice = open_tab("?endpoint=chat&client_id=1")
    bob = open_tab("?endpoint=chat&client_id=2", port=network.port, clock=True)
    network.hang_those_open()
    send(bob, "lost")
    bob.click("#connect")
    expect(bob.locator("#status")).to_have_text("connected (/chat/2)")
    bob.clock.run_for(11_000)
    network.up.clear()  # the next connection waits
    bob.click("#connect")
    bob.clock.run_for(2000)  # the first one gives up waiting
    expect(bob.locator("#messages li.missed")).to_have_text(["Not confirmed: lost"])
    network.up.set()
    expect(bob.locator("#status")).to_have_text("connected (/chat/2)")
    send(alice, "after")
    expect(messages(bob).last).to_have_text("Client #1 says: after")
    expect(messages(alice)).to_have_text(["You wrote: after", "Client #1 says: after"])


def test_a_room_message_on_its_way_through_a_slow_link_is_not_reported(
    open_tab, network: Network
) -> None:
    # Sent as #7 on a link slower than SETTLE_MS, its copy comes to the page as #8.
    page = room_tab_through(open_tab, network, client_id=7)
    network.slow_those_open()
    send(page, "hello")
    page.fill("#clientId", "8")
    page.click("#connect")
    expect(page.locator("#status")).to_have_text("connected (/rooms/lobby/8)")
    expect(page.locator("#members")).to_contain_text("#8")  # welcomed
    page.clock.run_for(2500)  # past SETTLE_MS after the welcome
    expect(messages(page)).to_have_text(["Client #7: hello"])
    page.clock.run_for(13_000)  # past RETIRING_WAIT_MS
    expect(messages(page)).to_have_text(["Client #7: hello"])


def test_a_chat_page_connecting_under_another_id_shows_no_message_twice(
    open_tab, network: Network, server: Server
) -> None:
    # Both of its connections get what is said once the new one is in, before the page
    # has seen it open: the old one's are not shown then.
    alice = open_tab("?endpoint=chat&client_id=1")
    bob = open_tab("?endpoint=chat&client_id=2", port=network.port)
    network.slow_from_now = True
    bob.fill("#clientId", "3")
    bob.click("#connect")
    wait_for_log(server, '"WebSocket /chat/3" [accepted]')  # in, not yet seen open
    send(alice, "during")
    expect(bob.locator("#status")).to_have_text("connected (/chat/3)")
    send(alice, "last")
    expect(messages(bob).last).to_have_text("Client #1 says: last")
    assert messages(bob).all_inner_texts().count("Client #1 says: during") == 1


def test_a_chat_page_connecting_under_another_id_shows_what_it_wrote_meanwhile(
    open_tab, network: Network
) -> None:
    # Its "You wrote" comes on the old connection alone, while the new one opens.
    bob = open_tab("?endpoint=chat&client_id=2", port=network.port)
    network.slow_from_now = True
    send_then_connect_as(bob, "mine", client_id=3)
    expect(bob.locator("#status")).to_have_text("connected (/chat/3)")
    expect(messages(bob).first).to_have_text("You wrote: mine")


def test_connect_pressed_while_connected_tells_nobody_the_page_left(open_tab) -> None:
    # The new connection takes the old one over before it is closed: no leave notice.
    alice = open_tab("?endpoint=chat&client_id=1")
    bob = open_tab("?endpoint=chat&client_id=2", count_closes=True)
    for pressed in range(1, 4):
        bob.click("#connect")
        expect(bob.locator("#status")).to_have_attribute("data-state", "connected")
        bob.wait_for_function("n => window.closedSockets === n", arg=pressed)
    send(bob, "still here")
    expect(messages(alice)).to_have_text(["Client #2 says: still here"])


def to_the_kitchen_and_straight_back(page: "Page") -> None:
    """From the lobby to the kitchen and back, in one turn of the page's event loop."""
    page.evaluate(
        """() => {
          roomInput.value = "kitchen";
          connectNow();
          roomInput.value = "lobby";
          connectNow();
        }"""
    )


def test_another_room_and_straight_back_tells_the_room_nothing(open_tab) -> None:
    # The connection to the first room is closed only once the newest one is open.
    peer = open_tab("?endpoint=rooms&room=lobby&client_id=2")
    page = open_tab("?endpoint=rooms&room=lobby&client_id=1")
    expect(peer.locator("#members")).to_have_text("#1, #2")
    shown = peer.evaluate_handle(SHOWN_TEXTS, "members")
    statuses = page.evaluate_handle(SHOWN_TEXTS, "status")
    to_the_kitchen_and_straight_back(page)
    expect(page.locator("#members")).to_have_text("#1, #2")
    send(page, "back")
    expect(messages(peer)).to_have_text(["Client #1: back"])
    assert shown.evaluate("shown => shown.length") == 0
    # The kitchen's connection, replaced before it opened, never says it is connected.
    assert "kitchen" not in " ".join(statuses.evaluate("shown => shown"))


def test_a_room_left_and_rejoined_while_the_link_is_slow_shows_its_messages_in_order(
    open_tab, network: Network
) -> None:
    # The old connection to the lobby showed what came while the new one opened; the
    # new one's welcome, asked with no `since`, then added the messages before it.
    alice = open_tab("?endpoint=rooms&room=lobby&client_id=1")
    bob = open_tab("?endpoint=rooms&room=lobby&client_id=2", port=network.port)
    send(alice, "earlier")
    expect(messages(bob)).to_have_text(["Client #1: earlier"])
    network.up.clear()  # a new connection waits; the open one goes on
    to_the_kitchen_and_straight_back(bob)
    send(alice, "meanwhile")
    expect(messages(alice)).to_have_count(2)
    network.up.set()
    expect(bob.locator("#status")).to_have_attribute("data-state", "connected")
    send(alice, "after")
    said = ["earlier", "meanwhile", "after"]
    expect(messages(bob)).to_have_text([f"Client #1: {text}" for text in said])


def test_the_members_line_is_emptied_once_the_page_is_disconnected(open_tab) -> None:
    page = open_tab("?endpoint=rooms&room=lobby&client_id=1")
    expect(page.locator("#members")).to_have_text("#1")
    page.click("#disconnect")
    expect(page.locator("#members")).to_have_text("")


def test_a_long_room_name_in_a_link_stays_within_the_page_s_width(open_tab) -> None:
    # Shown in the status line, which did not wrap: the page grew 4,593 px wide.
    page = open_tab(f"?endpoint=rooms&room={'a' * 400}&client_id=1", connected=False)
    expect(page.locator("#status")).to_contain_text("a" * 400)
    width = (
        "document.documentElement.scrollWidth <= document.documentElement.clientWidth"
    )
    assert page.evaluate(width)


def test_a_page_opened_as_a_file_connects_to_the_tutorial_s_address(
    page: "Page",
) -> None:
    # No host to build the address from: the tutorial's page's own, localhost:8000.
    with page.expect_websocket() as opened:
        page.goto((HERE / "index.html").as_uri() + "?endpoint=echo")
    assert opened.value.url == "ws://localhost:8000/ws"


def caught_then_let_through(
    page: "Page", server: Server, problem: str, field: str, value: str, path: str
) -> str:
    """The page says what is wrong before trying; with `field` put right, it connects
    to `path`: a handshake from this page, after any it would have tried before. The
    server's log, for the test to count the handshakes in."""
    expect(page.locator("#status")).to_contain_text(f"disconnected ({problem}")
    page.fill(field, value)
    page.click("#connect")
    wait_for_log(server, f'"WebSocket {path}" [accepted]')
    return server.log()


def test_a_room_name_out_of_the_rule_is_caught_on_the_page(
    open_tab, server: Server
) -> None:
    page = open_tab("?endpoint=rooms&room=a%20b&client_id=1", connected=False)
    problem = 'room must be 1 to 100 letters, digits, "_", "." or "-"'
    log = caught_then_let_through(
        page, server, problem, "#room", "lobby", "/rooms/lobby/1"
    )
    assert log.count("WebSocket /rooms/") == 1


@pytest.mark.parametrize("item_id", ["..", ".", "", "a%2Fb"])
def test_an_item_id_no_address_keeps_is_caught_on_the_page(
    open_tab, server: Server, item_id: str
) -> None:
    # ".." would reach step 1's /ws, and the others no route at all.
    page = open_tab(f"?endpoint=items&item_id={item_id}&token=t", connected=False)
    problem = 'item ID must not be empty, "." or "..", nor hold "/"'
    path = "/items/foo/ws?token=t"
    log = caught_then_let_through(page, server, problem, "#itemId", "foo", path)
    assert log.count("WebSocket /") == 1


# --- The reader's --reload loop ------------------------------------------------------------------


class RestartingServer:
    """uvicorn on one port, stopped and started again as a reader's --reload does."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir, self.port, self.runs = log_dir, free_port(), 0
        self.server = self.start()

    def start(self) -> Server:
        self.runs += 1
        log = self.log_dir / f"run {self.runs}.log"
        self.server = start_server(log, port=self.port)
        return self.server


@pytest.fixture
def restarting(tmp_path: Path) -> Iterator[RestartingServer]:
    servers = RestartingServer(tmp_path)
    yield servers
    servers.server.stop()


@pytest.fixture
def page(browser: "Browser") -> Iterator["Page"]:
    tab = browser.new_page()
    yield tab
    tab.close()


def test_page_reconnects_after_a_server_restart(
    restarting: RestartingServer, page: "Page"
) -> None:
    page.goto(f"{restarting.server.http_url}/?endpoint=chat&client_id=1")
    status = page.locator("#status")
    expect(status).to_have_attribute("data-state", "connected")
    shown = page.evaluate_handle(SHOWN_TEXTS, "status")

    restarting.server.stop()
    expect(status).to_have_attribute("data-state", "disconnected")
    expect(status).to_contain_text("retrying in")
    # uvicorn's 1012 comes with no reason: the page says what it means.
    first = "disconnected (code 1012: server restarting; retrying in"
    assert shown.evaluate("shown => shown[0]").startswith(first)

    restarting.start()
    expect(status).to_have_attribute("data-state", "connected", timeout=10_000)
    send(page, "back again")
    expect(messages(page)).to_have_text(
        ["You wrote: back again", "Client #1 says: back again"]
    )


def say_in_a_room_then_stop_the_server(
    restarting: RestartingServer, page: "Page", text: str
):
    """Client #1 says `text` in the lobby; then the server stops, and with it the room's
    history, kept in that process. The page's status line."""
    page.goto(f"{restarting.server.http_url}/?endpoint=rooms&room=lobby&client_id=1")
    status = page.locator("#status")
    expect(status).to_have_attribute("data-state", "connected")
    send(page, text)
    expect(messages(page)).to_have_text([f"Client #1: {text}"])
    restarting.server.stop()
    return status


def test_rooms_page_that_gave_up_asks_for_what_it_missed_once_connected_again(
    restarting: RestartingServer, page: "Page"
) -> None:
    # Connect after the page gave up joined afresh, and said nothing of what it missed.
    status = say_in_a_room_then_stop_the_server(restarting, page, "before")
    expect(status).to_contain_text("gave up after", timeout=ALL_RETRY_DELAYS_MS * 2)
    server = restarting.start()
    page.click("#connect")
    expect(status).to_have_attribute("data-state", "connected")
    expect(messages(page)).to_have_text(["Client #1: before", MISSED])
    assert "/rooms/lobby/1?since=" in server.log()


def test_rooms_page_across_a_server_restart_says_what_it_missed(
    restarting: RestartingServer, page: "Page"
) -> None:
    status = say_in_a_room_then_stop_the_server(restarting, page, "before the restart")
    expect(status).to_contain_text("retrying in")
    server = restarting.start()
    expect(status).to_have_attribute("data-state", "connected", timeout=10_000)
    assert "/rooms/lobby/1?since=" in server.log()
    send(page, "after the restart")
    expect(messages(page)).to_have_text(
        ["Client #1: before the restart", MISSED, "Client #1: after the restart"]
    )
    expect(page.locator("#messages li.missed")).to_have_count(1)
