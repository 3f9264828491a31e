"""One chat across processes, through a real `redis-server`.

Needs Debian's redis-server (`apt-get install redis-server`). Without it these tests are
skipped, except under CI=true, where they fail.
"""

import asyncio
import os
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from websockets.exceptions import ConnectionClosed

import main
from conftest import (
    HERE,
    STARTUP_TIMEOUT_S,
    RedisServer,
    Server,
    assert_nothing_went_wrong,
    free_port,
    open_client,
    receive_says,
    run,
    start_server,
    wait_for_log,
)

RELAYING = "Chat relayed through Redis"


@pytest.fixture
def workers(redis_server: RedisServer, tmp_path: Path) -> Iterator[list[Server]]:
    """Two uvicorn processes sharing one chat, as `--workers 2` or two machines would."""
    servers = [
        start_server(tmp_path / f"worker{i}.log", REDIS_URL=redis_server.url)
        for i in (1, 2)
    ]
    try:
        for server in servers:
            wait_for_log(server, RELAYING)
        yield servers
    finally:
        for server in servers:
            server.stop()


async def closed_with(websocket) -> tuple[int, str]:
    """Read until the server closes the connection; its close code and reason."""
    try:
        while True:
            await websocket.recv()
    except ConnectionClosed as closed:
        return closed.rcvd.code, closed.rcvd.reason


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
    assert alice_got == [
        "You wrote: hello from the first process",
        "Client #1 says: hello from the first process",
        "Client #2 left the chat",
    ]
    assert bob_got == ["Client #1 says: hello from the first process"]
    for server in workers:
        assert_nothing_went_wrong(server)


def test_order_of_200_messages_across_processes(workers: list[Server]) -> None:
    first, second = workers
    sent = [f"message {i}" for i in range(200)]

    async def burst() -> list[list[str]]:
        async with (
            open_client(f"{first.ws_url}/chat/1") as sender,
            open_client(f"{first.ws_url}/chat/2") as same_process,
            open_client(f"{second.ws_url}/chat/3") as other_process,
        ):
            clients = (sender, same_process, other_process)
            readers = [
                asyncio.create_task(receive_says(c, 1, len(sent))) for c in clients
            ]
            for text in sent:
                await sender.send(text)
            return await asyncio.gather(*readers)

    for received in run(burst()):
        assert received == sent


def test_chat_survives_redis_restart(
    workers: list[Server], redis_server: RedisServer
) -> None:
    first, second = workers

    async def lose_redis() -> list[tuple[int, str]]:
        async with (
            open_client(f"{first.ws_url}/chat/1") as alice,
            open_client(f"{second.ws_url}/chat/2") as bob,
        ):
            await alice.send("before")
            assert await bob.recv() == "Client #1 says: before"
            redis_server.kill()
            return [await closed_with(alice), await closed_with(bob)]

    lost = (1013, main.REDIS_DOWN)
    assert run(lose_redis()) == [lost, lost]

    async def without_redis() -> tuple[str, tuple[int, str]]:
        async with open_client(f"{first.ws_url}/ws") as echo:
            await echo.send("still here")
            echoed = await echo.recv()
        async with open_client(f"{second.ws_url}/chat/3") as newcomer:
            return echoed, await closed_with(newcomer)

    echoed, refused = run(without_redis())
    assert echoed == "Message text was: still here"
    assert refused == lost
    page = urllib.request.urlopen(f"{first.http_url}/", timeout=5).read()
    assert page == main.INDEX_HTML.read_bytes()

    redis_server.start()
    for server in workers:
        wait_for_log(server, RELAYING, count=2)

    async def chat_again() -> str:
        async with (
            open_client(f"{first.ws_url}/chat/1") as alice,
            open_client(f"{second.ws_url}/chat/2") as bob,
        ):
            await alice.send("after")
            return await bob.recv()

    assert run(chat_again()) == "Client #1 says: after"
    for server in workers:
        assert "Lost Redis at redis://127.0.0.1" in server.log()
        assert_nothing_went_wrong(server)


def test_unreachable_redis_at_start_up_exits_with_one_line() -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    command = [sys.executable, "-m", "uvicorn", "main:app", "--port", str(free_port())]
    result = subprocess.run(
        command,
        check=False,
        cwd=HERE,
        env={**os.environ, "REDIS_URL": url},
        capture_output=True,
        text=True,
        timeout=STARTUP_TIMEOUT_S,
    )
    assert result.returncode == 1
    output = (result.stdout + result.stderr).strip().splitlines()
    assert len(output) == 1, output
    assert output[0].startswith(f"ERROR:    Cannot reach Redis at {url} (")
    assert output[0].endswith("): start it, or unset REDIS_URL")
