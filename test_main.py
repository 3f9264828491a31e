"""What each step does, asserted with the exact text a reader sees.

These tests drive the app in-process with Starlette's TestClient. Behaviour that needs
real sockets (backpressure, abrupt disconnects, handshake headers) is in test_server.py.
"""

import asyncio
import logging
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from starlette.types import Message, Send
from starlette.websockets import WebSocket, WebSocketDisconnect
from uvicorn.protocols.utils import ClientDisconnected

import main


@pytest.fixture
def client() -> Iterator[TestClient]:
    # Entered, so that every connection of a test shares one event loop, as under uvicorn;
    # otherwise each websocket_connect() would run the app in a loop of its own.
    with TestClient(main.app) as client:
        yield client


def receive_close(websocket) -> tuple[int, str]:
    message = websocket.receive()
    assert message["type"] == "websocket.close", message
    return message["code"], message["reason"]


def refused_handshake(
    client: TestClient, path: str, headers: dict[str, str] | None = None
) -> WebSocketDisconnect:
    """The error a handshake fails with; fails the test if the handshake succeeds."""
    with pytest.raises(WebSocketDisconnect) as refused:
        client.websocket_connect(path, headers=headers or {}).__enter__()
    return refused.value


# --- The page ----------------------------------------------------------------------------


def test_page_is_index_html_from_disk(client: TestClient) -> None:
    response = client.get("/")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert response.content == main.INDEX_HTML.read_bytes()


def test_page_is_read_on_every_request(
    client: TestClient, tmp_path, monkeypatch
) -> None:
    page = tmp_path / "index.html"
    page.write_text("<p>first</p>")
    monkeypatch.setattr(main, "INDEX_HTML", page)
    assert client.get("/").text == "<p>first</p>"
    page.write_text("<p>edited</p>")
    assert client.get("/").text == "<p>edited</p>"


# --- Step 1: echo ------------------------------------------------------------------------


def test_echo_replies_with_message_text(client: TestClient) -> None:
    with client.websocket_connect("/ws") as websocket:
        websocket.send_text("hello")
        assert websocket.receive_text() == "Message text was: hello"
        websocket.send_text("again")
        assert websocket.receive_text() == "Message text was: again"


def test_echo_client_leaving_logs_nothing(client: TestClient, caplog) -> None:
    with client.websocket_connect("/ws") as websocket:
        websocket.send_text("bye")
        websocket.receive_text()
    # Leaving the block closed the socket; a new round trip proves the handler finished.
    with client.websocket_connect("/ws") as websocket:
        websocket.send_text("ping")
        assert websocket.receive_text() == "Message text was: ping"
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


# --- Step 2: client id -------------------------------------------------------------------


def test_client_endpoint_names_the_client(client: TestClient) -> None:
    with client.websocket_connect("/ws/7") as websocket:
        websocket.send_text("hi")
        assert websocket.receive_text() == "Client #7 says: hi"


def test_client_leaving_is_logged(client: TestClient, caplog) -> None:
    caplog.set_level(logging.INFO, logger="uvicorn.error")
    with client.websocket_connect("/ws/7") as websocket:
        websocket.send_text("hi")
        websocket.receive_text()
    with client.websocket_connect(
        "/ws/8"
    ) as websocket:  # waits for #7's handler to end
        websocket.send_text("hi")
        websocket.receive_text()
    assert "Client #7 left the chat" in caplog.messages
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


@pytest.mark.parametrize("path", ["/ws/abc", "/ws/1.5", "/chat/abc"])
def test_non_integer_client_id_is_refused_at_handshake(
    client: TestClient, path: str
) -> None:
    assert refused_handshake(client, path).code == 1008


# --- Step 3: chat ------------------------------------------------------------------------


def test_chat_sender_gets_personal_message_then_broadcast(client: TestClient) -> None:
    with client.websocket_connect("/chat/1") as alice:
        alice.send_text("hello")
        assert alice.receive_text() == "You wrote: hello"
        assert alice.receive_text() == "Client #1 says: hello"


