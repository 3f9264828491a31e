"""Measure the chat against the tutorial's own code, in the same run, on this machine.

    python bench.py                  # 1,000 chat clients
    python bench.py --clients 200    # quicker
    python bench.py --redis          # also the chat across two workers, through Redis

The servers: the tutorial's code as it is taught (kept below as `naive_app`), `main:app`,
and with --redis, `main:app` as two uvicorn workers sharing the chat through a
redis-server. Their CPU time (every worker's, and Redis's) is read from /proc, so the load
generator's own work (this process) does not count. Absolute figures depend on the
machine; the ratios are the point.
"""

import argparse
import asyncio
import contextlib
import itertools
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, WebSocket, WebSocketDisconnect
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from conftest import (
    RedisServer,
    Server,
    free_port,
    process_cpu_seconds,
    process_rss_bytes,
    raw_handshake,
    read_until_close,
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


# --- The servers under load -----------------------------------------------------------


@dataclass
class Contender:
    name: str
    app: str
    workers: int = 1
    # Each worker gets REDIS_URL, pointing at a redis-server of the contender's own.
    redis: bool = False


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
            worker = start_server(
                log_path, app=contender.app, options=("--log-level", "info"), **env
            )
            deployment.workers.append(worker)
            if contender.redis:
                wait_for_log(worker, "Chat relayed through Redis")
    except BaseException:
        deployment.stop()
        raise
    return deployment


# --- Loads -----------------------------------------------------------------------------------

FAN_OUT_MESSAGES = 100  # broadcast by one client as fast as it can send
LATENCY_MESSAGES = 20  # broadcast one at a time, each once every client has the last
ECHO_ROUND_TRIPS = 50  # per client, one after another
STALL_MESSAGES, STALL_MESSAGE_BYTES = 3000, 4096
STALL_TIMEOUT_S = 10.0  # the tutorial's loop never finishes: stop waiting then
QUIET_TIMEOUT_S = 3.0  # no delivery for this long: the rest is lost
CONNECT_BATCH = 50
RSS_SAMPLE_S = 0.02
REPEATS = 3  # runs of each load: solo per server, then with all servers at once


def progress(line: str) -> None:
    print(f"  ... {line}", file=sys.stderr, flush=True)


async def connect_all(urls: list[str]) -> list[ClientConnection]:
    clients: list[ClientConnection] = []
    for start in range(0, len(urls), CONNECT_BATCH):
        batch = urls[start : start + CONNECT_BATCH]
        clients += await asyncio.gather(*(connect(u, max_queue=None) for u in batch))
    return clients


async def close_all(clients: list[ClientConnection]) -> None:
    await asyncio.gather(*(client.close() for client in clients))


@dataclass
class Deliveries:
    """What the chat clients received of one sender's messages: `Client #0 says: seq t`."""

    expected: int
    count: int = 0
    latencies_s: list[float] = field(default_factory=list)
    per_message: dict[int, int] = field(default_factory=dict)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def read(self, client: ClientConnection) -> None:
        # Iterating ends quietly if the server closes the connection: what is missing
        # then counts as lost.
        async for text in client:
            if text.startswith("Client #0 says: "):
                seq, sent_at = text.removeprefix("Client #0 says: ").split()
                self.latencies_s.append(time.perf_counter() - float(sent_at))
                self.per_message[int(seq)] = self.per_message.get(int(seq), 0) + 1
                self.count += 1
                self.changed.set()

    async def wait_for(self, done: Callable[[], bool]) -> None:
        """Until `done()`, or until nothing arrives for QUIET_TIMEOUT_S."""
        while not done():
            self.changed.clear()
            try:
                async with asyncio.timeout(QUIET_TIMEOUT_S):
                    await self.changed.wait()
            except TimeoutError:
                return


async def send_stamped(client: ClientConnection, seq: int) -> None:
    with contextlib.suppress(ConnectionClosed):  # cut off: the rest counts as lost
        await client.send(f"{seq} {time.perf_counter()}")


async def fan_out(deployment: Deployment, client_count: int) -> dict[str, float]:
    """One client broadcasts to all; throughput, then latency with one message in flight."""
    clients = await connect_all(
        [f"{deployment.ws_url(i)}/chat/{i}" for i in range(client_count)]
    )
    progress(f"{client_count} chat clients connected")
    burst = Deliveries(expected=client_count * FAN_OUT_MESSAGES)
    readers = [asyncio.create_task(burst.read(c)) for c in clients]
    cpu_before, started = deployment.cpu_seconds(), time.perf_counter()
    for seq in range(FAN_OUT_MESSAGES):
        await send_stamped(clients[0], seq)
    await burst.wait_for(lambda: burst.count >= burst.expected)
    elapsed, cpu = time.perf_counter() - started, deployment.cpu_seconds() - cpu_before
    for reader in readers:
        reader.cancel()
    progress(f"burst: {burst.count} of {burst.expected} delivered in {elapsed:.2f} s")

    paced = Deliveries(expected=client_count * LATENCY_MESSAGES)
    readers = [asyncio.create_task(paced.read(c)) for c in clients]
    for seq in range(LATENCY_MESSAGES):
        await send_stamped(clients[0], seq)
        await paced.wait_for(lambda n=seq: paced.per_message.get(n, 0) >= client_count)
    for reader in readers:
        reader.cancel()
    await close_all(clients)
    percentiles_ms = statistics.quantiles([s * 1000 for s in paced.latencies_s], n=100)
    return {
        "deliveries_per_s": burst.count / elapsed,
        "cpu_us_per_delivery": cpu * 1e6 / max(burst.count, 1),
        "p50_ms": percentiles_ms[49],
        "p99_ms": percentiles_ms[98],
        "lost": (burst.expected - burst.count) + (paced.expected - paced.count),
    }


async def echo(deployment: Deployment, client_count: int) -> dict[str, float]:
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


async def stalled_client(deployment: Deployment, client_count: int) -> dict[str, float]:
    """A client that stops reading sits in the room while another sends 3,000 x 4 KiB.

    Only the two clients: `client_count` is not used here. With several workers, the two
    are on different ones.
    """
    stalled, _ = raw_handshake(deployment.workers[-1].port, "/chat/2", rcvbuf=4096)
    rss_before = peak_rss = deployment.rss_bytes()
    async with connect(f"{deployment.ws_url(0)}/chat/1", max_queue=None) as healthy:
        prefix = "Client #1 says: "
        received = 0

        async def receive_all() -> None:
            nonlocal received
            async for text in healthy:
                received += text.startswith(prefix)
                if received == STALL_MESSAGES:
                    return

        async def send_all() -> None:
            for seq in range(STALL_MESSAGES):
                await healthy.send(f"{seq:05d} ".ljust(STALL_MESSAGE_BYTES, "x"))

        started = time.perf_counter()
        tasks = [asyncio.create_task(receive_all()), asyncio.create_task(send_all())]
        deadline = started + STALL_TIMEOUT_S
        while not tasks[0].done() and time.perf_counter() < deadline:
            peak_rss = max(peak_rss, deployment.rss_bytes())
            await asyncio.sleep(RSS_SAMPLE_S)
        elapsed = time.perf_counter() - started
        for task in tasks:
            task.cancel()
    progress(f"healthy client: {received} of {STALL_MESSAGES} in {elapsed:.2f} s")
    stalled.settimeout(QUIET_TIMEOUT_S)
    try:
        close_code = (await asyncio.to_thread(read_until_close, stalled))[0]
    except OSError:
        close_code = 0  # no close frame: never cut off
    stalled.close()
    return {
        "received": received,
        "seconds": elapsed,
        "close_code": close_code,
        "rss_growth_mb": (peak_rss - rss_before) / 1e6,
    }


# --- Running it --------------------------------------------------------------------------------


@dataclass
class Load:
    name: str
    run: Callable[[Deployment, int], Awaitable[dict[str, float]]]
    best_by: str  # over solo runs, keep the one where this is lowest
    repeats: int
    cpu_key: str | None = None  # measured again with every server loaded at once


LOADS = [
    Load("fan-out", fan_out, "cpu_us_per_delivery", REPEATS, "cpu_us_per_delivery"),
    Load("echo", echo, "cpu_us_per_round_trip", REPEATS, "cpu_us_per_round_trip"),
    Load("stalled client", stalled_client, "seconds", 1),
]


async def run_load(
    contenders: list[Contender], load: Load, client_count: int, log_dir: Path
) -> list[dict[str, float]]:
    """One run of a load against each contender at the same time, each with its clients."""
    # Fresh deployments for each run: the tutorial's never recovers from a stall.
    deployments: list[Deployment] = []
    try:
        for contender in contenders:
            deployments.append(deploy(contender, log_dir))
        runs = (load.run(deployment, client_count) for deployment in deployments)
        return list(await asyncio.gather(*runs))
    finally:
        for deployment in deployments:
            deployment.stop()


async def measure(
    contenders: list[Contender], client_count: int, log_dir: Path
) -> list[dict]:
    """Each load on each contender.

    Solo runs, alternating, keep each contender's best: wall-clock figures (throughput,
    latency) only mean something with a server alone on the machine. CPU per operation is
    then measured with all of them loaded at once, so that whatever else the machine is
    doing weighs on each alike, and the median of those runs replaces the solo figure.
    """
    results: list[dict] = [{} for _ in contenders]
    for load in LOADS:
        for attempt in range(1, load.repeats + 1):
            for contender, result in zip(contenders, results, strict=True):
                progress(
                    f"{load.name}, run {attempt} of {load.repeats}: {contender.name}"
                )
                [figures] = await run_load([contender], load, client_count, log_dir)
                best = result.get(load.name)
                if best is None or figures[load.best_by] < best[load.best_by]:
                    result[load.name] = figures
        if load.cpu_key is None:
            continue
        paired: list[list[float]] = [[] for _ in contenders]
        for attempt in range(1, load.repeats + 1):
            progress(f"{load.name}, CPU with all servers loaded, run {attempt}")
            runs = await run_load(contenders, load, client_count, log_dir)
            for figures, samples in zip(runs, paired, strict=True):
                samples.append(figures[load.cpu_key])
        for result, samples in zip(results, paired, strict=True):
            result[load.name][load.cpu_key] = statistics.median(samples)
    return results


ROWS = [
    ("fan-out", "deliveries_per_s", "fan-out: deliveries per second", "{:,.0f}"),
    ("fan-out", "cpu_us_per_delivery", "fan-out: server CPU µs per delivery", "{:.1f}"),
    ("fan-out", "p50_ms", "fan-out: p50 broadcast latency, ms", "{:.1f}"),
    ("fan-out", "p99_ms", "fan-out: p99 broadcast latency, ms", "{:.1f}"),
    ("fan-out", "lost", "fan-out: messages lost", "{:.0f}"),
    ("echo", "round_trips_per_s", "echo: round trips per second", "{:,.0f}"),
    ("echo", "cpu_us_per_round_trip", "echo: server CPU µs per round trip", "{:.1f}"),
    ("stalled client", "received", "stalled: healthy client received", "{:.0f}"),
    ("stalled client", "seconds", "stalled: ... in seconds", "{:.2f}"),
    ("stalled client", "close_code", "stalled: close code (0: not cut)", "{:.0f}"),
    ("stalled client", "rss_growth_mb", "stalled: server RSS growth, MB", "{:.1f}"),
]
RATIO_ROWS = {"deliveries_per_s", "cpu_us_per_delivery", "p50_ms", "p99_ms"} | {
    "round_trips_per_s",
    "cpu_us_per_round_trip",
}


def print_table(names: list[str], results: list[dict]) -> None:
    """A Markdown table: each contender's figures, then each against the one before it."""
    ratios = [f"{names[i]} / {names[i - 1]}" for i in range(1, len(names))]
    header = ["measure", *names, *ratios]
    print("| " + " | ".join(header) + " |")
    print("|" + " --- |" * len(header))
    for load, key, label, number in ROWS:
        values = [result[load][key] for result in results]
        cells = [number.format(value) for value in values]
        for before, after in itertools.pairwise(values):
            show = key in RATIO_ROWS and before
            cells.append(f"{after / before:.2f}x" if show else "")
        print("| " + " | ".join([label, *cells]) + " |")


async def run(client_count: int, with_redis: bool) -> None:
    contenders = [
        Contender("tutorial", "bench:naive_app"),
        Contender("main.py", "main:app"),
    ]
    if with_redis:
        contenders.append(
            Contender("main.py, Redis, 2 workers", "main:app", 2, redis=True)
        )
    print(
        f"{client_count} clients; server CPU from /proc; {os.cpu_count()} cores",
        file=sys.stderr,
    )
    with tempfile.TemporaryDirectory() as log_dir:
        results = await measure(contenders, client_count, Path(log_dir))
    print_table([c.name for c in contenders], results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--clients", type=int, default=1000, help="chat and echo clients"
    )
    parser.add_argument(
        "--redis",
        action="store_true",
        help="also measure the chat across two workers through a redis-server of its own",
    )
    args = parser.parse_args()
    if args.redis and shutil.which("redis-server") is None:
        parser.error("--redis needs redis-server: apt-get install redis-server")
    asyncio.run(run(args.clients, args.redis))


if __name__ == "__main__":
    main()
