"""FastAPI WebSockets, step by step: echo, client ids, and a chat that holds up.

Run it with `uvicorn main:app --reload --reload-exclude .venv` and open
http://127.0.0.1:8000/. The file reads from the top, as the tutorial does:

- the app, and `GET /`, the page;
- step 1, echo; step 2, a client id; step 3, the chat (its ConnectionManager, then its
  endpoints); step 4, FastAPI's "Using Depends"; sending into the chat over HTTP;
- then the machinery the steps call by name, each in a section of its own: delivery
  (a broadcast never waits on a slow client), what a client may send (input checks,
  flood control), closing and the log, the origin check, and the relay (one process, or
  several through Redis when REDIS_URL is set).
"""

# Annotations are kept as strings: the manager's methods name `Client`, which the
# delivery section, after the steps, defines.
from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import itertools
import json
import logging
import os
import re
import secrets
import time
from collections.abc import AsyncIterator
from pathlib import Path as FilePath
from typing import Annotated, ClassVar
from urllib.parse import urlsplit

import anyio
from fastapi import (
    APIRouter,
    Cookie,
    Depends,
    FastAPI,
    HTTPException,
    Path,
    Query,
    Request,
    WebSocket,
    WebSocketDisconnect,
    WebSocketException,
    status,
)
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.websockets import WebSocketState
from pydantic import BaseModel, Field, ValidationError, field_validator
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# uvicorn's own logger, so these lines show in the terminal uvicorn runs in.
logger = logging.getLogger("uvicorn.error")

INDEX_HTML = FilePath(__file__).with_name("index.html")

app = FastAPI()


@app.get("/")
async def get() -> FileResponse:
    # Read from disk on every request: edits show on refresh, with no restart.
    return FileResponse(INDEX_HTML, headers={"Cache-Control": "no-cache"})


# Every WebSocket below is checked for its Origin before it reaches its endpoint (see
# "The origin check"), and reads with receive_valid_text (see "What a client may send").


# --- Step 1: echo. Accept, then receive and send in a loop ---------------------------------


@app.websocket("/ws")
async def websocket_endpoint(websocket: WebSocket) -> None:
    await websocket.accept()
    try:
        while True:
            data = await receive_valid_text(websocket)  # text only, at most 64 KiB
            await websocket.send_text(f"Message text was: {data}")
    except WebSocketDisconnect:
        pass  # The tab closed: an ordinary event, not an error.


# --- Step 2: a client id in the path, and noticing when the client leaves ------------------


@app.websocket("/ws/{client_id}")
async def websocket_client_endpoint(websocket: WebSocket, client_id: int) -> None:
    await websocket.accept()
    try:
        while True:
            data = await receive_valid_text(websocket)
            await websocket.send_text(f"Client #{client_id} says: {data}")
    except WebSocketDisconnect:
        logger.info("Client #%d left the chat", client_id)


# --- Step 3: a chat room. The ConnectionManager, then its endpoints ------------------------
# The tutorial's four methods, in its order, and `say`, at /chat/{client_id} (/ws/... is
# step 2's). Behind them, after the steps: "Delivery" (nobody waits on a slow client), and
# `relay` (this process, or Redis). The README says what to copy with this step.


class ConnectionManager:
    def __init__(self, name: str = "chat") -> None:
        self.name = name  # the room's, for the relay
        # By client id (anonymous: by connection); the same id again takes over.
        self.active_connections: dict[int, Client] = {}
        self.pending: list[tuple[Client | None, Message]] = []  # see `deliver`
        self.deliverer: asyncio.Task[None] | None = None
        self.departed: list[int | None] = []  # see `announce_leaving`
        self.announcer: asyncio.Task[None] | None = None

    async def connect(
        self, websocket: WebSocket, client_id: int | None = None
    ) -> Client:
        client = Client(websocket, client_id)
        await websocket.accept()
        await relay.join(self, client)  # an older connection with this id gets 4000
        return client

    def disconnect(self, client: Client) -> None:
        """Out of the room; the others are told in one notice for all who left at once."""
        leave(self, client)
        announce_leaving(self, client)

    async def send_personal_message(self, message: str, client: Client) -> None:
        await send_soon(self, client, message)

    async def broadcast(self, message: str) -> bool:
        """Queued for everyone, not yet written; False if Redis did not take it."""
        return await relay.publish(self, message)

    async def say(self, client: Client, acknowledgement: str, message: str) -> None:
        """FastAPI's docs' two sends; through Redis, `You wrote` once Redis has it."""
        await relay.say(self, client, acknowledgement, message)


manager = ConnectionManager()
anonymous_manager = ConnectionManager("anonymous")  # the first tutorial's /chat/


@app.websocket("/chat/{client_id}")
async def chat_endpoint(websocket: WebSocket, client_id: int) -> None:
    client = await manager.connect(websocket, client_id)
    try:
        with client.cut_off_scope:  # the manager cancels it to cut this client off
            while True:
                data = await receive_valid_text(websocket)
                await manager.say(
                    client, f"You wrote: {data}", f"Client #{client_id} says: {data}"
                )
                await slow_down_floods(client)  # a flooder's next message waits
    except WebSocketDisconnect as gone:
        ended_by(client, gone)  # the server shutting down: nobody is told
    finally:
        manager.disconnect(client)  # and "Client #{client_id} left the chat"
    await close_if_cut_off(client)  # too slow, taken over, Redis lost: it is told why


@app.websocket("/chat/")
async def anonymous_chat_endpoint(websocket: WebSocket) -> None:
    client = await anonymous_manager.connect(websocket)
    try:
        with client.cut_off_scope:
            while True:
                data = await receive_valid_text(websocket)
                await anonymous_manager.broadcast(f"Someone said: {data}")
                await slow_down_floods(client)
    except WebSocketDisconnect as gone:
        ended_by(client, gone)
    finally:
        anonymous_manager.disconnect(client)  # and "A user left the chat"
    await close_if_cut_off(client)


# --- Step 4, from FastAPI's docs: "Using Depends and others" --------------------------------
#
# A WebSocket endpoint takes dependencies like any route: cookies, query parameters,
# Depends. A dependency refuses the connection by raising WebSocketException (1008), which
# a browser sees as a refused handshake. This accepts any value, as the docs' example does.


async def get_cookie_or_token(
    websocket: WebSocket,
    session: Annotated[str | None, Cookie()] = None,
    token: Annotated[str | None, Query()] = None,
) -> str:
    if session is None and token is None:
        raise WebSocketException(code=status.WS_1008_POLICY_VIOLATION)
    return session or token or ""


@app.websocket("/items/{item_id}/ws")
async def item_endpoint(
    *,
    websocket: WebSocket,
    item_id: str,
    q: int | None = None,
    cookie_or_token: Annotated[str, Depends(get_cookie_or_token)],
) -> None:
    await websocket.accept()
    try:
        while True:
            data = await receive_valid_text(websocket)
            await websocket.send_text(
                f"Session cookie or query token value is: {cookie_or_token}"
            )
            if q is not None:
                await websocket.send_text(f"Query parameter q is: {q}")
            await websocket.send_text(
                f"Message text was: {data}, for item ID: {item_id}"
            )
    except WebSocketDisconnect:
        pass


# --- Step 5: named rooms, who is here, and nothing missed after a reconnect ---------------
#
# Where a chat goes next: many rooms, the members of each, and JSON messages with ids. A
# client that comes back with ?since=<the id of the last message it received> gets every
# message it missed, as long as its room still holds them; if not, its welcome says
# "missed": true. The protocol, the bounds and the history are in "Rooms", after the steps.

# Django Channels' rule for group names: no spaces or slashes, so a name fits in a URL,
# a Redis key and the relay's messages as it is.
ROOM_NAME = r"^[A-Za-z0-9_.\-]{1,100}$"


class RoomManager:
    """Step 3's manager for many rooms: each a ConnectionManager with a history."""

    def __init__(self) -> None:
        # By name, the least recently active first: see `open_room`.
        self.rooms: collections.OrderedDict[str, Room] = collections.OrderedDict()
        self.history_bytes = 0  # of all rooms together: see `keep_message`

    async def connect(
        self, websocket: WebSocket, room: str, client_id: int, since: str | None
    ) -> Client:
        client = Client(websocket, client_id)
        await websocket.accept()
        client.room = open_room(self, room)  # past MAX_ROOMS, or Redis lost: 1013
        let_in(client.room, client, since)  # welcomed with what it missed
        return client

    def disconnect(self, client: Client) -> None:
        """Out of its room; the others are told who left, several in one notice."""
        leave_room(client)

    async def broadcast(self, client: Client, text: str) -> None:
        """To everyone in the client's room, the sender too: its copy acknowledges it."""
        await relay.post(self, client.room, client.client_id, text)  # kept, with an id


