"""The chat under a real uvicorn, started with the README's production flags.

TestClient cannot model TCP backpressure, message size limits or shutdown, so these tests
talk to a uvicorn process over loopback, with the `websockets` client and, where a client
must misbehave, a raw socket.
"""

import asyncio
import contextlib
import json
import re
import select
import shutil
import signal
import socket
import struct
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote

import pytest
import uvloop
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

import main
from conftest import (
    BINARY_REFUSED,
    CANCELLED_HANDLER,
    FLOODING,
    HERE,
    LEFT_THE_CHAT,
    SAYS,
    SHUTDOWN_GAVE_UP,
    STARTUP_TIMEOUT_S,
    TEST_TIMEOUT_S,
    TOO_SLOW,
    YOU_WROTE,
    Server,
    assert_ignored,
    assert_nothing_went_wrong,
    client_frame,
    close_code_and_reason,
    close_frame,
    closed_with,
    failed_start_up,
    flood_past_close,
    flooder_process,
    following_along_options,
    launch_server,
    open_client,
    production_options,
    raw_handshake,
    read_frame,
    read_until_close,
    receive_from_each,
    receive_says,
    reset,
    response_head,
    run,
    send_endless_header,
    send_pings_reading_nothing,
    send_unread,
    start_server,
    wait_for_log,
)

BURST = main.FLOOD_BURST_MESSAGES  # what one sender may send at full speed
EXIT_BOUND_S = 8.0  # "exits rather than hangs": the graceful 3 s, and room to spare


async def enter_chat_clients(
    stack: contextlib.AsyncExitStack, server: Server, client_ids
) -> list[ClientConnection]:
    """Chat clients with these ids, closed when `stack` closes."""
    return [
        await stack.enter_async_context(open_client(f"{server.ws_url}/chat/{n}"))
        for n in client_ids
    ]


async def send_bursts(
    server: Server, first_id: int, senders: int, make_text
) -> dict[int, list[str]]:
    """`senders` clients each send one burst, all at once; what each one sent."""
    sent = {
        first_id + n: [make_text(n, i) for i in range(BURST)] for n in range(senders)
    }
    async with contextlib.AsyncExitStack() as stack:
        clients = dict(
            zip(sent, await enter_chat_clients(stack, server, sent), strict=True)
        )

        async def send_all(sender_id: int) -> None:
            for text in sent[sender_id]:
                await clients[sender_id].send(text)
            # Stay until the room has had them all: this client's own copies came back.
            # The rest (its "You wrote", the others' bursts, who left) is the readers'
            # to check.
            await receive_says(
                clients[sender_id],
                sender_id,
                len(sent[sender_id]),
                ignore=f"{YOU_WROTE}|{SAYS}|{LEFT_THE_CHAT}",
            )

        await asyncio.gather(*(send_all(sender_id) for sender_id in sent))
    return sent


# --- A client that stops reading -------------------------------------------------------------


def long_text(n: int, i: int) -> str:
    """Sender n's message i, as long as counts as one message for flood control."""
    return f"{n}:{i:03d} " + "x" * (main.FLOOD_BYTES_PER_MESSAGE - 10)


def cut_off_a_stalled_client(server: Server) -> socket.socket:
    """A client that stops reading, in a chat busy enough for it to be cut off."""
    stalled, head = raw_handshake(server.port, "/chat/2", rcvbuf=4096)
    assert head.startswith(b"HTTP/1.1 101")

    async def chat() -> None:
        await send_bursts(server, 10, 30, long_text)

    run(chat())
    wait_for_log(server, "Client #2 cut off")
    return stalled


TCP_CLOSE = 7  # a socket's state in Linux's TCP_INFO once the other end reset it


def tcp_state(sock: socket.socket) -> int:
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0]


def test_a_client_cut_off_that_never_reads_is_dropped(server: Server) -> None:
    stalled = cut_off_a_stalled_client(server)
    # The close frame waits behind what it holds, CLOSE_TIMEOUT_S at most; then uvicorn
    # closes the connection, which waits for it to read all: RESET_AFTER_CLOSE_S at most.
    deadline = time.monotonic() + main.CLOSE_TIMEOUT_S + main.RESET_AFTER_CLOSE_S + 5
    while tcp_state(stalled) != TCP_CLOSE and time.monotonic() < deadline:
        time.sleep(0.1)
    assert tcp_state(stalled) == TCP_CLOSE
    stalled.close()
    assert_nothing_went_wrong(server)


REFUSED_WS = "Run this app with --ws websockets-sansio"


def test_start_up_is_refused_where_a_given_up_write_would_have_been_sent(
    tmp_path: Path,
) -> None:
    # --ws websockets writes, then waits: a write step 3 gives up has gone out already.
    server = launch_server(tmp_path / "uvicorn.log", options=("--ws", "websockets"))
    try:
        exit_code = server.process.wait(STARTUP_TIMEOUT_S)
    finally:
        server.stop()
    assert exit_code == 3, server.log()  # uvicorn's code for a failed start-up
    assert REFUSED_WS in server.log()


def test_the_readme_flags_start_without_a_refusal(server: Server) -> None:
    wait_for_log(server, "Application startup complete")
    assert REFUSED_WS not in server.log()


class WaitsForRoom(asyncio.Protocol):
    """A send that waits for room as websockets-sansio's does: until resume_writing."""

    def __init__(self) -> None:
        self.writable = asyncio.Event()
        self.writable.set()

    def pause_writing(self) -> None:
        self.writable.clear()

    def resume_writing(self) -> None:
        self.writable.set()


async def turns_a_drain_takes_to_wake_a_writer() -> int:
    """A writer waits on a full socket; its client reads it all, unseen by the event
    loop yet: how many turns of the loop before the writer runs."""
    server_side, client_side = socket.socketpair()
    client_side.setblocking(False)
    transport, protocol = await asyncio.get_running_loop().connect_accepted_socket(
        WaitsForRoom, server_side
    )
    while protocol.writable.is_set():
        transport.write(b"x" * 65536)
    writer = asyncio.create_task(protocol.writable.wait())
    await asyncio.sleep(0.1)  # the loop has polled the full socket meanwhile
    with contextlib.suppress(BlockingIOError):
        while client_side.recv(1 << 20):
            pass
    turns = 0
    while not writer.done() and turns < 10:
        await asyncio.sleep(0)
        turns += 1
    transport.abort()
    client_side.close()
    return turns


@pytest.mark.parametrize("runner", [uvloop.run, asyncio.run], ids=["uvloop", "asyncio"])
def test_a_drain_wakes_its_writer_within_the_turns_a_full_backlog_is_given(
    runner: Callable,
) -> None:
    # Fewer, and a client whose socket drains as its backlog fills would be cut off.
    turns = run(turns_a_drain_takes_to_wake_a_writer(), runner=runner)
    assert turns <= main.TURNS_TO_SEE_A_DRAIN


def test_stalled_client_is_cut_off_with_1008_and_slows_nobody(server: Server) -> None:
    stalled, head = raw_handshake(server.port, "/chat/2", rcvbuf=4096)
    assert head.startswith(b"HTTP/1.1 101")

    async def chat_beside_a_stalled_client() -> tuple[dict, dict, tuple[int, str]]:
        # The stalled client reads at last once it is cut off, while the chat goes on:
        # it gets the close frame behind its backlog.
        closed = asyncio.create_task(asyncio.to_thread(close_once_cut_off, stalled))
        async with open_client(f"{server.ws_url}/chat/1") as healthy:
            notices: list[str] = []
            counts = {10 + n: BURST for n in range(30)}
            # Senders leave once done, and the stalled client once cut off.
            reader = asyncio.create_task(
                receive_from_each(healthy, counts, LEFT_THE_CHAT, notices)
            )
            started = time.monotonic()
            sent = await send_bursts(server, 10, 30, long_text)
            received = await reader
            # Not held back by the stalled client, which reads nothing all the while:
            # the chat is over sooner than closing that client may take.
            assert time.monotonic() - started < main.CLOSE_TIMEOUT_S
            # Before or after the rest; with others who left at the same time, maybe.
            while not any(re.search(r"#2\b.* left the chat", n) for n in notices):
                assert_ignored(await healthy.recv(), LEFT_THE_CHAT, notices)
            return sent, received, await closed

    def close_once_cut_off(sock: socket.socket) -> tuple[int, str]:
        try:
            wait_for_log(server, "Client #2 cut off", timeout_s=TEST_TIMEOUT_S)
            return read_until_close(sock, f"{SAYS}|{LEFT_THE_CHAT}")
        finally:
            sock.close()

    sent, received, closed = run(chat_beside_a_stalled_client())
    assert received == sent
    assert closed == (1008, TOO_SLOW)
    assert_nothing_went_wrong(server)


PING_INTERVAL_S, PING_TIMEOUT_S = 2.0, 1.0  # uvicorn's are 20 s and 20 s


def start_with_short_pings(tmp_path: Path) -> Server:
    pings = ("--ws-ping-interval", str(PING_INTERVAL_S))
    pings += ("--ws-ping-timeout", str(PING_TIMEOUT_S))
    return start_server(
        tmp_path / "uvicorn.log", options=(*production_options(), *pings)
    )


def test_a_stalled_client_in_a_quiet_chat_leaves_once_it_misses_the_pings(
    tmp_path: Path,
) -> None:
    # Its socket is full, so uvicorn's close after the unanswered ping waits for ever
    # behind what it holds, and the handler hears nothing: SansIOBounded resets it.
    server = start_with_short_pings(tmp_path)
    stalled, head = raw_handshake(server.port, "/chat/2", rcvbuf=4096)
    big = "x" * (main.MAX_MESSAGE_BYTES - 1024)  # one from each sender: no flooding
    senders = range(10, 20)

    async def fill_its_socket_then_go_quiet() -> float:
        async with open_client(f"{server.ws_url}/chat/1") as watcher:
            async with contextlib.AsyncExitStack() as stack:
                for sender in await enter_chat_clients(stack, server, senders):
                    await sender.send(big)
                counts = dict.fromkeys(senders, 1)
                await receive_from_each(watcher, counts, LEFT_THE_CHAT)
            quiet_from = time.monotonic()  # its backlog holds a few, far from 100
            notices: list[str] = []
            while not any(re.search(r"#2\b.* left the chat", n) for n in notices):
                assert_ignored(await watcher.recv(), LEFT_THE_CHAT, notices)
            return time.monotonic() - quiet_from

    try:
        assert head.startswith(b"HTTP/1.1 101")
        left_after_s = run(fill_its_socket_then_go_quiet())
        assert (
            left_after_s < PING_INTERVAL_S + PING_TIMEOUT_S + main.RESET_AFTER_CLOSE_S
        )
        assert "Client #2 cut off" not in server.log()  # it left: nobody cut it off
    finally:
        stalled.close()
        server.stop()
    assert_nothing_went_wrong(server)


