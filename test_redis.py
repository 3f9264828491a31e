"""The chat across two uvicorn processes, through a real `redis-server`.

Needs Debian's redis-server (`apt-get install redis-server`). Without it these tests are
skipped, except under CI=true, where they fail. Redis is killed to test a crash, and
stopped with SIGSTOP (then continued with SIGCONT) to test a Redis that hangs.
"""

import asyncio
import contextlib
import datetime
import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Collection, Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
import redis
import uvloop
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

import main
from conftest import (
    HERE,
    LEFT_THE_CHAT,
    NOT_SENT,
    REDIS_DOWN,
    SAYS,
    SERVER_PAUSED,
    STARTUP_TIMEOUT_S,
    TAKEN_OVER,
    YOU_WROTE,
    RedisServer,
    Server,
    Socket,
    assert_nothing_went_wrong,
    assert_welcomed_then_each_message_once,
    client_writing_with,
    closed_with,
    expect,
    failed_start_up,
    free_port,
    launch_server,
    let_in_a_joiner,
    open_client,
    receive_from_each,
    receive_says,
    redis_options,
    run,
    start_server,
    stop_with_no_traceback,
    wait_for_log,
    wait_until_listening,
)

RELAYING = "Chat relayed through Redis"
PAGE_HANDSHAKE = '"WebSocket /chat/1" [accepted]'
LOST = (1013, REDIS_DOWN)
# A hung Redis is noticed within REDIS_TIMEOUT_S of silence, after at most one ping
# interval; the rest is the time to close the clients.
DETECTION_BOUND_S = 3.5
RECOVERY_BOUND_S = 5.0
OUTAGE_S = 12.0


@pytest.fixture
def workers(redis_server: RedisServer, tmp_path: Path) -> Iterator[list[Server]]:
    """Two uvicorn processes sharing one chat, as `--workers 2` or two machines would."""
    servers: list[Server] = []
    try:
        for i in (1, 2):  # started together, then waited for
            servers.append(
                launch_server(
                    tmp_path / f"worker{i}.log",
                    options=redis_options(),
                    REDIS_URL=redis_server.url,
                    ANNOUNCE_TOKEN="s3cret",
                )
            )
        for server in servers:
            wait_until_listening(server)
        yield servers
    finally:
        redis_server.resume()  # in case a test left it stopped
        for server in servers:
            stop_with_no_traceback(server)


