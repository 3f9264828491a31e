"""The chat under a real uvicorn: slow readers, rude disconnects, bursts, limits, origins.

TestClient cannot model TCP backpressure, so these tests talk to a uvicorn process over
loopback, with the `websockets` client and, where a client must misbehave, a raw socket.
"""

import asyncio

from websockets.exceptions import ConnectionClosed

import main
from conftest import (
    Server,
    assert_nothing_went_wrong,
    open_client,
    raw_handshake,
    read_until_close,
    receive_says,
    reset,
    run,
    start_server,
    wait_for_log,
)

# --- A client that stops reading -------------------------------------------------------------


def test_stalled_client_is_cut_off_with_1008_and_slows_nobody(server: Server) -> None:
    stalled, head = raw_handshake(server.port, "/chat/2", rcvbuf=4096)
    assert head.startswith(b"HTTP/1.1 101")
    sent = [f"{i:05d} " + "x" * 4090 for i in range(3000)]

    async def chat_beside_a_stalled_client() -> list[str]:
        async with open_client(f"{server.ws_url}/chat/1") as healthy:
            notices: list[str] = []
            reader = asyncio.create_task(receive_says(healthy, 1, len(sent), notices))
            for text in sent:
                await healthy.send(text)
            received = await reader
            while (
                "Client #2 left the chat" not in notices
            ):  # before or after the last one
                notices.append(await healthy.recv())
            return received

    assert run(chat_beside_a_stalled_client()) == sent
    # The stalled client, reading at last, finds the close frame behind its backlog.
    assert read_until_close(stalled) == (
        1008,
        f"Too slow: over {main.MAX_BACKLOG_MESSAGES} messages behind",
    )
    stalled.close()
    assert "Client #2 cut off" in server.log()
    assert_nothing_went_wrong(server)


# --- Healthy clients ---------------------------------------------------------------------------


def test_burst_reaches_every_healthy_client_in_order(server: Server) -> None:
    client_count, message_count = 100, 1000
    sent = [f"message {i}" for i in range(message_count)]

    async def burst() -> list[list[str]]:
        clients = [
            await open_client(f"{server.ws_url}/chat/{i}") for i in range(client_count)
        ]
        readers = [
            asyncio.create_task(receive_says(c, 0, message_count)) for c in clients
        ]
        for text in sent:
            await clients[0].send(text)
        received = await asyncio.gather(*readers)
        await asyncio.gather(*(client.close() for client in clients))
        return received

    for received in run(burst()):
        assert received == sent
    assert "cut off" not in server.log()
    assert_nothing_went_wrong(server)


def test_clients_coming_and_going_mid_broadcast_lose_nothing(server: Server) -> None:
    sent = [f"message {i}" for i in range(500)]

    async def churn() -> None:
        # Clients that join, then leave politely or vanish, while the broadcast runs.
        for round_number in range(80):
            sock, _ = await asyncio.to_thread(
                raw_handshake, server.port, f"/chat/{100 + round_number}"
            )
            if round_number % 2:
                reset(sock)
            else:
                sock.close()
            async with open_client(
                f"{server.ws_url}/chat/{200 + round_number}"
            ) as passer_by:
                await passer_by.send("hello")

    async def broadcast_through_churn() -> tuple[list[str], list[str]]:
        async with (
            open_client(f"{server.ws_url}/chat/1") as sender,
            open_client(f"{server.ws_url}/chat/2") as watcher,
        ):
            readers = [
                asyncio.create_task(receive_says(ws, 1, len(sent)))
                for ws in (sender, watcher)
            ]
            churner = asyncio.create_task(churn())
            for text in sent:
                await sender.send(text)
                await asyncio.sleep(0)
            await churner
            return await asyncio.gather(*readers)

    for received in run(broadcast_through_churn()):
        assert received == sent
    assert "cut off" not in server.log()  # leaving is not falling behind
    assert_nothing_went_wrong(server)


def test_steps_1_and_2_take_a_vanished_client_quietly(server: Server) -> None:
    for path in ("/ws", "/ws/5"):
        sock, head = raw_handshake(server.port, path)
        assert head.startswith(b"HTTP/1.1 101"), path
        reset(sock)
    wait_for_log(server, "Client #5 left the chat")
    assert_nothing_went_wrong(server)


# --- Limits and origins --------------------------------------------------------------------------


def test_message_size_limit_over_real_socket(server: Server) -> None:
    async def send_sizes() -> tuple[str, int, str]:
        async with open_client(f"{server.ws_url}/chat/1", max_size=None) as websocket:
            await websocket.send("y" * 60_000)
            echoed = await websocket.recv()
            await websocket.send("z" * (main.MAX_MESSAGE_BYTES + 1))
            try:
                while True:
                    await websocket.recv()
            except ConnectionClosed as closed:
                return echoed, closed.rcvd.code, closed.rcvd.reason

    echoed, code, reason = run(send_sizes())
    assert echoed == "You wrote: " + "y" * 60_000
    assert (code, reason) == (1009, "Message over 65536 bytes")
    assert_nothing_went_wrong(server)


def test_cross_site_origin_gets_403(server: Server) -> None:
    sock, head = raw_handshake(server.port, "/chat/1", origin="http://evil.example")
    sock.close()
    assert head.startswith(b"HTTP/1.1 403")
    assert "Refused WebSocket from origin http://evil.example" in server.log()


def test_own_origin_and_no_origin_are_accepted(server: Server) -> None:
    for origin in (f"http://127.0.0.1:{server.port}", None):
        sock, head = raw_handshake(server.port, "/chat/1", origin=origin)
        sock.close()
        assert head.startswith(b"HTTP/1.1 101"), origin


def test_allowed_origins_environment_variable(tmp_path) -> None:
    server = start_server(
        tmp_path / "uvicorn.log", ALLOWED_ORIGINS="https://a.example, https://b.example"
    )
    try:
        for origin, status in [
            ("https://b.example", b"101"),
            ("https://c.example", b"403"),
        ]:
            sock, head = raw_handshake(server.port, "/ws", origin=origin)
            sock.close()
            assert head.startswith(b"HTTP/1.1 " + status), origin
    finally:
        server.stop()
