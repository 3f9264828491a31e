"""The harness for tests and bench.py: uvicorn on a free loopback port, and raw clients."""

import asyncio
import base64
import concurrent.futures
import contextlib
import json
import os
import re
import resource
import select
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from starlette.types import Message, Send
from starlette.websockets import WebSocket, WebSocketState
from uvicorn.config import STARTUP_FAILURE
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

import main

# main.py reads these as it is imported, and so do the servers the tests start: each
# test sets what it needs, and a value left in the shell must not change what it checks.
for setting in ("REDIS_URL", "ANNOUNCE_TOKEN", "ALLOWED_ORIGINS"):
    os.environ.pop(setting, None)

HERE = Path(__file__).parent
README = HERE / "README.md"
STARTUP_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 5.0
TEST_TIMEOUT_S = 30.0  # an async scenario that takes longer fails instead of hanging


TEST_HARD_LIMIT_S = 60  # any test still running then has hung: fail it, move on

# What a client is told, word for word, as the README promises it: a typo in main.py
# fails the tests. (test_main.py checks that the README still says each of these.)
TOO_SLOW = "Too slow: over 100 messages behind"
TAKEN_OVER = "Replaced by a newer connection with the same client id"
FLOODING = "Flooding: over 10 messages (or KiB) a second"
TOO_MANY_ROOMS = "Too many rooms open (over 1000): try again later"
ROOM_FULL = "Room full (10000 members): try again later"
EXPECTED_JSON = 'Expected a JSON object with a non-empty string "text": {"text": "hi"}'
BINARY_REFUSED = "Binary frames are not supported: send text"
TOO_BIG = "Message over 65536 bytes"
REDIS_DOWN = "Chat unavailable: lost its Redis server; try again later"
SERVER_PAUSED = "Chat unavailable: this server was paused; try again later"
NOT_SENT = "Chat unavailable: the message was not sent; try again later"
README_REASONS = (
    *(TOO_SLOW, TAKEN_OVER, FLOODING, TOO_MANY_ROOMS, EXPECTED_JSON, BINARY_REFUSED),
    *(TOO_BIG, REDIS_DOWN, SERVER_PAUSED, NOT_SENT, ROOM_FULL),
)

# What the chat says, as patterns for the frames a test names as ones it ignores.
YOU_WROTE = r"You wrote: .*"
SAYS = r"Client #\d+ says: .*"
LEFT_THE_CHAT = r"Clients? #.* left the chat"


def pytest_configure(config: pytest.Config) -> None:
    # A warning today is tomorrow's breakage: the suite fails on any.
    config.addinivalue_line("filterwarnings", "error")
    # A plain `pytest` says why tests were skipped (no Chromium, no redis-server).
    if "s" not in config.option.reportchars:
        config.option.reportchars += "s"
    raise_open_files_limit()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        item.add_marker(pytest.mark.timeout(TEST_HARD_LIMIT_S))


def raise_open_files_limit() -> int:
    """Raise this process's soft limit on open files to the hard limit; return it.

    Each WebSocket costs a file descriptor at each end: thousands of clients need more
    than the usual soft limit of 1,024.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def readme_command(start: str) -> tuple[str, ...]:
    """The options of the README's command line that begins with `start`.

    The tests run uvicorn as the README tells readers to, flag for flag; --host and
    --port are left out, since the tests pick a free loopback port of their own, and
    --workers, since the tests start each worker themselves.
    """
    lines = [line for line in README.read_text().splitlines() if line.startswith(start)]
    assert len(lines) == 1, f"README.md has {len(lines)} lines starting {start!r}"
    words = shlex.split(lines[0])
    words = words[words.index("main:app") + 1 :]  # after `[VAR=value] uvicorn main:app`
    options: list[str] = []
    while words:
        word = words.pop(0)
        if word in ("--host", "--port", "--workers"):
            words.pop(0)
        else:
            options.append(word)
    return tuple(options)


def production_options() -> tuple[str, ...]:
    return readme_command("uvicorn main:app --host")


def redis_options() -> tuple[str, ...]:
    """The README's command for several processes sharing one chat through Redis."""
    return readme_command("REDIS_URL=")