def test_chat_two_clients_see_each_other(client: TestClient) -> None:
    with (
        client.websocket_connect("/chat/1") as alice,
        client.websocket_connect("/chat/2") as bob,
    ):
        alice.send_text("hi bob")
        assert alice.receive_text() == "You wrote: hi bob"
        assert alice.receive_text() == "Client #1 says: hi bob"
        assert bob.receive_text() == "Client #1 says: hi bob"
        bob.send_text("hi alice")
        assert bob.receive_text() == "You wrote: hi alice"
        assert bob.receive_text() == "Client #2 says: hi alice"
        assert alice.receive_text() == "Client #2 says: hi alice"


def test_chat_announces_a_client_leaving(client: TestClient) -> None:
    with client.websocket_connect("/chat/1") as alice:
        with client.websocket_connect("/chat/2") as bob:
            bob.send_text("bye")
            assert alice.receive_text() == "Client #2 says: bye"
        assert alice.receive_text() == "Client #2 left the chat"
        assert list(main.manager.active_connections) != []
        assert len(main.manager.active_connections) == 1


def test_anonymous_chat_is_the_first_tutorials(client: TestClient) -> None:
    with (
        client.websocket_connect("/chat/") as alice,
        client.websocket_connect("/chat/") as bob,
    ):
        alice.send_text("hello")
        assert alice.receive_text() == "Someone said: hello"
        assert bob.receive_text() == "Someone said: hello"
        with client.websocket_connect("/chat/") as carol:
            carol.send_text("bye")
            assert carol.receive_text() == "Someone said: bye"
        assert alice.receive_text() == "Someone said: bye"
        assert alice.receive_text() == "A user left the chat"
        assert bob.receive_text() == "Someone said: bye"
        assert bob.receive_text() == "A user left the chat"


def test_anonymous_chat_is_a_room_of_its_own(client: TestClient) -> None:
    with (
        client.websocket_connect("/chat/") as someone,
        client.websocket_connect("/chat/1") as alice,
    ):
        alice.send_text("named")
        assert alice.receive_text() == "You wrote: named"
        assert alice.receive_text() == "Client #1 says: named"
        someone.send_text("anonymous")
        assert someone.receive_text() == "Someone said: anonymous"
        alice.send_text("again")
        assert alice.receive_text() == "You wrote: again"  # nothing from /chat/ between


def test_anonymous_departures_of_one_turn_go_out_as_one() -> None:
    assert main.left_the_chat([None]) == "A user left the chat"
    assert main.left_the_chat([None, None, None]) == "3 users left the chat"


def test_a_chat_without_its_middleware_fails_before_accepting() -> None:
    async def receive() -> Message:
        return {"type": "websocket.connect"}

    async def send(message: Message) -> None:
        raise AssertionError("nothing is sent: not even the accept")

    websocket = WebSocket({"type": "websocket", "headers": []}, receive, send)
    with pytest.raises(RuntimeError, match=r"app\.add_middleware\(KeepServerSend\)"):
        asyncio.run(main.ConnectionManager().connect(websocket, 1))


def client_writing_with(server_send: Send, client_id: int) -> main.Client:
    """A chat client outside any server: the manager's writes to it go to server_send."""

    async def not_read() -> Message:
        raise AssertionError("the manager does not read from clients")

    scope = {"type": "websocket", main.SERVER_SEND: server_send}
    return main.Client(WebSocket(scope, not_read, server_send), client_id)


def test_disconnect_is_idempotent() -> None:
    async def not_used(message: Message) -> None:
        raise AssertionError("disconnect() does not talk to the client")

    async def disconnect_twice() -> None:
        manager = main.ConnectionManager()
        never_connected = client_writing_with(not_used, client_id=1)
        manager.disconnect(never_connected)  # nothing to do, no KeyError
        manager.disconnect(never_connected)

    asyncio.run(disconnect_twice())


def test_a_client_whose_write_fails_leaves_the_room_and_the_rest_still_hear() -> None:
    heard: list[str] = []

    async def connection_gone(message: Message) -> None:
        raise ClientDisconnected  # uvicorn's: an OSError, as ASGI asks of servers

    async def connection_open(message: Message) -> None:
        heard.append(message["text"])

    async def broadcast_past_a_vanished_client() -> list[int]:
        manager = main.ConnectionManager()
        for client_id, send in ((1, connection_gone), (2, connection_open)):
            client = client_writing_with(send, client_id)
            manager.active_connections[client_id] = client
        await manager.broadcast("hello")
        assert manager.deliverer is not None
        await manager.deliverer
        return list(manager.active_connections)

    assert asyncio.run(broadcast_past_a_vanished_client()) == [2]
    assert heard == ["hello"]