def test_a_client_whose_pong_waits_behind_its_slowed_messages_stays(
    tmp_path: Path,
) -> None:
    # Flood control slows a long burst's reads, and the client's pong waits behind them,
    # unread: uvicorn took that silence for a dead client, and closed it with 1011.
    server = start_with_short_pings(tmp_path)
    # Each counts as 5: the first 20 spend the burst, and the other 10 wait 0.5 s each.
    size = 4 * main.FLOOD_BYTES_PER_MESSAGE
    sent = [f"{i:02d} ".ljust(size, "x") for i in range(30)]

    async def send_then_hear_them_all() -> list[str]:
        async with open_client(f"{server.ws_url}/chat/1") as sender:
            for text in sent:
                await sender.send(text)
            heard: list[str] = []
            while len(heard) < len(sent):
                message = await sender.recv()
                if message.startswith("Client #1 says: "):
                    heard.append(message.removeprefix("Client #1 says: "))
            return heard

    try:
        assert run(send_then_hear_them_all()) == sent
    finally:
        server.stop()
    assert_nothing_went_wrong(server)


def kernel_holds(local_port: int, remote_port: int) -> bool:
    """Whether the kernel has a TCP socket between these loopback ports, open or not."""
    pair = f":{local_port:04X} 0100007F:{remote_port:04X} "
    return pair in Path("/proc/net/tcp").read_text()


def test_a_client_closed_with_all_it_is_sent_in_the_kernel_is_dropped_too(
    tmp_path: Path,
) -> None:
    # Loopback's segments give the server's end megabytes of send buffer: all the
    # stalled client is sent fits there, so uvicorn's close after the unanswered ping
    # hands the socket to the kernel at once, which kept it, and what it held, minutes.
    server = start_with_short_pings(tmp_path)
    stalled, _ = raw_handshake(server.port, "/chat/2", rcvbuf=4096, ethernet=False)
    big = "x" * (main.MAX_MESSAGE_BYTES - 1024)  # one from each sender: no flooding

    async def send_it_600_kb() -> None:
        async with contextlib.AsyncExitStack() as stack:
            for sender in await enter_chat_clients(stack, server, range(10, 20)):
                await sender.send(big)

    ends = (server.port, stalled.getsockname()[1])
    try:
        run(send_it_600_kb())
        deadline = time.monotonic() + PING_INTERVAL_S + PING_TIMEOUT_S
        deadline += main.RESET_AFTER_CLOSE_S + 5
        while kernel_holds(*ends) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not kernel_holds(*ends)  # the server's end: its client never hears
    finally:
        stalled.close()
        server.stop()
    assert_nothing_went_wrong(server)


def test_an_http_client_that_reads_none_of_its_answers_is_dropped(
    tmp_path: Path,
) -> None:
    # 200 GET / sent at once, none read: the answers the kernel held, 4 MB, it held for
    # good, the connection open. Now as long as a WebSocket's pings allow, at most.
    server = start_with_short_pings(tmp_path)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
    sock.connect(("127.0.0.1", server.port))
    ends = (server.port, sock.getsockname()[1])
    try:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" * 200)
        deadline = time.monotonic() + PING_INTERVAL_S + PING_TIMEOUT_S
        deadline += main.RESET_AFTER_CLOSE_S + 5
        while kernel_holds(*ends) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not kernel_holds(*ends)
    finally:
        sock.close()
        server.stop()
    assert_nothing_went_wrong(server)


def room_says(n: int, i: int) -> str:
    return json.dumps({"text": long_text(n, i)})


async def room_message_ids(
    websocket: ClientConnection,
    count: int,
    ids: list[str] | None = None,
    ignore: Callable[[dict], bool] | None = None,
) -> list[str]:
    """The ids of the next `count` messages `websocket` receives in its room, into `ids`.

    Any other frame fails the test, unless `ignore(frame)` says it may come.
    """
    ids = [] if ids is None else ids
    while len(ids) < count:
        frame = json.loads(await websocket.recv())
        if frame["type"] == "message":
            ids.append(frame["id"])
        else:
            assert ignore is not None and ignore(frame), frame
    return ids


def test_a_room_client_cut_off_for_not_reading_gets_everything_back(
    server: Server,
) -> None:
    # Rounds of one 1 KB message from each of 20 senders until the stalled client is cut
    # off, then two more: what it missed stays within the room's history.
    senders, rounds_after = 20, 2
    sender_ids = {10 + n for n in range(senders)}
    stalled, head = raw_handshake(server.port, "/rooms/lobby/2", rcvbuf=4096)
    assert head.startswith(b"HTTP/1.1 101")

    def senders_joining(frame: dict) -> bool:
        # Nothing about client 2, cut off as too slow: within its grace, it has not left.
        return frame["type"] == "joined" and set(frame["client_ids"]) <= sender_ids

    def frames_once_cut_off() -> tuple[list[str], int]:
        """What the stalled client was sent: read at last once it is cut off, up to its
        close frame, which waits CLOSE_TIMEOUT_S for it, no longer."""
        try:
            wait_for_log(server, "Client #2 cut off", timeout_s=TEST_TIMEOUT_S)
            received: list[str] = []
            welcome = json.loads(read_frame(stalled)[1])
            assert welcome["type"] == "welcome", welcome
            while (frame := read_frame(stalled))[0] != 0x8:
                message = json.loads(frame[1])
                if message["type"] == "message":
                    received.append(message["id"])
                else:
                    assert senders_joining(message), message
            return received, close_code_and_reason(frame[1])[0]
        finally:
            stalled.close()

    async def chat_beside_a_stalled_client(
        stack: contextlib.AsyncExitStack, clients: list[ClientConnection]
    ) -> list[str]:
        for client in clients:  # every one welcomed: in the room
            assert json.loads(await client.recv())["type"] == "welcome"
        # A first, short message, which reaches even the stalled client's socket.
        await clients[0].send(json.dumps({"text": "first"}))
        ids = await room_message_ids(clients[0], 1, ignore=senders_joining)
        rounds_left = rounds_after
        for i in range(BURST):
            for n, client in enumerate(clients):
                await client.send(room_says(n, i))
            # The next round once this one went round: the server keeps up.
            await room_message_ids(clients[0], len(ids) + senders, ids, senders_joining)
            if "Client #2 cut off" in server.log():
                rounds_left -= 1
                if rounds_left == 0:
                    return ids
        raise AssertionError("never cut off")

    async def scenario() -> tuple[list[str], list[str], int, dict, list[list[str]]]:
        reading = asyncio.create_task(asyncio.to_thread(frames_once_cut_off))
        async with contextlib.AsyncExitStack() as stack:
            clients = [
                await stack.enter_async_context(
                    open_client(f"{server.ws_url}/rooms/lobby/{n}")
                )
                for n in sorted(sender_ids)
            ]
            sent = await chat_beside_a_stalled_client(stack, clients)
            received, code = await reading
            url = f"{server.ws_url}/rooms/lobby/2?since={received[-1]}"
            back = await stack.enter_async_context(open_client(url, max_size=None))
            welcome = json.loads(await back.recv())
            # Back within its grace: the others were told neither that it left nor
            # that it joined. Each hears the last message next, after all it was sent.
            await clients[0].send(json.dumps({"text": "last"}))
            heard = [
                await room_message_ids(client, len(sent) + 1, ignore=senders_joining)
                for client in clients[1:]
            ]
            last = await room_message_ids(clients[0], 1, ignore=senders_joining)
            heard.append(await room_message_ids(back, 1))  # and nothing before it
            return sent, received, code, welcome, [*heard, sent + last]

    sent, received, code, welcome, heard = run(scenario())
    assert code == 1008
    assert received == sent[: len(received)]
    assert 0 < len(received) < len(sent)
    assert welcome["missed"] is False
    assert received + [message["id"] for message in welcome["history"]] == sent
    *others, back_heard, first_heard = heard
    assert all(ids == first_heard for ids in others)
    assert back_heard == first_heard[-1:]
    assert_nothing_went_wrong(server)


# --- Healthy clients ---------------------------------------------------------------------------


def test_bursts_reach_every_healthy_client_in_order(server: Server) -> None:
    readers, senders = 100, 10

    async def bursts() -> tuple[dict, list[dict[int, list[str]]]]:
        clients = [
            await open_client(f"{server.ws_url}/chat/{1000 + i}")
            for i in range(readers)
        ]
        counts = {n: BURST for n in range(senders)}
        # Each sender leaves once its burst has gone round.
        reading = [
            asyncio.create_task(receive_from_each(c, counts, LEFT_THE_CHAT))
            for c in clients
        ]
        sent = await send_bursts(server, 0, senders, lambda n, i: f"message {n}.{i}")
        received = await asyncio.gather(*reading)
        await asyncio.gather(*(client.close() for client in clients))
        return sent, received

    sent, received = run(bursts())
    for each in received:
        assert each == sent
    assert "cut off" not in server.log()
    assert_nothing_went_wrong(server)


def test_clients_coming_and_going_mid_broadcast_lose_nothing(server: Server) -> None:
    churned: list[int] = []

    async def churn() -> None:
        # Clients that join, then leave politely or vanish, while the broadcast runs.
        for round_number in range(80):
            sock, head = await asyncio.to_thread(
                raw_handshake, server.port, f"/chat/{100 + round_number}"
            )
            assert head.startswith(b"HTTP/1.1 101"), head
            if round_number % 2:
                reset(sock)
            else:
                sock.close()
            async with open_client(
                f"{server.ws_url}/chat/{200 + round_number}"
            ) as passer_by:
                await passer_by.send("hello")
            churned.append(round_number)

    async def broadcast_through_churn() -> tuple[dict, dict[int, list[str]]]:
        async with open_client(f"{server.ws_url}/chat/1") as watcher:
            counts = {10 + n: BURST for n in range(5)}
            # Passers-by say hello; they, the vanished clients and the senders leave.
            passing = rf"Client #2\d\d says: hello|{LEFT_THE_CHAT}"
            reader = asyncio.create_task(receive_from_each(watcher, counts, passing))
            churner = asyncio.create_task(churn())
            while not churned:  # the churn is under way
                await asyncio.sleep(0.01)
            rounds_before = len(churned)
            sent = await send_bursts(server, 10, 5, lambda n, i: f"message {n}.{i}")
            assert len(churned) > rounds_before, "nobody came and went meanwhile"
            await churner
            return sent, await reader

    sent, received = run(broadcast_through_churn())
    assert received == sent
    assert "cut off" not in server.log()  # leaving is not falling behind
    assert_nothing_went_wrong(server)


def test_steps_1_and_2_take_a_vanished_client_quietly(server: Server) -> None:
    for path in ("/ws", "/ws/5"):
        sock, head = raw_handshake(server.port, path)
        assert head.startswith(b"HTTP/1.1 101"), path
        reset(sock)
    wait_for_log(server, "Client #5 left the chat")
    # Every handler has ended, and logged whatever it would, once the server has.
    server.process.send_signal(signal.SIGTERM)
    exited_after_sigterm(server)
    assert_nothing_went_wrong(server)


# --- Hostile clients -----------------------------------------------------------------------------


def test_the_readme_s_command_takes_64_kib_and_refuses_a_byte_more(
    server: Server,
) -> None:
    async def send_sizes() -> tuple[list[str], tuple[int, str]]:
        async with open_client(f"{server.ws_url}/chat/1", max_size=None) as websocket:
            await websocket.send("y" * 65536)
            echoed = [await websocket.recv(), await websocket.recv()]
            await websocket.send("z" * 65537)
            return echoed, await closed_with(websocket)

    echoed, closed = run(send_sizes())
    assert echoed == ["You wrote: " + "y" * 65536, "Client #1 says: " + "y" * 65536]
    # The README's --ws-max-size: uvicorn refuses it before reading the rest, in its
    # words (test_main checks the app's own limit, for a server run without the flag).
    assert closed[0] == 1009
    assert closed[1].endswith("exceeds limit of 65536 bytes"), closed
    assert_nothing_went_wrong(server)