def following_along_options() -> tuple[str, ...]:
    return readme_command("uvicorn main:app --reload")


HANDED_OUT_PORTS: set[int] = set()


def free_port() -> int:
    """A free loopback port, never 8000 (a reader's own `uvicorn main:app` may be there),
    nor one handed out before in this run: two servers started together, each told a
    port that was free a moment before, could otherwise both be told the same one."""
    while True:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        if port != 8000 and port not in HANDED_OUT_PORTS:
            HANDED_OUT_PORTS.add(port)
            return port


def failed_start_up(*options: str, **env: str) -> list[str]:
    """uvicorn started on main:app with these options and environment variables, which
    must make it stop at once, with uvicorn's status for a start that failed (0 from the
    parent of --workers): what it printed, line by line."""
    port = str(free_port())
    command = [sys.executable, "-m", "uvicorn", "main:app", "--port", port, *options]
    result = subprocess.run(
        command,
        check=False,
        cwd=HERE,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=STARTUP_TIMEOUT_S,
    )
    assert result.returncode == (0 if "--workers" in options else STARTUP_FAILURE)
    return (result.stdout + result.stderr).strip().splitlines()


def wait_for_port(port: int, process: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"server exited with code {process.returncode} before listening"
            )
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on port {port} after {timeout_s} s")


def process_cpu_seconds(pid: int) -> float:
    """User plus system CPU time a process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    user, system = int(fields[11]), int(fields[12])
    return (user + system) / os.sysconf("SC_CLK_TCK")


def process_rss_bytes(pid: int, field: str = "VmRSS") -> int:
    """Resident memory now; with field="VmHWM", at its highest since the process began."""
    status = Path(f"/proc/{pid}/status").read_text()
    line = next(line for line in status.splitlines() if line.startswith(f"{field}:"))
    return int(line.split()[1]) * 1024


@dataclass
class Server:
    """A running uvicorn process, and everything it logged."""

    port: int
    process: subprocess.Popen
    log_path: Path

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text()

    def cpu_seconds(self) -> float:
        return process_cpu_seconds(self.process.pid)

    def rss_bytes(self) -> int:
        return process_rss_bytes(self.process.pid)

    def peak_rss_bytes(self) -> int:
        return process_rss_bytes(self.process.pid, "VmHWM")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_server(
    log_path: Path,
    port: int | None = None,
    app: str = "main:app",
    options: tuple[str, ...] = (),
    cwd: Path = HERE,
    **env: str,
) -> Server:
    """Start `uvicorn app` with extra command-line options and environment variables."""
    server = launch_server(log_path, port, app, options, cwd, **env)
    wait_until_listening(server)
    return server


def launch_server(
    log_path: Path,
    port: int | None = None,
    app: str = "main:app",
    options: tuple[str, ...] = (),
    cwd: Path = HERE,
    **env: str,
) -> Server:
    """`uvicorn app`, started but maybe not listening yet: see wait_until_listening."""
    port = port or free_port()
    address = ("--host", "127.0.0.1", "--port", str(port))
    command = [sys.executable, "-m", "uvicorn", app, *address, *options]
    with log_path.open("a") as log:  # uvicorn keeps its own copy of the file handle
        process = subprocess.Popen(
            command,
            cwd=cwd,
            env={**os.environ, **env},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    return Server(port, process, log_path)


def wait_until_listening(server: Server) -> None:
    try:
        wait_for_port(server.port, server.process, STARTUP_TIMEOUT_S)
    except (RuntimeError, TimeoutError):
        server.stop()
        raise RuntimeError(f"uvicorn did not start:\n{server.log()}") from None


# main.py's one WARNING line, without its traceback, for any record carrying a
# CancelledError, and for uvicorn's line when a graceful shutdown gives up.
CANCELLED_HANDLER = "Cancelled a handler still running when the graceful shutdown ended"
SHUTDOWN_GAVE_UP = "Shut down without waiting any longer"


def assert_nothing_went_wrong(server: Server, shutdown_gave_up: bool = False) -> None:
    """No traceback and no ERROR line: clients leaving, however rudely, are ordinary.

    Nor a cancelled handler, unless the test made a graceful shutdown give up: main.py
    logs any CancelledError as that one WARNING line, so elsewhere it could hide a bug.
    """
    log = server.log()
    assert "Traceback" not in log, log
    assert "ERROR" not in log, log
    assert "Unclosed" not in log, log  # asyncio's, or redis-py's: a resource leaked
    if not shutdown_gave_up:
        assert CANCELLED_HANDLER not in log, log
        assert SHUTDOWN_GAVE_UP not in log, log


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    """uvicorn with the README's production flags."""
    running = start_server(tmp_path / "uvicorn.log", options=production_options())
    yield running
    stop_with_no_traceback(running)