def post(server: Server, text: str) -> tuple[int, dict]:
    """POST /chat/messages with the workers' token: the status, and the JSON answer."""
    request = urllib.request.Request(
        f"{server.http_url}/chat/messages",
        data=json.dumps({"text": text}).encode(),
        headers={"Authorization": "Bearer s3cret", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as refused:
        with refused:
            return refused.code, json.loads(refused.read())


@contextlib.contextmanager
def listening_to_the_channel(redis_server: RedisServer) -> Iterator:
    """A subscriber of Redis's `chat` channel of its own, beside the workers'."""
    client = redis.Redis(port=redis_server.port, decode_responses=True)
    pubsub = client.pubsub()
    try:
        pubsub.subscribe(main.REDIS_CHANNEL)
        assert pubsub.get_message(timeout=5)["type"] == "subscribe"
        yield pubsub
    finally:
        pubsub.close()
        client.close()


def channel_until(pubsub, last: str) -> list[str]:
    """What the channel carried, up to the first message that contains `last`."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    heard: list[str] = []
    while not heard or last not in heard[-1]:
        assert time.monotonic() < deadline, f"never heard {last!r}: {heard}"
        message = pubsub.get_message(timeout=1)
        if message is not None and message["type"] == "message":
            heard.append(message["data"])
    return heard


def test_start_up_completes_once_the_relay_is_subscribed(
    workers: list[Server],
) -> None:
    # start_server returned as soon as the port was open: the relay was subscribed then.
    for server in workers:
        log = server.log()
        assert log.index(RELAYING) < log.index("Application startup complete")

    async def chat_at_once() -> list[str]:
        async with open_client(f"{workers[0].ws_url}/chat/1") as alice:
            await alice.send("first")
            return sorted([await alice.recv(), await alice.recv()])

    assert run(chat_at_once()) == ["Client #1 says: first", "You wrote: first"]


def test_message_and_leave_notice_cross_processes(workers: list[Server]) -> None:
    first, second = workers

    async def chat() -> tuple[list[str], list[str]]:
        async with open_client(f"{first.ws_url}/chat/1") as alice:
            async with open_client(f"{second.ws_url}/chat/2") as bob:
                await alice.send("hello from the first process")
                alice_got = [await alice.recv(), await alice.recv()]
                bob_got = [await bob.recv()]
            alice_got.append(await alice.recv())
            return alice_got, bob_got

    alice_got, bob_got = run(chat())
    # The acknowledgement goes once Redis took the message; the room's copy comes back
    # through Redis, so either may arrive first.
    assert sorted(alice_got[:2]) == [
        "Client #1 says: hello from the first process",
        "You wrote: hello from the first process",
    ]
    assert alice_got[2] == "Client #2 left the chat"
    assert bob_got == ["Client #1 says: hello from the first process"]
    for server in workers:
        assert_nothing_went_wrong(server)


def test_order_of_two_senders_across_processes(workers: list[Server]) -> None:
    first, second = workers
    sent = [f"message {i}" for i in range(main.FLOOD_BURST_MESSAGES)]

    async def bursts() -> tuple[list[dict[int, list[str]]], list[list[str]]]:
        async with (
            open_client(f"{first.ws_url}/chat/1") as one,
            open_client(f"{second.ws_url}/chat/2") as two,
            open_client(f"{first.ws_url}/chat/3") as same_process,
            open_client(f"{second.ws_url}/chat/4") as other_process,
        ):
            counts = {1: len(sent), 2: len(sent)}
            orders: list[list[str]] = [[], [], [], []]
            readers = [
                # The senders hear their own "You wrote" too.
                asyncio.create_task(receive_from_each(c, counts, ignore, None, order))
                for c, ignore, order in zip(
                    (one, two, same_process, other_process),
                    (YOU_WROTE, YOU_WROTE, None, None),
                    orders,
                    strict=True,
                )
            ]
            for text in sent:
                await one.send(text)
                await two.send(text)
            return await asyncio.gather(*readers), orders

    received, orders = run(bursts())
    for each in received:
        assert each == {1: sent, 2: sent}
    # One order for every reader, on either process: Redis's.
    assert all(order == orders[0] for order in orders), orders


def test_every_acknowledged_message_reaches_every_reader_of_every_process(
    workers: list[Server],
) -> None:
    # Four writers, two on each process, all at once, under two readers on each.
    writers, count = {1: 0, 2: 1, 3: 0, 4: 1}, 60

    async def write_at_once() -> tuple[dict[int, list[str]], list[dict]]:
        async with contextlib.AsyncExitStack() as stack:

            async def enter(client_id: int, process: int) -> ClientConnection:
                url = f"{workers[process].ws_url}/chat/{client_id}"
                return await stack.enter_async_context(open_client(url))

            writing = {n: await enter(n, process) for n, process in writers.items()}
            readers = [await enter(100 + i, i % 2) for i in range(4)]
            counts = dict.fromkeys(writers, count)
            hearing = [
                asyncio.create_task(receive_from_each(reader, counts))
                for reader in readers
            ]

            async def write(n: int) -> list[str]:
                for i in range(count):
                    await writing[n].send(f"{n}.{i}")
                # Its acknowledgements, in order; the room's messages come between.
                acknowledged: list[str] = []
                while len(acknowledged) < count:
                    message = await writing[n].recv()
                    if message.startswith("You wrote: "):
                        acknowledged.append(message.removeprefix("You wrote: "))
                    else:
                        assert_said(message)
                return acknowledged

            acknowledged = await asyncio.gather(*(write(n) for n in writers))
            return dict(zip(writers, acknowledged, strict=True)), await asyncio.gather(
                *hearing
            )

    def assert_said(message: str) -> None:
        assert message.startswith(tuple(f"Client #{n} says: " for n in writers))

    acknowledged, heard = run(write_at_once())
    assert acknowledged == {n: [f"{n}.{i}" for i in range(count)] for n in writers}
    for received in heard:
        assert received == acknowledged
    for server in workers:
        assert_nothing_went_wrong(server)


def test_same_id_on_another_process_takes_over(workers: list[Server]) -> None:
    first, second = workers

    async def two_tabs() -> tuple[tuple[int, str], list[str], str]:
        async with (
            open_client(f"{first.ws_url}/chat/1") as watcher,
            open_client(f"{first.ws_url}/chat/7") as first_tab,
        ):
            async with open_client(f"{second.ws_url}/chat/7") as second_tab:
                closed = await closed_with(first_tab)
                await second_tab.send("moved over")
                heard = await watcher.recv()
            return closed, [heard], await watcher.recv()

    closed, heard, after = run(two_tabs())
    assert closed == (4000, TAKEN_OVER)
    assert heard == ["Client #7 says: moved over"]  # and no "Client #7 left the chat"
    assert after == "Client #7 left the chat"  # when the newer one leaves
    for server in workers:
        assert_nothing_went_wrong(server)


def test_post_reaches_chat_clients_of_every_process(workers: list[Server]) -> None:
    first, second = workers

    async def announce() -> list[str]:
        async with (
            open_client(f"{first.ws_url}/chat/1") as here,
            open_client(f"{second.ws_url}/chat/2") as there,
        ):
            answer = await asyncio.to_thread(post, first, "Deploying at 18:00")
            assert answer == (202, {"status": "sent"})
            return [await here.recv(), await there.recv()]

    assert run(announce()) == ["Server says: Deploying at 18:00"] * 2


def test_a_process_shutting_down_tells_no_other_process_its_clients_left(
    workers: list[Server],
) -> None:
    first, second = workers

    async def shut_one_down() -> list[str]:
        async with (
            open_client(f"{first.ws_url}/chat/1") as alice,
            open_client(f"{second.ws_url}/chat/2") as bob,
        ):
            await bob.send("bye")
            assert await receive_says(alice, 2, 1) == ["bye"]
            second.process.send_signal(signal.SIGTERM)  # a deploy: bob comes back
            await closed_with(bob, ignore=f"{YOU_WROTE}|{SAYS}")
            await asyncio.to_thread(second.process.wait, 10)
            # Its handlers have all ended: a leave notice would have come before this.
            await alice.send("still here")
            return sorted([await alice.recv(), await alice.recv()])

    heard = run(shut_one_down())
    assert heard == ["Client #1 says: still here", "You wrote: still here"]
    assert_nothing_went_wrong(first)


# Each counts as 59 messages against flood control, whose burst is 100: the second is
# slowed 1.8 s, and the third 5.9 s, longer than the shutdown waits (3 s).
SLOWED = [f"{n}{'.' * 60_000}" for n in (1, 2, 3)]


async def shut_down_while_slowed(
    workers: list[Server], sent: list[str], acknowledged: int
) -> list[str]:
    """Bob, on the second process, sends `sent` at once, and that process gets SIGTERM
    once bob has been told "You wrote" for the first `acknowledged`. What alice, on the
    first, hears from bob's first message on, till she hears herself once it has exited.
    """
    first, second = workers
    async with (
        open_client(f"{first.ws_url}/chat/1") as alice,
        open_client(f"{second.ws_url}/chat/2") as bob,
    ):
        for text in sent:
            await bob.send(text)
        for text in sent[:acknowledged]:
            while (message := await bob.recv()) != f"You wrote: {text}":
                assert re.fullmatch(SAYS, message, re.DOTALL)  # its own, relayed
        second.process.send_signal(signal.SIGTERM)  # a deploy: bob comes back
        await closed_with(bob, ignore=f"{YOU_WROTE}|{SAYS}")
        await asyncio.to_thread(second.process.wait, 10)
        # Its handlers have all ended: what they relayed would have come before this.
        await alice.send("still here")
        heard = []
        while (message := await alice.recv()) != "Client #1 says: still here":
            if message != "You wrote: still here":
                heard.append(message)
        return heard


def test_a_process_shutting_down_relays_nothing_its_client_sent_unread(
    workers: list[Server],
) -> None:
    after = [f"after {n}" for n in range(1, 6)]  # queued while bob is slowed
    heard = run(shut_down_while_slowed(workers, SLOWED[:2] + after, 1))
    # The second was being slowed, taken: it may be relayed; the others were not taken.
    said = [f"Client #2 says: {text}" for text in SLOWED[:2]]
    assert heard in (said, said[:1])
    assert_nothing_went_wrong(workers[0])


def test_a_process_whose_shutdown_cancels_a_slowed_handler_tells_no_one_it_left(
    workers: list[Server],
) -> None:
    # The third is slowed past the 3 s the shutdown waits: its handler is cancelled.
    heard = run(shut_down_while_slowed(workers, SLOWED, 2))
    assert heard == [f"Client #2 says: {text}" for text in SLOWED[:2]]
    assert_nothing_went_wrong(workers[0])


async def next_but_leave_notices(websocket: ClientConnection) -> str:
    while re.fullmatch(LEFT_THE_CHAT, message := await websocket.recv()):
        pass
    return message


def test_chat_survives_redis_restarts(
    workers: list[Server], redis_server: RedisServer
) -> None:
    first, second = workers

    async def lose_redis() -> list[tuple[int, str]]:
        async with (
            open_client(f"{first.ws_url}/chat/1") as alice,
            open_client(f"{second.ws_url}/chat/2") as bob,
        ):
            await alice.send("before")
            # The last round's clients leave as this one joins: their notices may come.
            assert await receive_says(bob, 1, 1, ignore=LEFT_THE_CHAT) == ["before"]
            own = [await next_but_leave_notices(alice) for _ in range(2)]
            assert sorted(own) == ["Client #1 says: before", "You wrote: before"]
            redis_server.kill()
            return [await closed_with(alice), await closed_with(bob)]

    async def without_redis() -> tuple[str, tuple[int, str]]:
        async with open_client(f"{first.ws_url}/ws") as echo:
            await echo.send("still here")
            echoed = await echo.recv()
        async with open_client(f"{second.ws_url}/chat/3") as newcomer:
            return echoed, await closed_with(newcomer)

    async def chat_again() -> list[str]:
        async with (
            open_client(f"{first.ws_url}/chat/1") as alice,
            open_client(f"{second.ws_url}/chat/2") as bob,
        ):
            await alice.send("after")
            return await receive_says(bob, 1, 1)

    for restart in range(1, 6):
        assert run(lose_redis()) == [LOST, LOST]
        assert run(without_redis()) == ("Message text was: still here", LOST)
        page = urllib.request.urlopen(f"{first.http_url}/", timeout=5).read()
        assert page == (HERE / "index.html").read_bytes()
        redis_server.start()
        for server in workers:
            wait_for_log(server, RELAYING, count=1 + restart)
        assert run(chat_again()) == ["after"]
    for server in workers:
        assert "Lost Redis at redis://127.0.0.1" in server.log()
        assert_nothing_went_wrong(server)


def test_redis_hanging_again_and_again_leaves_a_quiet_process_its_connections(
    workers: list[Server], redis_server: RedisServer
) -> None:
    # A hang while the heartbeat loaded its script kept that connection taken, with
    # "Unclosed Pipeline client" in the log: after 57 such, the process had none left,
    # and refused the chat for good.
    for hang in range(1, 4):
        redis_server.pause()
        time.sleep(main.REDIS_TIMEOUT_S + 0.6)
        redis_server.resume()
        for server in workers:
            wait_for_log(server, RELAYING, count=1 + hang)
    for server in workers:
        assert "Unclosed" not in server.log()
        assert_nothing_went_wrong(server)


def test_redis_lost_in_the_middle_of_a_burst(
    workers: list[Server], redis_server: RedisServer
) -> None:
    first, second = workers

    async def burst_then_kill() -> tuple[list[str], tuple[int, str]]:
        async with (
            open_client(f"{first.ws_url}/chat/1") as sender,
            open_client(f"{second.ws_url}/chat/2") as reader,
        ):
            for i in range(10):
                await sender.send(f"message {i}")
            got = [await reader.recv() for _ in range(10)]  # the burst is under way
            redis_server.kill()
            for i in range(10, main.FLOOD_BURST_MESSAGES):
                with contextlib.suppress(ConnectionClosed):
                    await sender.send(f"message {i}")
            closed = await closed_with(reader, into=got)
            return got, closed

    got, closed = run(burst_then_kill())
    assert closed == LOST
    # What went out before Redis died, in order, and nothing else.
    assert got == [f"Client #1 says: message {i}" for i in range(len(got))]
    redis_server.start()
    for server in workers:
        wait_for_log(server, RELAYING, count=2)
        assert_nothing_went_wrong(server)


def test_hung_redis_closes_the_chat_in_time_and_leaves_no_ghosts(
    workers: list[Server], redis_server: RedisServer
) -> None:
    first, second = workers

    async def redis_hangs() -> tuple[float, list[str], list[tuple[int, str]]]:
        async with (
            open_client(f"{first.ws_url}/chat/1") as alice,
            open_client(f"{first.ws_url}/chat/3") as carol,
            open_client(f"{second.ws_url}/chat/2") as bob,
        ):
            await alice.send("before")
            for client in (carol, bob):
                assert await receive_says(client, 1, 1) == ["before"]
            assert sorted([await alice.recv(), await alice.recv()]) == [
                "Client #1 says: before",
                "You wrote: before",
            ]
            redis_server.pause()
            stopped_at = time.monotonic()
            # Written into the outage: Redis runs it when it continues, 12 s late.
            await alice.send("ghost")
            alice_got: list[str] = []
            # Closed, each of them, with nothing before: no "You wrote: ghost". (No
            # leave notice could come: a process marks Redis lost before it cuts its
            # clients off, and publishes nothing once it has.)
            closes = await asyncio.gather(
                closed_with(alice, into=alice_got), closed_with(carol), closed_with(bob)
            )
            return time.monotonic() - stopped_at, alice_got, closes

    with listening_to_the_channel(redis_server) as channel:
        delay, alice_got, closes = run(redis_hangs())
        assert closes == [LOST, LOST, LOST]
        assert delay < DETECTION_BOUND_S
        assert alice_got == []  # never told it went out
        # Nobody joins a chat that cannot deliver, and nothing is posted into it.
        assert run(refused_while_lost(second)) == LOST
        assert post(first, "into the outage") == (503, {"detail": NOT_SENT})
        time.sleep(OUTAGE_S - delay)
        redis_server.resume()
        resumed_at = time.monotonic()
        for server in workers:
            wait_for_log(server, RELAYING, count=2, timeout_s=RECOVERY_BOUND_S)
        assert time.monotonic() - resumed_at < RECOVERY_BOUND_S

        async def new_session() -> list[str]:
            async with (
                open_client(f"{first.ws_url}/chat/1") as alice,
                open_client(f"{second.ws_url}/chat/2") as bob,
            ):
                await alice.send("after")
                return await receive_says(bob, 1, 1)

        assert run(new_session()) == ["after"]
        # Subscribed since before the outage, and still: had Redis run the ghost when
        # it continued, it would have come before "after".
        heard = channel_until(channel, "Client #1 says: after")
    assert not [text for text in heard if "ghost" in text]
    for server in workers:
        assert_nothing_went_wrong(server)


async def refused_while_lost(server: Server) -> tuple[int, str]:
    async with open_client(f"{server.ws_url}/chat/3") as newcomer:
        return await closed_with(newcomer)


# --- Step 5: rooms across processes ---------------------------------------------------------

PROCESS_GONE_BOUND_S = 10.0  # a process killed with -9: its members gone within this


async def join_room(
    stack: contextlib.AsyncExitStack, server: Server, path: str
) -> tuple[ClientConnection, dict]:
    """A step 5 client on `server`, closed with `stack`, once welcomed; its welcome."""
    client = open_client(f"{server.ws_url}{path}", max_size=None)
    websocket = await stack.enter_async_context(client)
    welcome = json.loads(await websocket.recv())
    assert welcome["type"] == "welcome", welcome
    return websocket, welcome


async def in_rooms(scenario):
    """Run `scenario(stack)`; the clients it joined to rooms are closed after it."""
    async with contextlib.AsyncExitStack() as stack:
        return await scenario(stack)


async def next_frame(
    websocket: ClientConnection, kind: str, ignore: Collection[str] = ()
) -> dict:
    """The next frame, which must be of this type, after any of the types `ignore`."""
    while (frame := json.loads(await websocket.recv()))["type"] != kind:
        assert frame["type"] in ignore, frame
    return frame


async def say_in_room(
    websocket: ClientConnection,
    text: str,
    ignore: Collection[str] = (),
    ignored: list[dict] | None = None,
) -> dict:
    """Send, as a browser's JSON.stringify does, and wait for the room's copy: the
    acknowledgement. Before it, only frames of the types `ignore`, others' messages
    among them if "message" is one; kept in `ignored`, if given, for the test."""
    await websocket.send(json.dumps({"text": text}, ensure_ascii=False))
    while True:
        frame = json.loads(await websocket.recv())
        if frame["type"] == "message" and frame["text"] == text:
            return frame
        assert frame["type"] in ignore, frame
        if ignored is not None:
            ignored.append(frame)


def test_room_members_and_messages_cross_processes(workers: list[Server]) -> None:
    first, second = workers

    async def two_processes(
        stack: contextlib.AsyncExitStack,
    ) -> tuple[dict, dict, dict, dict]:
        alice, _ = await join_room(stack, first, "/rooms/lobby/1")
        bob, bob_welcome = await join_room(stack, second, "/rooms/lobby/2")
        joined = await next_frame(alice, "joined")
        mine = await say_in_room(alice, "hello across")
        heard = await next_frame(bob, "message")
        await bob.close()
        left = await next_frame(alice, "left")
        await alice.close()
        return bob_welcome, joined, (mine, heard), left

    bob_welcome, joined, (mine, heard), left = run(in_rooms(two_processes))
    assert bob_welcome["members"] == [1, 2]
    assert joined["client_ids"] == [2]
    assert heard == mine
    assert (mine["client_id"], mine["text"]) == (1, "hello across")
    assert left["client_ids"] == [2]
    for server in workers:
        assert_nothing_went_wrong(server)


def test_members_on_two_processes_hear_a_room_in_one_order(
    workers: list[Server],
) -> None:
    # Four senders, two on each process, all at once, and a reader on each process.
    senders, count = 4, 50

    async def at_once(stack: contextlib.AsyncExitStack) -> list[list[tuple]]:
        clients = [
            (await join_room(stack, workers[n % 2], f"/rooms/lobby/{10 + n}"))[0]
            for n in range(senders)
        ]
        clients += [
            (await join_room(stack, workers[n], f"/rooms/lobby/{100 + n}"))[0]
            for n in range(2)
        ]

        async def send(n: int) -> None:
            for i in range(count):
                await clients[n].send(json.dumps({"text": f"{n}.{i}"}))

        async def hear(client: ClientConnection) -> list[tuple]:
            heard = []
            while len(heard) < senders * count:
                # Those who joined after it come first.
                frame = await next_frame(client, "message", ignore={"joined"})
                heard.append((frame["id"], frame["client_id"], frame["text"]))
            return heard

        hearing = [asyncio.create_task(hear(client)) for client in clients]
        await asyncio.gather(*(send(n) for n in range(senders)))
        return await asyncio.gather(*hearing)

    heard = run(in_rooms(at_once))
    assert all(each == heard[0] for each in heard)  # senders and readers, both sides
    ids = [message_id for message_id, _, _ in heard[0]]
    assert ids == sorted(ids, key=lambda i: tuple(map(int, i.split("-"))))
    for n in range(senders):  # each sender's, once each, in the order it sent them
        texts = [text for _, sender, text in heard[0] if sender == 10 + n]
        assert texts == [f"{n}.{i}" for i in range(count)]
    for server in workers:
        assert_nothing_went_wrong(server)


def test_a_client_back_on_the_other_process_gets_what_it_missed(
    workers: list[Server],
) -> None:
    first, second = workers

    async def drop_and_move(stack: contextlib.AsyncExitStack) -> tuple[list[str], dict]:
        alice, _ = await join_room(stack, first, "/rooms/lobby/1")
        bob, _ = await join_room(stack, first, "/rooms/lobby/2")
        assert (await next_frame(alice, "joined"))["client_ids"] == [2]
        last = (await say_in_room(alice, "seen by bob"))["id"]
        assert (await next_frame(bob, "message"))["id"] == last
        await bob.close()
        # Bob left: alice may hear it before her first message comes back.
        missed = [
            (await say_in_room(alice, f"missed {i}", ignore={"left"}))["id"]
            for i in range(5)
        ]
        _, welcome = await join_room(stack, second, f"/rooms/lobby/2?since={last}")
        await alice.close()
        return missed, welcome

    missed, welcome = run(in_rooms(drop_and_move))
    assert [message["id"] for message in welcome["history"]] == missed
    assert welcome["missed"] is False
    assert welcome["members"] == [1, 2]


def test_a_member_dropped_here_back_there_and_gone_is_told_gone_at_once(
    workers: list[Server],
) -> None:
    # Back on the other process, it is away here no more: its close there is a leaving,
    # told at once, not once its grace here is over (PRESENCE_GRACE_S, 30 s).
    first, second = workers

    async def drop_move_and_leave(stack: contextlib.AsyncExitStack) -> tuple:
        bob, _ = await join_room(stack, first, "/rooms/lobby/7")
        alice, welcome = await join_room(stack, first, "/rooms/lobby/1")
        assert welcome["members"] == [1, 7]
        bob.transport.abort()  # no close frame: away, for its grace
        async with open_client(f"{second.ws_url}/rooms/lobby/7") as bob_again:
            welcome = json.loads(await bob_again.recv())
        left = await asyncio.wait_for(next_frame(alice, "left"), RECOVERY_BOUND_S)
        return welcome["members"], left

    members, left = run(in_rooms(drop_move_and_leave))
    assert members == [1, 7]
    assert left == {"type": "left", "client_ids": [7]}


def test_same_id_in_a_room_on_another_process_takes_over(workers: list[Server]) -> None:
    first, second = workers

    async def two_tabs(
        stack: contextlib.AsyncExitStack,
    ) -> tuple[tuple[int, str], dict]:
        watcher, _ = await join_room(stack, first, "/rooms/lobby/1")
        first_tab, _ = await join_room(stack, first, "/rooms/lobby/7")
        second_tab, welcome = await join_room(stack, second, "/rooms/lobby/7")
        closed = await closed_with(first_tab)
        await say_in_room(second_tab, "moved over")
        frames = [json.loads(await watcher.recv()) for _ in range(2)]
        # No "left" for 7, nor a second "joined": the same member, moved. A joiner's
        # turn reads every process's members, so one that was due comes before it.
        await join_room(stack, first, "/rooms/lobby/9")
        frames.append(await next_frame(watcher, "joined"))  # and nothing before it
        # It leaves, with a close frame: the first process does not keep it as away.
        await second_tab.close()
        closed_at = time.monotonic()
        frames.append(await next_frame(watcher, "left"))
        left_after_s = time.monotonic() - closed_at
        return closed, {"welcome": welcome, "frames": frames, "after_s": left_after_s}

    closed, seen = run(in_rooms(two_tabs))
    assert closed == (4000, TAKEN_OVER)
    assert seen["welcome"]["members"] == [1, 7]
    joined_7, moved, joined_9, left_7 = seen["frames"]
    assert (joined_7["type"], joined_7["client_ids"]) == ("joined", [7])
    assert (moved["type"], moved["text"]) == ("message", "moved over")
    assert joined_9 == {"type": "joined", "client_ids": [9]}
    assert left_7 == {"type": "left", "client_ids": [7]}
    assert seen["after_s"] < main.PRESENCE_GRACE_S / 3  # not held as away
    for server in workers:
        assert_nothing_went_wrong(server)


# What others might publish on the channel, while a room and a chat are open there. Each
# but the first is shaped like the relay's own messages, and is logged as ignored.
FOREIGN = (
    "not for you",
    "- not JSON",
    '- ["room", "lobby"]',
    '- {"room": "lobby"}',
    '- {"room": "lobby", "presence": "elsewhere"}',
    '- {"chat": "chat"}',
)


SHUTDOWN_BOUND_S = 5.0  # a relay's shutdown takes a few of Redis's round trips


def test_a_relay_that_swallows_a_cancel_still_lets_the_app_shut_down(
    redis_server: RedisServer, monkeypatch
) -> None:
    # redis-py's asyncio.wait_for, on Python 3.11, returns as if nothing happened when a
    # cancel comes as its write ends: 5 of 11 servers stopped under load never exited.
    async def shut_down_a_relay_that_swallows_one_cancel() -> list[str]:
        relay = main.RedisRelay(redis_server.url, {}, main.RoomManager())
        relay_messages, ended = relay.relay_messages, []

        async def swallowing_one_cancel() -> None:
            relay.subscribed.set()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.Event().wait()
            try:
                await relay_messages()
            finally:
                ended.append("relay")

        async def start_then_shut_down() -> None:
            async with relay.running(main.app):
                pass

        monkeypatch.setattr(relay, "relay_messages", swallowing_one_cancel)
        # Waited for, not cancelled: a cancel from here would end the relay itself.
        shutting_down = asyncio.create_task(start_then_shut_down())
        await asyncio.wait({shutting_down}, timeout=SHUTDOWN_BOUND_S)
        if not shutting_down.done():
            ended.append("hung")
            shutting_down.cancel()
        return ended

    assert run(shut_down_a_relay_that_swallows_one_cancel()) == ["relay"]


def test_a_bug_in_the_relay_s_own_loop_is_logged_and_the_relay_comes_back(
    redis_server: RedisServer, monkeypatch, caplog
) -> None:
    # Not a message (each is relayed in a try of its own) but the session's start: the
    # relay must not end for good, with the chat open and nobody hearing anything.
    monkeypatch.setattr(main, "REDIS_RETRY_S", 0.1)

    async def start_a_relay_whose_first_session_fails() -> bool:
        relay = main.RedisRelay(redis_server.url, {}, main.RoomManager())
        start_session, failures = relay.start_session, [ValueError("a bug")]

        async def fail_once() -> None:
            if failures:
                raise failures.pop()
            await start_session()

        monkeypatch.setattr(relay, "start_session", fail_once)
        async with relay.running(main.app):  # once subscribed: within the bound
            return relay.relaying

    assert run(start_a_relay_whose_first_session_fails(), timeout_s=10)
    [failed] = [record for record in caplog.records if record.exc_info]
    assert failed.getMessage() == "Relaying from Redis failed"


def test_start_up_waits_for_a_redis_that_hangs_and_says_so(
    redis_server: RedisServer, monkeypatch, caplog
) -> None:
    # The start-up ping passed, then Redis hung before the relay subscribed: start-up
    # waits, and its log says why, rather than nothing at all.
    monkeypatch.setattr(main, "REDIS_RETRY_S", 0.1)

    def waiting_logged() -> bool:
        return any("Start-up waits for Redis" in r.getMessage() for r in caplog.records)

    async def start_up_while_redis_hangs() -> bool:
        relay = main.RedisRelay(redis_server.url, {}, main.RoomManager())

        async def start_up() -> bool:
            async with relay.running(main.app):
                return relay.relaying

        redis_server.pause()
        try:
            starting = asyncio.create_task(start_up())
            while not waiting_logged():
                await asyncio.sleep(0.1)
            assert not starting.done()
        finally:
            redis_server.resume()
        return await starting  # once Redis answers again

    assert run(start_up_while_redis_hangs(), timeout_s=15)
    assert waiting_logged()


def uvloop_s_error_for_a_write_to_a_closed_connection() -> RuntimeError:
    """uvloop's own, raised by a real uvloop transport: what redis-py passes on."""

    async def write_after_close() -> RuntimeError:
        accepted: list[asyncio.StreamWriter] = []
        server = await asyncio.start_server(
            lambda _, writer: accepted.append(writer), "127.0.0.1", 0
        )
        port = server.sockets[0].getsockname()[1]
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.transport.abort()
        await asyncio.sleep(0)
        try:
            writer.write(b"PING\r\n")
        except RuntimeError as error:
            return error
        finally:
            for other_end in accepted:
                other_end.transport.abort()
            server.close()
            await server.wait_closed()
        raise AssertionError("uvloop let a write to a closed connection through")

    return run(write_after_close(), runner=uvloop.run)


@pytest.mark.parametrize("is_uvloop_s", [True, False], ids=["uvloop's", "a bug"])
def test_only_uvloop_s_runtime_error_for_a_closed_connection_is_redis_lost(
    redis_server: RedisServer, monkeypatch, is_uvloop_s: bool
) -> None:
    # Redis lost closes the chat, and the pages retry; a bug is raised, and logged
    # where it lands (here, by the doorkeeper), not taken for an outage.
    error = (
        uvloop_s_error_for_a_write_to_a_closed_connection()
        if is_uvloop_s
        else RuntimeError("a bug")
    )

    async def look_up_failing() -> tuple[bool, bool]:
        relay = main.RedisRelay(redis_server.url, {}, main.RoomManager())
        async with relay.running(main.app):

            async def fail(**_) -> None:
                raise error

            monkeypatch.setattr(relay, "look_up_script", fail)
            try:
                await relay.look_up(main.Room("lobby"), [])
            except RuntimeError:
                return True, relay.relaying
            return False, relay.relaying

    raised, still_relaying = run(look_up_failing(), timeout_s=10)
    assert (raised, still_relaying) == (not is_uvloop_s, not is_uvloop_s)


def test_a_bug_publishing_a_chat_takeover_leaves_no_client_in_the_chat(
    redis_server: RedisServer, monkeypatch
) -> None:
    # connect() comes before the handler's try: a client it entered and then failed
    # would stay in the chat with nobody to take it out.
    async def join_while_publishing_fails() -> bool:
        manager = main.ConnectionManager()
        relay = main.RedisRelay(redis_server.url, {"chat": manager}, main.RoomManager())
        async with relay.running(main.app):

            async def a_bug(*_, **__) -> None:
                raise RuntimeError("a bug")

            monkeypatch.setattr(relay, "run_publish", a_bug)
            with pytest.raises(RuntimeError, match="a bug"):
                await relay.join(manager.chat, main.Client(websocket=None, client_id=7))
            return 7 in manager.chat.clients

    assert not run(join_while_publishing_fails(), timeout_s=10)


def test_a_joiner_is_let_in_while_other_processes_keep_its_room_busy(
    redis_server: RedisServer,
) -> None:
    # Another process's members say something at every turn of the event loop, as the
    # channel brings it: the joiner must not wait until they are done, and must still
    # get each message once, in its welcome's history or live.
    said_in_all = 500

    async def join_a_room_busy_elsewhere() -> tuple[int, list[str]]:
        rooms = main.RoomManager()
        relay = main.RedisRelay(redis_server.url, {}, rooms)
        rooms.relay = relay
        async with relay.running(main.app):
            room = rooms.open_room("lobby")
            member = client_writing_with(Socket().send, 1)
            room.chat.clients[member.key] = member
            heard = 0

            async def elsewhere_talking() -> None:
                nonlocal heard
                for number in range(1, said_in_all + 1):
                    said = main.said(2, f"message {number}")
                    relay.deliver_room_message("lobby", f"1000-{number}", said)
                    heard += 1
                    await asyncio.sleep(0)

            talking = asyncio.create_task(elsewhere_talking())
            await asyncio.sleep(0)
            joiner_socket = await let_in_a_joiner(rooms, room)
            heard_before_let_in = heard
            await talking
            while room.chat.deliverer is not None or room.doorkeeper is not None:
                await asyncio.sleep(0.01)
            return heard_before_let_in, joiner_socket.written

    heard_before_let_in, written = run(join_a_room_busy_elsewhere(), timeout_s=10)
    assert heard_before_let_in < said_in_all
    assert_welcomed_then_each_message_once(written, said_in_all)


def test_learning_redis_s_clock_waits_for_a_connection_as_every_command_does(
    redis_server: RedisServer, monkeypatch
) -> None:
    # Publishes refused as late each learn Redis's clock again, all at once if its
    # clock stepped: past the pool's size, redis-py would refuse ("Too many
    # connections"), and the chat would close as if Redis were lost.
    monkeypatch.setattr(main, "REDIS_CONNECTIONS", 2)

    async def learn_the_clock_many_times_at_once() -> bool:
        relay = main.RedisRelay(redis_server.url, {}, main.RoomManager())
        async with relay.running(main.app):
            at_once = [relay.learn_redis_clock() for _ in range(30)]
            await asyncio.gather(*at_once)
            return relay.relaying

    assert run(learn_the_clock_many_times_at_once(), timeout_s=10)


def test_a_foreign_message_on_the_channel_is_ignored(
    workers: list[Server], redis_server: RedisServer
) -> None:
    first, second = workers
    publish = [shutil.which("redis-cli") or "redis-cli", "-p", str(redis_server.port)]

    async def still_chatting(stack: contextlib.AsyncExitStack) -> tuple[dict, ...]:
        alice, _ = await join_room(stack, first, "/rooms/lobby/1")
        bob, _ = await join_room(stack, second, "/rooms/lobby/2")
        assert await next_frame(alice, "joined") == {
            "type": "joined",
            "client_ids": [2],
        }
        carol = await stack.enter_async_context(open_client(f"{first.ws_url}/chat/3"))
        dave = await stack.enter_async_context(open_client(f"{second.ws_url}/chat/4"))
        for foreign in FOREIGN:
            await asyncio.to_thread(
                subprocess.run,
                [*publish, "PUBLISH", main.REDIS_CHANNEL, foreign],
                check=True,
                timeout=5,
            )
        # Published after them, on the same channel: each is the next thing heard.
        mine = await say_in_room(alice, "still here")
        await carol.send("still chatting")
        return (
            mine,
            await next_frame(bob, "message"),
            sorted([await carol.recv(), await carol.recv()]),
            await dave.recv(),
        )

    mine, bob_heard, carol_heard, dave_heard = run(in_rooms(still_chatting))
    assert (mine["text"], bob_heard) == ("still here", mine)
    assert carol_heard == [
        "Client #3 says: still chatting",
        "You wrote: still chatting",
    ]
    assert dave_heard == "Client #3 says: still chatting"
    for server in workers:
        assert server.log().count("Ignored a message on chat") == len(FOREIGN) - 1
        assert_nothing_went_wrong(server)


def test_a_restarted_process_catches_its_member_up_from_redis(
    workers: list[Server], redis_server: RedisServer, tmp_path: Path
) -> None:
    first, second = workers

    async def before(
        stack: contextlib.AsyncExitStack,
    ) -> tuple[ClientConnection, ClientConnection, str]:
        alice, _ = await join_room(stack, first, "/rooms/lobby/1")
        bob, _ = await join_room(stack, second, "/rooms/lobby/2")
        assert (await next_frame(alice, "joined"))["client_ids"] == [2]
        last = (await say_in_room(alice, "before the restart"))["id"]
        assert (await next_frame(bob, "message"))["id"] == last
        return alice, bob, last

    async def meanwhile(alice: ClientConnection) -> list[str]:
        # Should the restart outlast the stopped process's liveness (PROCESS_TTL_S),
        # bob is heard leaving, then coming back: not what this test is about.
        return [
            (await say_in_room(alice, f"during {i}", ignore={"left"}))["id"]
            for i in range(5)
        ]

    async def scenario(
        stack: contextlib.AsyncExitStack,
    ) -> tuple[list[str], dict]:
        alice, bob, last = await before(stack)
        second.process.send_signal(signal.SIGTERM)  # a deploy, or a --reload
        await closed_with(bob)
        said = await meanwhile(alice)
        restarted = await start_again(second, redis_server, tmp_path)
        try:
            _, welcome = await join_room(
                stack, restarted, f"/rooms/lobby/2?since={last}"
            )
            await say_in_room(alice, "welcome back", ignore={"left", "joined"})
        finally:
            stop_with_no_traceback(restarted)
        await alice.close()
        return said, welcome

    said, welcome = run(in_rooms(scenario))
    assert [message["id"] for message in welcome["history"]] == said
    assert welcome["missed"] is False


async def start_again(
    worker: Server, redis_server: RedisServer, tmp_path: Path, down_s: float = 0
) -> Server:
    """The worker, stopping after a SIGTERM, on its port again `down_s` after it ended:
    a deploy."""
    await asyncio.to_thread(worker.process.wait, 10)
    await asyncio.sleep(down_s)
    return await asyncio.to_thread(
        start_server,
        tmp_path / "restarted.log",
        worker.port,
        options=redis_options(),
        REDIS_URL=redis_server.url,
    )


def test_a_room_member_s_process_restarting_is_not_heard_as_a_leaving(
    workers: list[Server], redis_server: RedisServer, tmp_path: Path
) -> None:
    first, second = workers

    async def scenario(stack: contextlib.AsyncExitStack) -> dict:
        alice, _ = await join_room(stack, first, "/rooms/lobby/1")
        bob, _ = await join_room(stack, second, "/rooms/lobby/2")
        assert (await next_frame(alice, "joined"))["client_ids"] == [2]
        # Bob has been in the room a while: his process's presence is told again at
        # once (not batched with his joining).
        await asyncio.sleep(main.PRESENCE_INTERVAL_S)
        second.process.send_signal(signal.SIGTERM)  # a deploy: bob will be back
        await closed_with(bob)
        # Down for longer than a killed process would count as alive (PROCESS_TTL_S).
        restarted = await start_again(
            second, redis_server, tmp_path, main.PROCESS_TTL_S + 1
        )
        try:
            await join_room(stack, restarted, "/rooms/lobby/2")
            # A joiner's turn tells whatever is due: a "left" or "joined" for bob
            # would come before it.
            await join_room(stack, first, "/rooms/lobby/3")
            return await next_frame(alice, "joined")
        finally:
            await stack.aclose()
            stop_with_no_traceback(restarted)

    assert run(in_rooms(scenario)) == {"type": "joined", "client_ids": [3]}
    assert_nothing_went_wrong(first)


def test_redis_stopped_for_5_s_closes_rooms_in_time_and_loses_nothing_acknowledged(
    workers: list[Server], redis_server: RedisServer
) -> None:
    first, second = workers

    async def outage(
        stack: contextlib.AsyncExitStack,
    ) -> tuple[str, list[float], list[dict]]:
        alice, _ = await join_room(stack, first, "/rooms/lobby/1")
        bob, _ = await join_room(stack, second, "/rooms/lobby/2")
        assert (await next_frame(alice, "joined"))["client_ids"] == [2]
        acknowledged = (await say_in_room(alice, "acknowledged"))["id"]
        assert (await next_frame(bob, "message"))["id"] == acknowledged
        redis_server.pause()
        stopped_at = time.monotonic()
        # Written into the outage: Redis runs it when it continues, too late.
        await alice.send(json.dumps({"text": "ghost"}))
        alice_got: list[str] = []
        # Closed with nothing before: no acknowledgement.
        closes = await asyncio.gather(
            closed_with(alice, into=alice_got), closed_with(bob)
        )
        delay = time.monotonic() - stopped_at
        assert closes == [LOST, LOST]
        await asyncio.sleep(5 - delay)
        redis_server.resume()
        return acknowledged, delay, [json.loads(frame) for frame in alice_got]

    acknowledged, delay, alice_got = run(in_rooms(outage))
    assert delay < DETECTION_BOUND_S
    assert alice_got == []  # the ghost never acknowledged
    for server in workers:
        wait_for_log(server, RELAYING, count=2, timeout_s=RECOVERY_BOUND_S)

    async def after(stack: contextlib.AsyncExitStack) -> tuple[dict, list[dict]]:
        _, welcome = await join_room(
            stack, second, f"/rooms/lobby/2?since={acknowledged}"
        )
        alice, _ = await join_room(stack, first, "/rooms/lobby/1")
        # Had Redis run the ghost when it continued, it would be in the room's stream
        # before "after", whose copy comes back once it is there.
        await say_in_room(alice, "after")
        _, latest = await join_room(stack, first, "/rooms/lobby/3")
        return welcome, latest["history"]

    welcome, history = run(in_rooms(after))
    assert (welcome["history"], welcome["missed"]) == ([], False)
    assert [message["text"] for message in history] == ["acknowledged", "after"]


def test_members_a_long_redis_outage_closed_are_not_told_left_once_it_is_back(
    workers: list[Server], redis_server: RedisServer
) -> None:
    # Each failed attempt to reach Redis again forgot who was away: members back within
    # their grace were told "left", then "joined".
    first, second = workers
    joined = r'\{"type":"joined".*'

    async def outage(stack: contextlib.AsyncExitStack) -> list[tuple[int, str]]:
        alice, _ = await join_room(stack, first, "/rooms/lobby/1")
        carol, _ = await join_room(stack, first, "/rooms/lobby/3")
        bob, _ = await join_room(stack, second, "/rooms/lobby/2")
        told: set[int] = set()
        while told != {2, 3}:
            told.update((await next_frame(alice, "joined"))["client_ids"])
        redis_server.pause()
        closes = [
            await closed_with(each, ignore=joined) for each in (alice, carol, bob)
        ]
        await asyncio.sleep(
            main.REDIS_TIMEOUT_S + 2
        )  # an attempt to reach it again fails
        redis_server.resume()
        return closes

    assert run(in_rooms(outage)) == [LOST] * 3
    for server in workers:
        wait_for_log(server, RELAYING, count=2, timeout_s=RECOVERY_BOUND_S)

    async def back(stack: contextlib.AsyncExitStack) -> tuple[list[int], list[str]]:
        alice, welcome = await join_room(stack, first, "/rooms/lobby/1")
        await asyncio.sleep(4 * main.PRESENCE_INTERVAL_S)  # told, if it were
        await join_room(stack, first, "/rooms/lobby/3")
        await join_room(stack, second, "/rooms/lobby/2")
        await asyncio.sleep(4 * main.PRESENCE_INTERVAL_S)
        heard = []
        with contextlib.suppress(TimeoutError):
            while True:
                heard.append(await asyncio.wait_for(alice.recv(), 0.5))
        return welcome["members"], heard

    members, heard = run(in_rooms(back))
    assert (members, heard) == ([1, 2, 3], [])


def test_a_heartbeat_redis_runs_late_revives_no_session_given_up(
    workers: list[Server], redis_server: RedisServer
) -> None:
    # A heartbeat written into a Redis that hangs runs when it continues: had it set
    # its liveness, the session each process gave up would count as alive again, and
    # the members it listed, gone meanwhile, would be welcomed as in the room.
    with redis.Redis(port=redis_server.port, decode_responses=True) as operator:
        given_up = operator.keys(main.alive_key("*"))
        assert len(given_up) == 2
        redis_server.pause()
        time.sleep(main.PROCESS_TTL_S + 1)  # each process gives up; the keys expire
        redis_server.resume()
        for server in workers:
            wait_for_log(server, RELAYING, count=2, timeout_s=RECOVERY_BOUND_S)
        alive = operator.keys(main.alive_key("*"))
    assert len(alive) == 2
    assert set(alive).isdisjoint(given_up)


def test_a_subscription_redis_cut_closes_the_chat_and_rooms_rather_than_miss_messages(
    workers: list[Server], redis_server: RedisServer
) -> None:
    """Redis cuts a subscriber that falls behind (its pubsub output buffer limit), or an
    operator kills it: what was published before redis-py subscribed again never
    reaches this process's clients, so they are closed, not left to miss it."""
    first, second = workers

    async def cut(stack: contextlib.AsyncExitStack) -> tuple[dict, tuple, tuple]:
        alice, _ = await join_room(stack, first, "/rooms/lobby/1")
        last = (await say_in_room(alice, "before the cut"))["id"]
        chatter = await stack.enter_async_context(open_client(f"{first.ws_url}/chat/1"))
        with redis.Redis(port=redis_server.port) as operator:
            operator.client_kill_filter(_type="pubsub")
        room_closed = await asyncio.wait_for(closed_with(alice), DETECTION_BOUND_S)
        chat_closed = await asyncio.wait_for(closed_with(chatter), DETECTION_BOUND_S)
        return last, room_closed, chat_closed

    last, room_closed, chat_closed = run(in_rooms(cut))
    assert room_closed == chat_closed == LOST
    for server in workers:
        wait_for_log(server, RELAYING, count=2, timeout_s=RECOVERY_BOUND_S)

    async def back(stack: contextlib.AsyncExitStack) -> dict:
        _, welcome = await join_room(stack, second, f"/rooms/lobby/1?since={last}")
        return welcome

    assert run(in_rooms(back))["missed"] is False


def test_a_chat_message_a_redis_out_of_memory_refuses_reaches_no_one(
    workers: list[Server], redis_server: RedisServer
) -> None:
    # Redis refused the script's write after its publish: the other process's client
    # got the message, and its sender was told it was not sent.
    first, second = workers

    async def refused() -> tuple[list[str], list[str]]:
        async with (
            open_client(f"{first.ws_url}/chat/1") as alice,
            open_client(f"{second.ws_url}/chat/2") as bob,
        ):
            await alice.send("both here")
            assert await receive_says(bob, 1, 1) == ["both here"]
            with redis.Redis(port=redis_server.port) as operator:
                operator.config_set("maxmemory-policy", "noeviction")
                operator.config_set("maxmemory", 1)  # every write refused
            await alice.send("refused")
            alice_got: list[str] = []
            bob_got: list[str] = []
            for websocket, got in [(alice, alice_got), (bob, bob_got)]:
                closed = await asyncio.wait_for(
                    closed_with(websocket, into=got), DETECTION_BOUND_S
                )
                assert closed == LOST
            return alice_got, bob_got

    alice_got, bob_got = run(refused())
    assert not [each for each in alice_got + bob_got if "refused" in each]


async def said_then_redis_killed(
    stack: contextlib.AsyncExitStack,
    server: Server,
    redis_server: RedisServer,
    *texts: str,
) -> list[dict]:
    """Client 1, in the lobby on `server`, says each text; then Redis is killed, and
    the client is closed as Redis is lost. What it said, as the room sent it back."""
    alice, _ = await join_room(stack, server, "/rooms/lobby/1")
    said = [await say_in_room(alice, text) for text in texts]
    redis_server.kill()
    assert await closed_with(alice) == LOST
    return said


def start_empty_and_wait_for_relaying(
    redis_server: RedisServer, workers: list[Server]
) -> None:
    """Redis started again after a kill, with persistence off: empty. Every worker
    relays again."""
    redis_server.start()
    for server in workers:
        wait_for_log(server, RELAYING, count=2, timeout_s=RECOVERY_BOUND_S)


def test_redis_killed_loses_the_rooms_history_and_says_so(
    workers: list[Server], redis_server: RedisServer
) -> None:
    first, second = workers

    async def before(stack: contextlib.AsyncExitStack) -> list[dict]:
        return await said_then_redis_killed(stack, first, redis_server, "kept in Redis")

    last = run(in_rooms(before))[-1]["id"]
    start_empty_and_wait_for_relaying(redis_server, workers)

    async def after(stack: contextlib.AsyncExitStack) -> dict:
        _, welcome = await join_room(stack, second, f"/rooms/lobby/1?since={last}")
        return welcome

    welcome = run(in_rooms(after))
    assert (welcome["history"], welcome["missed"]) == ([], True)


def test_a_client_back_after_redis_restarted_empty_is_sent_nothing_it_had(
    workers: list[Server], redis_server: RedisServer
) -> None:
    """Redis lost the room's stream, but this process still keeps what it delivered:
    a client back here is told it missed some, and sent only what followed its since."""
    first, _ = workers

    async def before(stack: contextlib.AsyncExitStack) -> list[dict]:
        return await said_then_redis_killed(stack, first, redis_server, "had", "latest")

    had_frame, latest = run(in_rooms(before))
    had = had_frame["id"]
    start_empty_and_wait_for_relaying(redis_server, workers)

    async def after(stack: contextlib.AsyncExitStack) -> list[dict]:
        welcomes = []
        for since in (had, latest["id"]):
            _, welcome = await join_room(stack, first, f"/rooms/lobby/1?since={since}")
            welcomes.append(welcome)
        return welcomes

    after_had, after_latest = run(in_rooms(after))
    assert (after_had["history"], after_had["missed"]) == ([latest], True)
    assert (after_latest["history"], after_latest["missed"]) == ([], True)


def test_a_welcome_after_redis_restarted_empty_gives_a_last_id_that_places(
    workers: list[Server], redis_server: RedisServer
) -> None:
    # The welcome's last_id is the new stream's, not the last message shown here
    # before the restart: a page back with it, on either process, missed nothing.
    first, second = workers

    async def before(stack: contextlib.AsyncExitStack) -> list[dict]:
        return await said_then_redis_killed(
            stack, first, redis_server, "before the restart"
        )

    run(in_rooms(before))
    start_empty_and_wait_for_relaying(redis_server, workers)

    async def welcomed_then_back(stack: contextlib.AsyncExitStack) -> list[bool]:
        async with open_client(f"{first.ws_url}/rooms/lobby/2") as bob:
            since = json.loads(await bob.recv())["last_id"]
        missed = []
        for server in (first, second):
            _, back = await join_room(stack, server, f"/rooms/lobby/2?since={since}")
            missed.append(back["missed"])
        return missed

    assert run(in_rooms(welcomed_then_back)) == [False, False]


def test_redis_flushed_closes_every_room_so_that_presence_is_told_again(
    workers: list[Server], redis_server: RedisServer
) -> None:
    """FLUSHALL (or an eviction) takes each process's members and liveness out of
    Redis: the others would count this process's members as gone while they chat on."""
    first, second = workers

    async def flush(stack: contextlib.AsyncExitStack) -> tuple[tuple, tuple]:
        alice, _ = await join_room(stack, first, "/rooms/lobby/1")
        bob, _ = await join_room(stack, second, "/rooms/lobby/2")
        await next_frame(alice, "joined")
        with redis.Redis(port=redis_server.port) as operator:
            operator.flushall()
        told_left = r'.*"left".*'  # may come first: the close is what matters
        return (
            await asyncio.wait_for(closed_with(alice, told_left), DETECTION_BOUND_S),
            await asyncio.wait_for(closed_with(bob, told_left), DETECTION_BOUND_S),
        )

    assert run(in_rooms(flush)) == (LOST, LOST)
    for server in workers:  # a new session, its members written again as they join
        wait_for_log(server, RELAYING, count=2, timeout_s=RECOVERY_BOUND_S)


def test_a_process_killed_with_9_loses_its_members_in_time(
    workers: list[Server],
) -> None:
    first, second = workers

    async def kill_one(stack: contextlib.AsyncExitStack) -> tuple[dict, float, dict]:
        alice, _ = await join_room(stack, first, "/rooms/lobby/1")
        _, bob_welcome = await join_room(stack, second, "/rooms/lobby/2")
        await next_frame(alice, "joined")
        second.process.kill()  # no goodbye: as a machine lost
        killed_at = time.monotonic()
        left = await next_frame(alice, "left")
        gone_after = time.monotonic() - killed_at
        _, carol_welcome = await join_room(stack, first, "/rooms/lobby/3")
        return left, gone_after, carol_welcome | {"bob": bob_welcome}

    left, gone_after, carol_welcome = run(in_rooms(kill_one))
    assert carol_welcome["bob"]["members"] == [1, 2]
    assert left["client_ids"] == [2]
    assert gone_after < PROCESS_GONE_BOUND_S
    assert carol_welcome["members"] == [1, 3]


# --- The page ------------------------------------------------------------------------------


def handshake_after_the_relay_came_back(server: Server) -> bool:
    """Whether the page's handshake is logged after the second "Chat relayed" line."""
    after_second = server.log().split(RELAYING, 2)[2:]
    return any(PAGE_HANDSHAKE in text for text in after_second)


# The page's own bounds, in index.html: the longest delay after a 1013, and otherwise.
MAX_TRY_LATER_DELAY_S = 30
MAX_RETRY_DELAY_S = 5
PAGE_OUTAGE_S = 60  # by the page's clock


def test_page_backs_off_while_redis_hangs_and_rejoins(
    browser, workers: list[Server], redis_server: RedisServer
) -> None:
    first = workers[0]
    page = browser.new_page()
    try:
        # The page's timers run as the test moves its clock on: a minute of retries
        # is over in as long as the handshakes take.
        start = datetime.datetime.now()
        page.clock.install(time=start)
        page.clock.pause_at(start + datetime.timedelta(seconds=1))
        page.goto(f"{first.http_url}/?endpoint=chat&client_id=1")
        status = page.locator("#status")
        expect(status).to_have_attribute("data-state", "connected")
        handshakes_before = first.log().count(PAGE_HANDSHAKE)
        redis_server.pause()
        expect(status).to_contain_text(f"code 1013: {REDIS_DOWN}")
        delays_s = []
        for _ in range(PAGE_OUTAGE_S):
            page.clock.run_for(1000)  # a retry due starts now, and is closed: 1013
            expect(status).to_have_attribute("data-state", "disconnected")
            shown = re.search(r"retrying in ([\d.]+) s", status.text_content() or "")
            delays_s.append(float(shown[1]) if shown else 0.0)
        # Thousands of pages told "try later" at once back off up to 30 s, not 5: at 5,
        # each would cost the server a handshake every 3.75 s on average.
        assert MAX_RETRY_DELAY_S < max(delays_s) <= MAX_TRY_LATER_DELAY_S
        handshakes = first.log().count(PAGE_HANDSHAKE) - handshakes_before
        assert handshakes <= 8  # 7 in two runs; with 5 s at most, 16 and 17
        redis_server.resume()
        # Each refused attempt is accepted, then closed with 1013: the page shows
        # "connected" for a moment. Only a handshake after the relay is back sticks.
        wait_for_log(first, RELAYING, count=2, timeout_s=RECOVERY_BOUND_S)
        for _ in range(MAX_TRY_LATER_DELAY_S):
            if handshake_after_the_relay_came_back(first):
                break
            page.clock.run_for(1000)
            page.wait_for_timeout(100)  # real time, for the handshake
        expect(status).to_have_attribute("data-state", "connected")
        assert handshake_after_the_relay_came_back(first)
        page.fill("#messageText", "back")
        page.press("#messageText", "Enter")
        # Through Redis, the room's copy and "You wrote" may come in either order.
        expect(
            page.locator("#messages li", has_text="Client #1 says: back")
        ).to_have_count(1)
        expect(page.locator("#messages li", has_text="You wrote: back")).to_have_count(
            1
        )
    finally:
        page.close()


@pytest.mark.parametrize(
    ("scheme", "hung"),
    [("redis", False), ("redis", True), ("http", False)],
    ids=["nothing listens", "hung", "not a Redis URL"],
)
def test_unreachable_redis_at_start_up_exits_with_one_line(
    request: pytest.FixtureRequest, scheme: str, hung: bool
) -> None:
    if hung:  # it takes the connection, and answers nothing
        redis_server = request.getfixturevalue("redis_server")
        redis_server.pause()
        port = redis_server.port
    else:
        port = free_port()
    url = f"{scheme}://user:s3cret@127.0.0.1:{port}/0"
    output = failed_start_up(REDIS_URL=url)
    assert len(output) == 1, output
    logged_url = f"{scheme}://user:***@127.0.0.1:{port}/0"  # no password in the log
    assert output[0].startswith(f"ERROR:    Cannot reach Redis at {logged_url} (")
    assert "s3cret" not in output[0]
    assert output[0].endswith("): start it, or unset REDIS_URL")


def test_redis_url_without_the_app_s_lifespan_says_so_not_that_redis_was_lost(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    # Under --lifespan off, the relay never starts: Redis, up, was never reached.
    server = start_server(
        tmp_path / "uvicorn.log",
        options=(*redis_options(), "--lifespan", "off"),
        REDIS_URL=redis_server.url,
    )

    async def try_the_chat_and_a_room() -> list[tuple[int, str]]:
        closes = []
        for path in ("/chat/1", "/rooms/lobby/1"):
            async with open_client(f"{server.ws_url}{path}") as client:
                closes.append(await closed_with(client))
        return closes

    try:
        server_error = (1011, main.SERVER_ERROR)
        assert run(try_the_chat_and_a_room()) == [server_error, server_error]
        assert server.log().count(main.RELAY_NEVER_STARTED) == 1
    finally:
        server.stop()


# --- What one client sends hurts only its sender ------------------------------------------


@pytest.mark.parametrize("since", ["1-1\n", "١-١", "18446744073709551616-0"])
def test_a_since_redis_would_refuse_is_missed_and_closes_nobody(
    workers: list[Server], since: str
) -> None:
    first, _ = workers

    async def scenario(stack: contextlib.AsyncExitStack) -> tuple[dict, list[str]]:
        chat = await stack.enter_async_context(open_client(f"{first.ws_url}/chat/1"))
        alice, _ = await join_room(stack, first, "/rooms/lobby/1")
        _, welcome = await join_room(
            stack, first, f"/rooms/lobby/3?since={quote(since)}"
        )
        # Everyone else is still in: each gets what it says next (alice after
        # hearing that 3 came).
        await say_in_room(alice, "still here", ignore={"joined"})
        await chat.send("still chatting")
        return welcome, await receive_says(chat, 1, 1, ignore=YOU_WROTE)

    welcome, heard = run(in_rooms(scenario))
    assert welcome["missed"] is True
    assert heard == ["still chatting"]
    assert "Lost Redis" not in first.log()
    assert_nothing_went_wrong(first)


def test_a_welcome_through_redis_is_bounded_in_bytes(workers: list[Server]) -> None:
    first, second = workers
    text = "é" * 30_000  # 60,000 bytes of UTF-8

    async def scenario(
        stack: contextlib.AsyncExitStack,
    ) -> tuple[list[str], list[tuple[int, dict]]]:
        # One message each: a 60 KB message counts as 59 against flood control.
        senders = [
            (await join_room(stack, first, f"/rooms/lobby/{n}"))[0] for n in range(20)
        ]
        # Each waits for its own copy; the others' messages, and who joined, come
        # between.
        ids = [
            (await say_in_room(sender, f"{n} {text}", {"joined", "message"}))["id"]
            for n, sender in enumerate(senders)
        ]
        welcomes = []
        for path in ("/rooms/lobby/9", f"/rooms/lobby/9?since={ids[0]}"):
            url = f"{second.ws_url}{path}"
            async with open_client(url, max_size=None) as joiner:
                frame = await joiner.recv()
                welcomes.append((len(frame.encode()), json.loads(frame)))
        return ids, welcomes

    ids, welcomes = run(in_rooms(scenario))
    for size, welcome in welcomes:
        # 1.2 MB were said: the welcome holds the latest, up to the bound, and one
        # message more at most.
        assert main.HISTORY_BYTES // 2 < size <= main.HISTORY_BYTES + 64 * 1024
        assert welcome["history"][-1]["id"] == ids[-1]
    # Asked for all after the first: more than the bound holds, so some were missed.
    assert welcomes[1][1]["missed"] is True


def test_all_rooms_history_in_redis_is_bounded_as_in_one_process(
    redis_server: RedisServer, monkeypatch
) -> None:
    # One client going from new room to new room, filling each, grew Redis by 687 MiB
    # in 20 s, kept for ROOM_IDLE_S: enough to fill Redis's machine. As in one process,
    # past ALL_HISTORY_BYTES the least recently written rooms lose their oldest first.
    monkeypatch.setattr(main, "ALL_HISTORY_BYTES", 100_000)
    text, rooms, each = "x" * 9_000, 10, 5  # 450 KB in all

    async def fill_rooms_one_after_another() -> dict[int, int]:
        relay = main.RedisRelay(redis_server.url, {}, main.RoomManager())
        async with relay.running(main.app):
            for n in range(rooms):
                for _ in range(each):
                    await relay.post(relay.room_manager, main.Room(f"r{n}"), 1, text)
        return {n: relay_kept(n) for n in range(rooms)}

    def relay_kept(n: int) -> int:
        with redis.Redis.from_url(redis_server.url) as client:
            return client.xlen(f"chat:room:r{n}")

    kept = run(fill_rooms_one_after_another(), timeout_s=20)
    assert sum(kept.values()) * len(text) <= main.ALL_HISTORY_BYTES
    assert kept[rooms - 1] == each and kept[0] == 0


def test_a_room_whose_history_expired_no_longer_counts_against_all_rooms(
    redis_server: RedisServer, monkeypatch
) -> None:
    monkeypatch.setattr(main, "ALL_HISTORY_BYTES", 100_000)
    text, each = "x" * 9_000, 9  # 81 KB a room: two rooms are over the bound

    def kept(room: str) -> int:
        with redis.Redis.from_url(redis_server.url) as client:
            return client.xlen(f"chat:room:{room}")

    async def fill_rooms_after_one_expired() -> tuple[int, int, int]:
        relay = main.RedisRelay(redis_server.url, {}, main.RoomManager())
        async with relay.running(main.app):

            async def fill(room: str) -> None:
                for _ in range(each):
                    await relay.post(relay.room_manager, main.Room(room), 1, text)

            monkeypatch.setattr(main, "ROOM_IDLE_S", 0.2)
            await fill("gone")
            await asyncio.sleep(0.5)  # its keys expire; the ledger still counts it
            monkeypatch.setattr(main, "ROOM_IDLE_S", 600.0)
            await fill("new")
            new_before_third = kept("new")
            await fill("third")
        return new_before_third, kept("new"), kept("third")

    new_alone, new, third = run(fill_rooms_after_one_expired(), timeout_s=20)
    # The expired room's bytes left the ledger, not the new room's messages; a third
    # room then takes from the new one, the least recently written.
    assert new_alone == each
    assert third == each and (new + third) * len(text) <= main.ALL_HISTORY_BYTES


@contextlib.asynccontextmanager
async def lobby_through_redis(redis_server: RedisServer):
    """Step 5's rooms through a relay run in this process, with the room "lobby" open:
    the rooms, the relay, the room, and the keys a publish into it takes."""
    rooms = main.RoomManager()
    relay = main.RedisRelay(redis_server.url, {}, rooms)
    rooms.relay = relay
    async with relay.running(main.app):
        room = rooms.open_room("lobby")
        yield rooms, relay, room, [*main.room_keys(room)[:2], *main.HISTORY_LEDGER]


def test_joiners_each_asking_another_since_cost_redis_one_read_of_the_room(
    redis_server: RedisServer,
) -> None:
    # Read since by since, 300 joiners of a full room with `since` 0-1, 0-2, ... made
    # Redis send 600 MB to one look-up and miss REDIS_TIMEOUT_S: the process closed
    # every chat and room with 1013. One range, from the oldest, holds what all asked.
    text = "x" * 8_000  # 50 of them, 400 KB: all within the room's HISTORY_BYTES
    said, asking = 50, 40

    async def look_up_for_joiners_with_many_sinces() -> tuple[int, list, list]:
        async with lobby_through_redis(redis_server) as (_, relay, room, keys):
            ids = [
                await relay.run_publish(keys, "lobby ", main.said(1, f"{n} {text}"))
                for n in range(said)
            ]
            joiners = [
                (main.Client(None, n), since) for n, since in enumerate(ids[:asking])
            ]
            await asyncio.sleep(0.2)  # the channel's copies are sent, and counted
            with redis.Redis.from_url(redis_server.url) as counter:
                sent_before = counter.info("stats")["total_net_output_bytes"]
                await relay.look_up(room, joiners)
                sent = counter.info("stats")["total_net_output_bytes"] - sent_before
            histories = relay.histories(room, joiners)
            got = [
                ([json.loads(frame)["id"] for frame in history], missed)
                for history, missed in histories.values()
            ]
        return sent, ids, got

    sent, ids, got = run(look_up_for_joiners_with_many_sinces(), timeout_s=20)
    # Each joiner gets all it asked for; Redis sends the room's messages once.
    assert got == [(ids[n + 1 :], False) for n in range(asking)]
    assert sent < 2 * said * len(text)


def test_what_a_look_up_read_for_joiners_goes_once_they_are_welcomed(
    redis_server: RedisServer,
) -> None:
    # Kept till the room's next joiners: 200 rooms with 720 KB of history each held
    # 150 MB, beyond what the history's bounds count.
    async def welcome_a_joiner() -> tuple[int, main.LookedUp | None]:
        async with lobby_through_redis(redis_server) as (rooms, relay, room, keys):
            for n in range(10):
                await relay.run_publish(keys, "lobby ", main.said(1, f"{n}"))
            socket = await let_in_a_joiner(rooms, room)
            while room.doorkeeper is not None:
                await asyncio.sleep(0.01)
            welcome = json.loads(socket.written[0])
            return len(welcome["history"]), relay.in_rooms[room].looked_up

    assert run(welcome_a_joiner(), timeout_s=10) == (10, None)


# --- The relay's promises: lifetimes, pauses, mixed joiners, retries, clock steps -----------


class RedisProxy:
    """A TCP proxy between a worker and redis-server, in a thread of its own, that can
    hold back or drop Redis's reply to the next command that carries a marker."""

    def __init__(self, redis_port: int) -> None:
        self.redis_port, self.port = redis_port, free_port()
        self.loop = asyncio.new_event_loop()
        self.marker: bytes | None = None
        self.connections: list[asyncio.StreamWriter] = []
        self.cut = False  # drop the reply and the connection, rather than hold it
        self.hold_request = False  # hold the command, rather than its reply
        self.channel_held = threading.Event()  # hold what subscriptions are sent
        self.reply_held = threading.Event()
        self.request_held = threading.Event()
        self.released = threading.Event()
        ready = threading.Event()
        self.thread = threading.Thread(target=self.serve, args=(ready,), daemon=True)
        self.thread.start()
        ready.wait(5)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def serve(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(
            asyncio.start_server(self.pass_on, "127.0.0.1", self.port)
        )
        ready.set()
        self.loop.run_forever()

    def hold_reply_to(self, marker: str) -> None:
        self.marker, self.cut = marker.encode(), False
        self.reply_held.clear()
        self.released.clear()

    def cut_reply_to(self, marker: str) -> None:
        self.marker, self.cut = marker.encode(), True
        self.reply_held.clear()

    def hold_request_with(self, marker: str) -> None:
        """Hold back the command itself, not Redis's reply, until release()."""
        self.marker, self.cut, self.hold_request = marker.encode(), False, True
        self.request_held.clear()
        self.released.clear()

    def release(self) -> None:
        self.released.set()

    async def pass_on(
        self, client: asyncio.StreamReader, to_client: asyncio.StreamWriter
    ) -> None:
        server, to_server = await asyncio.open_connection("127.0.0.1", self.redis_port)
        self.connections += [to_client, to_server]
        marked = asyncio.Event()  # the next reply on this connection is the one
        subscription = False

        async def requests() -> None:
            nonlocal subscription
            while data := await client.read(65536):
                subscription = subscription or b"SUBSCRIBE" in data
                if self.marker is not None and self.marker in data:
                    self.marker = None
                    if self.hold_request:
                        self.hold_request = False
                        self.request_held.set()
                        await asyncio.to_thread(self.released.wait, 10)
                    else:
                        marked.set()
                to_server.write(data)
                await to_server.drain()
            to_server.close()

        async def replies() -> None:
            while data := await server.read(65536):
                if marked.is_set():
                    marked.clear()
                    self.reply_held.set()
                    if self.cut:  # Redis ran it; the worker never hears so
                        to_client.transport.abort()
                        to_server.transport.abort()
                        return
                    await asyncio.to_thread(self.released.wait, 10)
                while subscription and self.channel_held.is_set():
                    await asyncio.sleep(0.01)
                to_client.write(data)
                await to_client.drain()
            to_client.close()

        with contextlib.suppress(OSError):
            await asyncio.gather(requests(), replies())

    def stop(self) -> None:
        self.released.set()

        async def close() -> None:
            self.server.close()
            for connection in self.connections:
                connection.transport.abort()
            others = asyncio.all_tasks() - {asyncio.current_task()}
            await asyncio.wait(others, timeout=5)

        asyncio.run_coroutine_threadsafe(close(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


def start_workers(
    tmp_path: Path, redis_urls: list[str], app: str = "main:app"
) -> list[Server]:
    """uvicorn workers sharing a chat through Redis, each at its own URL of it."""
    servers: list[Server] = []
    for i, url in enumerate(redis_urls, 1):
        log_path = tmp_path / f"worker{i}.log"
        servers.append(
            start_server(
                log_path,
                app=app,
                options=redis_options(),
                cwd=tmp_path if app != "main:app" else HERE,
                REDIS_URL=url,
                ANNOUNCE_TOKEN="s3cret",
                PYTHONPATH=str(HERE),
            )
        )
    return servers


# A room's keys expire ROOM_IDLE_S after it is left: these tests shorten the bounds in a
# module of their own that the workers run, main.py's with other constants.
SHORT_BOUNDS = """
import main
main.ROOM_IDLE_S = 2.0
main.PRESENCE_GRACE_S = 0.5
main.HISTORY_MESSAGES = 5
main.WELCOME_HISTORY_MESSAGES = 2
app = main.app
"""


@pytest.fixture
def short_bound_workers(
    redis_server: RedisServer, tmp_path: Path
) -> Iterator[list[Server]]:
    (tmp_path / "short_bounds.py").write_text(SHORT_BOUNDS)
    servers = start_workers(tmp_path, [redis_server.url] * 2, app="short_bounds:app")
    yield servers
    for server in servers:
        stop_with_no_traceback(server)


def test_since_the_message_just_trimmed_off_the_stream_misses_nothing(
    short_bound_workers: list[Server],
) -> None:
    # As in one process: nothing after the message just dropped is missing.
    first, second = short_bound_workers

    async def one_more_than_the_stream_keeps(stack: contextlib.AsyncExitStack):
        alice, _ = await join_room(stack, first, "/rooms/lobby/1")
        count = 5 + 1  # the shortened HISTORY_MESSAGES, and one more
        ids = [(await say_in_room(alice, f"{i}"))["id"] for i in range(count)]
        _, welcome = await join_room(stack, second, f"/rooms/lobby/2?since={ids[0]}")
        return ids, welcome

    ids, welcome = run(in_rooms(one_more_than_the_stream_keeps))
    assert [message["id"] for message in welcome["history"]] == ids[1:]
    assert welcome["missed"] is False


@pytest.mark.parametrize("since", ["too old", "not an id"])
def test_a_since_redis_cannot_place_gets_all_the_stream_holds_not_just_the_latest(
    short_bound_workers: list[Server], since: str
) -> None:
    # As in one process. The stream keeps 5; a welcome without since, the latest 2.
    first, second = short_bound_workers

    async def stale_and_new(stack: contextlib.AsyncExitStack) -> tuple:
        alice, _ = await join_room(stack, first, "/rooms/lobby/1")
        ids = [(await say_in_room(alice, f"{i}"))["id"] for i in range(8)]
        asked = ids[1] if since == "too old" else "nonsense"
        # Let in together: one read of the stream serves both.
        (_, back), (_, new) = await asyncio.gather(
            join_room(stack, second, f"/rooms/lobby/2?since={asked}"),
            join_room(stack, second, "/rooms/lobby/3"),
        )
        return ids, back, new

    ids, back, new = run(in_rooms(stale_and_new))
    assert ([m["id"] for m in back["history"]], back["missed"]) == (ids[-5:], True)
    assert ([m["id"] for m in new["history"]], new["missed"]) == (ids[-2:], False)


@pytest.mark.parametrize("said", [0, 4, 7])
def test_the_welcome_s_last_id_places_a_client_that_has_seen_no_message(
    short_bound_workers: list[Server], said: int
) -> None:
    # As in one process: a page with no message yet comes back with the welcome's
    # last_id as its since. The stream keeps 5: past them, it missed some.
    first, second = short_bound_workers

    async def away_then_back(stack: contextlib.AsyncExitStack) -> tuple:
        alice = open_client(f"{first.ws_url}/rooms/lobby/1")
        async with alice as websocket:
            welcome = json.loads(await websocket.recv())
        bob, _ = await join_room(stack, second, "/rooms/lobby/2")
        ids = [(await say_in_room(bob, f"{i}"))["id"] for i in range(said)]
        since = welcome["last_id"]
        _, back = await join_room(stack, first, f"/rooms/lobby/1?since={since}")
        return welcome, ids, back

    welcome, ids, back = run(in_rooms(away_then_back))
    assert [m["id"] for m in back["history"]] == ids[-5:]
    newest = ([welcome["last_id"], *ids])[-1]
    assert (back["missed"], back["last_id"]) == (said > 5, newest)
    assert welcome["history"] == []
    # The id of the stream's first entry, trimmed off: the room's own, not 0-0.
    assert re.fullmatch(main.STREAM_ID, welcome["last_id"])
    assert welcome["last_id"] != "0-0"


def test_members_written_by_a_session_long_gone_are_removed_as_joiners_look(
    workers: list[Server], redis_server: RedisServer
) -> None:
    # Each session of a process writes a room's members under a name of its own: in a
    # room that never went idle, those of every session before stayed for good.
    first, _ = workers
    members = "chat:members:lobby"
    with redis.Redis(port=redis_server.port, decode_responses=True) as operator:
        operator.hset(members, "deadbeef0000", "[99]")  # no session mark: long gone

        async def join(stack: contextlib.AsyncExitStack) -> list[int]:
            return (await join_room(stack, first, "/rooms/lobby/1"))[1]["members"]

        assert run(in_rooms(join)) == [1]
        assert not operator.hexists(members, "deadbeef0000")


def test_a_quiet_room_with_people_in_it_keeps_its_history_and_members(
    short_bound_workers: list[Server],
) -> None:
    first, second = short_bound_workers

    async def quiet_for_longer_than_the_expiry(stack: contextlib.AsyncExitStack):
        alice, _ = await join_room(stack, first, "/rooms/lobby/1")
        await join_room(stack, second, "/rooms/lobby/2")
        assert (await next_frame(alice, "joined"))["client_ids"] == [2]
        last = (await say_in_room(alice, "before a quiet spell"))["id"]
        await asyncio.sleep(4)  # twice ROOM_IDLE_S, with nobody saying anything
        _, welcome = await join_room(stack, second, f"/rooms/lobby/3?since={last}")
        return welcome

    welcome = run(in_rooms(quiet_for_longer_than_the_expiry))
    assert (welcome["history"], welcome["missed"]) == ([], False)
    assert welcome["members"] == [1, 2, 3]


def test_a_room_nobody_is_in_is_forgotten_after_its_idle_time(
    short_bound_workers: list[Server],
) -> None:
    first, second = short_bound_workers

    async def leave_it(stack: contextlib.AsyncExitStack) -> str:
        alice, _ = await join_room(stack, first, "/rooms/lobby/1")
        last = (await say_in_room(alice, "the last word"))["id"]
        await alice.close()
        return last

    last = run(in_rooms(leave_it))
    time.sleep(3)  # longer than ROOM_IDLE_S, and the grace
    welcome = run(in_rooms(lambda stack: joined(stack, second, f"?since={last}")))
    assert (welcome["history"], welcome["missed"]) == ([], True)


async def joined(stack: contextlib.AsyncExitStack, server: Server, query: str) -> dict:
    return (await join_room(stack, server, f"/rooms/lobby/9{query}"))[1]


def test_a_worker_paused_past_its_liveness_closes_its_clients_who_come_back(
    workers: list[Server],
) -> None:
    # Paused longer than PROCESS_TTL_S, the others count its members gone: it closes
    # them with 1013 as it resumes, and they come back through the front door.
    first, second = workers

    async def pause(stack: contextlib.AsyncExitStack) -> tuple:
        alice, _ = await join_room(stack, first, "/rooms/lobby/1")
        bob, _ = await join_room(stack, second, "/rooms/lobby/2")
        assert (await next_frame(alice, "joined"))["client_ids"] == [2]
        last = (await say_in_room(alice, "before the pause"))["id"]
        assert (await next_frame(bob, "message"))["id"] == last
        second.process.send_signal(signal.SIGSTOP)
        assert (await next_frame(alice, "left"))["client_ids"] == [2]
        said = (await say_in_room(alice, "while it was paused"))["id"]
        await asyncio.sleep(7 - main.PROCESS_TTL_S)
        second.process.send_signal(signal.SIGCONT)
        resumed_at = time.monotonic()
        bob_got: list[str] = []  # what reached its process while paused, if anything
        closed = await closed_with(bob, into=bob_got)
        assert [json.loads(frame)["id"] for frame in bob_got] in ([], [said])
        while True:  # the page's retries: refused until the worker is back in session
            try:
                _, welcome = await join_room(
                    stack, second, f"/rooms/lobby/2?since={last}"
                )
                break
            except ConnectionClosed as refused:
                assert refused.rcvd is not None
                code_and_reason = (refused.rcvd.code, refused.rcvd.reason)
                assert code_and_reason == (1013, SERVER_PAUSED)  # Redis was not lost
            await asyncio.sleep(0.5)
        rejoined = await next_frame(alice, "joined")
        return closed, welcome, rejoined, said, time.monotonic() - resumed_at

    closed, welcome, rejoined, said, back_after = run(in_rooms(pause))
    assert closed == (1013, SERVER_PAUSED)
    assert "This process was silent for" in second.log()
    assert "Lost Redis" not in second.log()  # it was this process, not Redis
    assert [m["id"] for m in welcome["history"]] == [said]
    assert welcome["missed"] is False
    assert rejoined["client_ids"] == [2]
    assert back_after < PROCESS_GONE_BOUND_S


@pytest.fixture
def proxied_workers(
    redis_server: RedisServer, tmp_path: Path
) -> Iterator[tuple[list[Server], RedisProxy]]:
    """Two workers; the second reaches Redis through a proxy the test controls."""
    proxy = RedisProxy(redis_server.port)
    servers = start_workers(tmp_path, [redis_server.url, proxy.url])
    yield servers, proxy
    proxy.stop()
    for server in servers:
        stop_with_no_traceback(server)


CHANNEL_HELD_S = 0.5  # a process this far behind the channel is behind, not lost


def test_a_client_back_on_a_process_behind_the_channel_gets_nothing_twice(
    proxied_workers: tuple[list[Server], RedisProxy],
) -> None:
    # The process it comes back to has yet to deliver what the client had: let in
    # at once, the client would get those messages again, live.
    (first, second), proxy = proxied_workers

    async def back_ahead(stack: contextlib.AsyncExitStack) -> tuple[str, dict, list]:
        anchor, _ = await join_room(stack, second, "/rooms/ahead/1")
        mover, _ = await join_room(stack, first, "/rooms/ahead/7")
        assert (await next_frame(anchor, "joined"))["client_ids"] == [7]
        proxy.channel_held.set()
        had = [(await say_in_room(mover, f"had {i}"))["id"] for i in range(3)]
        await mover.close()
        back = open_client(f"{second.ws_url}/rooms/ahead/7?since={had[-1]}")
        mover = await stack.enter_async_context(back)
        await asyncio.sleep(CHANNEL_HELD_S)
        proxy.channel_held.clear()
        welcome = json.loads(await mover.recv())
        await say_in_room(anchor, "after", ignore={"message", "left", "joined"})
        live = []
        while (frame := json.loads(await mover.recv())).get("text") != "after":
            live.append(frame)
        return had[-1], welcome, live

    last, welcome, live = run(in_rooms(back_ahead))
    assert (welcome["type"], welcome["history"], welcome["missed"]) == (
        "welcome",
        [],
        False,
    )
    assert welcome["last_id"] == last
    assert live == []


def test_joiners_with_and_without_since_let_in_together_miss_nothing(
    proxied_workers: tuple[list[Server], RedisProxy],
) -> None:
    (first, second), proxy = proxied_workers

    async def ids_until(websocket: ClientConnection, welcome: dict, last: str) -> list:
        """The welcome's history, then what comes live, up to `last`: their ids."""
        ids = [message["id"] for message in welcome["history"]]
        while last not in ids:
            frame = json.loads(await websocket.recv())
            if frame["type"] == "message":
                ids.append(frame["id"])
            else:  # the other joiners, and nothing else
                assert frame["type"] == "joined", frame
                assert set(frame["client_ids"]) <= {2, 3}, frame
        return ids

    async def mixed_batch(stack: contextlib.AsyncExitStack) -> tuple[list, dict]:
        alice, _ = await join_room(stack, first, "/rooms/lobby/1")
        last = (await say_in_room(alice, "seen"))["id"]
        await join_room(stack, second, "/rooms/lobby/4")  # the next joiners wait a turn
        assert (await next_frame(alice, "joined"))["client_ids"] == [4]
        # Redis's answer to the look-up for the joiner with `since` is held back, while
        # a message goes out: as if it came between two reads.
        proxy.hold_reply_to(last)
        returning = asyncio.create_task(
            join_room(stack, second, f"/rooms/lobby/2?since={last}")
        )
        fresh = asyncio.create_task(join_room(stack, second, "/rooms/lobby/3"))
        assert await asyncio.to_thread(proxy.reply_held.wait, 5)
        # The joiners are told to alice when they are let in: before or after this.
        told: list[dict] = []
        between = (await say_in_room(alice, "between the reads", {"joined"}, told))[
            "id"
        ]
        proxy.release()
        back, back_welcome = await returning
        new, new_welcome = await fresh
        marker = (await say_in_room(alice, "after", {"joined"}, told))["id"]
        # Both in one turn, with one look-up: told in one notice, before or after the
        # marker (alice's process hears of them through Redis).
        while {2, 3} - {i for frame in told for i in frame["client_ids"]}:
            told.append(await next_frame(alice, "joined"))
        assert told == [{"type": "joined", "client_ids": [2, 3]}]
        heard = {
            "back": await ids_until(back, back_welcome, marker),
            "new": await ids_until(new, new_welcome, marker),
        }
        missed = {"back": back_welcome["missed"], "new": new_welcome["missed"]}
        return [last, between, marker], {"heard": heard, "missed": missed}

    (seen, between, marker), got = run(in_rooms(mixed_batch))
    # Each once, in order: the returning one after what it had seen, the new one all.
    assert got["heard"] == {"back": [between, marker], "new": [seen, between, marker]}
    assert got["missed"] == {"back": False, "new": False}


def test_a_session_s_first_heartbeat_run_late_loses_nothing(
    proxied_workers: tuple[list[Server], RedisProxy], redis_server: RedisServer
) -> None:
    # Refused as late, it marked nothing: the next, finding no mark, would take Redis
    # for lost (flushed), and close every client of the process.
    (_, second), proxy = proxied_workers
    with redis.Redis(port=redis_server.port) as operator:
        operator.client_kill_filter(
            _type="pubsub"
        )  # every process starts a new session
        wait_for_log(second, "Lost Redis")
        proxy.hold_request_with("chat:session:")  # the new session's first heartbeat
        assert proxy.request_held.wait(RECOVERY_BOUND_S)
        time.sleep(
            main.PUBLISH_DEADLINE_S + 0.2
        )  # past its deadline, within its timeout
        proxy.release()
    wait_for_log(second, RELAYING, count=2, timeout_s=RECOVERY_BOUND_S)
    time.sleep(2 * main.REDIS_PING_INTERVAL_S)  # the next heartbeats
    assert "no longer held" not in second.log()
    assert second.log().count("Lost Redis") == 1


def test_a_publish_whose_reply_is_lost_is_published_once(
    proxied_workers: tuple[list[Server], RedisProxy],
) -> None:
    # The connection breaks after Redis ran the publish, before its reply: redis-py
    # sends it again on a fresh connection.
    (first, second), proxy = proxied_workers

    async def cut(stack: contextlib.AsyncExitStack) -> list[str]:
        alice, _ = await join_room(stack, first, "/rooms/lobby/1")
        bob, _ = await join_room(stack, second, "/rooms/lobby/2")
        await next_frame(alice, "joined")
        proxy.cut_reply_to("once only")
        await bob.send(json.dumps({"text": "once only"}))
        assert await asyncio.to_thread(proxy.reply_held.wait, 5)
        # Its next message goes once the first was published: a marker after it.
        await bob.send(json.dumps({"text": "marker"}))
        heard = []
        while (frame := await next_frame(alice, "message"))["text"] != "marker":
            heard.append(frame["text"])
        return heard

    assert run(in_rooms(cut)) == ["once only"]


def test_a_publish_whose_reply_is_lost_in_the_chat_is_published_once(
    proxied_workers: tuple[list[Server], RedisProxy],
) -> None:
    (first, second), proxy = proxied_workers

    async def cut() -> list[str]:
        async with (
            open_client(f"{first.ws_url}/chat/1") as alice,
            open_client(f"{second.ws_url}/chat/2") as bob,
        ):
            proxy.cut_reply_to("once only")
            await bob.send("once only")
            assert await asyncio.to_thread(proxy.reply_held.wait, 5)
            assert await receive_says(alice, 2, 1) == ["once only"]
            await bob.send("marker")
            heard = []
            while (message := await alice.recv()) != "Client #2 says: marker":
                heard.append(message)
            return heard

    assert run(cut()) == []


# The worker refuses a publish that reaches Redis 1 s late, not 1.5 s, so that the test
# has a wide window between that and giving up on Redis's reply (REDIS_TIMEOUT_S, 2 s);
# once Redis is lost, it waits a minute before it subscribes again.
LATE_PUBLISHES = """
import main
main.PUBLISH_DEADLINE_S = 1.0
main.REDIS_RETRY_S = 60.0
app = main.app
"""
HELD_S = 1.4  # a publish held this long reaches Redis past its deadline, not timed out


@pytest.fixture
def proxied_worker(
    redis_server: RedisServer, tmp_path: Path
) -> Iterator[tuple[Server, RedisProxy]]:
    (tmp_path / "late_publishes.py").write_text(LATE_PUBLISHES)
    proxy = RedisProxy(redis_server.port)
    (server,) = start_workers(tmp_path, [proxy.url], app="late_publishes:app")
    yield server, proxy
    proxy.stop()
    stop_with_no_traceback(server)


def post_while_redis_is_lost(
    server: Server,
    proxy: RedisProxy,
    operator: redis.Redis,
    held_s: float,
    listener=None,
) -> tuple[tuple, tuple[int, dict]]:
    """POST a message, and hold it back on its way to Redis; meanwhile, cut every
    process's subscription (then subscribe `listener`, if any). Then let it through,
    `held_s` after it was held."""

    async def lose_redis_while_a_post_is_on_its_way() -> tuple[tuple, tuple]:
        async with open_client(f"{server.ws_url}/chat/1") as alice:
            proxy.hold_request_with("held back")
            posted = asyncio.create_task(asyncio.to_thread(post, server, "held back"))
            assert await asyncio.to_thread(proxy.request_held.wait, 5)
            held_at = time.monotonic()
            operator.client_kill_filter(_type="pubsub")
            closed = await asyncio.wait_for(closed_with(alice), DETECTION_BOUND_S)
        if listener is not None:
            listener.subscribe(main.REDIS_CHANNEL)
            assert listener.get_message(timeout=5)["type"] == "subscribe"
        await asyncio.sleep(held_at + held_s - time.monotonic())
        proxy.release()
        return closed, await posted

    return run(lose_redis_while_a_post_is_on_its_way())


def test_a_publish_refused_as_late_is_not_sent_again_once_redis_is_lost(
    proxied_worker: tuple[Server, RedisProxy], redis_server: RedisServer
) -> None:
    # Refused as late, a publish is sent again once Redis's clock is learned: not if
    # meanwhile the process lost Redis and closed its chat. It would be a message
    # nobody here can receive, and a 202 for it.
    server, proxy = proxied_worker
    with (
        redis.Redis(port=redis_server.port, decode_responses=True) as operator,
        operator.pubsub() as listener,
    ):
        closed, answer = post_while_redis_is_lost(
            server, proxy, operator, HELD_S, listener
        )
        operator.publish(main.REDIS_CHANNEL, "marker")
        heard = channel_until(listener, "marker")
    assert closed == LOST
    assert answer == (503, {"detail": NOT_SENT})
    assert heard == ["marker"]


def test_a_chat_message_no_process_was_subscribed_to_hear_is_not_sent(
    proxied_worker: tuple[Server, RedisProxy], redis_server: RedisServer
) -> None:
    # In time, but every process had lost its subscription: nobody got it, and no
    # stream keeps it (a room's would, for its members to catch up from).
    server, proxy = proxied_worker
    with redis.Redis(port=redis_server.port, decode_responses=True) as operator:
        closed, answer = post_while_redis_is_lost(server, proxy, operator, 0.0)
    assert closed == LOST
    assert answer == (503, {"detail": NOT_SENT})


@contextlib.contextmanager
def the_clock_stepped_forward(seconds: float) -> Iterator[None]:
    """This machine's wall clock, which Redis's TIME reads, stepped as an NTP correction
    steps it; back again after. (libfaketime cannot fake it for Debian's redis-server,
    which allocates with jemalloc: libfaketime issue #130.) The workers time their
    publishes with the monotonic clock, and Redis's answers: for them, only Redis's
    clock has stepped."""
    try:
        time.clock_settime(time.CLOCK_REALTIME, time.time() + seconds)
    except PermissionError:
        message = "stepping the clock needs root (CAP_SYS_TIME)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    try:
        yield
    finally:
        time.clock_settime(time.CLOCK_REALTIME, time.time() - seconds)


def test_a_step_of_redis_clock_disconnects_nobody(workers: list[Server]) -> None:
    first, second = workers

    async def step_the_clock(stack: contextlib.AsyncExitStack) -> tuple:
        chat = await stack.enter_async_context(open_client(f"{first.ws_url}/chat/1"))
        alice, _ = await join_room(stack, first, "/rooms/lobby/1")
        bob, _ = await join_room(stack, second, "/rooms/lobby/2")
        assert (await next_frame(alice, "joined"))["client_ids"] == [2]
        await say_in_room(alice, "before")
        # A step of 5 s may outlast the liveness keys in Redis (PROCESS_TTL_S): then
        # each process hears the other's members leave and come back at once.
        blips = {"left", "joined"}
        with the_clock_stepped_forward(5):
            said = [await say_in_room(alice, "right after", blips)]
            await chat.send("chat right after")
            bob_heard = {"message"} | blips  # alice's messages, before its own
            said.append(await say_in_room(bob, "from the other worker", bob_heard))
            heard = [(await next_frame(alice, "message", blips))["text"]]
            return said, heard, await receive_says(chat, 1, 1, YOU_WROTE)

    said, heard, chatted = run(in_rooms(step_the_clock))
    assert [message["text"] for message in said] == [
        "right after",
        "from the other worker",
    ]
    assert heard == ["from the other worker"]
    assert chatted == ["chat right after"]
    for server in workers:
        assert "Lost Redis" not in server.log()
        assert_nothing_went_wrong(server)


def test_a_worker_stopped_for_less_than_its_liveness_keeps_its_clients(
    workers: list[Server],
) -> None:
    # Its own loop was stopped, not Redis: nothing was lost, and nobody is closed.
    first, second = workers

    async def stop_it(stack: contextlib.AsyncExitStack) -> list[str]:
        alice, _ = await join_room(stack, first, "/rooms/lobby/1")
        bob, _ = await join_room(stack, second, "/rooms/lobby/2")
        assert (await next_frame(alice, "joined"))["client_ids"] == [2]
        second.process.send_signal(signal.SIGSTOP)
        await say_in_room(alice, "while it was stopped")
        await asyncio.sleep(main.REDIS_TIMEOUT_S + 1 - 0.2)
        second.process.send_signal(signal.SIGCONT)
        await asyncio.sleep(main.REDIS_PING_INTERVAL_S * 2)
        await say_in_room(alice, "after")
        return [(await next_frame(bob, "message"))["text"] for _ in range(2)]

    assert run(in_rooms(stop_it)) == ["while it was stopped", "after"]
    assert "Lost Redis" not in second.log()