UVICORN_TOO_BIG = (1009, "exceeds limit of 65536 bytes")


def send_huge_messages(server: Server, senders: int, **options) -> set[tuple[int, str]]:
    """`senders` clients each send one message of 15 MiB; how they were closed: the code,
    and the end of the reason."""
    huge = "h" * (15 * 1024 * 1024)

    async def send_one(n: int) -> int:
        async with open_client(
            f"{server.ws_url}/chat/{n}", max_size=None, **options
        ) as ws:
            with contextlib.suppress(ConnectionClosed):
                await ws.send(huge)
            # The other senders, closed, leave the chat.
            code, reason = await closed_with(ws, ignore=LEFT_THE_CHAT)
            return code, reason[reason.find("exceeds") :]

    async def send_all() -> list[tuple[int, str]]:
        return await asyncio.gather(*(send_one(n) for n in range(senders)))

    return set(run(send_all()))


def test_the_readme_s_ws_max_size_refuses_huge_messages_before_buffering(
    server: Server,
) -> None:
    rss_before = server.rss_bytes()
    # Refused by uvicorn (--ws-max-size), in its words, before a message is buffered.
    assert send_huge_messages(server, 50, compression=None) == {UVICORN_TOO_BIG}
    assert server.peak_rss_bytes() - rss_before < 200e6
    assert_nothing_went_wrong(server)


OWED = "x" * 30_000


def owed_what_it_does_not_read(server: Server) -> socket.socket:
    """Client #9 of the chat, with a small window, reading nothing, once client #1 has
    said OWED five times: some of it waits in the server's buffers."""
    sock, _ = raw_handshake(server.port, "/chat/9", rcvbuf=4096)

    async def owe_it_some() -> None:
        async with open_client(f"{server.ws_url}/chat/1") as writer:
            for _ in range(5):
                await writer.send(OWED)
            await receive_says(writer, 1, 5, ignore="You wrote: x+")

    run(owe_it_some())
    return sock


def test_a_client_refused_for_a_message_past_ws_max_size_is_done_at_once(
    server: Server,
) -> None:
    # Its close came, then nothing: the client waited for the end of the connection,
    # which came only with the server's reset, RESET_AFTER_CLOSE_S later.
    async def refused() -> tuple[int | None, float]:
        async with open_client(f"{server.ws_url}/ws") as websocket:
            started = time.monotonic()
            with contextlib.suppress(ConnectionClosed):
                await websocket.send("y" * 70_000)
                await websocket.recv()
            await websocket.wait_closed()
            return websocket.close_code, time.monotonic() - started

    code, took_s = run(refused())
    assert code == 1009
    assert took_s < main.RESET_AFTER_CLOSE_S / 2


def test_a_client_refused_whose_close_came_with_its_fault_is_still_reset_in_time(
    server: Server,
) -> None:
    # Its pings past the limit and its close, in one write: uvicorn took the close as
    # the end of a closing handshake, and closed the connection without the reset, to
    # wait for a client that reads nothing: 44 s, till the kernel gave up on it.
    sock = owed_what_it_does_not_read(server)
    pings = client_frame(0x9, b"") * (main.MAX_PINGS_AND_PONGS_PER_S + 1)
    sock.sendall(pings + close_frame(1000))
    deadline = time.monotonic() + main.RESET_AFTER_CLOSE_S + 3
    while kernel_holds(server.port, sock.getsockname()[1]):
        assert time.monotonic() < deadline, "still open"
        time.sleep(0.2)
    sock.close()
    assert_nothing_went_wrong(server)


def test_a_message_past_ws_max_size_is_closed_with_1009_behind_what_its_client_is_owed(
    server: Server,
) -> None:
    # uvicorn closed the connection at once, the rest of the message unread: the kernel
    # reset it, and dropped the close frame, which waited for the client's window.
    sock = owed_what_it_does_not_read(server)
    megabyte = struct.pack("!BBQ", 0x81, 0x80 | 127, 1024 * 1024) + bytes(4)

    def send_too_much() -> None:
        with contextlib.suppress(OSError):  # reset, once the server is done with it
            sock.sendall(megabyte + bytes(1024 * 1024))

    sender = threading.Thread(target=send_too_much)
    sender.start()
    time.sleep(1)  # the server refuses it meanwhile; its client reads only now
    ignored = rf"Client #1 says: {OWED}|{LEFT_THE_CHAT}"
    closed = read_until_close(sock, ignore=ignored)
    sock.shutdown(socket.SHUT_RDWR)  # the sender's sendall returns
    sender.join(timeout=10)
    sock.close()
    assert (closed[0], closed[1][closed[1].find("exceeds") :]) == UVICORN_TOO_BIG
    assert_nothing_went_wrong(server)


def test_the_production_command_turns_compression_off(server: Server) -> None:
    # Parsed 4 KiB at a time, 47 compressed messages of 64 KiB (86 bytes each) were
    # inflated at once: 3 MiB held per connection, 300 of them grew the server 670 MB.
    async def ask_for_it() -> str | None:
        async with open_client(f"{server.ws_url}/ws", compression="deflate") as ws:
            return ws.response.headers.get("Sec-WebSocket-Extensions")

    assert run(ask_for_it()) is None


def test_the_readme_s_ws_max_size_refuses_compressed_huge_messages_too(
    server: Server,
) -> None:
    # 15 MiB of one letter compresses to about 15 KiB on the wire, if compression is on.
    rss_before = server.rss_bytes()
    assert send_huge_messages(server, 20, compression="deflate") == {UVICORN_TOO_BIG}
    assert server.peak_rss_bytes() - rss_before < 200e6
    assert_nothing_went_wrong(server)


INVALID_UTF8 = {
    "a lone continuation byte": [client_frame(0x1, b"ok \x80")],
    "a cut multi-byte sequence": [client_frame(0x1, b"caf\xc3")],
    "an encoded surrogate": [client_frame(0x1, b"\xed\xa0\x80")],
    "split over two frames": [
        client_frame(0x1, b"fine so far ", fin=False),
        client_frame(0x0, b"\xff"),
    ],
}


def test_invalid_utf8_closes_with_1007_without_a_traceback(server: Server) -> None:
    for name, frames in INVALID_UTF8.items():
        sock, _ = raw_handshake(server.port, "/chat/3")
        sock.sendall(b"".join(frames))
        assert read_until_close(sock, LEFT_THE_CHAT)[0] == 1007, name
        sock.close()
    log = server.log()
    assert log.count("WARNING:  Closed a WebSocket with 1007") == len(INVALID_UTF8)
    assert_nothing_went_wrong(server)


def test_text_not_utf8_sent_with_its_close_frame_is_dropped_and_the_client_left(
    server: Server,
) -> None:
    # uvicorn reads both at once and answers the close; its 1007 for the text then
    # raised, and the connection ended with no close frame and nobody told.
    async def each_leaves_as_it_closed() -> None:
        async with open_client(f"{server.ws_url}/chat/9") as member:
            for number, frames in enumerate(INVALID_UTF8.values(), start=10):
                sock, _ = raw_handshake(server.port, f"/chat/{number}")
                sock.sendall(b"".join(frames) + close_frame(1000))
                try:
                    closed = await asyncio.to_thread(read_until_close, sock)
                finally:
                    sock.close()
                assert closed == (1000, ""), closed  # its own close, answered
                left = await asyncio.wait_for(member.recv(), 5)
                assert left == f"Client #{number} left the chat"

    run(each_leaves_as_it_closed())
    assert "1007" not in server.log()  # not closed with 1007: it had closed first
    assert_nothing_went_wrong(server)


def test_a_client_the_app_closes_first_has_its_own_close_answered_at_once(
    server: Server,
) -> None:
    # Its messages and its close frame in one write: while its handler is slowed by
    # flood control, it is taken over (4000). Its close frame, read but not yet parsed,
    # waited for the reset 5 s later (SansIOBounded's), unanswered.
    messages = [client_frame(0x1, f"{i:03d} {'m' * 45}".encode()) for i in range(150)]
    sock, _ = raw_handshake(server.port, "/chat/7")
    try:
        sock.sendall(b"".join(messages) + close_frame(1000))
        time.sleep(0.5)  # its handler is past the burst, and slowed
        taker, _ = raw_handshake(server.port, "/chat/7")
        taker.close()
        closed = read_until_close(sock, f"{YOU_WROTE}|{SAYS}|{LEFT_THE_CHAT}")
        assert closed == (4000, main.TAKEN_OVER)
        sock.settimeout(2)
        assert sock.recv(1) == b""  # closed by the server, well before a reset
    finally:
        sock.close()
    assert_nothing_went_wrong(server)


def test_refused_message_racing_its_close_frame_leaves_no_traceback(
    server: Server,
) -> None:
    async def busy_chat(stop: asyncio.Event) -> None:
        # 20 writers, each well under the flood rate, and one reader.
        async with contextlib.AsyncExitStack() as stack:
            writers = await enter_chat_clients(stack, server, range(20))
            [reader] = await enter_chat_clients(stack, server, [99])
            round_number = 0
            while not stop.is_set():
                round_number += 1
                for writer in writers:
                    await writer.send(f"busy {round_number}")
                counts = dict.fromkeys(range(20), 1)
                # The refused clients leave the chat.
                await receive_from_each(reader, counts, LEFT_THE_CHAT)
                await asyncio.sleep(0.2)

    def refuse_and_close(attempt: int) -> tuple[str, int, str]:
        sock, _ = raw_handshake(server.port, f"/chat/{100 + attempt}")
        kind = "binary" if attempt % 2 else "oversized"
        refused = (
            client_frame(0x2, b"\x00")
            if kind == "binary"
            else client_frame(0x1, b"y" * 65537)
        )
        sock.sendall(refused + close_frame(1000))  # in the same write
        try:
            # The busy chat's messages may come first; the reader checks those.
            while (frame := read_frame(sock))[0] == 0x1:
                assert_ignored(frame[1].decode(), f"{SAYS}|{LEFT_THE_CHAT}")
        finally:
            sock.close()
        opcode, payload = frame
        assert opcode == 0x8, (kind, opcode, payload[:80])
        return kind, *close_code_and_reason(payload)

    async def race() -> list[tuple[str, int, str]]:
        stop = asyncio.Event()
        chat = asyncio.create_task(busy_chat(stop))
        closes = [
            await asyncio.to_thread(refuse_and_close, attempt) for attempt in range(40)
        ]
        stop.set()
        await chat
        return closes

    for kind, code, reason in run(race()):
        if kind == "oversized":  # refused by uvicorn (--ws-max-size), in its words
            assert code == 1009
            assert reason.endswith("exceeds limit of 65536 bytes"), reason
        else:
            # uvicorn read the client's close frame with the refused one, and echoed it
            # before the app could close with 1003; or the app was first.
            assert (code, reason) in ((1000, ""), (1003, BINARY_REFUSED))
    assert_nothing_went_wrong(server)