rooms = RoomManager()


@app.websocket("/rooms/{room}/{client_id}")
async def room_endpoint(
    websocket: WebSocket,
    room: Annotated[str, Path(pattern=ROOM_NAME)],
    client_id: int,
    since: str | None = None,  # the id of the last message this client received
) -> None:
    client = await rooms.connect(websocket, room, client_id, since)
    try:
        with client.cut_off_scope:
            while True:
                text = await receive_json_text(websocket)  # {"text": ...}, else 1007
                await rooms.broadcast(client, text)
                await slow_down_floods(client)
    except WebSocketDisconnect as gone:
        ended_by(client, gone)
    finally:
        rooms.disconnect(client)  # and "left" to the others, unless it may be back
    await close_if_cut_off(client)


# --- Sending into the chat from HTTP, or from any code -----------------------------------
#
# manager.broadcast() is all it takes, from an endpoint, a background job or a scheduled
# task in this app; with REDIS_URL set, it reaches the clients of every process.

# Unset or empty: POST /chat/messages refuses everyone. Set: the bearer token it takes.
ANNOUNCE_TOKEN = os.environ.get("ANNOUNCE_TOKEN", "")


class ChatMessage(BaseModel):
    text: str = Field(min_length=1)

    @field_validator("text")
    @classmethod
    def fits_in_one_message(cls, text: str) -> str:
        if len(text.encode()) > MAX_MESSAGE_BYTES:
            raise ValueError(f"must be at most {MAX_MESSAGE_BYTES} bytes in UTF-8")
        return text


def check_announce_token(
    credentials: Annotated[
        HTTPAuthorizationCredentials | None, Depends(HTTPBearer(auto_error=False))
    ],
) -> None:
    if not ANNOUNCE_TOKEN:
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            "Sending into the chat over HTTP is off: start the server with "
            "ANNOUNCE_TOKEN set to a secret, and send it as a bearer token",
        )
    given = credentials.credentials if credentials is not None else ""
    if not secrets.compare_digest(given.encode(), ANNOUNCE_TOKEN.encode()):
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "Missing or wrong token: send Authorization: Bearer <ANNOUNCE_TOKEN>",
            headers={"WWW-Authenticate": "Bearer"},
        )


# JSON may spell each byte of the text as an escape (`\u0001`: six bytes), and a little
# more for the braces: past six times MAX_MESSAGE_BYTES, no body is a message that fits.
MAX_POST_BYTES = 6 * 64 * 1024 + 1024
POST_TOO_LARGE = (
    f"Body over {MAX_POST_BYTES} bytes: a message is at most 64 KiB of text"
)


async def read_chat_message(request: Request) -> ChatMessage:
    """The body, read once the token has passed, and never more than MAX_POST_BYTES.

    A body parameter would be read whole, however large, before any dependency runs.
    """
    too_large = HTTPException(status.HTTP_413_CONTENT_TOO_LARGE, POST_TOO_LARGE)
    with contextlib.suppress(ValueError):
        if int(request.headers.get("content-length", "0")) > MAX_POST_BYTES:
            raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_POST_BYTES:
            raise too_large
    try:
        return ChatMessage.model_validate_json(body)
    except ValidationError as invalid:
        raise RequestValidationError(invalid.errors()) from None


@app.post(
    "/chat/messages",
    status_code=status.HTTP_202_ACCEPTED,
    dependencies=[Depends(check_announce_token)],
)
async def post_chat_message(
    message: Annotated[ChatMessage, Depends(read_chat_message)],
) -> dict[str, str]:
    if not await manager.broadcast(f"Server says: {message.text}"):
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, REDIS_DOWN)
    return {"status": "sent"}


# --- Delivery: a broadcast reaches everyone, and waits on nobody ---------------------------
#
# Protects against: the tutorial's `broadcast` awaits each client in turn, so one client
# that stops reading stalls the whole room. Measured: beside such a client, the tutorial's
# chat delivered 699 of 3,000 messages and then nothing; this one all 3,000 in 2.35 s.
#
# The policy, in short. A client that keeps up is written to directly. One whose socket is
# full gets a backlog of at most MAX_BACKLOG_MESSAGES, written by a task of its own. Once
# that backlog is full while its socket still is, the client is cut off with 1008: its own
# socket keeps it behind, and waiting for it would set the room's pace to its. A backlog
# full only because its task has not had its turn yet (the server is busy) is waited for.
# Departures of one turn of the event loop are announced in one notice.

MAX_BACKLOG_MESSAGES = 100  # queued for a chat client that has fallen behind, at most
MAX_PENDING_MESSAGES = 100  # sent in one turn, not yet written: writers wait for them

WS_4000_TAKEN_OVER = 4000  # the same client id connected again: the page does not retry
TOO_SLOW = f"Too slow: over {MAX_BACKLOG_MESSAGES} messages behind"
TAKEN_OVER = "Replaced by a newer connection with the same client id"

# Endings the room is not told about: the server restarting (1012), the chat closing for
# everyone in this process (1013), and a client replaced by its own newer connection.
QUIET_CLOSE_CODES = frozenset({1012, 1013, WS_4000_TAKEN_OVER})

# A write to a client that has gone fails with an OSError (ASGI's rule), which Starlette
# turns into WebSocketDisconnect. One to a connection that was closed, by the app or by
# uvicorn itself (a message over --ws-max-size, a protocol error), fails with a RuntimeError.
GONE = (OSError, WebSocketDisconnect, RuntimeError)

# For each write, websocket.send_text() builds the ASGI message, checks the connection's
# state, and passes it through a layer of Starlette's: at 10,000 clients, about 8% of the
# server's CPU per delivery. So the chat builds each message once and writes it with the
# server's own `send`, which this middleware keeps in each WebSocket's scope.
SERVER_SEND = "chat.server_send"  # the scope's key for it


class KeepServerSend:
    """Pure ASGI middleware: keeps the server's `send` in each WebSocket's scope."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            scope[SERVER_SEND] = send
        await self.app(scope, receive, send)


app.add_middleware(KeepServerSend)


class Backlog:
    """What a chat client that has fallen behind is yet to be sent, and the task sending it."""

    __slots__ = ("blocked_on_socket", "made_room", "messages", "sender")

    def __init__(self) -> None:
        self.messages: collections.deque[Message] = collections.deque()
        self.made_room = asyncio.Event()
        self.sender: asyncio.Task[None] | None = None
        # A write waits only while the client's socket is full: whoever sees this set knows
        # that the client is not reading.
        self.blocked_on_socket = False


class Client:
    """One chat connection, and what the manager keeps about it."""

    # Fixed attributes, no __dict__: less memory for each of thousands of connections.
    __slots__ = (
        "allowance",
        "allowance_at",
        "announced",
        "backlog",
        "client_id",
        "close_code",
        "close_reason",
        "cut_off_scope",
        "key",
        "quiet",
        "room",
        "send",
        "slowed_in_a_row",
        "token",
        "websocket",
    )

    def __init__(self, websocket: WebSocket, client_id: int | None) -> None:
        if SERVER_SEND not in websocket.scope:
            raise RuntimeError(
                "The chat writes with the server's own send: register its middleware "
                "with app.add_middleware(KeepServerSend)"
            )
        self.websocket = websocket
        self.send: Send = websocket.scope[SERVER_SEND]  # what the chat writes with
        self.client_id = client_id
        # Where the room keeps it: its id, or, for the anonymous chat, its own identity.
        self.key = client_id if client_id is not None else id(self)
        self.room: Room | None = None  # step 5's, once it has one
        self.backlog: Backlog | None = None  # only while it has fallen behind
        # The client's handler runs inside this scope: cancelling it ends the handler even
        # while it waits for a message from a client that will never send one.
        self.cut_off_scope = anyio.CancelScope()
        # Why the connection ended, as a close code: some endings are not announced.
        self.close_code = status.WS_1000_NORMAL_CLOSURE
        self.close_reason = ""
        # The server ended it, and the room is not told: see `ended_quietly`.
        self.quiet = False
        # Flood control (see slow_down_floods): messages it may still send at full speed.
        self.allowance = float(FLOOD_BURST_MESSAGES)
        self.allowance_at = time.monotonic()
        self.slowed_in_a_row = 0
        # With Redis: tells this connection from another one with the same id elsewhere.
        self.token = ""
        self.announced = False


def websocket_send(text: str) -> Message:
    """What websocket.send_text(text) hands the server; built once, written to all."""
    return {"type": "websocket.send", "text": text}


def enter(room: ConnectionManager, client: Client) -> None:
    """Into the room; an older connection with the same id is closed with 4000."""
    older = room.active_connections.get(client.key)
    if older is not None:
        cut_off(room, older, WS_4000_TAKEN_OVER, TAKEN_OVER)
    room.active_connections[client.key] = client


def leave(room: ConnectionManager, client: Client) -> None:
    # Safe to call twice, and for a connection that a newer one has replaced.
    if room.active_connections.get(client.key) is client:
        del room.active_connections[client.key]
    if client.backlog is not None and client.backlog.sender is not None:
        client.backlog.sender.cancel()


async def send_soon(room: ConnectionManager, to: Client | None, text: str) -> None:
    """Send to one client (or to all: None) with everything else of this turn: `deliver`."""
    queue(room, to, websocket_send(text))
    if len(room.pending) >= MAX_PENDING_MESSAGES:
        # Backpressure: a writer that outpaces delivery waits for it.
        await asyncio.shield(room.deliverer)


def queue(room: ConnectionManager, to: Client | None, message: Message) -> None:
    room.pending.append((to, message))
    if room.deliverer is None:
        room.deliverer = asyncio.create_task(deliver(room))


async def deliver(room: ConnectionManager) -> None:
    """Write what was sent in one turn to each client, as the tutorial does, but never
    wait on one.

    The tutorial awaits each write, so one client whose socket is full holds up everyone
    after it. Here a write that would wait is given up at once, and that client gets a
    backlog, and a task that sends it, until it has caught up. A client that keeps up
    costs less than in the tutorial's loop: no task, no queue, one ASGI message for all,
    and the server's own `send`. Each client's messages of the turn are written back to
    back, which lets the kernel send a burst in fewer packets.
    """
    try:
        while room.pending:
            sent, room.pending = room.pending, []
            everyone, own = shares(sent)
            # A copy: clients join and leave while this waits for room in a backlog.
            clients = list(room.active_connections.values())
            position = 0
            while position < len(clients):
                position, left = await write_while_keeping_up(
                    room, clients, position, everyone, own
                )
                for message in left:
                    await send_later(room, clients[position], message)
                position += 1
    finally:
        room.deliverer = None


def shares(
    sent: list[tuple[Client | None, Message]],
) -> tuple[list[Message], dict[Client, list[Message]]]:
    """What everyone gets of a turn's messages, and, for the few clients with messages
    of their own, theirs, in order, among everyone's."""
    everyone: list[Message] = []
    own: dict[Client, list[Message]] = {}
    for to, message in sent:
        if to is None:
            everyone.append(message)
            for messages in own.values():
                messages.append(message)
        elif to in own:
            own[to].append(message)
        else:
            own[to] = [*everyone, message]
    return everyone, own


