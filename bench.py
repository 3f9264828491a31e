"""Measure the chat against the tutorial's own code, in the same run, on this machine.

    python bench.py             # up to 10,000 clients: about 20 minutes
    python bench.py --quick     # up to 1,000 clients: about 3 minutes
    python bench.py --redis     # also the chat across two workers, through Redis
    python bench.py --sketch    # also the simplest cure, a queue and a task per client
    python bench.py --flags     # also main.py with the README's production flags
    python bench.py --hostile-only  # the hostile clients alone: about 10 minutes

The servers: the tutorial's code as it is taught (kept below as `naive_app`), and
`main:app`; with --redis, also `main:app` as two uvicorn workers sharing the chat through
a redis-server; with --sketch, also the simplest cure of step 3's header (`queue_app`).
Each runs as its own uvicorn process, and its CPU time and memory (every worker's, and
Redis's) are read from /proc, so this needs Linux; the load generator's own work (this
process) does not count. Absolute figures depend on the machine; the ratios are the
point. Progress goes to standard error, the tables to standard output.

On 2 cores the load generator shares the machine with the server, and a slow one counts as
the server's latency: so it runs on uvloop, as uvicorn does, and without garbage
collection while it measures (see `measuring`).
"""

import argparse
import asyncio
import contextlib
import gc
import itertools
import json
import os
import random
import shutil
import signal
import socket
import statistics
import string
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import uvloop
from fastapi import FastAPI, WebSocket, WebSocketDisconnect
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from conftest import (
    HERE,
    RedisServer,
    Server,
    client_frame,
    flooder_process,
    following_along_options,
    free_port,
    process_cpu_seconds,
    process_rss_bytes,
    production_options,
    raise_open_files_limit,
    raw_handshake,
    read_frame,
    read_until_close,
    send_endless_header,
    send_pings_reading_nothing,
    send_unread,
    start_server,
    wait_for_log,
)

# --- The reference: the tutorial's code, as it is taught -----------------------------------

naive_app = FastAPI()


class ConnectionManager:
    def __init__(self):
        self.active_connections: list[WebSocket] = []

    async def connect(self, websocket: WebSocket):
        await websocket.accept()
        self.active_connections.append(websocket)

    def disconnect(self, websocket: WebSocket):
        self.active_connections.remove(websocket)

    async def send_personal_message(self, message: str, websocket: WebSocket):
        await websocket.send_text(message)

    async def broadcast(self, message: str):
        for connection in self.active_connections:
            await connection.send_text(message)


manager = ConnectionManager()


@naive_app.websocket("/ws")
async def websocket_endpoint(websocket: WebSocket):
    await websocket.accept()
    while True:
        data = await websocket.receive_text()
        await websocket.send_text(f"Message text was: {data}")


@naive_app.websocket("/chat/{client_id}")
async def websocket_chat_endpoint(websocket: WebSocket, client_id: int):
    await manager.connect(websocket)
    try:
        while True:
            data = await websocket.receive_text()
            await manager.send_personal_message(f"You wrote: {data}", websocket)
            await manager.broadcast(f"Client #{client_id} says: {data}")
    except WebSocketDisconnect:
        manager.disconnect(websocket)
        await manager.broadcast(f"Client #{client_id} left the chat")


# --- The simplest cure, as step 3's header describes it (--sketch) --------------------------
# A queue and a writer task per client: broadcast waits on nobody, and a client whose
# queue holds 100 messages is taken out and closed with 1008. Measured beside the others,
# it shows what a task woken per client for every message costs.

queue_app = FastAPI()
QUEUE_MESSAGES = 100
closers: set[asyncio.Task] = set()  # closing tasks, kept from the garbage collector


class QueueClient:
    def __init__(self, websocket: WebSocket):
        self.websocket = websocket
        self.queue: asyncio.Queue[str] = asyncio.Queue(maxsize=QUEUE_MESSAGES)
        self.writer = asyncio.create_task(self.write_queue())

    async def write_queue(self) -> None:
        with contextlib.suppress(Exception):  # gone: its handler takes it out
            while True:
                await self.websocket.send_text(await self.queue.get())


async def close_quietly(websocket: WebSocket, code: int) -> None:
    with contextlib.suppress(Exception):  # closed already
        await websocket.close(code)


class QueueManager:
    def __init__(self):
        self.active_connections: dict[WebSocket, QueueClient] = {}

    async def connect(self, websocket: WebSocket) -> None:
        await websocket.accept()
        self.active_connections[websocket] = QueueClient(websocket)

    def disconnect(self, websocket: WebSocket) -> None:
        client = self.active_connections.pop(websocket, None)
        if client is not None:
            client.writer.cancel()

    def send(self, client: QueueClient, message: str) -> None:
        try:
            client.queue.put_nowait(message)
        except asyncio.QueueFull:  # out, and closed in a task: nobody waits
            self.disconnect(client.websocket)
            closer = asyncio.create_task(close_quietly(client.websocket, 1008))
            closers.add(closer)
            closer.add_done_callback(closers.discard)

    def send_personal_message(self, message: str, websocket: WebSocket) -> None:
        if (client := self.active_connections.get(websocket)) is not None:
            self.send(client, message)

    def broadcast(self, message: str) -> None:
        for client in list(self.active_connections.values()):
            self.send(client, message)


queue_manager = QueueManager()


queue_app.websocket("/ws")(websocket_endpoint)  # the tutorial's echo, for the echo load


@queue_app.websocket("/chat/{client_id}")
async def queue_chat_endpoint(websocket: WebSocket, client_id: int):
    await queue_manager.connect(websocket)
    try:
        while True:
            data = await websocket.receive_text()
            queue_manager.send_personal_message(f"You wrote: {data}", websocket)
            queue_manager.broadcast(f"Client #{client_id} says: {data}")
    except WebSocketDisconnect:
        queue_manager.disconnect(websocket)
        queue_manager.broadcast(f"Client #{client_id} left the chat")
    finally:
        queue_manager.disconnect(websocket)  # cut off, or any other end


# --- The servers under load -----------------------------------------------------------


@dataclass
class Contender:
    name: str
    app: str
    workers: int = 1
    # Each worker gets REDIS_URL, pointing at a redis-server of the contender's own.
    redis: bool = False
    options: tuple[str, ...] = ()  # more uvicorn flags


@dataclass
class Deployment:
    """The processes serving one contender: its uvicorn workers, and Redis if it uses it."""

    workers: list[Server]
    redis: RedisServer | None = None

    def ws_url(self, client_number: int) -> str:
        """Clients are spread over the workers, as a load balancer would."""
        return self.workers[client_number % len(self.workers)].ws_url

    def pids(self) -> list[int]:
        redis_pids = (
            [self.redis.process.pid] if self.redis and self.redis.process else []
        )
        return [worker.process.pid for worker in self.workers] + redis_pids

    def cpu_seconds(self) -> float:
        return sum(process_cpu_seconds(pid) for pid in self.pids())

    def rss_bytes(self) -> int:
        return sum(process_rss_bytes(pid) for pid in self.pids())

    def stop(self) -> None:
        for worker in self.workers:
            worker.stop()
        if self.redis is not None:
            self.redis.kill()


def deploy(contender: Contender, log_dir: Path) -> Deployment:
    deployment = Deployment(workers=[])
    env = {}
    if contender.redis:
        deployment.redis = RedisServer(shutil.which("redis-server") or "", free_port())
        deployment.redis.start()
        env["REDIS_URL"] = deployment.redis.url
    try:
        for number in range(contender.workers):
            log_path = log_dir / f"{contender.name} {number}.log"
            options = ("--log-level", "warning", *contender.options)
            worker = start_server(log_path, app=contender.app, options=options, **env)
            deployment.workers.append(worker)

    except BaseException:
        deployment.stop()
        raise
    return deployment


# --- Loads -----------------------------------------------------------------------------------

CHAT_STEPS = (1000, 2000, 5000, 10_000)  # clients in the ordinary chat, step by step
QUICK_CHAT_STEPS = (200, 500, 1000)
CHAT_MESSAGES = 20  # one at a time, each from another client
CHAT_WAIT_S = 1.0  # the next message goes once the last reached everyone, or after this
SHOOTOUT_LATENCY_S = 0.5  # websocket-shootout: 95% of broadcasts reach all within this
SHOOTOUT_SHARE = 0.95
FAN_OUT_CLIENTS = 1000
FAN_OUT_MESSAGES = 100  # one client's burst, sent as fast as it can
ECHO_ROUND_TRIPS = 50  # per client, one after another
# Each sends one burst of 100, of messages short enough to count as one each in
# main.py's flood control (1 KiB more counts as a second).
STALL_SENDERS, STALL_MESSAGE_BYTES = 30, 1000
STALL_TIMEOUT_S = 10.0  # the tutorial's loop never finishes: stop waiting then
QUIET_TIMEOUT_S = 3.0  # no delivery for this long: the rest is lost
IDLE_SAMPLE_S = 20.0  # uvicorn's keepalive interval: every client's ping, once
CONNECT_BATCH = 50
RSS_SAMPLE_S = 0.02
REPEATS = 3  # runs of the burst and echo loads: solo per server, then all at once
TOP_STEP_REPEATS = 3  # runs of the ordinary chat at the largest step, alternating