def test_a_binary_frame_sent_with_its_close_frame_is_refused_by_the_app(
    server: Server,
) -> None:
    # uvicorn reads both at once and echoes the close; the app reads the binary frame
    # first all the same, and refuses it, in one line and no traceback. On step 1's
    # endpoint, where nothing else is written to the client meanwhile.
    for _ in range(10):
        sock, _ = raw_handshake(server.port, "/ws")
        sock.sendall(client_frame(0x2, b"\x00") + close_frame(1000))
        try:
            closed = read_until_close(sock)
        finally:
            sock.close()
        assert closed in ((1000, ""), (1003, BINARY_REFUSED))
    refused = f"Closed /ws with 1003: {BINARY_REFUSED}"
    wait_for_log(server, refused, count=10, timeout_s=5)
    assert server.log().count(refused) == 10
    assert_nothing_went_wrong(server)


def test_flooder_is_closed_and_the_room_keeps_chatting(server: Server) -> None:
    async def flood_beside_a_chat() -> tuple:
        async with contextlib.AsyncExitStack() as stack:
            readers = await enter_chat_clients(stack, server, range(1000, 1050))
            [flooder, last] = await enter_chat_clients(stack, server, [666, 2])

            async def flood() -> tuple[tuple[int, str], float, list[str]]:
                started = time.monotonic()
                with contextlib.suppress(ConnectionClosed):
                    for i in range(20_000):
                        await flooder.send(f"flood {i}")
                received: list[str] = []  # the readers check the others' messages
                closed = await closed_with(flooder, into=received)
                wrote = [m.removeprefix("You wrote: ") for m in received]
                confirmed = [m for m in wrote if m.startswith("flood ")]
                return closed, time.monotonic() - started, confirmed

            async def hear(reader: ClientConnection) -> tuple[list[str], list[str]]:
                ordinary: list[str] = []
                flood: list[str] = []
                while (message := await reader.recv()) != "Client #2 says: the end":
                    said = re.fullmatch(r"Client #(1|666) says: (.*)", message)
                    if said:
                        (ordinary if said[1] == "1" else flood).append(said[2])
                    else:  # the ordinary sender and the flooder leave
                        assert_ignored(message, LEFT_THE_CHAT)
                return ordinary, flood

            hearing = [asyncio.create_task(hear(reader)) for reader in readers]
            flooding = asyncio.create_task(flood())
            sent = await send_bursts(server, 1, 1, lambda n, i: f"ordinary {i}")
            flooded = await flooding
            await last.send("the end")
            return flooded, sent[1], await asyncio.gather(*hearing)

    (closed, flood_s, confirmed), sent, heard = run(flood_beside_a_chat())
    assert closed == (1008, FLOODING)
    # Of its 20,000, the room heard its burst, then the ones it sent while slowed down,
    # in order: no more than the rule lets through in the time it flooded, and at least
    # as many as it takes to be slowed FLOOD_MAX_SLOWED_MESSAGES times in a row. The
    # one that closed it reached nobody: the flooder was told of each the room heard.
    at_most = BURST + main.FLOOD_MESSAGES_PER_S * flood_s + 1
    at_least = BURST + main.FLOOD_MAX_SLOWED_MESSAGES
    for ordinary, flood in heard:
        assert ordinary == sent
        assert flood == [f"flood {i}" for i in range(len(flood))]
        assert at_least <= len(flood) <= at_most
        assert flood == confirmed
    assert "cut off" not in server.log()  # no healthy client was
    assert_nothing_went_wrong(server)


def test_a_flooder_is_slowed_down_alone_not_the_room(
    server: Server,
) -> None:
    # Its burst, then as many as it may send slowed down before it is closed.
    count = BURST + main.FLOOD_MAX_SLOWED_MESSAGES
    per_s = main.FLOOD_MESSAGES_PER_S

    async def flood_beside_a_writer() -> tuple[list[str], list[float]]:
        async with contextlib.AsyncExitStack() as stack:
            reader, writer, flooder = await enter_chat_clients(
                stack, server, [1000, 2, 666]
            )
            started = time.monotonic()
            for i in range(count):  # all at once, into its socket
                await flooder.send(f"flood {i}")
            heard: list[str] = []
            flood_at: list[float] = []
            while len(flood_at) < count:
                heard.append(await reader.recv())
                if heard[-1].startswith("Client #666 says: "):
                    flood_at.append(time.monotonic() - started)
                    if len(flood_at) == BURST + 5:  # being slowed down: meanwhile,
                        await writer.send("meanwhile")
            return heard, flood_at

    heard, flood_at = run(flood_beside_a_writer())
    flood = [f"Client #666 says: flood {i}" for i in range(count)]
    assert [message for message in heard if message in flood] == flood
    assert [m for m in heard if m not in flood] == ["Client #2 says: meanwhile"]
    # After its burst, no more than FLOOD_MESSAGES_PER_S: each message reached the room
    # no sooner than that pace allows. (A lower bound: a slow machine is only later.)
    for i, seconds in enumerate(flood_at):
        assert seconds >= (i - BURST) / per_s - 0.001, (i, flood_at)
    # The rest waited in its own connection, not in the room: another writer's message,
    # sent once the flooder was slowed down, went ahead of them.
    assert heard.index("Client #2 says: meanwhile") < heard.index(flood[-1])
    assert_nothing_went_wrong(server)


# --- Departures and shutdown ---------------------------------------------------------------------


def test_mass_departure_is_announced_in_batches(server: Server) -> None:
    leaving = 200

    async def many_leave_at_once() -> list[str]:
        async with open_client(f"{server.ws_url}/chat/1") as watcher:
            socks = [
                (
                    await asyncio.to_thread(
                        raw_handshake, server.port, f"/chat/{100 + n}"
                    )
                )[0]
                for n in range(leaving)
            ]
            for sock in socks:
                reset(sock)
            notices: list[str] = []
            named: list[int] = []
            while len(named) < leaving:
                notices.append(await watcher.recv())
                named += [int(n) for n in re.findall(r"#(\d+)", notices[-1])]
            assert sorted(named) == [100 + n for n in range(leaving)]
            return notices

    notices = run(many_leave_at_once())
    assert all(notice.endswith(" left the chat") for notice in notices)
    assert len(notices) < 200 / 4, notices  # many departures share a notice
    assert_nothing_went_wrong(server)


def test_shutdown_under_a_busy_chat_ends_every_handler_with_no_traceback(
    server: Server,
) -> None:
    # uvicorn writes its 1012 to every client at once, before a handler runs again, so
    # no client could hear a leave notice here (test_main shows the app keeps a 1012
    # quiet). What is the app's: each handler, mid-broadcast, ends with no traceback.
    async def shut_down_under_a_chat() -> None:
        clients = [await open_client(f"{server.ws_url}/chat/{n}") for n in range(200)]

        async def read_until_closed(client: ClientConnection) -> None:
            with contextlib.suppress(ConnectionClosed):
                async for frame in client:
                    assert_ignored(str(frame), f"{SAYS}|{YOU_WROTE}")

        async def keep_talking(client: ClientConnection) -> None:
            with contextlib.suppress(ConnectionClosed):
                for i in range(BURST):  # 10 a second, until the server closes it
                    await client.send(f"busy {i}")
                    await asyncio.sleep(0.1)

        reading = [asyncio.create_task(read_until_closed(c)) for c in clients]
        talking = [asyncio.create_task(keep_talking(c)) for c in clients[:5]]
        await asyncio.sleep(0.5)  # the chat under way
        server.process.send_signal(signal.SIGTERM)
        await asyncio.gather(*reading, *talking)

    run(shut_down_under_a_chat())
    exited_after_sigterm(server)
    assert_nothing_went_wrong(server)


def test_sigterm_after_a_stalled_client_s_own_close_sends_everyone_else_1012(
    server: Server,
) -> None:
    # Its close answered, its connection held open by all it has yet to read: uvicorn's
    # 1012 to it raised InvalidState, which ended uvicorn's shutdown there. The clients
    # after it got 1006, not 1012, and the log held a traceback for each handler.
    stalled, _ = raw_handshake(server.port, "/chat/1", rcvbuf=4096)
    big = "x" * (main.MAX_MESSAGE_BYTES - 1024)  # one from each sender: no flooding

    async def close_then_shut_down() -> list[tuple[int, str]]:
        async with contextlib.AsyncExitStack() as stack:
            clients = await enter_chat_clients(stack, server, range(10, 30))
            for sender in clients:
                await sender.send(big)
            counts = dict.fromkeys(range(10, 30), 1)
            await receive_from_each(clients[0], counts, ignore=YOU_WROTE)
            stalled.sendall(close_frame(1000))
            await asyncio.sleep(0.5)  # its close read, and answered
            server.process.send_signal(signal.SIGTERM)
            ignore = f"{SAYS}|{YOU_WROTE}|{LEFT_THE_CHAT}"
            return [await closed_with(client, ignore=ignore) for client in clients]

    try:
        closes = run(close_then_shut_down())
    finally:
        stalled.close()
    assert {code for code, _ in closes} == {1012}
    exited_after_sigterm(server)
    assert_nothing_went_wrong(server)


def exited_after_sigterm(server: Server) -> None:
    # uvicorn ends by raising the signal it was stopped with again, once it is done.
    assert server.process.wait(EXIT_BOUND_S) == -signal.SIGTERM
    assert "Finished server process" in server.log()


def test_sigterm_beside_a_cut_off_client_gives_up_with_a_warning_not_a_traceback(
    server: Server,
) -> None:
    stalled = cut_off_a_stalled_client(server)
    server.process.send_signal(signal.SIGTERM)
    try:
        exited_after_sigterm(server)
    finally:
        stalled.close()
    log = server.log()
    assert log.count(SHUTDOWN_GAVE_UP) == 1, log
    warnings = [line for line in log.splitlines() if line.startswith("WARNING")]
    # Besides it, one line for each handler cancelled: the stalled client's, unless its
    # close had already been given up on (CLOSE_TIMEOUT_S from the cut-off).
    cancelled = log.count(CANCELLED_HANDLER)
    assert cancelled <= 1 and len(warnings) == 1 + cancelled, warnings
    assert_nothing_went_wrong(server, shutdown_gave_up=True)


def test_a_reload_after_a_cut_off_leaves_no_traceback(tmp_path: Path) -> None:
    # The README's command for following along, in a copy of the project it can edit.
    for name in ("main.py", "index.html"):
        shutil.copy(HERE / name, tmp_path / name)
    server = start_server(
        tmp_path / "uvicorn.log", options=following_along_options(), cwd=tmp_path
    )
    try:
        wait_for_log(server, "Application startup complete")
        stalled = cut_off_a_stalled_client(server)
        with (tmp_path / "main.py").open("a") as source:
            source.write('\napp.get("/reloaded")(lambda: "the new code")\n')
        wait_for_log(server, "Application startup complete", count=2)
        stalled.close()
        reloaded = urllib.request.urlopen(f"{server.http_url}/reloaded", timeout=5)
        assert reloaded.read() == b'"the new code"'
        sock, head = raw_handshake(server.port, "/ws")
        sock.close()
        assert head.startswith(b"HTTP/1.1 101")
    finally:
        server.process.send_signal(signal.SIGINT)  # Ctrl+C
        server.process.wait(EXIT_BOUND_S)
        server.stop()
    assert_nothing_went_wrong(server, shutdown_gave_up=True)