async def write_while_keeping_up(
    room: ConnectionManager,
    clients: list[Client],
    start: int,
    everyone: list[Message],
    own: dict[Client, list[Message]],
) -> tuple[int, list[Message]]:
    """Write from clients[start] on; where it stopped, and what that client is owed.

    It stops at a client that is behind, or whose write would wait: that client's
    messages then go to its backlog, in order.
    """
    position, messages, written = start, [], 0
    try:
        # A deadline of now: any wait is too long. uvicorn's default WebSocket
        # implementations (websockets-sansio, wsproto) and the TestClient wait before
        # writing anything, so a write given up is not half-sent. (Its legacy
        # `--ws websockets` writes first, then waits: not for this app.)
        async with asyncio.timeout(0):
            for position in range(start, len(clients)):
                client = clients[position]
                messages = own.get(client, everyone)
                if client.backlog is not None:
                    return position, messages
                written = 0
                for message in messages:
                    try:
                        await client.send(message)
                    except GONE:
                        leave(room, client)  # its handler tells the room
                    written += 1
    except TimeoutError:
        return position, messages[written:]  # that client's socket is full
    return len(clients), []


async def send_later(room: ConnectionManager, client: Client, message: Message) -> None:
    """Queue a message for a client that is behind; cut it off if its socket keeps it
    a full backlog behind.

    A full backlog whose task is waiting on the client's socket: the client reads more
    slowly than the room talks, and waiting for it would slow everyone to its pace,
    however much it still reads. A full backlog whose task has not had its turn yet: the
    server is busy, every client behind, and waiting is backpressure.
    """
    waited_a_turn = False
    while room.active_connections.get(client.key) is client:
        backlog = client.backlog
        if backlog is None:
            backlog = client.backlog = Backlog()
            backlog.sender = asyncio.create_task(send_backlog(room, client))
        if len(backlog.messages) < MAX_BACKLOG_MESSAGES:
            backlog.messages.append(message)
            return
        if not backlog.blocked_on_socket:
            backlog.made_room.clear()
            await backlog.made_room.wait()
        elif not waited_a_turn:
            # One turn of the event loop: a socket that has just drained writes first.
            waited_a_turn = True
            await asyncio.sleep(0)
        else:
            cut_off(room, client, status.WS_1008_POLICY_VIOLATION, TOO_SLOW)
            return


async def send_backlog(room: ConnectionManager, client: Client) -> None:
    backlog = client.backlog
    assert backlog is not None
    try:
        while backlog.messages:
            message = backlog.messages.popleft()
            backlog.made_room.set()
            backlog.blocked_on_socket = True
            await client.send(message)
            backlog.blocked_on_socket = False
    except GONE:
        leave(room, client)
    finally:
        # Caught up, or gone: a broadcaster still waiting for room goes on, and starts a
        # new backlog, behind everything this one sent, if the client is still here.
        client.backlog = None
        backlog.made_room.set()


def cut_off(room: ConnectionManager, client: Client, code: int, reason: str) -> None:
    """Take the client out of the room and end its handler, which then closes it."""
    leave(room, client)
    client.close_code, client.close_reason = code, reason
    client.quiet = code in QUIET_CLOSE_CODES
    client.cut_off_scope.cancel()


def ended_by(client: Client, gone: WebSocketDisconnect) -> None:
    """How the client's connection ended: quietly if the server is shutting down."""
    client.close_code = gone.code
    client.quiet = isinstance(gone, ServerShutdown)


def announce_leaving(room: ConnectionManager, client: Client) -> None:
    """Tell the room, unless it is a quiet ending; departures of one turn go as one.

    One notice per departure, to everyone still there, costs O(N²) when N clients leave
    at once (a network drop, a proxy restarting): batched, it costs O(N).
    """
    if ended_quietly(client):
        return
    room.departed.append(client.client_id)
    if room.announcer is None:
        room.announcer = asyncio.create_task(announce_departures(room))


def ended_quietly(client: Client) -> bool:
    """The server shutting down (1012), or the server cutting the client off with 1013
    or 4000; not a client that chose one of those codes itself."""
    return client.quiet


async def announce_departures(room: ConnectionManager) -> None:
    try:
        while room.departed:
            client_ids, room.departed = room.departed, []
            await room.broadcast(left_the_chat(client_ids))
    finally:
        room.announcer = None


def left_the_chat(client_ids: list[int | None]) -> str:
    """`Client #2 left the chat`, or `Clients #2, #5 and #9 left the chat`; in the
    anonymous chat, `A user left the chat`, or `3 users left the chat`."""
    names = [f"#{client_id}" for client_id in client_ids if client_id is not None]
    if not names:
        count = len(client_ids)
        return "A user left the chat" if count == 1 else f"{count} users left the chat"
    if len(names) == 1:
        return f"Client {names[0]} left the chat"
    return f"Clients {', '.join(names[:-1])} and {names[-1]} left the chat"


async def close_if_cut_off(client: Client) -> None:
    """A client the manager cut off (too slow, taken over, Redis lost) is told why."""
    if client.cut_off_scope.cancelled_caught:
        who = f"#{client.client_id}" if client.client_id is not None else "(anonymous)"
        logger.info("Client %s cut off: %s", who, client.close_reason)
        await close_quietly(client.websocket, client.close_code, client.close_reason)


# --- Rooms: history, who is here, and catching up after a reconnect ------------------------
#
# Protects against a client losing messages without knowing it, whenever it is cut off
# (too slow, a network blip, a restart). Measured: a client that stopped reading beside
# ten senders of 95 messages of 4 KB was cut off after about 710 of the 950.
#
# The protocol, JSON text frames. From the server: a `welcome` first (the room, the
# client's id, the members, the history, whether some was missed); then each `message`
# ({"id", "client_id", "text"}, to everyone, the sender too), and `joined` and `left`
# ({"client_ids": [...]}). From the client: {"text": T}; anything else closes with 1007.
# Each room keeps its latest messages, by count and by bytes; all rooms together are
# bounded too, and a room nobody is in forgets itself after ROOM_IDLE_S.