def stop_with_no_traceback(server: Server) -> None:
    """Stopped; and nothing it ran, up to its end, raised past main.py's handlers, in
    whatever test, checked or not."""
    server.stop()
    assert "Traceback" not in server.log(), server.log()


def wait_for_log(
    server: Server, text: str, count: int = 1, timeout_s: float = STARTUP_TIMEOUT_S
) -> None:
    """Until `text` has appeared `count` times in the server's log."""
    deadline = time.monotonic() + timeout_s
    while server.log().count(text) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{text!r} not logged {count} times:\n{server.log()}")
        time.sleep(0.05)


@dataclass
class RedisServer:
    """A throwaway `redis-server` on loopback, with persistence off."""

    executable: str
    port: int
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        options = ["--bind", "127.0.0.1", "--port", str(self.port), "--save", ""]
        options += ["--appendonly", "no"]
        self.process = subprocess.Popen(
            [self.executable, *options], stdout=subprocess.DEVNULL
        )
        wait_for_port(self.port, self.process, STARTUP_TIMEOUT_S)

    def pause(self) -> None:
        """Hung, not dead: connections stay open and nothing answers, as in a partition."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def kill(self) -> None:
        """Gone at once, as after a crash: no goodbye to its clients."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    executable = require_program(
        "redis-server", "install it with: apt-get install redis-server"
    )
    server = RedisServer(executable, free_port())
    server.start()
    yield server
    server.kill()


def require_program(path_or_name: str, install_hint: str) -> str:
    """The program's path; skipped with a hint when it is missing, but failed under CI=true."""
    found = shutil.which(path_or_name)
    if found:
        return found
    message = f"no {path_or_name} found: {install_hint}"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


# --- A real browser -------------------------------------------------------------------

# Where to look for a Chromium, after the CHROMIUM environment variable (a path).
CHROMIUM_NAMES = (
    "chromium",
    "chromium-browser",
    "google-chrome",
    "google-chrome-stable",
)
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

try:
    from playwright.sync_api import expect
except ImportError:  # the browser fixture says what to do
    expect = None


def find_chromium() -> str:
    """CHROMIUM if set, else the first Chromium on PATH; skipped (failed under CI) if none."""
    hint = "install one (Debian: apt-get install chromium), or set CHROMIUM to its path"
    if os.environ.get("CHROMIUM"):
        return require_program(os.environ["CHROMIUM"], hint)
    for name in CHROMIUM_NAMES:
        if shutil.which(name):
            return shutil.which(name)
    return require_program("chromium", hint)


# One for the whole run: Playwright's sync API keeps an event loop running in this
# thread, and every async scenario of the other tests runs in a thread of its own (`run`).
@pytest.fixture(scope="session")
def browser() -> Iterator:
    if expect is None:
        message = "playwright is not installed: pip install -r requirements-test.txt"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    executable = find_chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=executable, headless=True, args=CHROMIUM_ARGS
        )
        yield chromium
        chromium.close()


# --- A raw WebSocket client, for clients that misbehave ------------------------------------


ETHERNET_SEGMENT_BYTES = 1460  # TCP's payload in a 1,500-byte Ethernet frame