# --- Origins -------------------------------------------------------------------------------------


def test_cross_site_origin_gets_403(server: Server) -> None:
    sock, head = raw_handshake(server.port, "/chat/1", origin="http://evil.example")
    sock.close()
    assert head.startswith(b"HTTP/1.1 403")
    assert "Refused WebSocket from origin http://evil.example" in server.log()


@pytest.mark.parametrize(
    "path",
    [
        "/rooms/a%20b/1",
        f"/rooms/{'r' * 101}/1",
        "/rooms/lobby/x",
        f"/rooms/lobby/{2**53}",
        "/chat/1.5",
        # Another way to write an id, which pydantic alone takes: one more to take it.
        "/chat/7%0A",
        "/chat/+7",
        "/chat/07",
        "/chat/%207",
        "/chat/7.0",
        "/chat/1_000",
        "/rooms/lobby/-0",
    ],
)
def test_a_bad_room_name_or_client_id_gets_403(server: Server, path: str) -> None:
    sock, head = raw_handshake(server.port, path)
    sock.close()
    assert head.split(b"\r\n")[0] == b"HTTP/1.1 403 Forbidden", head


def test_own_origin_and_no_origin_are_accepted(server: Server) -> None:
    for origin in (f"http://127.0.0.1:{server.port}", None):
        sock, head = raw_handshake(server.port, "/chat/1", origin=origin)
        sock.close()
        assert head.startswith(b"HTTP/1.1 101"), origin


def test_a_page_on_this_machine_may_call_the_server_by_another_loopback_name(
    server: Server,
) -> None:
    # The tutorials' pages connect to ws://localhost:8000, and uvicorn tells you to open
    # http://127.0.0.1:8000: one machine, one port, two names.
    port = server.port
    for origin, host, status in [
        (f"http://127.0.0.1:{port}", f"localhost:{port}", b"101"),
        (f"http://localhost:{port}", f"127.0.0.1:{port}", b"101"),
        (f"http://[::1]:{port}", f"localhost:{port}", b"101"),
        (f"http://localhost:{port + 1}", f"127.0.0.1:{port}", b"403"),  # another port
        (f"http://localhost.evil.example:{port}", f"localhost:{port}", b"403"),
        (f"http://127.0.0.1:{port}", f"chat.example:{port}", b"403"),
    ]:
        sock, head = raw_handshake(port, "/ws", origin=origin, host=host)
        sock.close()
        assert head.startswith(b"HTTP/1.1 " + status), (origin, host)


@pytest.mark.parametrize(
    ("origin", "host"),
    [
        ("http://[::1", None),
        ("http://localhost:abc", None),
        ("http://[zz]:80", None),
        ("http://localhost:99999", None),
        ("http://127.0.0.1", "[::1"),
        ("http://127.0.0.1", "127.0.0.1:abc"),
    ],
    ids=[
        "open-bracket",
        "port-of-letters",
        "bad-ipv6",
        "port-out-of-range",
        "bad-host",
        "host-port-of-letters",
    ],
)
def test_an_origin_or_host_no_url_can_hold_is_refused_without_a_traceback(
    server: Server, origin: str, host: str | None
) -> None:
    sock, head = raw_handshake(server.port, "/ws", origin=origin, host=host)
    sock.close()
    assert head.split(b"\r\n")[0] == b"HTTP/1.1 403 Forbidden", head
    assert_nothing_went_wrong(server)


def test_allowed_origins_environment_variable(tmp_path) -> None:
    # Each entry as a user may write it, each Origin as Chromium sends it: the third
    # was refused, and the log said "add it to ALLOWED_ORIGINS".
    server = start_server(
        tmp_path / "uvicorn.log",
        options=production_options(),
        ALLOWED_ORIGINS="https://a.example, https://b.example, "
        "HTTPS://Chat.Example:443/, http://xn--bcher-kva.example:8080",
    )
    try:
        for origin, status in [
            ("https://b.example", b"101"),
            ("https://c.example", b"403"),
            ("https://chat.example", b"101"),
            ("http://xn--bcher-kva.example:8080", b"101"),
            ("https://chat.example:8443", b"403"),
        ]:
            sock, head = raw_handshake(server.port, "/ws", origin=origin)
            sock.close()
            assert head.startswith(b"HTTP/1.1 " + status), origin
    finally:
        server.stop()


@pytest.mark.parametrize(
    "entry",
    [
        "chat.example:8000",
        "https://chat.example/chat",
        "*",
        "https://*.chat.example",
        '"http://a.example"',
        "http://bücher.example",  # Python's IDNA and Chromium's differ on some names
        "http://127.1:8000",  # Chromium sends http://127.0.0.1:8000
        "http://0x7f.0.0.1",
    ],
)
def test_an_allowed_origin_no_browser_sends_stops_the_start_in_one_line(
    entry: str,
) -> None:
    # It started, and refused the page it was meant to let in.
    output = failed_start_up(ALLOWED_ORIGINS=f"https://a.example,{entry}")
    expected = f"ALLOWED_ORIGINS: {entry!r} is not an origin as browsers send it"
    assert len(output) == 1, output
    assert output[0].startswith(f"ERROR:    {expected}"), output


def test_allowing_origin_null_warns_that_it_lets_every_site_s_sandboxed_frames_in(
    tmp_path: Path,
) -> None:
    server = start_server(tmp_path / "uvicorn.log", ALLOWED_ORIGINS="null")
    try:
        wait_for_log(server, "ALLOWED_ORIGINS=null lets in pages opened from disk, ")
        sock, head = raw_handshake(server.port, "/ws", origin="null")
        sock.close()
        assert head.startswith(b"HTTP/1.1 101"), head
    finally:
        server.stop()


@pytest.mark.parametrize(
    "setting",
    [
        {"ALLOWED_ORIGINS": "*"},
        {"ANNOUNCE_TOKEN": " token"},
        {"REDIS_URL": "redis://127.0.0.1:1/0"},
    ],
)
def test_a_bad_setting_stops_uvicorn_workers_not_restarted_forever(
    setting: dict[str, str],
) -> None:
    # uvicorn starts again a worker that exits, unless with its status for a failed start.
    output = failed_start_up("--workers", "2", **setting)
    errors = [line for line in output if line.startswith("ERROR")]
    assert len(errors) <= 3, errors  # one a worker, and the parent's
    stopped = "failed to start, stopping the parent process."
    assert [line for line in errors if line.endswith(stopped)], errors


def test_each_worker_says_the_room_is_its_own_without_redis_url(tmp_path) -> None:
    server = start_server(tmp_path / "uvicorn.log", options=("--workers", "2"))
    try:
        wait_for_log(server, "set REDIS_URL so that they share one room", count=2)
    finally:
        server.stop()


# --- What one client sends hurts only its sender -----------------------------------------


async def welcome_of(server: Server, path: str) -> dict:
    async with open_client(f"{server.ws_url}{path}", max_size=None) as websocket:
        async with asyncio.timeout(5):
            return json.loads(await websocket.recv())


def test_a_since_the_room_cannot_parse_is_missed_and_hurts_nobody(
    server: Server,
) -> None:
    async def scenario() -> list[tuple[dict, dict]]:
        async with open_client(f"{server.ws_url}/rooms/lobby/1") as alice:
            assert json.loads(await alice.recv())["type"] == "welcome"
            await alice.send(json.dumps({"text": "first"}))
            first = json.loads(await alice.recv())["id"]
            epoch = first.split("-")[0]
            hostile = [f"{epoch}-²", f"{epoch}-" + "9" * 5000, f"{first}\n", "١-١"]
            answers = []
            for since in hostile:
                # A hostile joiner and a legitimate one, let in together.
                answers.append(
                    await asyncio.gather(
                        welcome_of(server, f"/rooms/lobby/2?since={quote(since)}"),
                        welcome_of(server, f"/rooms/lobby/3?since={first}"),
                    )
                )
            await alice.send(json.dumps({"text": "still here"}))
            # The joiners came and went: alice hears who, then her message.
            while (frame := json.loads(await alice.recv()))["type"] != "message":
                assert frame["type"] in ("joined", "left"), frame
                assert set(frame["client_ids"]) <= {2, 3}, frame
            assert frame["text"] == "still here"
            return answers

    for hostile, legitimate in run(scenario()):
        assert (hostile["type"], hostile["missed"]) == ("welcome", True)
        assert (legitimate["history"], legitimate["missed"]) == ([], False)
    assert_nothing_went_wrong(server)


async def enter_room_big(
    stack: contextlib.AsyncExitStack, server: Server, count: int
) -> list[ClientConnection]:
    """`count` clients in the room "big", ids 0 on, each taking frames of any size."""
    return [
        await stack.enter_async_context(
            open_client(f"{server.ws_url}/rooms/big/{n}", max_size=None)
        )
        for n in range(count)
    ]


def test_a_client_with_the_websockets_library_s_defaults_takes_any_welcome(
    server: Server,
) -> None:
    # A welcome is one frame. The websockets library, and `python -m websockets`,
    # refuse a frame over 1 MiB by default: with 2 MiB of history, they closed with 1009
    # on every attempt, and could never join the room.
    senders = said = 30  # one message each: 60 KB counts as 59 against flood control

    async def scenario() -> tuple[int, dict, str]:
        async with contextlib.AsyncExitStack() as stack:
            clients = await enter_room_big(stack, server, senders)
            for client in clients:
                assert json.loads(await client.recv())["type"] == "welcome"
            for i in range(said):  # 60,000 bytes of UTF-8 each: 1.8 MB in all
                text = json.dumps({"text": f"{i} {'é' * 30_000}"}, ensure_ascii=False)
                await clients[i % senders].send(text)
            joined = lambda frame: frame["type"] == "joined"
            ids = await room_message_ids(clients[0], said, ignore=joined)
            # The library's own defaults, as a reader trying the room in a terminal has.
            async with connect(f"{server.ws_url}/rooms/big/99") as plain:
                text = await plain.recv()
            return len(text.encode()), json.loads(text), ids[-1]

    size, welcome, last = run(scenario())
    assert size <= 1 << 20
    assert (welcome["history"][-1]["id"], welcome["missed"]) == (last, False)
    assert_nothing_went_wrong(server)


JOINERS_EACH_WITH_ITS_SINCE = 200