WELCOME_HISTORY_MESSAGES = 50  # of the latest, in a welcome without `since`
HISTORY_MESSAGES = 500  # a room keeps at most this many messages,
HISTORY_BYTES = 2 * 1024 * 1024  # and at most this much of them (as sent)
ALL_HISTORY_BYTES = 256 * 1024 * 1024  # all rooms: past it, the least active forget
MAX_ROOMS = 1000  # open at once; a client asking for one more is closed with 1013
ROOM_IDLE_S = 600.0  # a room nobody is in is forgotten, history and all, after this
PRESENCE_INTERVAL_S = 0.25  # joiners are let in, and presence told, this often at most
# A dropped client may come back this long before it has left: time enough for a whole
# server's pages to be back after a network cut (10,000 took about 20 s in bench.py).
PRESENCE_GRACE_S = 30.0

# Endings after which the page comes back by itself: the connection dropped without a
# close frame (uvicorn says 1005 or 1006), or the client was cut off as too slow.
AWAY_CLOSE_CODES = frozenset({1005, 1006, status.WS_1008_POLICY_VIOLATION})

TOO_MANY_ROOMS = f"Too many rooms open (over {MAX_ROOMS}): try again later"
# A message's id in one process: the room's epoch, in hexadecimal, and a number. Anything
# else a client sends as `since` is an id the room cannot place: ASCII digits only (`\d`
# takes "²" and "١" too), no newline (`$` lets one through), no 5,000-digit number.
IN_PROCESS_ID = r"([0-9a-f]{1,16})-([0-9]{1,18})"
EXPECTED_JSON = 'Expected a JSON object with a non-empty string "text": {"text": "hi"}'


class Room(ConnectionManager):
    """A step 5 room: step 3's delivery, a history, and who is in it.

    Only step 3's delivery state is used: clients come and go through `RoomManager`
    and the doorkeeper, not through the methods a ConnectionManager has.
    """

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.history = History()
        self.joining: list[tuple[Client, str | None]] = []  # and the `since` each asked
        self.away: dict[int, float] = {}  # dropped, and when their grace ends
        self.elsewhere: dict[
            str, list[int]
        ] = {}  # with Redis: other processes' members
        self.told: set[int] = set()  # the members the room was last told of
        self.told_at = -PRESENCE_INTERVAL_S  # when, by the event loop's clock
        self.presence_changed = False
        self.doorkeeper: asyncio.Task[None] | None = None  # see `keep_the_door`
        self.empty_since = 0.0
        self.shown_upto = (0, 0)  # with Redis: the last message id delivered here
        self.written: list[int] = []  # with Redis: the members it last said are here

    def members(self) -> set[int]:
        elsewhere = itertools.chain.from_iterable(self.elsewhere.values())
        return {*self.active_connections, *self.away, *elsewhere}

    def is_empty(self) -> bool:
        return not self.active_connections and not self.joining and not self.away


class History:
    """A room's latest messages, encoded as sent, each with its id.

    In one process the ids are `{epoch}-{number}`, the epoch being when the room began:
    after a restart, or once a room was forgotten, an old id is not mistaken for one of
    the new history's. Through Redis, they are the ids of the room's Redis stream.
    """

    def __init__(self) -> None:
        self.epoch = (
            f"{time.time_ns() // 1_000_000:x}"  # in hexadecimal: shorter frames
        )
        self.next_number = 1
        self.messages: collections.deque[tuple[str, str]] = collections.deque()
        self.bytes = 0  # of the frames, in UTF-8, as sent

    def next_id(self) -> str:
        """An id for a new message, in one process."""
        message_id = f"{self.epoch}-{self.next_number}"
        self.next_number += 1
        return message_id

    def keep(self, message_id: str, frame: str) -> int:
        """Kept, with its id; how many bytes the history grew (or shrank)."""
        before = self.bytes
        self.messages.append((message_id, frame))
        self.bytes += len(frame.encode())
        while len(self.messages) > HISTORY_MESSAGES or self.bytes > HISTORY_BYTES:
            self.drop_oldest()
        return self.bytes - before

    def drop_oldest(self) -> int:
        dropped = len(self.messages.popleft()[1].encode())
        self.bytes -= dropped
        return dropped

    def after(self, since: str | None) -> tuple[list[str], bool]:
        """Every message after `since`, if the history holds it; else the latest, and
        True: the client missed some."""
        first = self.next_number - len(self.messages)
        number = self.number_of(since)
        # The message just dropped still counts: nothing after it is missing.
        if number is not None and max(first - 1, 1) <= number < self.next_number:
            after = itertools.islice(self.messages, number - first + 1, None)
            return [frame for _, frame in after], False
        return self.latest(), since is not None

    def number_of(self, message_id: str | None) -> int | None:
        """The number in an id of this history's; None for anything else a client sends."""
        match = re.fullmatch(IN_PROCESS_ID, message_id or "")
        return int(match[2]) if match and match[1] == self.epoch else None

    def latest(self) -> list[str]:
        count = min(WELCOME_HISTORY_MESSAGES, len(self.messages))
        return [frame for _, frame in itertools.islice(reversed(self.messages), count)][
            ::-1
        ]


def said(client_id: int, text: str) -> str:
    """Who said what, as kept: the message's frame without its type and id."""
    return compact_json({"client_id": client_id, "text": text})


def message_frame(message_id: str, what: str) -> str:
    """{"type":"message","id":...,"client_id":...,"text":...}: spliced, not re-encoded."""
    return f'{{"type":"message","id":"{message_id}",{what[1:]}'


def compact_json(value: object) -> str:
    # No spaces, and UTF-8 as it is: each delivery's frame is compressed for every
    # client, and a smaller frame costs less to compress and send ("é" is 2 bytes, not
    # the 6 of "\u00e9"; 86 bytes for a short message, not 93).
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def stream_order(message_id: str) -> tuple[int, int]:
    """Ids compare as their two numbers do: `1733040000000-7` before `1733040000001-0`."""
    match = re.fullmatch(STREAM_ID, message_id)
    return (int(match[1]), int(match[2])) if match else (0, 0)


def open_room(rooms: RoomManager, name: str) -> Room:
    relay.refuse_if_down()  # 1013 while Redis is lost: the room would miss messages
    room = rooms.rooms.get(name)
    if room is None:
        if len(rooms.rooms) >= MAX_ROOMS:
            forget_a_room_nobody_is_in(rooms)
        room = rooms.rooms[name] = Room(name)
    rooms.rooms.move_to_end(name)
    return room


def forget_a_room_nobody_is_in(rooms: RoomManager) -> None:
    """The least recently active room that nobody is in forgets itself, to make room;
    if every room has someone in it, 1013. Rooms opened and left cannot lock others out:
    to hold MAX_ROOMS, a client must keep a connection open in each."""
    for room in rooms.rooms.values():  # the least recently active first
        if room.is_empty():
            forget(rooms, room)
            return
    raise WebSocketException(status.WS_1013_TRY_AGAIN_LATER, TOO_MANY_ROOMS)


def forget(rooms: RoomManager, room: Room) -> None:
    del rooms.rooms[room.name]
    rooms.history_bytes -= room.history.bytes


def keep_message(rooms: RoomManager, room: Room, message_id: str, frame: str) -> None:
    """Into the room's history; the least active rooms forget first past the total."""
    grown = room.history.keep(message_id, frame)
    rooms.history_bytes += grown
    rooms.rooms.move_to_end(room.name)
    for other in rooms.rooms.values():
        while rooms.history_bytes > ALL_HISTORY_BYTES and other.history.messages:
            rooms.history_bytes -= other.history.drop_oldest()
        if rooms.history_bytes <= ALL_HISTORY_BYTES:
            break


def let_in(room: Room, client: Client, since: str | None) -> None:
    """Queue a joiner: `keep_the_door` lets it in, with its welcome."""
    room.joining.append((client, since))
    call_the_doorkeeper(room)


def leave_room(client: Client) -> None:
    room = client.room
    assert room is not None  # RoomManager.connect gave it one before its handler ran on
    was_let_in = all(joiner is not client for joiner, _ in room.joining)
    room.joining = [(c, since) for c, since in room.joining if c is not client]
    leave(room, client)
    replaced = client.key in room.active_connections  # by a newer connection
    if was_let_in and not replaced and client.close_code in AWAY_CLOSE_CODES:
        # Not gone yet: a page that lost its connection is back within seconds, and
        # 10,000 of them coming back at once would cost a `left` and a `joined` each.
        loop = asyncio.get_running_loop()
        room.away[client.key] = loop.time() + PRESENCE_GRACE_S
        loop.call_later(PRESENCE_GRACE_S, presence_changed, room)
    elif ended_quietly(client) and client.key not in room.active_connections:
        room.told.discard(client.key)  # nobody is told
    presence_changed(room)  # and, once nobody is left, see `forget_if_idle`