def test_same_id_again_takes_over_without_a_leave_notice(client: TestClient) -> None:
    with (
        client.websocket_connect("/chat/1") as alice,
        client.websocket_connect("/chat/7") as first_tab,
    ):
        with client.websocket_connect("/chat/7") as second_tab:
            assert receive_close(first_tab) == (4000, main.TAKEN_OVER)
            second_tab.send_text("still me")
            assert second_tab.receive_text() == "You wrote: still me"
            # The room hears the newer connection, and no "Client #7 left the chat".
            assert alice.receive_text() == "Client #7 says: still me"
        assert alice.receive_text() == "Client #7 left the chat"


def test_leave_notices_of_one_turn_go_out_as_one() -> None:
    assert main.left_the_chat([2]) == "Client #2 left the chat"
    assert main.left_the_chat([2, 5]) == "Clients #2 and #5 left the chat"
    assert main.left_the_chat([2, 5, 9]) == "Clients #2, #5 and #9 left the chat"


def test_flooding_client_is_slowed_then_closed_with_1008(
    client: TestClient, monkeypatch
) -> None:
    # The same rule, scaled down: 5 messages at once, then 200 a second, 3 slowed.
    monkeypatch.setattr(main, "FLOOD_BURST_MESSAGES", 5)
    monkeypatch.setattr(main, "FLOOD_MESSAGES_PER_S", 200)
    monkeypatch.setattr(main, "FLOOD_MAX_SLOWED_MESSAGES", 3)
    with client.websocket_connect("/chat/1") as flooder:
        for i in range(5 + 3 + 1):
            flooder.send_text(f"message {i}")
        received = []
        while (message := flooder.receive())["type"] == "websocket.send":
            received.append(message["text"])
        assert (message["code"], message["reason"]) == (1008, main.FLOODING)
    # In order, and slowed rather than dropped, up to the close.
    expected = [f"{prefix}message {i}" for i in range(9) for prefix in PREFIXES]
    assert received == expected[: len(received)]
    assert len(received) >= 2 * 6


PREFIXES = ("You wrote: ", "Client #1 says: ")


# --- Bad input, on every endpoint ----------------------------------------------------------


@pytest.mark.parametrize("path", ["/ws", "/ws/3", "/chat/3", "/chat/"])
def test_binary_frame_closes_with_1003(client: TestClient, path: str) -> None:
    with client.websocket_connect(path) as websocket:
        websocket.send_bytes(b"\x00\x01")
        assert receive_close(websocket) == (
            1003,
            "Binary frames are not supported: send text",
        )


def test_binary_frame_leaves_the_rest_of_the_chat_working(client: TestClient) -> None:
    with (
        client.websocket_connect("/chat/1") as alice,
        client.websocket_connect("/chat/2") as bob,
    ):
        bob.send_bytes(b"\x00")
        assert receive_close(bob)[0] == 1003
        assert alice.receive_text() == "Client #2 left the chat"
        assert len(main.manager.active_connections) == 1
        alice.send_text("still here")
        assert alice.receive_text() == "You wrote: still here"
        assert alice.receive_text() == "Client #1 says: still here"


@pytest.mark.parametrize("path", ["/ws", "/ws/3", "/chat/3", "/chat/"])
def test_message_over_limit_closes_with_1009(client: TestClient, path: str) -> None:
    with client.websocket_connect(path) as websocket:
        websocket.send_text("x" * (main.MAX_MESSAGE_BYTES + 1))
        assert receive_close(websocket) == (1009, "Message over 65536 bytes")


def test_message_at_limit_is_relayed(client: TestClient) -> None:
    text = "é" * (
        main.MAX_MESSAGE_BYTES // 2
    )  # two bytes each in UTF-8: exactly the limit
    with client.websocket_connect("/chat/1") as alice:
        alice.send_text(text)
        assert alice.receive_text() == f"You wrote: {text}"


# --- Step 4: Depends ---------------------------------------------------------------------


def test_depends_step_with_a_query_token(client: TestClient) -> None:
    with client.websocket_connect("/items/foo/ws?token=some-key-token") as websocket:
        websocket.send_text("Hello, WebSocket!")
        assert websocket.receive_text() == (
            "Session cookie or query token value is: some-key-token"
        )
        assert websocket.receive_text() == (
            "Message text was: Hello, WebSocket!, for item ID: foo"
        )