@pytest.mark.parametrize("last", ["x", "😀"], ids=["ascii", "an-emoji-in-each"])
def test_joiners_each_with_a_since_of_its_own_cost_the_server_little(
    server: Server, last: str
) -> None:
    # Each `since` is a history of its own, each a welcome of up to 760 KB: all built
    # in one go, 300 such joiners grew the server 286 MB, where 300 with one `since` did
    # 11 MB. Bounded in characters, an emoji in each message made it 149 MB: a str with
    # one takes 4 bytes a character. Now each round builds WELCOME_BYTES_AT_ONCE at most.
    senders, said = 10, 50  # 1,480 characters count twice: a burst of 100 each
    text = f"{'x' * 1479}{last}"

    async def fill_the_room() -> str:
        async with contextlib.AsyncExitStack() as stack:
            clients = await enter_room_big(stack, server, senders)
            for client in clients:
                for i in range(said):
                    message = json.dumps({"text": f"{i} {text}"}, ensure_ascii=False)
                    await client.send(message)
            joined = lambda frame: frame["type"] in ("welcome", "joined")
            ids = await room_message_ids(clients[0], senders * said, ignore=joined)
            return ids[-1].split("-")[0]

    epoch = run(fill_the_room())
    rss_before = server.rss_bytes()
    joiners = [  # all at once, each reading nothing, for now
        raw_handshake(
            server.port, f"/rooms/big/{100 + n}?since={epoch}-{n}", answered=False
        )[0]
        for n in range(JOINERS_EACH_WITH_ITS_SINCE)
    ]
    try:
        for n, sock in enumerate(joiners):
            assert response_head(sock).startswith(b"HTTP/1.1 101 ")
            welcome = json.loads(read_frame(sock)[1])
            assert (welcome["type"], welcome["missed"]) == ("welcome", False)
            assert welcome["history"][0]["id"] == f"{epoch}-{n + 1}"
    finally:
        for sock in joiners:
            sock.close()
    grown = server.peak_rss_bytes() - rss_before
    assert grown < 80e6, f"{grown / 1e6:.0f} MB"
    assert_nothing_went_wrong(server)


def test_a_thousand_rooms_opened_and_left_do_not_lock_new_rooms_out(
    server: Server,
) -> None:
    async def open_and_leave(name: str) -> str:
        return (await welcome_of(server, f"/rooms/{name}/1"))["type"]

    async def scenario() -> tuple[set[str], dict]:
        opened: list[str] = []
        for batch in range(0, main.MAX_ROOMS, 50):
            names = [f"junk-{n}" for n in range(batch, batch + 50)]
            opened += await asyncio.gather(*(open_and_leave(n) for n in names))
        return set(opened), await welcome_of(server, "/rooms/fresh/1")

    opened, welcome = run(scenario())
    assert opened == {"welcome"}
    assert (welcome["type"], welcome["room"]) == ("welcome", "fresh")
    assert_nothing_went_wrong(server)


HUGE_POST_BYTES = 20 * 1024 * 1024


def post_head(port: int, content_length: int, token: str | None) -> str:
    """The head of a POST of JSON to /chat/messages, but for the blank line ending it."""
    head = (
        f"POST /chat/messages HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {content_length}\r\n"
    )
    if token is not None:
        head += f"Authorization: Bearer {token}\r\n"
    return head


def answer_to_a_huge_post(port: int, token: str | None) -> bytes:
    """The response head to a POST that announces 20 MiB and sends 10 bytes of it: a
    server that read the body before answering would wait for the rest (a timeout)."""
    head = post_head(port, HUGE_POST_BYTES, token)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(head.encode() + b"\r\n" + b'{"text": "')
        return sock.recv(4096).split(b"\r\n\r\n")[0]


def answer_to_a_chunked_post(port: int, token: str) -> tuple[bytes, int]:
    """The response head to a POST in chunks of 64 KiB, sent until it is answered, and
    how many chunks were sent by then."""
    head = (
        f"POST /chat/messages HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n"
        f"Authorization: Bearer {token}\r\n\r\n"
    )
    chunk = b"10000\r\n" + b"x" * 0x10000 + b"\r\n"
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(head.encode())
        with contextlib.suppress(ConnectionError):
            while sent < HUGE_POST_BYTES // 0x10000:
                sock.sendall(chunk)
                sent += 1
                if select.select([sock], [], [], 0)[0]:
                    break  # answered
        return sock.recv(4096).split(b"\r\n\r\n")[0], sent


def answer_to_a_post(port: int, body: bytes) -> bytes:
    """The answer to a POST of `body`, with the token, on a connection of its own."""
    head = post_head(port, len(body), "s3cret") + "Connection: close\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(head.encode() + b"\r\n" + body)
        return sock.recv(4096)


@pytest.mark.parametrize(
    "request_head",
    [
        "GET / HTTP/1.1",  # the page, answered whole
        "POST /chat/messages HTTP/1.1",  # refused before its body is read: no token
    ],
)
def test_a_client_breaking_http_after_its_answer_leaves_a_warning_not_a_traceback(
    server: Server, request_head: str
) -> None:
    # uvicorn's h11 answers a malformed chunk with a 400, even once the answer is out,
    # and h11 raises: a traceback in the log for anyone who can send a request.
    head = f"{request_head}\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n"
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(head.encode() + b"5\r\nhello\r\n")
        answer = sock.recv(65536)
        while b"</html>" not in answer and not answer.endswith(b"}"):
            answer += sock.recv(65536)
        sock.sendall(b"zz\r\n")
        assert sock.recv(4096) == b""  # closed
    wait_for_log(server, main.BROKE_HTTP)
    assert_nothing_went_wrong(server)


TINY_CHUNKS = 250_000  # of a body's one-byte chunks: six bytes each, 1.5 MB
ECHOES_WHILE_PARSED = 20  # answered to another client, at least, while they are parsed


def test_a_body_sent_in_one_byte_chunks_holds_nobody_else_up(server: Server) -> None:
    # h11 parses a chunk a time, about 13 µs each; uvicorn's h11 protocol parses all
    # it reads in one go, and uvloop reads up to 32 times in a row: a few MB of chunks
    # held every other client up for seconds.
    head = b"POST /chat/messages HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    head += b"Transfer-Encoding: chunked\r\n\r\n"
    body = b"1\r\na\r\n" * TINY_CHUNKS + b"0\r\n\r\n"
    next_request = b"GET /missing HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"  # then 404
    parsed = threading.Event()

    def send_and_wait_for_the_next_answer() -> None:
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
            threading.Thread(
                target=sock.sendall, args=(head + body + next_request,)
            ).start()
            answers = b""
            while answers.count(b"HTTP/1.1 ") < 2:  # the 401, then the 404
                answers += sock.recv(65536)
            parsed.set()

    async def echoes_while_parsed() -> int:
        async with open_client(f"{server.ws_url}/ws") as echo:
            echoes = 0  # a burst of BURST at most, from this one client
            while not parsed.is_set() and echoes < BURST:
                await echo.send("hi")
                await asyncio.wait_for(echo.recv(), 10)
                echoes += 1
            return echoes

    sender = threading.Thread(target=send_and_wait_for_the_next_answer)
    sender.start()
    echoes = run(echoes_while_parsed())
    sender.join(TEST_TIMEOUT_S)
    assert parsed.is_set()
    assert echoes >= ECHOES_WHILE_PARSED, f"{echoes} echoes while the body was parsed"


PIPELINED_BYTES = 30_000_000  # of requests with small bodies, on one connection


def test_requests_sent_faster_than_answered_cost_the_server_one_read(
    server: Server,
) -> None:
    # Each answered before its body is read, whereupon uvicorn reads on: a parser
    # that kept what it read to parse later would keep all a client sends.
    request = b"POST /missing HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 5000\r\n"
    request += b"\r\n" + b"x" * 5000
    count = PIPELINED_BYTES // len(request)
    rss_before = server.rss_bytes()
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        threading.Thread(target=sock.sendall, args=(request * count,)).start()
        answers = b""
        while answers.count(b"HTTP/1.1 404") < count:
            answers += sock.recv(1 << 20)
    grown = server.peak_rss_bytes() - rss_before
    assert grown < 10e6, f"{PIPELINED_BYTES / 1e6:.0f} MB sent: the server grew {grown}"


def test_what_follows_a_request_to_close_with_is_not_parsed(server: Server) -> None:
    # A client that said Connection: close sends nothing more HTTP allows: h11 would
    # answer it 400 (blank lines, which a server should ignore, in a later read).
    request = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(request + b"\r\n" * 3000)
        answer = b""
        while data := sock.recv(65536):
            answer += data
    assert answer.startswith(b"HTTP/1.1 200 OK"), answer[:200]
    assert b"400 Bad Request" not in answer


@pytest.mark.parametrize(
    ("version", "closing", "cookie_bytes"),
    [
        ("HTTP/1.1", "", 100),
        ("HTTP/1.1", "", 6000),  # over a piece: the end of the head is read later
        ("HTTP/1.1", "Connection: close\r\n", 100),
        ("HTTP/1.0", "", 100),  # as `printf 'GET / HTTP/1.0\r\n\r\n' | nc -N` sends
    ],
)
def test_a_client_that_shuts_its_side_after_its_request_is_answered(
    server: Server, version: str, closing: str, cookie_bytes: int
) -> None:
    head = (
        f"GET / {version}\r\nHost: 127.0.0.1\r\n{closing}"  # the page: read from disk
    )
    head += f"Cookie: c={'x' * cookie_bytes}"
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(f"{head}\r\n\r\n".encode())
        sock.shutdown(socket.SHUT_WR)  # as `nc -N` does
        answer = b""
        while data := sock.recv(65536):
            answer += data
    assert answer.startswith(b"HTTP/1.1 200 OK"), answer[:200]
    assert answer.rstrip().endswith(b"</html>")


def test_a_body_that_breaks_http_after_its_answer_closes_the_connection(
    server: Server,
) -> None:
    # Answered (403: no ANNOUNCE_TOKEN) before its body ends; then, in one read, chunks
    # over one piece, and a chunk size that is not hexadecimal. uvicorn's 400 for it
    # raises, the answer sent already, in a piece parsed on a later turn.
    head = b"POST /chat/messages HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    head += b"Transfer-Encoding: chunked\r\n\r\n"
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(head + b"1\r\na\r\n")
        answer = sock.recv(65536)
        assert answer.startswith(b"HTTP/1.1 403"), answer[:200]
        sock.sendall(b"1\r\na\r\n" * 1000 + b"zz\r\n")
        with contextlib.suppress(ConnectionResetError):
            while sock.recv(65536):  # times out if the server keeps it open
                pass
    server.stop()  # at once: the connection is not left for the shutdown to find
    assert "Application shutdown complete" in server.log(), server.log()
    assert main.BROKE_HTTP in server.log()  # one warning line, as under plain h11


def echo_still_answers(server: Server) -> str:
    """A fresh client's ping is answered at once, and so is its "hi": the echo."""

    async def a_client_that_reads() -> str:
        async with open_client(f"{server.ws_url}/ws") as other:
            await asyncio.wait_for(await other.ping(), 5)  # its pong, at once
            await other.send("hi")
            return await asyncio.wait_for(other.recv(), 5)

    return run(a_client_that_reads())


PING_FLOOD_BYTES = 40_000_000  # of pings, from one client that reads no pong


def test_a_client_that_pings_and_never_reads_costs_the_server_little(
    tmp_path: Path,
) -> None:
    server = start_server(tmp_path / "uvicorn.log", options=production_options())
    try:
        sock, head = raw_handshake(server.port, "/ws", rcvbuf=4096)
        assert head.startswith(b"HTTP/1.1 101"), head
        rss_before = server.rss_bytes()
        sent = send_pings_reading_nothing(sock, PING_FLOOD_BYTES, TEST_TIMEOUT_S / 2)
        grown = server.peak_rss_bytes() - rss_before
        assert echo_still_answers(server) == "Message text was: hi"
        sock.close()
        # uvicorn's own websockets-sansio answers every ping it reads, and keeps each
        # answer until the client reads it: all 40 MB were read, and the server grew by
        # as much.
        assert grown < 10e6, f"{sent / 1e6:.0f} MB of pings: the server grew {grown}"
    finally:
        server.stop()
    assert_nothing_went_wrong(server)