def forget_if_idle(room: Room) -> None:
    idle_s = time.monotonic() - room.empty_since
    if room.is_empty() and idle_s >= ROOM_IDLE_S and rooms.rooms.get(room.name) is room:
        forget(rooms, room)


def presence_changed(room: Room) -> None:
    room.presence_changed = True
    call_the_doorkeeper(room)


def call_the_doorkeeper(room: Room) -> None:
    if room.doorkeeper is None:
        room.doorkeeper = asyncio.create_task(keep_the_door(room))


async def keep_the_door(room: Room) -> None:
    """Let joiners in, and tell the others who joined and left, at most every
    PRESENCE_INTERVAL_S.

    Telling each join at once would cost a `joined` notice to everyone per joiner:
    10,000 clients coming back to 100 rooms of 100 after a restart, about 500,000
    deliveries. Batched, each room hears at most one notice per PRESENCE_INTERVAL_S.
    """
    loop = asyncio.get_running_loop()
    try:
        while room.joining or room.presence_changed:
            await asyncio.sleep(room.told_at + PRESENCE_INTERVAL_S - loop.time())
            joiners, room.presence_changed = list(room.joining), False
            looked_up = await relay.look_up(room, joiners)  # with Redis: who, what
            # Between deliveries, every message of the history has gone to the members:
            # a joiner gets the history in its welcome, and every later message live.
            while room.deliverer is not None:
                await asyncio.wait([room.deliverer])
            admit_joiners(room, joiners, looked_up)
            room.told_at = loop.time()
            await relay.share_presence(room)
    finally:
        room.doorkeeper = None


def admit_joiners(
    room: Room, joiners: list[tuple[Client, str | None]], looked_up: object
) -> None:
    """Let the joiners in, each with its welcome; tell the others who joined and left."""
    still_joining = [joiner for joiner in joiners if joiner in room.joining]
    room.joining = [joiner for joiner in room.joining if joiner not in joiners]
    others = list(room.active_connections.values())
    for client, _ in still_joining:
        enter(room, client)  # an older connection with this id is closed with 4000
    now = asyncio.get_running_loop().time()
    room.away = {
        client_id: until
        for client_id, until in room.away.items()
        if until > now and client_id not in room.active_connections
    }
    if room.is_empty():
        room.empty_since = time.monotonic()
        asyncio.get_running_loop().call_later(ROOM_IDLE_S, forget_if_idle, room)
    histories = relay.histories(room, still_joining, looked_up, bool(others))
    members = sorted(room.members())
    present = set(members)
    for kind, client_ids in (
        ("left", room.told - present),
        ("joined", present - room.told),
    ):
        if client_ids:
            notice = compact_json({"type": kind, "client_ids": sorted(client_ids)})
            message = websocket_send(notice)  # one for all: encoded once
            for other in others:
                if room.active_connections.get(other.key) is other:
                    queue(room, other, message)
    room.told = present
    for client, since in still_joining:
        if room.active_connections.get(client.key) is client:
            history, missed = histories[client]
            frame = welcome(room, client, members, history, missed)
            queue(room, client, websocket_send(frame))


def welcome(
    room: Room, client: Client, members: list[int], history: list[str], missed: bool
) -> str:
    fields = {"type": "welcome", "room": room.name, "client_id": client.client_id}
    fields |= {"members": members, "missed": missed}
    # The history as it is kept, encoded: spliced in, not decoded and encoded again.
    return compact_json(fields)[:-1] + ',"history":[' + ",".join(history) + "]}"


async def receive_json_text(websocket: WebSocket) -> str:
    """The text of a step 5 message, {"text": T}; anything else closes with 1007."""
    data = await receive_valid_text(websocket)
    try:
        message = json.loads(data)
    except ValueError:
        message = None
    text = message.get("text") if isinstance(message, dict) else None
    if not isinstance(text, str) or not text or not is_utf8(text):
        raise WebSocketException(
            status.WS_1007_INVALID_FRAME_PAYLOAD_DATA, EXPECTED_JSON
        )
    return text


def is_utf8(text: str) -> bool:
    # JSON can spell half of a UTF-16 pair ("\ud800"), which no UTF-8 frame can carry.
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


# --- What a client may send: text of a bounded size, at a bounded rate ---------------------
#
# Protects against what the tutorial's code lets any client do: crash a handler with a
# binary frame, send 16 MiB at a time, flood the room. Measured: one client sending 20,000
# messages held another writer's messages up by 6.6 to 9.6 s (p99) before flood control.

# uvicorn must enforce the size limit too, before it buffers a message: `--ws-max-size
# 65536` in the README's production command.
MAX_MESSAGE_BYTES = 64 * 1024  # longer text closes the connection with 1009
FLOOD_BURST_MESSAGES = 100  # a chat client may send this many at full speed,
FLOOD_MESSAGES_PER_S = 10  # then this many a second: its next message is read later,
FLOOD_MAX_SLOWED_MESSAGES = 20  # and slowed down this many times in a row: closed
FLOODING = f"Flooding: over {FLOOD_MESSAGES_PER_S} messages a second"


async def receive_valid_text(websocket: WebSocket) -> str:
    """`websocket.receive_text()`, but refusing what would break the handler.

    `receive_text()` fails with a KeyError on a binary frame, and lets a client send up to
    uvicorn's `--ws-max-size` per message. Raising WebSocketException closes the
    connection with that code and reason; WebSocketDisconnect means the client left.
    """
    message = await websocket.receive()
    if message["type"] == "websocket.disconnect":
        if (
            message["code"] == status.WS_1012_SERVICE_RESTART
            and "reason" not in message
        ):
            raise ServerShutdown(message["code"])
        raise WebSocketDisconnect(message["code"], message.get("reason"))
    text = message.get("text")
    if text is None:
        raise WebSocketException(
            status.WS_1003_UNSUPPORTED_DATA,
            "Binary frames are not supported: send text",
        )
    if len(text.encode()) > MAX_MESSAGE_BYTES:
        raise WebSocketException(
            status.WS_1009_MESSAGE_TOO_BIG, f"Message over {MAX_MESSAGE_BYTES} bytes"
        )
    return text


class ServerShutdown(WebSocketDisconnect):
    """uvicorn closing every connection with 1012 as it shuts down. Its message has no
    reason, where one for a client's close frame always has one, if empty: so a client
    that closes with 1012 itself is not taken for the server."""


async def slow_down_floods(client: Client) -> None:
    """Count a chat message; past the client's allowance, read its next one later.

    A token bucket: FLOOD_BURST_MESSAGES at full speed, then FLOOD_MESSAGES_PER_S. Its
    next messages wait in its own socket meanwhile (uvicorn reads one message ahead), so
    a flooder slows down itself, not the room.
    """
    now = time.monotonic()
    earned = (now - client.allowance_at) * FLOOD_MESSAGES_PER_S
    client.allowance = min(FLOOD_BURST_MESSAGES, client.allowance + earned) - 1
    client.allowance_at = now
    if client.allowance >= 0:
        client.slowed_in_a_row = 0
        return
    client.slowed_in_a_row += 1
    if client.slowed_in_a_row > FLOOD_MAX_SLOWED_MESSAGES:
        raise WebSocketException(status.WS_1008_POLICY_VIOLATION, FLOODING)
    await asyncio.sleep(-client.allowance / FLOOD_MESSAGES_PER_S)


# --- Closing, and the log: no traceback for anything a client does --------------------------
#
# Protects against: a close that waits forever on a client that reads nothing, and ERROR
# lines with tracebacks for what clients do (every closed tab, in the tutorial's echo).

CLOSE_TIMEOUT_S = 5.0  # how long closing a client that reads nothing may take


async def close_quietly(websocket: WebSocket, code: int, reason: str) -> None:
    """Close with a code and reason, unless the client has gone already.

    The close frame queues behind all the client has not read, and may never go out:
    give up after CLOSE_TIMEOUT_S (uvicorn then drops the connection once it can).
    """
    if websocket.application_state is WebSocketState.DISCONNECTED:
        return  # closed already, or the client left
    with anyio.move_on_after(CLOSE_TIMEOUT_S), contextlib.suppress(*GONE):
        await websocket.close(code, reason)


@app.exception_handler(WebSocketException)
async def close_refused_websocket(
    websocket: WebSocket, refusal: WebSocketException
) -> None:
    # Starlette's own handler calls close() even when the client's close frame arrived
    # with the refused message, and the close then fails with a traceback.
    if websocket.application_state is WebSocketState.CONNECTED:
        logger.info(
            "Closed %s with %d: %s", websocket.url.path, refusal.code, refusal.reason
        )
    await close_quietly(websocket, refusal.code, refusal.reason or "")