def test_depends_step_with_a_cookie_and_q(client: TestClient) -> None:
    headers = {"Cookie": "session=fakesession"}
    with client.websocket_connect("/items/bar/ws?q=3", headers=headers) as websocket:
        websocket.send_text("Hi")
        assert websocket.receive_text() == (
            "Session cookie or query token value is: fakesession"
        )
        assert websocket.receive_text() == "Query parameter q is: 3"
        assert websocket.receive_text() == "Message text was: Hi, for item ID: bar"


def test_depends_step_refuses_no_credentials_with_1008(client: TestClient) -> None:
    assert refused_handshake(client, "/items/foo/ws").code == 1008


def test_depends_step_refuses_a_q_that_is_not_a_number(client: TestClient) -> None:
    refused = refused_handshake(client, "/items/foo/ws?q=bar&token=some-key-token")
    assert refused.code == 1008


def test_depends_step_keeps_the_project_rules(client: TestClient) -> None:
    with client.websocket_connect("/items/foo/ws?token=t") as websocket:
        websocket.send_bytes(b"\x00")
        assert receive_close(websocket)[0] == 1003
    refused = refused_handshake(
        client, "/items/foo/ws?token=t", {"Origin": "http://evil.example"}
    )
    assert refused.code == 1008


# --- Sending into the chat over HTTP ------------------------------------------------------


@pytest.fixture
def announce_token(monkeypatch) -> str:
    monkeypatch.setattr(main, "ANNOUNCE_TOKEN", "s3cret")
    return "s3cret"


def post_message(client: TestClient, body: object, token: str | None = None):
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    return client.post("/chat/messages", json=body, headers=headers)


def test_post_reaches_every_chat_client(client: TestClient, announce_token) -> None:
    with (
        client.websocket_connect("/chat/1") as alice,
        client.websocket_connect("/chat/2") as bob,
    ):
        response = post_message(client, {"text": "Maintenance at 18:00"}, "s3cret")
        assert response.status_code == 202
        for websocket in (alice, bob):
            assert websocket.receive_text() == "Server says: Maintenance at 18:00"


def test_post_is_off_without_announce_token(client: TestClient) -> None:
    response = post_message(client, {"text": "hi"}, "anything")
    assert response.status_code == 403
    assert "set to a secret" in response.json()["detail"]
    assert "ANNOUNCE_TOKEN" in response.json()["detail"]


@pytest.mark.parametrize("token", [None, "wrong"])
def test_post_refuses_a_missing_or_wrong_token(
    client: TestClient, announce_token, token
) -> None:
    response = post_message(client, {"text": "hi"}, token)
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize(
    "body", [{"text": ""}, {"text": "x" * (main.MAX_MESSAGE_BYTES + 1)}, {}]
)
def test_post_refuses_an_empty_or_oversized_text(
    client: TestClient, announce_token, body
) -> None:
    assert post_message(client, body, "s3cret").status_code == 422


# --- Origin ----------------------------------------------------------------------------


def test_same_origin_is_allowed(client: TestClient) -> None:
    with client.websocket_connect(
        "/ws", headers={"Origin": "http://testserver"}
    ) as websocket:
        websocket.send_text("ok")
        assert websocket.receive_text() == "Message text was: ok"


def test_other_origin_is_refused(client: TestClient, caplog) -> None:
    refused = refused_handshake(client, "/chat/1", {"Origin": "http://evil.example"})
    assert (refused.code, refused.reason) == (
        1008,
        "Origin http://evil.example is not allowed",
    )
    assert "add it to ALLOWED_ORIGINS" in caplog.text


def test_allowed_origins_lets_another_site_in(client: TestClient, monkeypatch) -> None:
    monkeypatch.setattr(main, "ALLOWED_ORIGINS", frozenset({"https://chat.example"}))
    with client.websocket_connect(
        "/ws", headers={"Origin": "https://chat.example"}
    ) as websocket:
        websocket.send_text("ok")
        assert websocket.receive_text() == "Message text was: ok"


# --- Scale out -------------------------------------------------------------------------


def test_redis_url_password_is_kept_out_of_the_log() -> None:
    url = "redis://user:s3cret@redis.example:6379/0"
    assert main.without_password(url) == "redis://user:***@redis.example:6379/0"
    assert (
        main.without_password("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"
    )