def progress(line: str) -> None:
    print(f"  ... {line}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def measuring() -> Iterator[None]:
    """This process's garbage collector off, while a load's messages go round.

    The faster a server writes, the more messages wait here at once, and the more often
    the collector runs: at 10,000 clients it took 0.3 s of a 4 s run against the
    tutorial's server and 0.9 s against main.py's, delaying every message behind it, so
    the faster server measured the slower one. So too when 10,000 room clients come back
    at once: their handshakes cost this process 19.5 s of CPU with the collector on, 12.7 s
    with it off. Nothing made in these few seconds needs it.
    """
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


Item, Connected = TypeVar("Item"), TypeVar("Connected")


async def in_batches(
    connect_one: Callable[[Item], Awaitable[Connected]], items: Sequence[Item]
) -> list[Connected]:
    """connect_one(item) for every item, CONNECT_BATCH at a time, each batch once the one
    before is done."""
    connected: list[Connected] = []
    for start in range(0, len(items), CONNECT_BATCH):
        batch = items[start : start + CONNECT_BATCH]
        connected += await asyncio.gather(*(connect_one(item) for item in batch))
        if start and start % 2000 == 0:
            progress(f"{start} clients connected")
    return connected


async def connect_all(urls: list[str], **options) -> list[ClientConnection]:
    return await in_batches(lambda url: connect_client(url, **options), urls)


def connect_client(url: str, **options) -> connect:
    """A client as a browser is one: it buffers what it receives, and sends no pings of
    its own (the server's, every 20 s, it answers). A ping from every client would cost
    the server as much again as its own: at 10,000 idle clients, 0.047 s of CPU a second
    instead of 0.028."""
    return connect(url, max_queue=None, ping_interval=None, **options)


async def close_all(clients: list[ClientConnection]) -> None:
    await asyncio.gather(
        *(client.close() for client in clients), return_exceptions=True
    )


@dataclass
class Deliveries:
    """What the chat clients received of stamped messages: `Client #N says: seq t`."""

    count: int = 0
    latencies_s: list[float] = field(default_factory=list)
    per_message: dict[int, int] = field(default_factory=dict)
    last_at: dict[int, float] = field(default_factory=dict)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def read(self, client: ClientConnection) -> None:
        # Iterating ends quietly if the server closes the connection: what is missing
        # then counts as lost.
        with contextlib.suppress(ConnectionClosed):
            async for text in client:
                now = time.perf_counter()
                stamp = text.partition(" says: ")[2].split(maxsplit=2)[:2]
                if len(stamp) != 2 or not stamp[0].isdigit():
                    continue  # not a stamped message: a flooder's, say
                seq, sent_at = int(stamp[0]), float(stamp[1])
                self.latencies_s.append(now - sent_at)
                self.per_message[seq] = self.per_message.get(seq, 0) + 1
                self.last_at[seq] = now
                self.count += 1
                self.changed.set()

    async def wait_for(self, done: Callable[[], bool], quiet_s: float) -> None:
        """Until `done()`, or until nothing arrives for `quiet_s`."""
        while not done():
            self.changed.clear()
            try:
                async with asyncio.timeout(quiet_s):
                    await self.changed.wait()
            except TimeoutError:
                return


async def send_stamped(client: ClientConnection, seq: int) -> float:
    sent_at = time.perf_counter()
    with contextlib.suppress(ConnectionClosed):  # cut off: the rest counts as lost
        await client.send(f"{seq} {sent_at}")
    return sent_at


def percentile_ms(samples_s: list[float], p: int) -> float:
    if len(samples_s) < 2:
        return float("nan")
    return statistics.quantiles([s * 1000 for s in samples_s], n=100)[p - 1]


async def idle_cpu_s_per_s(deployment: "Deployment") -> float:
    """The server's CPU a second with every client connected and nothing sent: uvicorn's
    keepalive, a ping to each client every 20 s.

    Over one interval, which holds each client's ping once, however they connected: over
    5 s, right after 10,000 chat clients connected, it measured 0.033 s a second, only
    the pings of those that had connected 20 s before.
    """
    cpu_before, started = deployment.cpu_seconds(), time.perf_counter()
    await asyncio.sleep(IDLE_SAMPLE_S)
    return (deployment.cpu_seconds() - cpu_before) / (time.perf_counter() - started)


def per_delivery_us(cpu_s: float, deliveries: int) -> float:
    return cpu_s * 1e6 / max(deliveries, 1)


def net_of_idle(
    cpu_s: float, seconds: float, idle_cpu: float | None, deliveries: int
) -> dict[str, float]:
    """The CPU per delivery once what the idle clients cost over the load is taken off."""
    if idle_cpu is None:
        return {}
    net_s = cpu_s - idle_cpu * seconds
    return {
        "idle_cpu_s_per_s": idle_cpu,
        "cpu_us_per_delivery_net": per_delivery_us(net_s, deliveries),
    }


async def ordinary_chat(
    deployment: "Deployment", client_count: int, idle: bool = False, **client_options
) -> dict[str, float]:
    """People chatting: one message at a time, each from another client.

    The next message goes once the last one has reached everyone, or after CHAT_WAIT_S.
    With `idle`, the server's CPU with nothing sent is measured first, and taken off.
    """
    rss_before = deployment.rss_bytes()
    clients = await connect_all(
        [f"{deployment.ws_url(i)}/chat/{i}" for i in range(client_count)],
        **client_options,
    )
    await asyncio.sleep(1)  # let the server settle before reading its memory
    rss_idle = deployment.rss_bytes()
    progress(f"{client_count} chat clients connected")
    idle_cpu = await idle_cpu_s_per_s(deployment) if idle else None
    chat = Deliveries()
    readers = [asyncio.create_task(chat.read(c)) for c in clients]
    reached_all_s: list[float] = []
    cpu_before, started = deployment.cpu_seconds(), time.perf_counter()
    with measuring():
        for seq in range(CHAT_MESSAGES):
            sender = clients[(seq * 7919) % client_count]  # another client each time
            sent_at = await send_stamped(sender, seq)
            await chat.wait_for(
                lambda n=seq: chat.per_message.get(n, 0) >= client_count, CHAT_WAIT_S
            )
            if chat.per_message.get(seq, 0) >= client_count:
                reached_all_s.append(chat.last_at[seq] - sent_at)
            else:
                reached_all_s.append(float("inf"))
    cpu, seconds = deployment.cpu_seconds() - cpu_before, time.perf_counter() - started
    rss_after = deployment.rss_bytes()
    for reader in readers:
        reader.cancel()
    await close_all(clients)
    within = sum(t <= SHOOTOUT_LATENCY_S for t in reached_all_s) / len(reached_all_s)
    return net_of_idle(cpu, seconds, idle_cpu, chat.count) | {
        "cpu_us_per_delivery": per_delivery_us(cpu, chat.count),
        "p50_ms": percentile_ms(chat.latencies_s, 50),
        "p99_ms": percentile_ms(chat.latencies_s, 99),
        "rss_mb": rss_after / 1e6,
        "kib_per_idle_connection": (rss_idle - rss_before) / client_count / 1024,
        "lost": client_count * CHAT_MESSAGES - chat.count,
        "share_within_500_ms": within,
    }


async def fan_out(deployment: "Deployment", client_count: int) -> dict[str, float]:
    """One client sends a burst of 100 messages as fast as it can, to all."""
    clients = await connect_all(
        [f"{deployment.ws_url(i)}/chat/{i}" for i in range(client_count)]
    )
    burst = Deliveries()
    expected = client_count * FAN_OUT_MESSAGES
    readers = [asyncio.create_task(burst.read(c)) for c in clients]
    cpu_before, started = deployment.cpu_seconds(), time.perf_counter()
    with measuring():
        for seq in range(FAN_OUT_MESSAGES):
            await send_stamped(clients[0], seq)
        await burst.wait_for(lambda: burst.count >= expected, QUIET_TIMEOUT_S)
    elapsed, cpu = time.perf_counter() - started, deployment.cpu_seconds() - cpu_before
    for reader in readers:
        reader.cancel()
    await close_all(clients)
    return {
        "deliveries_per_s": burst.count / elapsed,
        "cpu_us_per_delivery": per_delivery_us(cpu, burst.count),
        "lost": expected - burst.count,
    }


async def echo(deployment: "Deployment", client_count: int) -> dict[str, float]:
    clients = await connect_all(
        [f"{deployment.ws_url(i)}/ws" for i in range(client_count)]
    )

    async def round_trips(client: ClientConnection) -> None:
        for i in range(ECHO_ROUND_TRIPS):
            await client.send(f"ping {i}")
            assert await client.recv() == f"Message text was: ping {i}"

    cpu_before, started = deployment.cpu_seconds(), time.perf_counter()
    await asyncio.gather(*(round_trips(c) for c in clients))
    elapsed, cpu = time.perf_counter() - started, deployment.cpu_seconds() - cpu_before
    await close_all(clients)
    total = client_count * ECHO_ROUND_TRIPS
    return {
        "round_trips_per_s": total / elapsed,
        "cpu_us_per_round_trip": cpu * 1e6 / total,
    }


async def stalled_client(
    deployment: "Deployment", client_count: int
) -> dict[str, float]:
    """A client that stops reading sits in the room while 30 others send 100 x 1 KB each.

    `client_count` is not used here. With several workers, the stalled client and the
    healthy one watched are on different ones.
    """
    stalled, _ = raw_handshake(deployment.workers[-1].port, "/chat/2", rcvbuf=4096)
    rss_before = peak_rss = deployment.rss_bytes()
    expected = STALL_SENDERS * FAN_OUT_MESSAGES
    senders = await connect_all(
        [f"{deployment.ws_url(0)}/chat/{10 + n}" for n in range(STALL_SENDERS)]
    )
    async with connect(f"{deployment.ws_url(0)}/chat/1", max_queue=None) as healthy:
        received = 0

        async def receive_all() -> None:
            nonlocal received
            async for text in healthy:
                received += " says: " in text
                if received == expected:
                    return

        async def send_all(sender: ClientConnection) -> None:
            for seq in range(FAN_OUT_MESSAGES):
                await sender.send(f"{seq:05d} ".ljust(STALL_MESSAGE_BYTES, "x"))

        started = time.perf_counter()
        tasks = [asyncio.create_task(receive_all())]
        tasks += [asyncio.create_task(send_all(s)) for s in senders]
        deadline = started + STALL_TIMEOUT_S
        while not tasks[0].done() and time.perf_counter() < deadline:
            peak_rss = max(peak_rss, deployment.rss_bytes())
            await asyncio.sleep(RSS_SAMPLE_S)
        elapsed = time.perf_counter() - started
        for task in tasks:
            task.cancel()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(close_all(senders), QUIET_TIMEOUT_S)
    progress(f"healthy client: {received} of {expected} in {elapsed:.2f} s")
    stalled.settimeout(QUIET_TIMEOUT_S)
    try:
        close_code = (await asyncio.to_thread(read_until_close, stalled, ".*"))[0]
    except OSError:
        close_code = 0  # no close frame: never cut off
    stalled.close()
    return {
        "received": received,
        "seconds": elapsed,
        "close_code": close_code,
        "rss_growth_mb": (peak_rss - rss_before) / 1e6,
    }


# --- Step 5: rooms, and everyone coming back at once ---------------------------------------

ROOMS = 100  # the rooms load's clients, in this many rooms of equal size
QUICK_ROOMS = 10
ROOM_SECONDS = 20  # one message a second in every room, for this long
RECONNECT_AT_ONCE = 500  # handshakes in flight when everyone comes back


@dataclass
class RoomDeliveries:
    """What room clients received of stamped messages: {"text": "second sent_at"}."""

    count: int = 0
    latencies_s: list[float] = field(default_factory=list)
    last_ids: dict[int, str] = field(default_factory=dict)  # by client number
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def read(self, number: int, client: ClientConnection) -> None:
        with contextlib.suppress(ConnectionClosed):
            async for text in client:
                now = time.perf_counter()
                frame = json.loads(text)
                if frame["type"] != "message":
                    continue  # who joined or left
                self.latencies_s.append(now - float(frame["text"].split()[1]))
                self.last_ids[number] = frame["id"]
                self.count += 1
                self.changed.set()

    wait_for = Deliveries.wait_for


async def join_rooms(
    deployment: "Deployment", rooms: int, numbers: range, since: dict[int, str]
) -> tuple[list[ClientConnection], list[dict]]:
    """Clients `numbers`, each in room `number % rooms`, once welcomed; their welcomes.

    The first time, they join `in_batches`, as every other load's clients connect, so
    that the server's keepalive pings fall due in the same turns for both loads of the
    comparison: connected one by one instead, 10,000 idle chat clients cost the server
    0.13 s of CPU a second, not 0.07. Coming back (with `since`), RECONNECT_AT_ONCE at a
    time, each to another worker than before, where there are several: as a load balancer
    may send it.
    """
    at_once = asyncio.Semaphore(RECONNECT_AT_ONCE)

    async def join(number: int) -> tuple[ClientConnection, dict]:
        path = f"/rooms/room{number % rooms}/{number}"
        worker = number
        if number in since:
            path += f"?since={since[number]}"
            worker += 1
        async with at_once:
            client = await connect_client(
                deployment.ws_url(worker) + path, max_size=None
            )
            return client, json.loads(await client.recv())

    if since:
        joined = await asyncio.gather(*(join(number) for number in numbers))
    else:
        joined = await in_batches(join, numbers)
    return [client for client, _ in joined], [welcome for _, welcome in joined]


async def rooms_chat(deployment: "Deployment", client_count: int) -> dict[str, float]:
    """People chatting in rooms, then every client dropping at once and coming back.

    One message a second in every room, each second from another member, the rooms'
    messages spread over the second. Then every connection is dropped without a close
    frame (a network cut), and every client comes back with `since` = the id of the last
    message it received.
    """
    rooms = min(ROOMS, max(client_count // 100, 1))
    rss_before = deployment.rss_bytes()
    clients, _ = await join_rooms(deployment, rooms, range(client_count), {})
    await asyncio.sleep(1)  # let the server settle before reading its memory
    rss_idle = deployment.rss_bytes()
    progress(f"{client_count} clients in {rooms} rooms")
    idle_cpu = await idle_cpu_s_per_s(deployment)
    chat = RoomDeliveries()
    readers = [asyncio.create_task(chat.read(n, c)) for n, c in enumerate(clients)]
    members = client_count // rooms
    cpu_before = deployment.cpu_seconds()
    with measuring():
        started = time.perf_counter()
        for second in range(ROOM_SECONDS):
            for room in range(rooms):
                sender = clients[room + rooms * ((second * 37) % members)]
                text = f"{second} {time.perf_counter()}"
                await sender.send(json.dumps({"text": text}))
                next_at = started + second + (room + 1) / rooms
                await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
        expected = client_count * ROOM_SECONDS
        await chat.wait_for(lambda: chat.count >= expected, QUIET_TIMEOUT_S)
    cpu, seconds = deployment.cpu_seconds() - cpu_before, time.perf_counter() - started
    rss_after = deployment.rss_bytes()
    for reader in readers:
        reader.cancel()
    figures = net_of_idle(cpu, seconds, idle_cpu, chat.count) | {
        "cpu_us_per_delivery": per_delivery_us(cpu, chat.count),
        "p50_ms": percentile_ms(chat.latencies_s, 50),
        "p99_ms": percentile_ms(chat.latencies_s, 99),
        "rss_mb": rss_after / 1e6,
        "kib_per_idle_connection": (rss_idle - rss_before) / client_count / 1024,
        "lost": expected - chat.count,
    }
    progress(f"all {client_count} dropping at once, and coming back with since")
    for client in clients:
        client.transport.abort()
    cpu_before, started = deployment.cpu_seconds(), time.perf_counter()
    with measuring():
        clients, welcomes = await join_rooms(
            deployment, rooms, range(client_count), chat.last_ids
        )
        reconnect_s = time.perf_counter() - started
    figures |= {
        "reconnect_s": reconnect_s,
        "reconnect_cpu_s": deployment.cpu_seconds() - cpu_before,
        "reconnect_welcomed": len(welcomes),
        "reconnect_missed": sum(welcome["missed"] for welcome in welcomes),
    }
    await close_all(clients)
    return figures


async def measure_rooms(
    contender: Contender, client_count: int, log_dir: Path
) -> dict[str, float]:
    progress(f"rooms, {client_count} clients: {contender.name}")
    [figures] = await run_load([contender], rooms_chat, client_count, log_dir)
    return figures


ROOM_ROWS = [
    ("cpu_us_per_delivery", "server CPU µs per delivery", "{:.1f}"),
    ("idle_cpu_s_per_s", "... idle: server CPU s a second, nothing sent", "{:.3f}"),
    (
        "cpu_us_per_delivery_net",
        "... net of idle: server CPU µs per delivery",
        "{:.1f}",
    ),
    ("p50_ms", "p50 latency, ms", "{:.0f}"),
    ("p99_ms", "p99 latency, ms", "{:.0f}"),
    ("rss_mb", "server RSS, MB", "{:.0f}"),
    ("kib_per_idle_connection", "KiB per idle connection", "{:.1f}"),
    ("lost", "messages lost", "{:.0f}"),
    ("reconnect_s", "all dropped at once: seconds until all are welcomed", "{:.1f}"),
    ("reconnect_cpu_s", "... server CPU seconds", "{:.1f}"),
    ("reconnect_welcomed", "... clients welcomed", "{:,.0f}"),
    ("reconnect_missed", "... told they missed some", "{:.0f}"),
]


def print_rooms_table(names: list[str], results: list[dict]) -> None:
    """Step 5's rooms beside step 3's chat: each column against the first."""
    ratios = [f"{name} / {names[0]}" for name in names[1:]]
    print("| " + " | ".join(["measure", *names, *ratios]) + " |")
    print("|" + " --- |" * (1 + len(names) + len(ratios)))
    for key, label, number in ROOM_ROWS:
        values = [result.get(key) for result in results]
        cells = ["" if value is None else number.format(value) for value in values]
        for value in values[1:]:
            show = key in RATIO_KEYS and values[0] and value is not None
            cells.append(f"{value / values[0]:.2f}x" if show else "")
        print(f"| {label} | " + " | ".join(cells) + " |")


# --- Running it --------------------------------------------------------------------------------


@dataclass
class Load:
    name: str
    run: Callable[["Deployment", int], Awaitable[dict[str, float]]]
    best_by: str  # over solo runs, keep the one where this is lowest
    repeats: int
    cpu_key: str | None = None  # measured again with every server loaded at once


LOADS = [
    Load("burst", fan_out, "cpu_us_per_delivery", REPEATS, "cpu_us_per_delivery"),
    Load("echo", echo, "cpu_us_per_round_trip", REPEATS, "cpu_us_per_round_trip"),
    Load("stalled client", stalled_client, "seconds", 1),
]


async def run_load(
    contenders: list[Contender],
    load: Callable[..., Awaitable[dict[str, float]]],
    client_count: int,
    log_dir: Path,
    **options,
) -> list[dict[str, float]]:
    """One run of a load against each contender at the same time, each with its clients."""
    # Fresh deployments for each run: the tutorial's never recovers from a stall.
    deployments: list[Deployment] = []
    try:
        for contender in contenders:
            deployments.append(deploy(contender, log_dir))
        runs = (load(deployment, client_count, **options) for deployment in deployments)
        return list(await asyncio.gather(*runs))
    finally:
        for deployment in deployments:
            deployment.stop()


async def measure_chat(
    contenders: list[Contender], steps: tuple[int, ...], log_dir: Path
) -> list[dict]:
    """The ordinary chat at each step, the contenders alternating; the largest step 3 times.

    At the largest step, the figures are the mean of the runs. The websocket-shootout
    figure is the largest step at which 95% of broadcasts (of all its runs) reached
    everyone in 500 ms.
    """
    results: list[dict] = [{"shootout": {"clients": 0}} for _ in contenders]
    for step in steps:
        repeats = TOP_STEP_REPEATS if step == steps[-1] else 1
        runs: list[list[dict[str, float]]] = [[] for _ in contenders]
        for attempt in range(1, repeats + 1):
            for contender, samples in zip(contenders, runs, strict=True):
                progress(
                    f"ordinary chat, {step} clients, run {attempt}: {contender.name}"
                )
                [figures] = await run_load(
                    [contender], ordinary_chat, step, log_dir, idle=step == steps[-1]
                )
                samples.append(figures)
        for result, samples in zip(results, runs, strict=True):
            # Of all the broadcasts at this step, over every run.
            within = statistics.mean(s["share_within_500_ms"] for s in samples)
            result["shootout"][step] = within * 100
            if within >= SHOOTOUT_SHARE:
                result["shootout"]["clients"] = step
            if step == steps[-1]:
                result["chat"] = {
                    k: statistics.mean(s[k] for s in samples) for k in samples[0]
                }
    # Without compression: the same chat, served with --ws-per-message-deflate false.
    plain = [
        Contender(
            c.name,
            c.app,
            c.workers,
            c.redis,
            (*c.options, "--ws-per-message-deflate", "false"),
        )
        for c in contenders
    ]
    for contender, result in zip(plain, results, strict=True):
        progress(
            f"ordinary chat, {steps[-1]} clients, no compression: {contender.name}"
        )
        [figures] = await run_load(
            [contender], ordinary_chat, steps[-1], log_dir, compression=None
        )
        result["chat, no compression"] = figures
    return results


async def measure(
    contenders: list[Contender], client_count: int, log_dir: Path
) -> list[dict]:
    """The burst, echo and stalled-client loads on each contender.

    Solo runs, alternating, keep each contender's best: wall-clock figures (throughput)
    only mean something with a server alone on the machine. CPU per operation is then
    measured with all of them loaded at once, so that whatever else the machine is doing
    weighs on each alike, and the median of those runs replaces the solo figure.
    """
    results: list[dict] = [{} for _ in contenders]
    for load in LOADS:
        for attempt in range(1, load.repeats + 1):
            for contender, result in zip(contenders, results, strict=True):
                progress(
                    f"{load.name}, run {attempt} of {load.repeats}: {contender.name}"
                )
                [figures] = await run_load([contender], load.run, client_count, log_dir)
                best = result.get(load.name)
                if best is None or figures[load.best_by] < best[load.best_by]:
                    result[load.name] = figures
        if load.cpu_key is None:
            continue
        # Each contender's figures from its runs with every server loaded at once.
        loaded: list[list[dict[str, float]]] = [[] for _ in contenders]
        for attempt in range(1, load.repeats + 1):
            progress(f"{load.name}, CPU with all servers loaded, run {attempt}")
            runs = await run_load(contenders, load.run, client_count, log_dir)
            for run_figures, samples in zip(runs, loaded, strict=True):
                samples.append(run_figures)
        for contender, result, samples in zip(contenders, results, loaded, strict=True):
            figures = result[load.name]
            figures[f"{load.cpu_key}_alone"] = figures[load.cpu_key]
            figures[load.cpu_key] = statistics.median(s[load.cpu_key] for s in samples)
            # What it lost loaded beside the others: its CPU figure then counts only
            # what arrived, and says nothing of its cost.
            figures["lost_loaded"] = lost = sum(s.get("lost", 0.0) for s in samples)
            if lost:
                progress(
                    f"{load.name}: {contender.name} lost {lost:.0f} messages with all "
                    f"servers loaded: its CPU figure is not comparable"
                )
    return results


def chat_rows(step: int) -> list[tuple[str, str, str, str]]:
    chat = f"ordinary chat, {step:,} clients"
    return [
        (
            "chat",
            "cpu_us_per_delivery",
            f"{chat}: server CPU µs per delivery",
            "{:.1f}",
        ),
        ("chat", "p50_ms", f"{chat}: p50 latency, ms", "{:.0f}"),
        ("chat", "p99_ms", f"{chat}: p99 latency, ms", "{:.0f}"),
        ("chat", "rss_mb", f"{chat}: server RSS, MB", "{:.0f}"),
        (
            "chat",
            "kib_per_idle_connection",
            f"{chat}: KiB per idle connection",
            "{:.1f}",
        ),
        ("chat", "lost", f"{chat}: messages lost", "{:.0f}"),
        (
            "chat, no compression",
            "cpu_us_per_delivery",
            f"{chat}, no compression: server CPU µs per delivery",
            "{:.1f}",
        ),
        (
            "chat, no compression",
            "p99_ms",
            f"{chat}, no compression: p99 latency, ms",
            "{:.0f}",
        ),
        (
            "chat, no compression",
            "rss_mb",
            f"{chat}, no compression: server RSS, MB",
            "{:.0f}",
        ),
        (
            "chat, no compression",
            "kib_per_idle_connection",
            f"{chat}, no compression: KiB per idle connection",
            "{:.1f}",
        ),
        ("shootout", step, f"{chat}: % of broadcasts to all in 500 ms", "{:.0f}"),
        (
            "shootout",
            "clients",
            "most clients with 95% of broadcasts to all in 500 ms",
            "{:,.0f}",
        ),
    ]


LOAD_ROWS = [
    (
        "burst",
        "deliveries_per_s",
        "burst of 100 to 1,000 clients: deliveries per second",
        "{:,.0f}",
    ),
    ("burst", "cpu_us_per_delivery", "burst: server CPU µs per delivery", "{:.1f}"),
    ("burst", "lost", "burst: messages lost", "{:.0f}"),
    (
        "burst",
        "lost_loaded",
        "burst: ... lost with all servers loaded (its CPU figure's runs)",
        "{:.0f}",
    ),
    (
        "burst",
        "cpu_us_per_delivery_alone",
        "burst: ... alone: server CPU µs per delivery (the best of its runs)",
        "{:.1f}",
    ),
    (
        "echo",
        "round_trips_per_s",
        "echo, 1,000 clients: round trips per second",
        "{:,.0f}",
    ),
    ("echo", "cpu_us_per_round_trip", "echo: server CPU µs per round trip", "{:.1f}"),
    ("stalled client", "received", "stalled client: healthy client received", "{:.0f}"),
    ("stalled client", "seconds", "stalled client: ... in seconds", "{:.2f}"),
    (
        "stalled client",
        "close_code",
        "stalled client: close code (0: not cut)",
        "{:.0f}",
    ),
    (
        "stalled client",
        "rss_growth_mb",
        "stalled client: server RSS growth, MB",
        "{:.1f}",
    ),
]
RATIO_KEYS = {
    "cpu_us_per_delivery",
    "cpu_us_per_delivery_alone",
    "cpu_us_per_delivery_net",
    "idle_cpu_s_per_s",
    "p50_ms",
    "p99_ms",
    "rss_mb",
    "kib_per_idle_connection",
    "deliveries_per_s",
    "round_trips_per_s",
    "cpu_us_per_round_trip",
}


def print_table(names: list[str], results: list[dict], rows: list) -> None:
    """A Markdown table: each contender's figures, then each against the one before it,
    and the third on against the first too."""
    ratios = [f"{names[i]} / {names[i - 1]}" for i in range(1, len(names))]
    ratios += [f"{name} / {names[0]}" for name in names[2:]]
    header = ["measure", *names, *ratios]
    print("| " + " | ".join(header) + " |")
    print("|" + " --- |" * len(header))
    for load, key, label, number in rows:
        values = [result[load][key] for result in results]
        cells = [number.format(value) for value in values]
        pairs = [*itertools.pairwise(values), *((values[0], v) for v in values[2:])]
        for before, after in pairs:
            show = key in RATIO_KEYS and before
            cells.append(f"{after / before:.2f}x" if show else "")
        print("| " + " | ".join([label, *cells]) + " |")


async def run(
    steps: tuple[int, ...],
    with_redis: bool,
    hostile: bool,
    hostile_only: bool,
    rooms_only: bool,
    with_sketch: bool,
    with_flags: bool,
) -> None:
    contenders = [
        Contender("tutorial", "bench:naive_app"),
        Contender("main.py", "main:app"),
    ]
    if with_flags:
        flags = production_options()
        contenders.append(
            Contender("main.py, the README's flags", "main:app", options=flags)
        )
    if with_redis:
        contenders.append(
            Contender("main.py, Redis, 2 workers", "main:app", 2, redis=True)
        )
    with_rooms = contenders[1:]  # the sketch has no rooms
    if with_sketch:
        contenders.append(Contender("queue per client", "bench:queue_app"))
    print(
        f"up to {steps[-1]} clients; server CPU and memory from /proc; "
        f"{os.cpu_count()} cores",
        file=sys.stderr,
    )
    names = [c.name for c in contenders]
    with tempfile.TemporaryDirectory() as log_dir:
        if hostile_only:
            print_hostile(await measure_hostile(Path(log_dir), steps[-1]))
            return
        if rooms_only:
            await run_rooms_only(with_rooms, steps[-1], Path(log_dir))
            return
        chat = await measure_chat(contenders, steps, Path(log_dir))
        rooms = [
            await measure_rooms(contender, steps[-1], Path(log_dir))
            for contender in with_rooms
        ]
        loads = await measure(
            contenders, min(FAN_OUT_CLIENTS, steps[-1]), Path(log_dir)
        )
        if hostile:
            hostile_figures = await measure_hostile(Path(log_dir), steps[-1])
    print_table(
        names,
        [c | l for c, l in zip(chat, loads, strict=True)],
        chat_rows(steps[-1]) + LOAD_ROWS,
    )
    print()
    clients = f"{steps[-1]:,} clients"
    print_rooms_table(
        [
            f"step 3 chat, {clients}",
            *(f"step 5 rooms, {c.name}" for c in with_rooms),
        ],
        [chat[1]["chat"], *rooms],
    )
    if hostile:
        print()
        print_hostile(hostile_figures)


async def run_rooms_only(
    contenders: list[Contender], client_count: int, log_dir: Path
) -> None:
    """Step 5's rooms beside step 3's chat (main.py alone), alternating: quicker to
    repeat. With --redis, the rooms through Redis too."""
    chats: list[dict[str, float]] = []
    rooms: list[list[dict[str, float]]] = [[] for _ in contenders]
    for attempt in range(1, TOP_STEP_REPEATS + 1):
        progress(f"ordinary chat, {client_count} clients, run {attempt}")
        chats += await run_load(
            [contenders[0]], ordinary_chat, client_count, log_dir, idle=True
        )
        for contender, runs in zip(contenders, rooms, strict=True):
            runs.append(await measure_rooms(contender, client_count, log_dir))
    clients = f"{client_count:,} clients"
    print_rooms_table(
        [f"step 3 chat, {clients}", *(f"step 5 rooms, {c.name}" for c in contenders)],
        [mean_of(chats), *(mean_of(runs) for runs in rooms)],
    )


def mean_of(runs: list[dict[str, float]]) -> dict[str, float]:
    return {key: statistics.mean(run[key] for run in runs) for key in runs[0]}


# --- Hostile and careless clients: main.py as uvicorn runs it, with and without flags ----

HUGE_BYTES = 15 * 1024 * 1024
HUGE_SENDERS, COMPRESSED_SENDERS = 50, 20
PING_FLOOD_S = 10.0  # one client's pings, as fast as the server takes them
FLOOD_BESIDE_ECHO_S = 10.0  # one client's frames, beside an echo client
ECHO_EVERY_S = 0.05  # the echo client's pace
UNREAD_SENDERS, UNREAD_LETTERS_BYTES = 10, 10_000_000  # of one-letter messages, each
ENDLESS_HEADER_S = 10.0  # one request's header, sent for this long, never ended
FLOOD_MESSAGES, FLOOD_READERS, FLOOD_WRITER_MESSAGES = 20_000, 50, 50
PAIR_INTERVAL_S = 0.1  # the healthy pair's pace: within the flood rate
EXIT_WAIT_S = 10.0  # a server not gone by then is counted as hung
SHUTDOWN_CLIENTS = (4000, 10_000)


async def healthy_pair_latencies(server: Server, stop: asyncio.Event) -> list[float]:
    """Two chat clients: one writes every PAIR_INTERVAL_S, the other times each message."""
    latencies: list[float] = []
    async with (
        connect(f"{server.ws_url}/chat/90001", max_queue=None) as writer,
        connect(f"{server.ws_url}/chat/90002", max_queue=None) as reader,
    ):

        async def read() -> None:
            async for text in reader:
                _, says, stamp = text.partition("Client #90001 says: ")
                if says:
                    latencies.append(time.perf_counter() - float(stamp))

        reading = asyncio.create_task(read())
        while not stop.is_set():
            await writer.send(str(time.perf_counter()))
            await asyncio.sleep(PAIR_INTERVAL_S)
        await asyncio.sleep(QUIET_TIMEOUT_S / 3)
        reading.cancel()
    return latencies


async def huge_messages(
    server: Server, senders: int, compressed: bool
) -> dict[str, float]:
    """`senders` clients each send one 15 MiB message, beside a healthy pair."""
    stop = asyncio.Event()
    pair = asyncio.create_task(healthy_pair_latencies(server, stop))
    await asyncio.sleep(0.5)
    rss_before = peak_rss = server.rss_bytes()
    # max_queue: with 16 leave notices unread, as the sender waits, a client would stop
    # reading, its close frame too, and its close code would be 1006.
    options = {
        "compression": "deflate" if compressed else None,
        "max_size": None,
        "max_queue": None,
    }
    huge = "h" * HUGE_BYTES

    async def send_one(n: int) -> int:
        async with connect(f"{server.ws_url}/chat/{n}", **options) as client:
            with contextlib.suppress(ConnectionClosed):
                await client.send(huge)
                await client.recv()  # the acknowledgement, if it was taken
                await client.close()
            return client.close_code or 0

    sending = asyncio.gather(*(send_one(n) for n in range(senders)))
    while not sending.done():
        peak_rss = max(peak_rss, server.rss_bytes())
        await asyncio.sleep(RSS_SAMPLE_S)
    codes = await sending
    stop.set()
    latencies = await pair
    return {
        "rss_growth_mb": (peak_rss - rss_before) / 1e6,
        "closed_1009": sum(code == 1009 for code in codes),
        "pair_p99_ms": percentile_ms(latencies, 99),
    }


async def flood(server: Server) -> dict[str, float]:
    """One client sends 20,000 messages as fast as it can; another writes at a human pace."""
    readers = await connect_all(
        [f"{server.ws_url}/chat/{1000 + n}" for n in range(FLOOD_READERS)]
    )
    chat = Deliveries()
    reading = [asyncio.create_task(chat.read(r)) for r in readers]
    async with (
        connect(f"{server.ws_url}/chat/666", max_queue=None) as flooder,
        connect(f"{server.ws_url}/chat/1", max_queue=None) as writer,
    ):

        async def send_flood() -> None:
            with contextlib.suppress(ConnectionClosed):
                for n in range(FLOOD_MESSAGES):
                    await flooder.send(f"flood {n}")

        flooding = asyncio.create_task(send_flood())
        for seq in range(FLOOD_WRITER_MESSAGES):
            await send_stamped(writer, seq)
            await asyncio.sleep(PAIR_INTERVAL_S)
        expected = FLOOD_READERS * FLOOD_WRITER_MESSAGES
        await chat.wait_for(lambda: chat.count >= expected, QUIET_TIMEOUT_S)
        flooding.cancel()
        flooder_code = flooder.close_code or 0
    for task in reading:
        task.cancel()
    await close_all(readers)
    return {
        "writer_p50_ms": percentile_ms(chat.latencies_s, 50),
        "writer_p99_ms": percentile_ms(chat.latencies_s, 99),
        "flooder_close_code": flooder_code,
        "healthy_cut_off": server.log().count("cut off"),
    }


LONG_READERS, LONG_WRITER_MESSAGES = 100, 50
LONG_BYTES = 64 * 1024 - 32  # just within main.py's MAX_MESSAGE_BYTES


async def long_messages(server: Server) -> dict[str, float]:
    """One client sends a 64 KiB message of random letters every 0.1 s (10 a second, the
    flood rule's rate for short ones), to 100 readers that ask for compression, as
    browsers do; another writes every 0.1 s: the server's CPU a second, and that
    writer's latency."""
    readers = await connect_all(
        [f"{server.ws_url}/chat/{1000 + n}" for n in range(LONG_READERS)]
    )
    chat = Deliveries()
    reading = [asyncio.create_task(chat.read(r)) for r in readers]
    letters = random.Random(1).choices(string.ascii_lowercase + " ", k=LONG_BYTES)
    long_text = "".join(letters)
    async with (
        connect(f"{server.ws_url}/chat/666", max_queue=None) as sender,
        connect(f"{server.ws_url}/chat/1", max_queue=None) as writer,
    ):

        async def send_long() -> None:
            with contextlib.suppress(ConnectionClosed):
                while True:
                    await sender.send(long_text)
                    await asyncio.sleep(PAIR_INTERVAL_S)

        async def drain_own_copies() -> None:
            # As a flooder would: not reading, it would soon be cut off as too slow.
            with contextlib.suppress(ConnectionClosed):
                async for _ in sender:
                    pass

        cpu_before, started = server.cpu_seconds(), time.perf_counter()
        sending = asyncio.create_task(send_long())
        draining = asyncio.create_task(drain_own_copies())
        for seq in range(LONG_WRITER_MESSAGES):
            await send_stamped(writer, seq)
            await asyncio.sleep(PAIR_INTERVAL_S)
        cpu_s_per_s = (server.cpu_seconds() - cpu_before) / (
            time.perf_counter() - started
        )
        expected = LONG_READERS * LONG_WRITER_MESSAGES
        await chat.wait_for(lambda: chat.count >= expected, QUIET_TIMEOUT_S)
        sending.cancel()
        draining.cancel()
    for task in reading:
        task.cancel()
    await close_all(readers)
    return {
        "long_cpu_s_per_s": cpu_s_per_s,
        "long_writer_p50_ms": percentile_ms(chat.latencies_s, 50),
        "long_writer_p99_ms": percentile_ms(chat.latencies_s, 99),
        "long_writer_lost": expected - chat.count,
    }


SLOW_READERS, SLOW_SENDERS, SLOW_MESSAGES = 20, 5, 200
SLOW_PACE_S, SLOW_READ_EVERY_S = 1 / 8, 0.3


async def slow_reader(server: Server) -> dict[str, float]:
    """A client that reads one message every 0.3 s, beside 20 readers and 5 senders of
    200 messages of 1 KB each, 8 a second each: the readers' latency, and its fate."""
    slow, _ = raw_handshake(server.port, "/chat/2", rcvbuf=4096)
    reading_slowly = True

    def read_slowly() -> None:
        with contextlib.suppress(OSError):  # closed: by the server, or after the load
            while reading_slowly and read_frame(slow)[0] != 0x8:
                time.sleep(SLOW_READ_EVERY_S)

    slow_reading = asyncio.create_task(asyncio.to_thread(read_slowly))
    readers = await connect_all(
        [f"{server.ws_url}/chat/{1000 + n}" for n in range(SLOW_READERS)]
    )
    senders = await connect_all(
        [f"{server.ws_url}/chat/{10 + n}" for n in range(SLOW_SENDERS)]
    )
    chat = Deliveries()
    reading = [asyncio.create_task(chat.read(r)) for r in readers]
    for seq in range(SLOW_MESSAGES):
        for n, sender in enumerate(senders):
            stamp = f"{seq * SLOW_SENDERS + n} {time.perf_counter()} "
            await sender.send(stamp.ljust(STALL_MESSAGE_BYTES, "x"))
        await asyncio.sleep(SLOW_PACE_S)
    expected = SLOW_READERS * SLOW_SENDERS * SLOW_MESSAGES
    await chat.wait_for(lambda: chat.count >= expected, QUIET_TIMEOUT_S)
    reading_slowly = False
    with contextlib.suppress(OSError):
        slow.shutdown(socket.SHUT_RDWR)
    await slow_reading
    slow.close()
    for task in reading:
        task.cancel()
    await close_all(readers + senders)
    return {
        "slow_readers_p50_ms": percentile_ms(chat.latencies_s, 50),
        "slow_readers_p99_ms": percentile_ms(chat.latencies_s, 99),
        "slow_reader_cut_off": float("Client #2 cut off" in server.log()),
        "slow_lost": expected - chat.count,
    }


HUGE_POST_BYTES = 20 * 1024 * 1024


async def huge_post(server: Server) -> dict[str, float]:
    """A POST that announces 20 MiB, without a token; the server's answer, and growth."""
    rss_before = server.rss_bytes()

    def post() -> tuple[float, float]:
        head = (
            f"POST /chat/messages HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
            "Content-Type: application/json\r\n"
            f"Content-Length: {HUGE_POST_BYTES}\r\n\r\n"
        )
        started = time.perf_counter()
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
            sock.sendall(head.encode())
            with contextlib.suppress(OSError):  # refused before the end: the point
                for _ in range(HUGE_POST_BYTES // 65536):
                    sock.sendall(b"x" * 65536)
            status = sock.recv(64).split(b" ")[1]
        return float(status), time.perf_counter() - started

    status, seconds = await asyncio.to_thread(post)
    return {
        "post_status": status,
        "post_s": seconds,
        "post_rss_growth_mb": (server.rss_bytes() - rss_before) / 1e6,
    }


ROOMS_OPENED_AND_LEFT = 10_000  # ten times MAX_ROOMS: most are forgotten to make room


async def rooms_opened_and_left(server: Server) -> dict[str, float]:
    """Rooms, each opened by one handshake and left at once; then a new one."""

    async def open_and_leave(name: str) -> str:
        async with connect(f"{server.ws_url}/rooms/{name}/1") as client:
            return json.loads(await client.recv())["type"]

    rss_before, started = server.rss_bytes(), time.perf_counter()
    for batch in range(0, ROOMS_OPENED_AND_LEFT, CONNECT_BATCH):
        names = [f"junk-{n}" for n in range(batch, batch + CONNECT_BATCH)]
        await asyncio.gather(*(open_and_leave(name) for name in names))
    seconds = time.perf_counter() - started
    grown = server.rss_bytes() - rss_before
    try:
        opened = await open_and_leave("fresh") == "welcome"
    except ConnectionClosed:
        opened = False
    return {
        "junk_rooms_s": seconds,
        "junk_rooms_rss_growth_mb": grown / 1e6,
        "fresh_room_opened": float(opened),
    }


async def ping_flood(server: Server) -> dict[str, float]:
    """One client sending pings for PING_FLOOD_S, reading none of the pongs."""
    sock, _ = raw_handshake(server.port, "/ws", rcvbuf=4096)
    rss_before = server.rss_bytes()
    sent = await asyncio.to_thread(
        send_pings_reading_nothing, sock, 1 << 40, PING_FLOOD_S
    )
    grown = server.peak_rss_bytes() - rss_before
    sock.close()
    return {"pings_sent_mb": sent / 1e6, "pings_rss_growth_mb": grown / 1e6}


FLOODS_BESIDE_AN_ECHO = {  # each for FLOOD_BESIDE_ECHO_S: path, opcode, payload
    "empty_pings": ("/ws", 0x9, ""),
    "chat_letters": ("/chat/5", 0x1, "a"),
    "echo_letters": ("/ws", 0x1, "a"),
}


async def flood_beside_an_echo(
    server: Server, name: str, path: str, opcode: int, payload: str
) -> dict[str, float]:
    """One client sending a frame again and again for FLOOD_BESIDE_ECHO_S, reading and
    ignoring what the server sends, past its close, while another sends "hi" every
    ECHO_EVERY_S and times the echo."""
    flooder = flooder_process(server.port, path, opcode, payload, FLOOD_BESIDE_ECHO_S)
    latencies: list[float] = []
    async with connect(f"{server.ws_url}/ws") as echo:
        deadline = time.perf_counter() + FLOOD_BESIDE_ECHO_S
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            await echo.send("hi")
            await echo.recv()
            latencies.append(time.perf_counter() - started)
            await asyncio.sleep(ECHO_EVERY_S)
    output, _ = await asyncio.to_thread(flooder.communicate)
    sent, code = output.split()
    return {
        f"{name}_sent_mb": int(sent) / 1e6,
        f"{name}_close_code": int(code),
        f"{name}_echoes": len(latencies),
        f"{name}_echo_max_ms": max(latencies) * 1000,
    }


async def unread_letters(server: Server) -> dict[str, float]:
    """UNREAD_SENDERS clients each sending UNREAD_LETTERS_BYTES of one-letter messages
    to the echo, reading none of its answers."""

    def send_them() -> list[socket.socket]:
        letters = client_frame(0x1, b"a") * (UNREAD_LETTERS_BYTES // 7)
        return [send_unread(server.port, "/ws", letters) for _ in range(UNREAD_SENDERS)]

    rss_before = server.rss_bytes()
    senders = await asyncio.to_thread(send_them)
    grown = server.peak_rss_bytes() - rss_before
    for sock in senders:
        sock.close()
    return {"unread_rss_growth_mb": grown / 1e6}


async def endless_header(server: Server) -> dict[str, float]:
    """One request whose header's value goes on for ENDLESS_HEADER_S, never ended."""

    rss_before = server.rss_bytes()
    sent = await asyncio.to_thread(
        send_endless_header, server.port, 1 << 40, ENDLESS_HEADER_S
    )
    grown = server.peak_rss_bytes() - rss_before
    return {"header_sent_mb": sent / 1e6, "header_rss_growth_mb": grown / 1e6}


async def cut_off_a_stalled_client(server: Server) -> object:
    stalled, _ = raw_handshake(server.port, "/chat/2", rcvbuf=4096)
    senders = await connect_all(
        [f"{server.ws_url}/chat/{10 + n}" for n in range(STALL_SENDERS)]
    )
    for seq in range(FAN_OUT_MESSAGES):
        for sender in senders:
            await sender.send(f"{seq:05d} ".ljust(STALL_MESSAGE_BYTES, "x"))
        if "Client #2 cut off" in server.log():
            break
    await asyncio.to_thread(wait_for_log, server, "Client #2 cut off")
    await close_all(senders)
    return stalled


async def seconds_to_exit(server: Server) -> float:
    started = time.perf_counter()
    server.process.send_signal(signal.SIGTERM)
    try:
        await asyncio.to_thread(server.process.wait, EXIT_WAIT_S)
    except Exception:  # noqa: BLE001 - still running: hung
        return float("inf")
    return time.perf_counter() - started


async def exit_with_a_cut_off_client(server: Server) -> dict[str, float]:
    stalled = await cut_off_a_stalled_client(server)
    seconds = await seconds_to_exit(server)
    stalled.close()
    return {"sigterm_cut_off_s": seconds}


async def exit_with_chat_clients(server: Server, client_count: int) -> float:
    clients = await connect_all(
        [f"{server.ws_url}/chat/{n}" for n in range(client_count)]
    )
    seconds = await seconds_to_exit(server)
    await close_all(clients)
    return seconds


async def reload_after_a_cut_off(options: tuple[str, ...], log_dir: Path) -> float:
    """Seconds from an edit of main.py to the new code serving, after a cut-off."""
    project = Path(tempfile.mkdtemp(dir=log_dir))
    for name in ("main.py", "index.html"):
        shutil.copy(HERE / name, project / name)
    server = start_server(project.with_suffix(".log"), options=options, cwd=project)
    try:
        wait_for_log(server, "Application startup complete")
        stalled = await cut_off_a_stalled_client(server)
        started = time.perf_counter()
        with (project / "main.py").open("a") as source:
            source.write("\nRELOADED = True\n")
        try:
            await asyncio.to_thread(
                wait_for_log, server, "Application startup complete", 2
            )
            seconds = time.perf_counter() - started
        except TimeoutError:
            seconds = float("inf")
        stalled.close()
        return seconds
    finally:
        server.process.send_signal(signal.SIGINT)
        with contextlib.suppress(Exception):
            server.process.wait(EXIT_WAIT_S)
        server.stop()


def fresh_server(log_dir: Path, options: tuple[str, ...]) -> Server:
    log_path = Path(tempfile.mkstemp(dir=log_dir, suffix=".log")[1])
    return start_server(log_path, options=options)


async def with_server(log_dir: Path, options: tuple[str, ...], load, *args) -> dict:
    server = fresh_server(log_dir, options)
    try:
        return await load(server, *args)
    finally:
        server.stop()


async def measure_hostile(log_dir: Path, max_clients: int) -> dict[str, dict]:
    """Each hostile load on main.py as `uvicorn main:app`, and with the README's flags."""
    setups = {
        "uvicorn main:app": ((), ("--reload",)),
        "with the README's flags": (production_options(), following_along_options()),
    }
    figures: dict[str, dict] = {}
    for name, (options, reload_options) in setups.items():
        result: dict[str, float] = {}
        progress(f"hostile clients, {name}: 50 messages of 15 MiB")
        huge = await with_server(log_dir, options, huge_messages, HUGE_SENDERS, False)
        result |= {f"huge_{k}": v for k, v in huge.items()}
        progress(f"hostile clients, {name}: 20 compressed messages of 15 MiB")
        packed = await with_server(
            log_dir, options, huge_messages, COMPRESSED_SENDERS, True
        )
        result |= {f"compressed_{k}": v for k, v in packed.items()}
        progress(f"hostile clients, {name}: pings for {PING_FLOOD_S:.0f} s, none read")
        result |= await with_server(log_dir, options, ping_flood)
        for flood_name, (path, opcode, payload) in FLOODS_BESIDE_AN_ECHO.items():
            progress(f"hostile clients, {name}: {flood_name} beside an echo")
            result |= await with_server(
                log_dir,
                options,
                flood_beside_an_echo,
                flood_name,
                path,
                opcode,
                payload,
            )
        progress(f"hostile clients, {name}: one-letter messages, none of the echo read")
        result |= await with_server(log_dir, options, unread_letters)
        progress(f"hostile clients, {name}: a header for {ENDLESS_HEADER_S:.0f} s")
        result |= await with_server(log_dir, options, endless_header)
        progress(f"hostile clients, {name}: SIGTERM after a cut-off")
        server = fresh_server(log_dir, options)
        try:
            result |= await exit_with_a_cut_off_client(server)
        finally:
            server.process.kill()
            server.stop()
        progress(f"hostile clients, {name}: --reload after a cut-off")
        result["reload_cut_off_s"] = await reload_after_a_cut_off(
            reload_options, log_dir
        )
        figures[name] = result
    flags = figures["with the README's flags"]
    progress("hostile clients: a flood beside 50 readers")
    flags |= await with_server(log_dir, production_options(), flood)
    progress("hostile clients: 64 KiB messages, 10 a second, to 100 readers")
    flags |= await with_server(log_dir, production_options(), long_messages)
    progress("hostile clients: a reader that drains slowly")
    flags |= await with_server(log_dir, production_options(), slow_reader)
    progress("hostile clients: a POST of 20 MiB, and 10,000 rooms opened and left")
    flags |= await with_server(log_dir, production_options(), huge_post)
    flags |= await with_server(log_dir, production_options(), rooms_opened_and_left)
    for client_count in SHUTDOWN_CLIENTS:
        if client_count > max_clients:
            continue
        progress(f"SIGTERM with {client_count} chat clients")
        server = fresh_server(log_dir, production_options())
        try:
            flags[f"sigterm_{client_count}_s"] = await exit_with_chat_clients(
                server, client_count
            )
        finally:
            server.stop()
    return figures


HOSTILE_ROWS = [
    ("huge_rss_growth_mb", "50 messages of 15 MiB: server RSS growth, MB", "{:.0f}"),
    ("huge_closed_1009", "... connections closed with 1009", "{:.0f}"),
    ("huge_pair_p99_ms", "... a healthy pair's p99 latency, ms", "{:.0f}"),
    (
        "compressed_rss_growth_mb",
        "20 compressed messages of 15 MiB: server RSS growth, MB",
        "{:.0f}",
    ),
    ("compressed_closed_1009", "... connections closed with 1009", "{:.0f}"),
    (
        "pings_sent_mb",
        f"pings for {PING_FLOOD_S:.0f} s, no pong read: MB taken",
        "{:.0f}",
    ),
    ("pings_rss_growth_mb", "... server RSS growth, MB", "{:.0f}"),
    (
        "empty_pings_echo_max_ms",
        f"empty pings for {FLOOD_BESIDE_ECHO_S:.0f} s, pongs read: an echo's longest, ms",
        "{:.0f}",
    ),
    ("empty_pings_echoes", "... echoes, one every 50 ms at most", "{:.0f}"),
    ("empty_pings_sent_mb", "... MB of pings taken", "{:.0f}"),
    ("empty_pings_close_code", "... the pinger's close code (0: none)", "{:.0f}"),
    (
        "chat_letters_echo_max_ms",
        "one-letter messages to the chat, past its close: an echo's longest, ms",
        "{:.0f}",
    ),
    ("chat_letters_echoes", "... echoes, one every 50 ms at most", "{:.0f}"),
    ("chat_letters_close_code", "... the flooder's close code", "{:.0f}"),
    (
        "echo_letters_echo_max_ms",
        "one-letter messages to the echo, answers read: another echo's longest, ms",
        "{:.0f}",
    ),
    ("echo_letters_echoes", "... echoes, one every 50 ms at most", "{:.0f}"),
    (
        "unread_rss_growth_mb",
        "10 clients' 10 MB of one-letter messages, no echo read: RSS growth, MB",
        "{:.0f}",
    ),
    (
        "header_sent_mb",
        f"one header sent for {ENDLESS_HEADER_S:.0f} s: MB taken",
        "{:.0f}",
    ),
    ("header_rss_growth_mb", "... server RSS growth, MB", "{:.0f}"),
    (
        "writer_p50_ms",
        "a flood of 20,000 beside 50 readers: another writer's p50, ms",
        "{:.0f}",
    ),
    ("writer_p99_ms", "... another writer's p99, ms", "{:.0f}"),
    ("flooder_close_code", "... the flooder's close code", "{:.0f}"),
    ("healthy_cut_off", "... healthy clients cut off", "{:.0f}"),
    (
        "long_cpu_s_per_s",
        "64 KiB messages, 10 a second, to 100 compressed readers: server CPU s/s",
        "{:.2f}",
    ),
    ("long_writer_p50_ms", "... another writer's p50, ms", "{:.0f}"),
    ("long_writer_p99_ms", "... another writer's p99, ms", "{:.0f}"),
    ("long_writer_lost", "... that writer's messages lost", "{:.0f}"),
    (
        "slow_readers_p50_ms",
        "a reader draining one message per 0.3 s, beside 20: their p50, ms",
        "{:.0f}",
    ),
    ("slow_readers_p99_ms", "... their p99, ms", "{:.0f}"),
    ("slow_reader_cut_off", "... the slow reader cut off (1: yes)", "{:.0f}"),
    ("slow_lost", "... messages lost by the others", "{:.0f}"),
    ("post_status", "a POST announcing 20 MiB, no token: HTTP status", "{:.0f}"),
    ("post_s", "... seconds to the answer", "{:.2f}"),
    ("post_rss_growth_mb", "... server RSS growth, MB", "{:.0f}"),
    ("junk_rooms_s", "10,000 rooms opened and left: seconds", "{:.1f}"),
    ("junk_rooms_rss_growth_mb", "... server RSS growth, MB", "{:.0f}"),
    ("fresh_room_opened", "... then a new room opens (1: yes)", "{:.0f}"),
    (
        "sigterm_cut_off_s",
        "SIGTERM after a client was cut off: seconds to exit",
        "{:.1f}",
    ),
    (
        "reload_cut_off_s",
        "--reload after a client was cut off: seconds to the new code",
        "{:.1f}",
    ),
    ("sigterm_4000_s", "SIGTERM with 4,000 chat clients: seconds to exit", "{:.1f}"),
    ("sigterm_10000_s", "SIGTERM with 10,000 chat clients: seconds to exit", "{:.1f}"),
]


def print_hostile(figures: dict[str, dict]) -> None:
    names = list(figures)
    print("| measure | " + " | ".join(names) + " |")
    print("|" + " --- |" * (len(names) + 1))
    for key, label, number in HOSTILE_ROWS:
        cells = []
        for name in names:
            value = figures[name].get(key)
            hung = value == float("inf")
            cells.append(
                "" if value is None else "hung" if hung else number.format(value)
            )
        if any(cells):
            print(f"| {label} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Defaults: the ordinary chat at 1,000, 2,000, 5,000 and 10,000 clients; "
        "the burst, echo and stalled-client loads with 1,000; then the hostile clients. "
        "About 20 minutes on 2 cores; --quick: about 3. Linux only (reads /proc).",
    )
    parser.add_argument(
        "--quick", action="store_true", help="at most 1,000 clients: about 3 minutes"
    )
    parser.add_argument(
        "--redis",
        action="store_true",
        help="also measure the chat across two workers through a redis-server of its own",
    )
    parser.add_argument(
        "--no-hostile", action="store_true", help="skip the hostile-client loads"
    )
    parser.add_argument(
        "--sketch",
        action="store_true",
        help="also the simplest cure of step 3's header: a queue and a task per client",
    )
    parser.add_argument(
        "--flags",
        action="store_true",
        help="also main.py as the README's production command runs it",
    )
    parser.add_argument(
        "--hostile-only",
        action="store_true",
        help="only the hostile-client loads, on main.py: about 10 minutes",
    )
    parser.add_argument(
        "--rooms-only",
        action="store_true",
        help="only step 5's rooms beside step 3's chat, 3 runs each; with --redis "
        "or --flags, those servers' rooms too",
    )
    args = parser.parse_args()
    if not Path("/proc/self/stat").exists():
        parser.error("needs Linux: it reads each server's CPU time from /proc")
    if args.redis and shutil.which("redis-server") is None:
        parser.error("--redis needs redis-server: apt-get install redis-server")
    steps = QUICK_CHAT_STEPS if args.quick else CHAT_STEPS
    # Each client costs a file descriptor here, and one in the server's process.
    needed = steps[-1] + 1000
    limit = raise_open_files_limit()
    if limit < needed:
        parser.error(
            f"{steps[-1]} clients need about {needed} open files, and the hard limit "
            f"is {limit}: raise it (`ulimit -Hn {needed}` as root, or nofile in "
            "/etc/security/limits.conf), or use --quick"
        )
    uvloop.run(
        run(
            steps,
            args.redis,
            not args.no_hostile,
            args.hostile_only,
            args.rooms_only,
            args.sketch,
            args.flags,
        )
    )


if __name__ == "__main__":
    main()