class ClientFaultsAsWarnings(logging.Filter):
    """One WARNING line, instead of an ERROR with a traceback, for what clients cause.

    uvicorn logs a text frame that is not valid UTF-8 (it closes the connection with 1007)
    as a server error with a traceback. So it does a graceful shutdown that gave up on
    connections that read nothing, and each handler it then cancels, such as one still
    trying to close such a client. None of these is a bug in the server.
    """

    REWORDED: ClassVar[dict[str, str]] = {
        "Invalid UTF-8 sequence received from client.": (
            "Closed a WebSocket with 1007: its text was not valid UTF-8"
        ),
        "Cancel %s running task(s), timeout graceful shutdown exceeded": (
            "Shut down without waiting any longer for clients that read nothing "
            "(--timeout-graceful-shutdown); %s task(s) cancelled"
        ),
    }
    CANCELLED = "Cancelled a handler still running when the graceful shutdown ended"

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[0] if record.exc_info else None
        if error is asyncio.CancelledError:
            reworded: str | None = self.CANCELLED
        else:
            reworded = self.REWORDED.get(str(record.msg))
        if reworded is not None:
            record.msg = reworded
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.exc_info, record.exc_text = None, None
        return True


logger.addFilter(ClientFaultsAsWarnings())


# --- The origin check: other sites' pages cannot connect ------------------------------------
#
# Protects against cross-site WebSocket hijacking: a browser attaches cookies to a
# WebSocket handshake whatever page opens it, and the Same-Origin Policy does not apply to
# WebSockets. The Origin header is the only sign of which site is asking.

# Browsers send Origin on every WebSocket handshake; other sites' pages are refused.
ALLOWED_ORIGINS = frozenset(
    origin.strip().rstrip("/")
    for origin in os.environ.get("ALLOWED_ORIGINS", "").split(",")
    if origin.strip()
)


class CheckOrigin:
    """Pure ASGI middleware: refuse WebSocket handshakes from pages on other sites.

    The page's own host is let in, and so are scripts and tests, which send no Origin.
    Refused before accept(), the client gets an HTTP 403 instead of a WebSocket.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "websocket":
            await self.app(scope, receive, send)
            return
        origin = Headers(scope=scope).get("origin")
        if origin_allowed(origin, scope):
            await self.app(scope, receive, send)
            return
        logger.warning(
            "Refused WebSocket from origin %s: add it to ALLOWED_ORIGINS to allow it",
            origin,
        )
        refusal = f"Origin {origin} is not allowed"
        code = status.WS_1008_POLICY_VIOLATION
        await send({"type": "websocket.close", "code": code, "reason": refusal})


def origin_allowed(origin: str | None, scope: Scope) -> bool:
    if origin is None or origin in ALLOWED_ORIGINS:
        return True
    return urlsplit(origin).netloc == Headers(scope=scope).get("host")


app.add_middleware(CheckOrigin)


# --- The relay: one process, or several through Redis ---------------------------------------
#
# Protects against a chat that cannot grow past one process: with `uvicorn main:app
# --workers 4`, or two machines behind a load balancer, clients of different processes
# would never see each other, and a client coming back to another process would find
# none of its room's history. With REDIS_URL set, every broadcast goes through Redis, and
# each process relays what Redis brings to its own clients. Measured at 10,000 clients
# over 2 workers: 1.08x the single process's CPU per delivery for step 3's chat.
# The managers do not change: what carries their broadcasts does, behind the same methods.

# Unset or empty: one process, nothing else to run. Set: through Redis.
REDIS_URL = os.environ.get("REDIS_URL", "")
REDIS_CHANNEL = "chat"  # every process's messages, and who joined where
REDIS_TIMEOUT_S = 2.0  # a Redis silent this long is lost (whether it died or hangs)
REDIS_PING_INTERVAL_S = (
    0.5  # a quiet subscription is pinged, and liveness told, this often
)
REDIS_RETRY_S = 1.0  # between attempts to reach Redis again once it is lost
# A publish that Redis runs later than this after it was sent, by Redis's own clock, is
# refused: the sender had given up on it (REDIS_TIMEOUT_S) and told nobody it went out.
PUBLISH_DEADLINE_S = 1.5
PROCESS_TTL_S = 5.0  # a process silent this long is gone, and its room members with it
REDIS_CONNECTIONS = 50  # commands in flight at once, at most, from one process
REDIS_DOWN = "Chat unavailable: lost its Redis server; try again later"


class InProcessRelay:
    """Without Redis: the room is this process's clients, and broadcasting is delivering."""

    @contextlib.asynccontextmanager
    async def running(self, app: FastAPI) -> AsyncIterator[None]:
        logger.info(
            "Chat room kept in this process: with --workers or several machines, "
            "set REDIS_URL so that they share one room"
        )
        yield

    # Step 3's chat.

    async def join(self, room: ConnectionManager, client: Client) -> None:
        enter(room, client)

    async def publish(self, room: ConnectionManager, message: str) -> bool:
        await send_soon(room, None, message)
        return True

    async def say(
        self,
        room: ConnectionManager,
        client: Client,
        acknowledgement: str,
        message: str,
    ) -> None:
        await room.send_personal_message(acknowledgement, client)
        await self.publish(room, message)

    # Step 5's rooms.

    def refuse_if_down(self) -> None:
        pass  # never down

    async def post(
        self, rooms: RoomManager, room: Room, client_id: int, text: str
    ) -> None:
        message_id = room.history.next_id()
        frame = message_frame(message_id, said(client_id, text))
        keep_message(rooms, room, message_id, frame)
        await send_soon(room, None, frame)

    async def look_up(self, room: Room, joiners: list) -> None:
        return None  # all is here

    def histories(
        self, room: Room, joiners: list, looked_up: object, had_members: bool
    ) -> dict[Client, tuple[list[str], bool]]:
        return {client: room.history.after(since) for client, since in joiners}

    async def share_presence(self, room: Room) -> None:
        pass  # nobody else to tell


if REDIS_URL:
    try:
        import redis
        import redis.asyncio
        import redis.asyncio.retry
        import redis.backoff
    except ImportError:
        logger.error("REDIS_URL is set, but redis-py is not: pip install redis")
        raise SystemExit(1) from None
    # What losing Redis raises. redis-py turns a failed write into a ConnectionError, but
    # uvloop, uvicorn's event loop, raises RuntimeError for a write to a connection that
    # has just closed (uvloop issue #506), and redis-py passes it on as it is: uncaught,
    # it ended the relay, and the process never relayed again.
    REDIS_FAILURES = (redis.RedisError, RuntimeError)

# Publishes ARGV[3] .. ARGV[4] on the channel ARGV[2], first adding ARGV[4] to the stream
# KEYS[1], if there is one, under a new id, which it returns; unless Redis's clock is
# past ARGV[1], the sender's deadline. One script: the stream's ids and the channel's
# order are the same for every process. The stream keeps at most ARGV[5] messages and
# ARGV[7] bytes of them, counted in KEYS[2], and both keys expire after ARGV[6] ms.
PUBLISH_BEFORE_DEADLINE = """
local now = redis.call('TIME')
if tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) > tonumber(ARGV[1]) then
  return false
end
local id = '-'
if #KEYS > 0 then
  id = redis.call('XADD', KEYS[1], '*', 'm', ARGV[4])
  local bytes = redis.call('INCRBY', KEYS[2], #ARGV[4])
  local count = redis.call('XLEN', KEYS[1])
  while count > 1 and (count > tonumber(ARGV[5]) or bytes > tonumber(ARGV[7])) do
    local oldest = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)[1]
    redis.call('XDEL', KEYS[1], oldest[1])
    bytes = redis.call('DECRBY', KEYS[2], #oldest[2][2])
    count = count - 1
  end
  redis.call('PEXPIRE', KEYS[1], ARGV[6])
  redis.call('PEXPIRE', KEYS[2], ARGV[6])
end
redis.call('PUBLISH', ARGV[2], id .. ' ' .. ARGV[3] .. ARGV[4])
return id
"""
# A Redis stream id, as `since` must be for Redis to take it: two numbers below 2**64.
STREAM_ID = r"([0-9]{1,19})-([0-9]{1,19})"


@dataclasses.dataclass
class LookedUp:
    """What Redis said of a room as joiners were let in."""

    elsewhere: dict[str, list[int]]  # other live processes' members
    latest: list[tuple[str, str]]  # (id, frame), oldest first
    after: dict[str, list[tuple[str, str]]]  # by `since`: from it on, if Redis holds it