@pytest.mark.parametrize("opcode", [0x9, 0xA], ids=["pings", "pongs"])
def test_a_client_flooding_pings_or_pongs_is_closed_with_1008(
    tmp_path: Path, opcode: int
) -> None:
    server = start_server(tmp_path / "uvicorn.log", options=production_options())
    try:
        empty_frames = client_frame(opcode, b"") * 10_000
        sent, close = flood_past_close(
            server.port, "/ws", empty_frames, TEST_TIMEOUT_S / 2
        )
        # uvicorn's own websockets-sansio parses all it reads in one go, and answers
        # each ping: the flood went on, 23 to 31 MB of it, and held every other up.
        assert close == (1008, main.PINGING), f"{sent / 1e6:.0f} MB sent: {close}"
        assert echo_still_answers(server) == "Message text was: hi"
    finally:
        server.stop()
    assert_nothing_went_wrong(server)


def test_pings_and_pongs_up_to_the_limit_are_answered(server: Server) -> None:
    async def ping_then_echo() -> str:
        async with open_client(f"{server.ws_url}/ws") as client:
            for _ in range(main.MAX_PINGS_AND_PONGS_PER_S // 2):
                await client.pong()
                await asyncio.wait_for(await client.ping(), 5)
            await client.send("hi")
            return await asyncio.wait_for(client.recv(), 5)

    assert run(ping_then_echo()) == "Message text was: hi"


def send_in_frames(sock: socket.socket, frames: int) -> None:
    """The text "x", then empty continuation frames: one message in `frames`."""
    sock.sendall(client_frame(0x1, b"x", fin=False))
    sock.sendall(client_frame(0x0, b"", fin=False) * (frames - 2))
    sock.sendall(client_frame(0x0, b"", fin=True))


def test_a_message_in_too_many_frames_is_closed_with_1009(server: Server) -> None:
    sock, _ = raw_handshake(server.port, "/ws")
    send_in_frames(sock, main.MAX_MESSAGE_FRAMES + 1)
    # websockets-sansio kept each empty frame, 8 bytes of the server's memory for 6
    # sent, and parsed them 250,000 a second, the other clients waiting.
    assert read_until_close(sock) == (1009, main.TOO_MANY_FRAMES)
    sock.close()
    assert echo_still_answers(server) == "Message text was: hi"


def test_a_path_cannot_write_lines_or_escapes_into_the_log(server: Server) -> None:
    # Step 4's item id takes any text: here a newline, a made-up log line, and the
    # terminal escape that turns the text after it red.
    forged = "INFO:     Forged line"
    item_id = quote(f"x\n{forged}\x1b[31m")
    sock, head = raw_handshake(server.port, f"/items/{item_id}/ws?token=t")
    assert head.startswith(b"HTTP/1.1 101"), head
    send_in_frames(sock, main.MAX_MESSAGE_FRAMES + 1)  # logged as it is closed
    assert read_until_close(sock) == (1009, main.TOO_MANY_FRAMES)
    sock.close()
    wait_for_log(server, main.TOO_MANY_FRAMES)
    assert "\x1b" not in server.log()
    assert not any(line.startswith(forged) for line in server.log().splitlines())


def test_an_origin_cannot_write_lines_or_escapes_into_the_log(server: Server) -> None:
    # A header's bytes past ASCII reach the app as latin-1: "\x85" is a line break to
    # Python's splitlines and many a log viewer, "\x9b" a terminal's escape.
    forged = "INFO:     Forged line"
    origin = f"http://evil.example\x85{forged}\x9b31m"
    sock, head = raw_handshake(server.port, "/ws", origin=origin)
    assert head.startswith(b"HTTP/1.1 403"), head
    sock.close()
    wait_for_log(server, "Refused WebSocket from origin http://evil.example")
    assert not {"\x85", "\x9b"} & set(server.log())
    assert not any(line.startswith(forged) for line in server.log().splitlines())


def test_a_long_origin_is_logged_in_one_short_line(server: Server) -> None:
    # Each byte past ASCII is logged as 6 ("%C3%BF"): 4 KB of them made a 24 KB line,
    # and one client's refused handshakes wrote the log 6 times faster than it sent.
    origin = "http://evil.example/" + "\xff" * 4000
    sock, head = raw_handshake(server.port, "/ws", origin=origin)
    assert head.startswith(b"HTTP/1.1 403"), head
    sock.close()
    wait_for_log(server, "Refused WebSocket from origin http://evil.example/")
    longest = max(server.log().splitlines(), key=len)
    assert len(longest) < len(origin) // 4, longest[:300]


def test_a_message_in_as_many_frames_as_allowed_is_read(server: Server) -> None:
    sock, _ = raw_handshake(server.port, "/ws")
    send_in_frames(sock, main.MAX_MESSAGE_FRAMES)
    opcode, payload = read_frame(sock)
    assert (opcode, payload) == (0x1, b"Message text was: x")
    sock.close()


TINY_MESSAGES_BYTES = 10_000_000  # one-letter messages, from each of 10 clients
TINY_MESSAGE_SENDERS = 10


@pytest.mark.parametrize("path", ["/ws", "/ws/7"])
def test_tiny_messages_sent_faster_than_echoed_cost_the_server_little(
    tmp_path: Path, path: str
) -> None:
    server = start_server(tmp_path / "uvicorn.log", options=production_options())
    try:
        rss_before = server.rss_bytes()
        messages = client_frame(0x1, b"a") * (TINY_MESSAGES_BYTES // 7)
        senders = [
            send_unread(server.port, path, messages)
            for _ in range(TINY_MESSAGE_SENDERS)
        ]
        grown = server.peak_rss_bytes() - rss_before
        assert echo_still_answers(server) == "Message text was: hi"
        for sock in senders:
            sock.close()
        # uvicorn parsed all it read at once, up to 256 KiB of 7-byte frames, and
        # queued every message for a handler that echoes them to a client that reads
        # none: the 10 grew the server by 40 to 50 MB.
        assert grown < 10e6, f"{grown / 1e6:.0f} MB"
    finally:
        server.stop()
    assert_nothing_went_wrong(server)


FLOOD_BESIDE_ECHO_S = 6.0  # one-letter messages to the chat, the replies read
ECHO_WAIT_S = 2.0  # the most another client's echo may wait meanwhile


def test_a_chat_flooder_holds_no_other_client_up(tmp_path: Path) -> None:
    server = start_server(tmp_path / "uvicorn.log", options=production_options())
    try:

        async def echo_all_along() -> int:
            echoes = 0
            async with open_client(f"{server.ws_url}/ws") as other:
                flooder = flooder_process(
                    server.port, "/chat/5", 0x1, "a", FLOOD_BESIDE_ECHO_S
                )
                while flooder.poll() is None:
                    await other.send("hi")
                    # Once closed for flooding, it went on being parsed, 8 MB at a
                    # time, and this waited 3.5 to 7 s.
                    await asyncio.wait_for(other.recv(), ECHO_WAIT_S)
                    echoes += 1
                    await asyncio.sleep(0.05)
                flooder.communicate()
            return echoes

        assert run(echo_all_along()) >= 10  # the flood went on all along
    finally:
        server.stop()
    assert_nothing_went_wrong(server)


ENDLESS_HEADER_BYTES = 20_000_000  # of one header's value, its end never sent


def test_a_header_that_never_ends_is_refused_before_it_fills_the_server(
    tmp_path: Path,
) -> None:
    server = start_server(tmp_path / "uvicorn.log", options=production_options())
    try:
        rss_before = server.rss_bytes()
        sent = send_endless_header(server.port, ENDLESS_HEADER_BYTES, TEST_TIMEOUT_S)
        grown = server.peak_rss_bytes() - rss_before
        # httptools, uvicorn's default parser, took all 20 MB, and grew by as much.
        assert sent < ENDLESS_HEADER_BYTES and grown < 10e6, (sent, grown)
    finally:
        server.stop()


# What the websockets library parses a handshake with: lines of 8 KiB at most, and 128
# headers. A browser whose cookies for the host come to more sends such a one.
TOO_BIG_FOR_THE_HANDSHAKE = {
    "a 9 KB cookie": (f"Cookie: session={'a' * 9000}",),
    "200 headers": tuple(f"X-Header-{n}: a" for n in range(200)),
}


@pytest.mark.parametrize(
    "headers", TOO_BIG_FOR_THE_HANDSHAKE.values(), ids=list(TOO_BIG_FOR_THE_HANDSHAKE)
)
def test_a_handshake_too_big_to_parse_is_answered_431_and_closed(
    server: Server, headers: tuple[str, ...]
) -> None:
    # uvicorn 0.54 logged a 431, sent nothing, and kept the connection: a page stayed
    # "connecting", and 2,000 such handshakes held 2,000 of the server's files.
    sock, head = raw_handshake(server.port, "/chat/1", headers=headers)
    with sock:
        assert head.startswith(b"HTTP/1.1 431"), head
        sock.settimeout(2)
        while sock.recv(4096):  # its body, then the end of the connection
            pass


def test_a_huge_post_is_answered_before_its_body_is_read(tmp_path: Path) -> None:
    server = start_server(
        tmp_path / "uvicorn.log", options=production_options(), ANNOUNCE_TOKEN="s3cret"
    )
    try:
        rss_before = server.rss_bytes()
        for _ in range(5):
            without = answer_to_a_huge_post(server.port, None)
            assert without.startswith(b"HTTP/1.1 401"), without
            wrong = answer_to_a_huge_post(server.port, "wrong")
            assert wrong.startswith(b"HTTP/1.1 401"), wrong
            too_big = answer_to_a_huge_post(server.port, "s3cret")
            assert too_big.startswith(b"HTTP/1.1 413"), too_big
            # Announced by no length: refused once past what a message can be.
            chunked, sent = answer_to_a_chunked_post(server.port, "s3cret")
            assert chunked.startswith(b"HTTP/1.1 413"), chunked
            # Answered long before the whole body: about 50 chunks are sent (the rest
            # in the sockets' buffers) when the server reads 7 of the 320.
            assert sent < HUGE_POST_BYTES // 0x10000 // 2, sent
        assert server.peak_rss_bytes() - rss_before < 15e6
    finally:
        server.stop()
    assert_nothing_went_wrong(server)


@pytest.mark.parametrize("token", ["voilà", " padded", "s3cret\n"])
def test_an_announce_token_no_request_could_carry_stops_the_start_in_one_line(
    token: str,
) -> None:
    # HTTPBearer strips what it takes for spaces ("voilà" ends in such a byte, in
    # UTF-8): the server ran, and refused every POST with 401.
    output = failed_start_up(ANNOUNCE_TOKEN=token)
    assert len(output) == 1, output
    assert output[0].startswith("ERROR:    ANNOUNCE_TOKEN would never match: ")


@pytest.mark.parametrize(
    "body",
    [b"[", b"\xff\xfe", b'{"text": "\\ud800"}', b'{"text": "caf\xe9"}'],
    ids=["not-json", "not-utf8", "lone-surrogate", "latin-1"],
)
def test_a_post_whose_body_is_no_message_gets_422_without_a_traceback(
    tmp_path: Path, body: bytes
) -> None:
    server = start_server(
        tmp_path / "uvicorn.log", options=production_options(), ANNOUNCE_TOKEN="s3cret"
    )
    try:
        answer = answer_to_a_post(server.port, body)
    finally:
        server.stop()
    assert answer.startswith(b"HTTP/1.1 422"), answer
    assert_nothing_went_wrong(server)


def test_a_post_whose_client_leaves_mid_body_leaves_no_traceback(
    tmp_path: Path,
) -> None:
    server = start_server(
        tmp_path / "uvicorn.log", options=production_options(), ANNOUNCE_TOKEN="s3cret"
    )
    try:
        for body in (b'{"text":', b'8\r\n{"text"'):  # by its length, then chunked
            head = post_head(server.port, 100, "s3cret")
            if body.startswith(b"8"):
                head = head.replace("Content-Length: 100", "Transfer-Encoding: chunked")
            with socket.create_connection(
                ("127.0.0.1", server.port), timeout=5
            ) as sock:
                sock.sendall(head.encode() + b"\r\n" + body)
        # A whole POST after them: answered once the server has seen them go.
        answer = answer_to_a_post(server.port, b'{"text": "hi"}')
    finally:
        server.stop()
    assert answer.startswith(b"HTTP/1.1 202"), answer
    assert_nothing_went_wrong(server)


def test_a_slow_reader_is_cut_off_and_the_others_get_every_message(
    server: Server,
) -> None:
    # Beside 10 senders of 8 messages of 1 KB a second (within flood control), a reader
    # that takes two every 0.3 s: its socket is never still for long, and always full.
    senders, per_sender, pace_s, size = 10, 60, 1 / 8, 1000
    slow, head = raw_handshake(server.port, "/chat/2", rcvbuf=16 * 1024)
    assert head.startswith(b"HTTP/1.1 101")
    reading_slowly = threading.Event()
    reading_slowly.set()

    def read_slowly_then_at_once() -> tuple[int, str]:
        """Slowly while the chat goes on; then at once, up to its close frame."""
        try:
            while reading_slowly.is_set():
                for _ in range(2):
                    opcode, payload = read_frame(slow)
                    if opcode == 0x8:  # closed early: the test says with what
                        return close_code_and_reason(payload)
                    assert_ignored(payload.decode(), f"{SAYS}|{LEFT_THE_CHAT}")
                time.sleep(0.3)
            return read_until_close(slow, f"{SAYS}|{LEFT_THE_CHAT}")
        finally:
            slow.close()

    async def chat() -> tuple[dict, list[dict], tuple[int, str]]:
        slow_reader = asyncio.create_task(asyncio.to_thread(read_slowly_then_at_once))
        async with contextlib.AsyncExitStack() as stack:
            readers = await enter_chat_clients(stack, server, range(100, 120))
            writers = await enter_chat_clients(stack, server, range(10, 10 + senders))
            sent: dict[int, list[str]] = {10 + n: [] for n in range(senders)}
            counts = dict.fromkeys(sent, per_sender)
            # The slow reader, once cut off, leaves.
            heard = [
                asyncio.create_task(
                    receive_from_each(r, counts, "Client #2 left the chat")
                )
                for r in readers
            ]
            for i in range(per_sender):
                for n, writer in enumerate(writers):
                    sent[10 + n].append(f"{n}:{i:03d} " + "x" * size)
                    await writer.send(sent[10 + n][-1])
                await asyncio.sleep(pace_s)
            received = await asyncio.gather(*heard)
        reading_slowly.clear()
        return sent, received, await slow_reader

    sent, received, closed = run(chat())
    assert all(each == sent for each in received)
    assert closed == (1008, TOO_SLOW)
    assert_nothing_went_wrong(server)


# --- Step 5: joining while the room talks, and who has left --------------------------------


def test_a_client_joining_while_messages_flow_gets_each_one_once(
    server: Server,
) -> None:
    # 10 senders each send a message every 20 ms, all at once (the server busy taking
    # them in as joiners are let in); 10 clients join one after another meanwhile.
    senders, per_sender, joiners = 10, 50, 10
    newcomers = {10 + n for n in range(senders)} | {100 + k for k in range(joiners)}

    def joining(frame: dict) -> bool:
        return frame["type"] == "joined" and set(frame["client_ids"]) <= newcomers

    async def until_the_end(websocket: ClientConnection) -> list[str]:
        """The ids of the messages it receives, up to the watcher's "the end"."""
        ids: list[str] = []
        while True:
            frame = json.loads(await websocket.recv())
            if frame["type"] != "message":
                assert joining(frame), frame  # those who joined after it
                continue
            ids.append(frame["id"])
            if frame["text"] == "the end":
                return ids

    async def scenario() -> tuple[list[str], list[tuple[dict, list[str]]]]:
        async with contextlib.AsyncExitStack() as stack:

            async def enter(client_id: int) -> tuple[ClientConnection, dict]:
                url = f"{server.ws_url}/rooms/lobby/{client_id}"
                client = await stack.enter_async_context(open_client(url))
                return client, json.loads(await client.recv())

            watcher, _ = await enter(1)
            clients = [(await enter(10 + n))[0] for n in range(senders)]
            watching = asyncio.create_task(until_the_end(watcher))

            async def send_steadily() -> None:
                for i in range(per_sender):
                    for n, sender in enumerate(clients):
                        await sender.send(json.dumps({"text": f"{n}:{i}"}))
                    await asyncio.sleep(0.02)

            async def join_meanwhile(k: int) -> tuple[ClientConnection, dict]:
                await asyncio.sleep(0.1 * k)
                joiner, welcome = await enter(100 + k)
                assert welcome["type"] == "welcome", welcome
                return joiner, welcome

            entering = [asyncio.create_task(join_meanwhile(k)) for k in range(joiners)]
            await send_steadily()
            entered = await asyncio.gather(*entering)
            await watcher.send(json.dumps({"text": "the end"}))
            return await watching, [
                (welcome, await until_the_end(joiner)) for joiner, welcome in entered
            ]

    everything, joined = run(scenario())
    assert len(everything) == senders * per_sender + 1
    for welcome, live in joined:
        ids = [message["id"] for message in welcome["history"]] + live
        # From the first message of its history on, every message, once, in order.
        first = everything.index(ids[0])
        assert ids == everything[first:]
        # A welcome without `since` holds the latest 50, or all there were.
        assert len(welcome["history"]) == 50 or first == 0
    assert_nothing_went_wrong(server)


GRACE_S = 1.0
UVLOOP_CLOCK_S = 0.002  # its resolution, and a turn of its loop's lag: a bound


def start_with_a_short_grace(tmp_path: Path) -> Server:
    """main.py under uvicorn, with PRESENCE_GRACE_S of GRACE_S rather than 30 s."""
    (tmp_path / "short_grace.py").write_text(
        f"import main\n\nmain.PRESENCE_GRACE_S = {GRACE_S}\napp = main.app\n"
    )
    return start_server(
        tmp_path / "uvicorn.log",
        app="short_grace:app",
        options=production_options(),
        PYTHONPATH=str(tmp_path),
    )


def test_a_dropped_room_client_is_a_member_for_its_grace_then_has_left(
    tmp_path: Path,
) -> None:
    server = start_with_a_short_grace(tmp_path)

    def dropping_client() -> tuple[socket.socket, dict]:
        """Client #2 in the lobby, on a raw socket that can drop without a close frame."""
        sock, head = raw_handshake(server.port, "/rooms/lobby/2")
        assert head.startswith(b"HTTP/1.1 101"), head
        return sock, json.loads(read_frame(sock)[1])

    async def scenario() -> tuple[list[dict], dict, float]:
        async with contextlib.AsyncExitStack() as stack:

            async def enter(client_id: int) -> tuple[ClientConnection, dict]:
                url = f"{server.ws_url}/rooms/lobby/{client_id}"
                client = await stack.enter_async_context(open_client(url))
                return client, json.loads(await client.recv())

            alice, _ = await enter(1)
            bob, _ = await asyncio.to_thread(dropping_client)
            heard = [json.loads(await alice.recv())]  # joined: 2
            reset(bob)  # uvicorn reports 1005: no close frame came
            # The reset is taken in at once, long before carol's handshake is through:
            # her "joined" goes out in a turn that knows bob dropped.
            await enter(3)
            heard.append(json.loads(await alice.recv()))
            bob, back = await asyncio.to_thread(dropping_client)  # within the grace
            await alice.send(json.dumps({"text": "marker"}))
            heard.append(json.loads(await alice.recv()))
            dropped_at = time.monotonic()
            reset(bob)  # and not back this time
            heard.append(json.loads(await alice.recv()))
            return heard, back, time.monotonic() - dropped_at

    try:
        heard, back, left_after_s = run(scenario())
    finally:
        server.stop()
    assert heard[:2] == [
        {"type": "joined", "client_ids": [2]},
        {"type": "joined", "client_ids": [3]},  # and no "left" for 2: in its grace
    ]
    assert back["members"] == [1, 2, 3]
    assert (heard[2]["type"], heard[2]["text"]) == ("message", "marker")  # no "joined"
    assert heard[3] == {"type": "left", "client_ids": [2]}
    # uvloop's clock counts whole milliseconds, read as each turn of its loop begins.
    assert left_after_s >= GRACE_S - UVLOOP_CLOCK_S
    assert_nothing_went_wrong(server)


@pytest.mark.parametrize(
    "last_frame",
    [
        client_frame(0x8, b""),  # a close frame with no code: a page's ws.close()
        client_frame(0x1, b"y" * 70_000),  # over --ws-max-size: uvicorn closes, 1009
    ],
    ids=["close-with-no-code", "too-big"],
)
def test_a_room_client_closed_with_a_frame_has_left_at_once(
    server: Server, last_frame: bytes
) -> None:
    # uvicorn says 1005 for a close frame with no code, as it does for a connection
    # that drops. Only the dropped one may be back, and gets a grace (PRESENCE_GRACE_S,
    # 30 s) before it has left; a close frame, the client's or uvicorn's, is an end.
    def leaving_client() -> None:
        sock, head = raw_handshake(server.port, "/rooms/lobby/2")
        assert head.startswith(b"HTTP/1.1 101"), head
        read_frame(sock)  # its welcome
        sock.sendall(last_frame)
        opcode, _ = read_frame(sock)
        while opcode != 0x8:  # "joined", then the server's close frame
            opcode, _ = read_frame(sock)
        sock.close()

    async def scenario() -> list[dict]:
        async with open_client(f"{server.ws_url}/rooms/lobby/1") as alice:
            await alice.recv()  # its welcome
            await asyncio.to_thread(leaving_client)
            async with asyncio.timeout(10):  # well within the grace
                return [json.loads(await alice.recv()) for _ in range(2)]

    assert run(scenario()) == [
        {"type": "joined", "client_ids": [2]},
        {"type": "left", "client_ids": [2]},
    ]
    assert_nothing_went_wrong(server)