def raw_handshake(
    port: int,
    path: str,
    origin: str | None = None,
    rcvbuf: int | None = None,
    host: str | None = None,
    headers: tuple[str, ...] = (),
    ethernet: bool = True,
    answered: bool = True,
) -> tuple[socket.socket, bytes]:
    """Open a WebSocket by hand; return the socket and the server's HTTP response head.
    `host`: the Host header, as a page's address for the server has it; `headers`, more
    lines for the request, each "Name: value"; `ethernet`, with `rcvbuf`: see below.
    Not `answered`: the head is left for the test to read (response_head), as it sends
    other handshakes meanwhile."""
    sock = socket.socket()
    if rcvbuf is not None:
        # Set before connect, so the TCP window stays small: the client stalls sooner.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    if rcvbuf is not None and ethernet:
        # And an Ethernet's segments: for loopback's 64 KiB ones, Linux gave the
        # server's end 2.8 MB of send buffer, 0.08 MB for these.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, ETHERNET_SEGMENT_BYTES)
    sock.settimeout(10)
    sock.connect(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    head = (
        f"GET {path} HTTP/1.1\r\nHost: {host or f'127.0.0.1:{port}'}\r\n"
        "Upgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
    )
    if origin is not None:
        head += f"Origin: {origin}\r\n"
    head += "".join(f"{line}\r\n" for line in headers)
    sock.sendall((head + "\r\n").encode())
    return sock, response_head(sock) if answered else b""


def response_head(sock: socket.socket) -> bytes:
    """The server's HTTP response head, read off `sock`."""
    response = b""
    while b"\r\n\r\n" not in response:
        # Byte by byte: nothing past the head is taken off the wire.
        chunk = sock.recv(1)
        if not chunk:
            break
        response += chunk
    return response


def client_frame(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    """One frame as a client sends it: masked, as the protocol requires."""
    mask = os.urandom(4)
    length = len(payload)
    if length < 126:
        head = struct.pack("!BB", opcode | (0x80 if fin else 0), 0x80 | length)
    elif length < 1 << 16:
        head = struct.pack("!BBH", opcode | (0x80 if fin else 0), 0x80 | 126, length)
    else:
        head = struct.pack("!BBQ", opcode | (0x80 if fin else 0), 0x80 | 127, length)
    masked = bytes(byte ^ mask[i % 4] for i, byte in enumerate(payload))
    return head + mask + masked


def send_pings_reading_nothing(
    sock: socket.socket, most_bytes: int, most_s: float
) -> int:
    """Pings, as fast as the server takes them, and never a pong read: bytes sent."""
    pings = client_frame(0x9, b"p" * 125) * 1000  # 125 bytes: the most a ping holds
    sent, started = 0, time.monotonic()
    sock.settimeout(1)
    try:
        while sent < most_bytes and time.monotonic() - started < most_s:
            sent += sock.send(pings)
    except OSError:  # no longer read (a timeout), or closed (a reset)
        pass
    return sent


def flood_past_close(
    port: int, path: str, frames: bytes, most_s: float
) -> tuple[int, tuple[int, str] | None]:
    """Open `path`, and send `frames` again and again for most_s, reading and ignoring
    all the server sends, its close too, until it drops the connection: the bytes sent,
    and the server's close code and reason, if it sent one."""
    sock, head = raw_handshake(port, path)
    assert head.startswith(b"HTTP/1.1 101"), head
    sock.setblocking(False)
    sent, close, started = 0, bytearray(), time.monotonic()
    with sock, contextlib.suppress(OSError):  # dropped by the server
        while time.monotonic() - started < most_s:
            readable, writable, _ = select.select([sock], [sock], [], 0.1)
            if readable:
                answer = sock.recv(1 << 16)
                if not answer:
                    break
                if close:
                    close += answer[: 127 - len(close)]  # the rest of its frame
                elif (start := answer.find(0x88)) >= 0:  # no other answer holds it
                    close += answer[start:]
            if writable:
                sent += sock.send(frames)
    if len(close) < 4 or len(close) < 2 + close[1]:  # a close payload is < 126 bytes
        return sent, None
    return sent, close_code_and_reason(bytes(close[2 : 2 + close[1]]))


def send_unread(port: int, path: str, frames: bytes) -> socket.socket:
    """Open `path` with a small receive buffer, send `frames` until the server stops
    reading them (1 s with no room), and read nothing: the socket, still open."""
    sock, _ = raw_handshake(port, path, rcvbuf=4096)
    sock.settimeout(1)
    unsent = memoryview(frames)
    with contextlib.suppress(TimeoutError):
        while unsent:
            unsent = unsent[sock.send(unsent) :]
    return sock


def send_endless_header(port: int, most_bytes: int, most_s: float) -> int:
    """A request whose one header goes on, never ended, until the server answers or
    stops reading, or most_bytes, or most_s: the bytes of it sent."""
    with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
        sock.sendall(b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Endless: ")
        sent, started = 0, time.monotonic()
        with contextlib.suppress(OSError):  # answered and closed, or no longer read
            while sent < most_bytes and time.monotonic() - started < most_s:
                sent += sock.send(b"a" * 65536)
        return sent


FLOODER = """
import sys
from conftest import client_frame, flood_past_close
port, path, opcode, payload, most_s = sys.argv[1:]
frames = client_frame(int(opcode), payload.encode()) * 10_000
sent, close = flood_past_close(int(port), path, frames, float(most_s))
print(sent, close[0] if close else 0)
"""


def flooder_process(
    port: int, path: str, opcode: int, payload: str, most_s: float
) -> subprocess.Popen:
    """A client in a process of its own, sending one frame again and again for most_s
    (flood_past_close): a thread of the test's own process would share its interpreter
    lock with the clients measured beside it."""
    arguments = [str(port), path, str(opcode), payload, str(most_s)]
    return subprocess.Popen(
        [sys.executable, "-c", FLOODER, *arguments],
        cwd=HERE,
        stdout=subprocess.PIPE,
        text=True,
    )


def close_frame(code: int) -> bytes:
    return client_frame(0x8, struct.pack("!H", code))


def read_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError("connection closed mid-frame")
        data += chunk
    return data


def read_frame(sock: socket.socket) -> tuple[int, bytes]:
    """One server frame (servers never mask): its opcode and payload."""
    first, second = read_exactly(sock, 2)
    length = second & 0x7F
    if length == 126:
        (length,) = struct.unpack("!H", read_exactly(sock, 2))
    elif length == 127:
        (length,) = struct.unpack("!Q", read_exactly(sock, 8))
    return first & 0x0F, read_exactly(sock, length)


def close_code_and_reason(payload: bytes) -> tuple[int, str]:
    """What a close frame's payload says."""
    (code,) = struct.unpack("!H", payload[:2])
    return code, payload[2:].decode()


def read_until_close(sock: socket.socket, ignore: str | None = None) -> tuple[int, str]:
    """The close code and reason. A text frame before it fails the test unless it
    matches `ignore` (as in assert_ignored): for a client that stopped reading, the
    backlog of the chat it was sent."""
    while True:
        opcode, payload = read_frame(sock)
        if opcode == 0x8:
            return close_code_and_reason(payload)
        if opcode != 0x9:  # a ping is uvicorn's, not the app's
            assert opcode == 0x1, (opcode, payload[:80])
            assert_ignored(payload.decode(), ignore)


def reset(sock: socket.socket) -> None:
    """Vanish without a close frame: SO_LINGER 0 makes close() send a TCP reset."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


# --- Clients for tests that drive a real server ------------------------------------------


def open_client(url: str, **options) -> connect:
    """A `websockets` client that buffers all it receives.

    With its default bound, a test client the test has stopped reading would stop reading
    its socket too, and its closing handshake would wait out a 10 s timeout.
    """
    return connect(url, max_queue=None, **options)


def run(scenario, timeout_s: float = TEST_TIMEOUT_S, runner=asyncio.run):
    """Run an async scenario, failing rather than hanging if it takes too long.

    In a thread of its own: Playwright's sync API keeps an event loop running in this
    one, whichever test ran before. `runner` may be another loop's: `uvloop.run`.
    """

    async def bounded():
        async with asyncio.timeout(timeout_s):
            return await scenario

    with concurrent.futures.ThreadPoolExecutor(1) as thread:
        return thread.submit(runner, bounded()).result()


async def receive_says(
    websocket: ClientConnection,
    sender: int,
    count: int,
    ignore: str | None = None,
    ignored: list[str] | None = None,
) -> list[str]:
    """The next `count` messages `sender` broadcast; see receive_from_each."""
    received = await receive_from_each(websocket, {sender: count}, ignore, ignored)
    return received[sender]


async def receive_from_each(
    websocket: ClientConnection,
    counts: dict[int, int],
    ignore: str | None = None,
    ignored: list[str] | None = None,
    order: list[str] | None = None,
) -> dict[int, list[str]]:
    """What `websocket` receives from each sender, until it has `counts[sender]` of each;
    in `order`, if given, every one of them as it came.

    Any other frame fails the test, unless it matches `ignore` (a regular expression,
    matched whole): those go to `ignored`, if given.
    """
    received: dict[int, list[str]] = {sender: [] for sender in counts}
    while any(len(received[s]) < counts[s] for s in counts):
        message = await websocket.recv()
        said = re.fullmatch(r"Client #(\d+) says: (.*)", message, re.DOTALL)
        if said and int(said[1]) in received:
            received[int(said[1])].append(said[2])
            if order is not None:
                order.append(message)
        else:
            assert_ignored(message, ignore, ignored)
    return received


def assert_ignored(
    frame: str, ignore: str | None, ignored: list[str] | None = None
) -> None:
    """A frame the test did not wait for fails it, unless the test said to ignore it."""
    if ignore is None or not re.fullmatch(ignore, frame, re.DOTALL):
        raise AssertionError(f"unexpected frame: {frame[:300]!r}")
    if ignored is not None:
        ignored.append(frame)


async def closed_with(
    websocket: ClientConnection,
    ignore: str | None = None,
    into: list[str] | None = None,
) -> tuple[int, str]:
    """Read until the server closes the connection; its close code and reason.

    A frame before the close fails the test, unless the test collects them `into` a
    list, to check them itself, or names what it ignores (`ignore`, as above).
    """
    try:
        while True:
            message = await websocket.recv()
            if into is not None:
                into.append(message)
            else:
                assert_ignored(message, ignore)
    except ConnectionClosed as closed:
        assert closed.rcvd is not None, "closed without a close frame"
        return closed.rcvd.code, closed.rcvd.reason


# --- Clients outside any server, for the delivery's own tests -----------------------------


def client_writing_with(server_send: Send, client_id: int) -> main.Client:
    """A chat client outside any server, accepted: the manager's writes to it go to
    server_send, as they would go to uvicorn's `send`."""

    async def not_read() -> Message:
        raise AssertionError("the manager does not read from clients")

    websocket = WebSocket({"type": "websocket"}, not_read, server_send)
    websocket.application_state = WebSocketState.CONNECTED  # as after accept()
    return main.Client(websocket, client_id)


class Socket:
    """A client's socket as uvicorn's `send` sees it: a write waits while it is full."""

    def __init__(self) -> None:
        self.writable = asyncio.Event()
        self.writable.set()
        self.written: list[str] = []

    async def send(self, message: Message) -> None:
        await self.writable.wait()  # as uvicorn's does, before writing anything
        self.written.append(message["text"])


async def let_in_a_joiner(rooms: main.RoomManager, room: main.Room) -> Socket:
    """Client 7 joins the room through its doorkeeper; its socket, once it is in."""
    socket = Socket()
    room.joining.append((client_writing_with(socket.send, 7), None))
    rooms.call_the_doorkeeper(room)
    while 7 not in room.chat.clients:
        await asyncio.sleep(0)
    return socket


def assert_welcomed_then_each_message_once(written: list[str], last: int) -> None:
    """A welcome first; then, in its history or live, each message up to `last`, once.
    Ids are `{epoch}-{number}`: the history's and the live ones make one run."""
    frames = [json.loads(frame) for frame in written]
    assert frames[0]["type"] == "welcome"
    live = [frame for frame in frames[1:] if frame["type"] == "message"]
    numbers = [int(m["id"].split("-")[1]) for m in frames[0]["history"] + live]
    assert live and numbers == list(range(numbers[0], last + 1))