class RedisRelay:
    """Every process's clients in each room: broadcasts go through Redis.

    Step 3's chat publishes on a channel. Each step 5 room has a Redis stream, which
    gives its messages their ids and keeps its history (HISTORY_MESSAGES of them), and
    each message is published on the channel too, in the same script: a stream per room
    for what a client missed, the channel for what happens now, as Centrifugo and
    Discourse's MessageBus do. Who is in a room is a hash per room, a field per process.
    """

    def __init__(self, url: str) -> None:
        self.url = without_password(url)  # for the log
        self.redis = redis.asyncio.Redis.from_url(
            url,
            decode_responses=True,
            socket_connect_timeout=REDIS_TIMEOUT_S,
            socket_timeout=REDIS_TIMEOUT_S,
            # Commands wait for one of REDIS_CONNECTIONS (see `connections`); the
            # subscription and the heartbeat have their own.
            max_connections=REDIS_CONNECTIONS + 4,
            # One immediate retry, on a fresh connection, for a connection that went
            # stale while Redis restarted: that command never ran. One that timed out
            # is not retried: Redis may still run it, late.
            retry=redis.asyncio.retry.Retry(
                redis.backoff.NoBackoff(),
                retries=1,
                supported_errors=(redis.ConnectionError,),
            ),
        )
        self.publish_script = self.redis.register_script(PUBLISH_BEFORE_DEADLINE)
        # Thousands of handlers may publish at once: each waits for a connection here,
        # rather than redis-py failing past its pool's size ("Too many connections").
        self.connections = asyncio.Semaphore(REDIS_CONNECTIONS)
        # Step 3's managers, by name, once used here.
        self.chats: dict[str, ConnectionManager] = {}
        self.relaying = False  # subscribed, and Redis answers: chat clients are welcome
        self.subscribed = asyncio.Event()
        self.process = ""  # this process's name in Redis, new for each session
        self.redis_clock_offset_ms = 0.0  # Redis's clock minus this process's
        self.best_round_trip_ms = float("inf")  # of the answers that measured it
        self.others_alive: set[str] = set()  # other processes seen in rooms, alive
        self.to_announce: set[str] = set()  # rooms whose members here were rewritten

    @contextlib.asynccontextmanager
    async def running(self, app: FastAPI) -> AsyncIterator[None]:
        relaying = asyncio.create_task(self.relay_messages())
        try:
            # Start-up completes once chat clients can be welcome.
            await self.subscribed.wait()
            yield
        finally:
            relaying.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await relaying
            await self.redis.aclose()

    # Step 3's chat.

    async def join(self, room: ConnectionManager, client: Client) -> None:
        self.refuse_if_down()
        self.chats[room.name] = room
        enter(room, client)
        if client.client_id is not None:
            # Other processes close their connection with this id, if they have one.
            client.token = secrets.token_hex(8)
            takeover = {"chat": room.name, "takeover": client.client_id}
            await self.send(takeover | {"token": client.token})

    async def publish(self, room: ConnectionManager, message: str) -> bool:
        self.chats[room.name] = room
        return await self.send({"chat": room.name, "text": message})

    async def say(
        self,
        room: ConnectionManager,
        client: Client,
        acknowledgement: str,
        message: str,
    ) -> None:
        # "You wrote" only once Redis has the message: a publish can fail.
        if await self.publish(room, message):
            await room.send_personal_message(acknowledgement, client)

    # Step 5's rooms.

    def refuse_if_down(self) -> None:
        if not self.relaying:
            # Raised after accept(), so the page sees the code and reason, and retries.
            raise WebSocketException(status.WS_1013_TRY_AGAIN_LATER, REDIS_DOWN)

    async def post(
        self, rooms: RoomManager, room: Room, client_id: int, text: str
    ) -> None:
        # Delivered, to the sender too, once it comes back through the channel.
        await self.run_publish(
            [f"chat:room:{room.name}", f"chat:bytes:{room.name}"],
            f"{room.name} ",
            said(client_id, text),
        )

    async def look_up(self, room: Room, joiners: list) -> LookedUp | None:
        """Who is in the room elsewhere, and the history each joiner is owed; and, for
        the others, who is here, the joiners included, before they are welcomed."""
        stream = f"chat:room:{room.name}"
        sinces = sorted({s for _, s in joiners if s and re.fullmatch(STREAM_ID, s)})
        here = {*room.active_connections, *room.away, *(c.key for c, _ in joiners)}
        try:
            ask = self.redis.pipeline(transaction=False)
            ask.hgetall(f"chat:members:{room.name}")
            for since in sinces:
                ask.xrange(stream, min=since, count=HISTORY_MESSAGES + 1)
            ask.pexpire(stream, int((ROOM_IDLE_S + PRESENCE_GRACE_S) * 1000))
            if sorted(here) != room.written:
                self.write_members(ask, room, sorted(here))
            async with self.connections:
                members, *ranges = await ask.execute(raise_on_error=False)
            if isinstance(members, Exception):
                raise members
            # A `since` Redis refused is that client's: it missed some, nobody else did.
            after = {
                since: found
                for since, found in zip(sinces, ranges[: len(sinces)], strict=True)
                if not isinstance(found, redis.ResponseError)
            }
            for result in ranges[len(sinces) :]:
                if isinstance(result, Exception):
                    raise result
            processes = [p for p in members if p != self.process]
            # The latest messages only for a joiner that needs them: a mass reconnect
            # asks with `since`, and each welcome is what came after it.
            held = [bool(after.get(s)) and after[s][0][0] == s for _, s in joiners]
            ask = self.redis.pipeline(transaction=False)
            ask.mget([f"chat:alive:{p}" for p in processes] or ["chat:alive:-"])
            if not all(held):
                ask.xrevrange(stream, count=WELCOME_HISTORY_MESSAGES)
            async with self.connections:
                alive, *latest = await ask.execute()
        except REDIS_FAILURES as error:
            self.close_chat(f"looking up room {room.name}: {error}")
            return None
        elsewhere = {}
        for process, is_alive in zip(processes, alive[: len(processes)], strict=True):
            if is_alive:
                elsewhere[process] = json.loads(members[process])
                self.others_alive.add(process)
        return LookedUp(
            elsewhere,
            [
                (i, message_frame(i, f["m"]))
                for i, f in reversed(latest[0] if latest else [])
            ],
            {
                since: [(i, message_frame(i, fields["m"])) for i, fields in entries]
                for since, entries in after.items()
            },
        )

    def write_members(self, pipeline, room: Room, here: list[int]) -> None:
        """Who is here, for the other processes: to be told once written."""
        self.to_announce.add(room.name)
        key = f"chat:members:{room.name}"
        if here:
            pipeline.hset(key, self.process, json.dumps(here))
        else:
            pipeline.hdel(key, self.process)
        pipeline.pexpire(key, int((ROOM_IDLE_S + PRESENCE_GRACE_S) * 1000))
        room.written = here

    def histories(
        self, room: Room, joiners: list, looked_up: object, had_members: bool
    ) -> dict[Client, tuple[list[str], bool]]:
        """Each joiner's history: from Redis, and what came here since, up to the last
        message delivered here (later ones reach it live), none twice."""
        if not isinstance(looked_up, LookedUp):
            return {client: ([], since is not None) for client, since in joiners}
        room.elsewhere = looked_up.elsewhere
        seen = [m for ms in (looked_up.latest, *looked_up.after.values()) for m in ms]
        newest = max((stream_order(i) for i, _ in seen), default=(0, 0))
        if not had_members:
            # Nobody here yet: what Redis had is in the welcomes, the rest comes live.
            room.shown_upto = max(room.shown_upto, newest)
        histories = {}
        for client, since in joiners:
            after = looked_up.after.get(since or "", [])
            held = bool(after) and after[0][0] == since
            kept = after[1:] if held else looked_up.latest
            last = max(stream_order(kept[-1][0]) if kept else (0, 0), newest)
            if held:
                last = max(last, stream_order(since or ""))
            since_then = [m for m in room.history.messages if stream_order(m[0]) > last]
            history, cut = latest_within_bytes(
                [
                    frame
                    for message_id, frame in kept + since_then
                    if stream_order(message_id) <= room.shown_upto
                ]
            )
            histories[client] = (history, since is not None and (cut or not held))
        return histories

    async def share_presence(self, room: Room) -> None:
        """Tell the other processes to look again at who is in the room; and take over
        from their connections with the joiners' ids."""
        here = sorted({*room.active_connections, *room.away})
        if here != room.written:  # a joiner left before it was let in
            try:
                tell = self.redis.pipeline(transaction=False)
                self.write_members(tell, room, here)
                async with self.connections:
                    await tell.execute()
            except REDIS_FAILURES as error:
                self.close_chat(f"telling who is in room {room.name}: {error}")
                return
        # One notice for all the joiners let in: 10,000 clients coming back at once
        # cost a notice per room each PRESENCE_INTERVAL_S, not one each.
        joined = [
            client for client in room.active_connections.values() if not client.token
        ]
        for client in joined:
            client.token = secrets.token_hex(8)
        if room.name in self.to_announce or joined:
            self.to_announce.discard(room.name)
            takeovers = [[client.client_id, client.token] for client in joined]
            notice = {
                "room": room.name,
                "presence": self.process,
                "takeovers": takeovers,
            }
            await self.send(notice)

    # Both.

    async def send(self, envelope: dict) -> bool:
        return await self.run_publish([], "", json.dumps(envelope)) is not None

    async def run_publish(
        self, stream: list[str], prefix: str, text: str
    ) -> str | None:
        """The id Redis gave the message (`-` off the streams); None if it was not
        taken, and the chat is then closed."""
        if not self.relaying:
            return None
        idle_ms = int((ROOM_IDLE_S + PRESENCE_GRACE_S) * 1000)
        try:
            async with self.connections:
                # The deadline once a connection is ours: from here, it is sent at once.
                deadline_ms = int(self.redis_now_ms() + PUBLISH_DEADLINE_S * 1000)
                args = [deadline_ms, REDIS_CHANNEL, prefix, text]
                args += [HISTORY_MESSAGES, idle_ms, HISTORY_BYTES]
                message_id = await self.publish_script(keys=stream, args=args)
        except REDIS_FAILURES as error:
            self.close_chat(f"publish failed: {error}")
            return None
        if message_id is None:
            self.close_chat("a publish reached Redis after its deadline")
        return message_id

    def redis_now_ms(self) -> float:
        return time.monotonic() * 1000 + self.redis_clock_offset_ms

    async def relay_messages(self) -> None:
        """Hand each message on the channel to this process's clients, while the app runs."""
        while True:
            try:
                async with self.redis.pubsub() as pubsub:
                    await pubsub.subscribe(REDIS_CHANNEL)
                    await self.relay_until_silent(pubsub)
            except REDIS_FAILURES as error:
                self.close_chat(str(error))
                await asyncio.sleep(REDIS_RETRY_S)

    async def relay_until_silent(self, pubsub: redis.asyncio.client.PubSub) -> None:
        """Relay until Redis has said nothing for REDIS_TIMEOUT_S, or a publish failed.

        Waiting for the next message would wait forever on a Redis that hangs (stopped,
        cut off by the network, stuck in a slow command) rather than dies: so a quiet
        subscription is pinged, and silence is taken for an outage.
        """
        loop = asyncio.get_running_loop()
        heard_at = beat_at = loop.time()
        in_session = False  # this subscription confirmed, and clients welcomed
        while True:
            message = await pubsub.get_message(timeout=REDIS_PING_INTERVAL_S)
            now = loop.time()
            if message is None and now - heard_at > REDIS_TIMEOUT_S:
                raise redis.TimeoutError(f"no answer for {REDIS_TIMEOUT_S} s")
            if message is None:
                await pubsub.ping()
            elif message["type"] == "subscribe":
                heard_at, in_session = now, True
                await self.start_session()
            else:
                heard_at = now
                try:
                    self.relay(message)
                except (ValueError, KeyError, TypeError):
                    # Someone else publishing on the channel: not ours, not fatal.
                    logger.warning(
                        "Ignored a message on %s: %.80r", REDIS_CHANNEL, message
                    )
            if in_session and now - beat_at > REDIS_PING_INTERVAL_S:
                beat_at = now
                await self.heartbeat()
            if in_session and not self.relaying:
                raise redis.ConnectionError("a publish failed")

    async def start_session(self) -> None:
        # A new name for each session: what an earlier one left in Redis is stale.
        self.process = secrets.token_hex(6)
        self.best_round_trip_ms = float(
            "inf"
        )  # Redis may have restarted, its clock too
        await self.heartbeat()
        self.relaying = True
        self.subscribed.set()
        logger.info("Chat relayed through Redis at %s", self.url)

    async def heartbeat(self) -> None:
        """Tell Redis this process is alive; learn Redis's clock, and who else is."""
        others = sorted(self.others_alive)
        sent_ms = time.monotonic() * 1000
        beat = self.redis.pipeline(transaction=False)
        beat.time()
        beat.set(f"chat:alive:{self.process}", 1, px=int(PROCESS_TTL_S * 1000))
        if others:
            beat.mget([f"chat:alive:{process}" for process in others])
        (seconds, microseconds), _, *alive = await beat.execute()
        round_trip_ms = time.monotonic() * 1000 - sent_ms
        redis_ms = seconds * 1000 + microseconds / 1000
        # The quickest answer tells best: a busy event loop may read an answer late.
        if round_trip_ms <= self.best_round_trip_ms:
            self.best_round_trip_ms = round_trip_ms
            self.redis_clock_offset_ms = redis_ms - (sent_ms + round_trip_ms / 2)
        gone = {
            p for p, a in zip(others, alive[0] if alive else [], strict=True) if not a
        }
        self.others_alive -= gone
        for room in rooms.rooms.values():  # their members have left
            if gone & room.elsewhere.keys():
                presence_changed(room)

    def relay(self, message: dict) -> None:
        if message["type"] != "message":
            return  # a pong
        message_id, _, rest = message["data"].partition(" ")
        if message_id != "-":
            name, _, what = rest.partition(" ")
            self.show(name, message_id, what)
            return
        envelope = json.loads(rest)
        if "chat" in envelope:
            room: ConnectionManager | None = self.chats.get(envelope["chat"])
        else:
            room = rooms.rooms.get(envelope["room"])
        if room is None:
            return  # nobody here in that room
        if "takeover" in envelope:
            self.take_over(room, envelope["takeover"], envelope["token"])
        elif "presence" in envelope and isinstance(room, Room):
            for client_id, token in envelope["takeovers"]:
                self.take_over(room, client_id, token)
            if envelope["presence"] != self.process:
                presence_changed(room)
        else:
            queue(room, None, websocket_send(envelope["text"]))

    def show(self, name: str, message_id: str, what: str) -> None:
        """A room's message, to this process's members of the room, unless they have it."""
        room = rooms.rooms.get(name)
        if room is None or stream_order(message_id) <= room.shown_upto:
            return
        room.shown_upto = stream_order(message_id)
        frame = message_frame(message_id, what)
        keep_message(rooms, room, message_id, frame)
        queue(room, None, websocket_send(frame))

    def take_over(self, room: ConnectionManager, client_id: int, token: str) -> None:
        """Another connection with this id joined: close ours if it joined earlier.

        Redis orders the notices: a connection whose own notice has come back joined
        before the notice at hand, one whose notice is still to come joined after it.
        """
        client = room.active_connections.get(client_id)
        if client is None:
            return
        if client.token == token:
            client.announced = True
        elif client.announced:
            cut_off(room, client, WS_4000_TAKEN_OVER, TAKEN_OVER)

    def close_chat(self, why: str) -> None:
        # Without Redis, this process's clients would only see part of the room: close
        # them with 1013, Try Again Later, and no leave notices. The page retries.
        if self.relaying:
            logger.warning("Lost Redis at %s (%s): chat closed", self.url, why)
        self.relaying = False
        for chat in [*self.chats.values(), *rooms.rooms.values()]:
            clients = list(chat.active_connections.values())
            if isinstance(chat, Room):
                clients += [client for client, _ in chat.joining]
                chat.joining, chat.away, chat.elsewhere = [], {}, {}
            for client in clients:
                cut_off(chat, client, status.WS_1013_TRY_AGAIN_LATER, REDIS_DOWN)


def latest_within_bytes(frames: list[str]) -> tuple[list[str], bool]:
    """The latest frames that fit in HISTORY_BYTES; True if older ones did not."""
    total = 0
    for start in range(len(frames) - 1, -1, -1):
        total += len(frames[start].encode())
        if total > HISTORY_BYTES:
            return frames[start + 1 :], True
    return frames, False


def without_password(url: str) -> str:
    """The URL fit for a log: redis://:secret@host becomes redis://:***@host."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return parts._replace(netloc=netloc).geturl()


def exit_unless_redis_answers(url: str) -> None:
    """Fail at start-up, in one line, rather than with every chat message later."""
    try:
        with redis.Redis.from_url(
            url, socket_connect_timeout=REDIS_TIMEOUT_S
        ) as client:
            client.ping()
    except redis.RedisError as error:
        logger.error(
            "Cannot reach Redis at %s (%s): start it, or unset REDIS_URL",
            without_password(url),
            error,
        )
        raise SystemExit(1) from None


if REDIS_URL:
    exit_unless_redis_answers(REDIS_URL)

# The one choice between one process and many; the relay runs while the app does.
relay = RedisRelay(REDIS_URL) if REDIS_URL else InProcessRelay()
app.include_router(APIRouter(lifespan=relay.running))
