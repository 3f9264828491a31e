"""FastAPI WebSockets, step by step: echo, client ids, and a chat that holds up.

Run it with `uvicorn main:app --reload` and open http://127.0.0.1:8000/.
Each step below is one endpoint, in the order the tutorial teaches them. The last section
lets the chat span several processes through Redis, when REDIS_URL is set.
"""

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import anyio
import redis
import redis.asyncio
import redis.asyncio.retry
import redis.backoff
from fastapi import (
    Depends,
    FastAPI,
    WebSocket,
    WebSocketDisconnect,
    WebSocketException,
    status,
)
from fastapi.responses import FileResponse
from fastapi.websockets import WebSocketState

# uvicorn's own logger, so these lines show in the terminal uvicorn runs in.
logger = logging.getLogger("uvicorn.error")

INDEX_HTML = Path(__file__).with_name("index.html")

# Limits. Every one is per connection.
MAX_MESSAGE_BYTES = 64 * 1024  # longer chat text is refused with close code 1009
MAX_BACKLOG_MESSAGES = 100  # messages queued for one chat client, at most
SEND_TIMEOUT_S = 0.5  # a full outbox whose socket takes nothing this long: cut off
CLOSE_TIMEOUT_S = 5.0  # how long closing a client that reads nothing may take

TOO_SLOW = f"Too slow: over {MAX_BACKLOG_MESSAGES} messages behind"

# Browsers send Origin on every WebSocket handshake; other sites' pages are refused.
ALLOWED_ORIGINS = frozenset(
    origin.strip().rstrip("/")
    for origin in os.environ.get("ALLOWED_ORIGINS", "").split(",")
    if origin.strip()
)

# Unset or empty: one process, nothing else to run. Set: see the last section.
REDIS_URL = os.environ.get("REDIS_URL", "")
REDIS_CHANNEL = "chat"
REDIS_TIMEOUT_S = 2.0  # connecting to, or waiting on, Redis
REDIS_RETRY_S = 1.0  # between attempts to reach Redis again once it is lost
REDIS_DOWN = "Chat unavailable: lost its Redis server; try again later"


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    # Only the Redis relay, at the end of this file, has anything to start and stop.
    if not isinstance(manager, RedisConnectionManager):
        yield
        return
    relay = asyncio.create_task(manager.relay_messages())
    yield
    relay.cancel()
    await manager.redis.aclose()


app = FastAPI(lifespan=lifespan)


@app.get("/")
async def get() -> FileResponse:
    # Read from disk on every request: edits show on refresh, with no restart.
    return FileResponse(INDEX_HTML, headers={"Cache-Control": "no-cache"})


# --- Shared by every step: who may connect, and what a client may send ------------------


def check_origin(websocket: WebSocket) -> None:
    """Refuse handshakes from pages on other sites (cross-site WebSocket hijacking).

    A browser attaches cookies to a WebSocket handshake whatever page opens it, and the
    Same-Origin Policy does not apply to WebSockets: the Origin header is the only sign of
    which site is asking. Scripts and tests send no Origin, and are let in.
    """
    origin = websocket.headers.get("origin")
    if origin is None or origin in ALLOWED_ORIGINS:
        return
    if urlsplit(origin).netloc == websocket.headers.get("host"):
        return
    logger.warning(
        "Refused WebSocket from origin %s: add it to ALLOWED_ORIGINS to allow it",
        origin,
    )
    # Raised before accept(), so the client gets an HTTP 403 instead of a WebSocket.
    raise WebSocketException(
        status.WS_1008_POLICY_VIOLATION, f"Origin {origin} is not allowed"
    )


async def receive_valid_text(websocket: WebSocket) -> str:
    """`websocket.receive_text()`, but refusing what would break the handler.

    `receive_text()` fails with a KeyError on a binary frame, and lets a client send up to
    uvicorn's 16 MiB limit (`--ws-max-size`) per message. Raising WebSocketException closes
    the connection with that code and reason; WebSocketDisconnect means the client left.
    """
    message = await websocket.receive()
    if message["type"] == "websocket.disconnect":
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


# --- Step 1: echo. Accept, then receive and send in a loop ---------------------------------


@app.websocket("/ws", dependencies=[Depends(check_origin)])
async def websocket_endpoint(websocket: WebSocket) -> None:
    await websocket.accept()
    try:
        while True:
            data = await receive_valid_text(websocket)
            await websocket.send_text(f"Message text was: {data}")
    except WebSocketDisconnect:
        pass  # The tab closed: an ordinary event, not an error.


# --- Step 2: a client id in the path, and noticing when the client leaves ------------------


@app.websocket("/ws/{client_id}", dependencies=[Depends(check_origin)])
async def websocket_client_endpoint(websocket: WebSocket, client_id: int) -> None:
    await websocket.accept()
    try:
        while True:
            data = await receive_valid_text(websocket)
            await websocket.send_text(f"Client #{client_id} says: {data}")
    except WebSocketDisconnect:
        logger.info("Client #%d left the chat", client_id)


# --- Step 3: a chat room. The ConnectionManager, then its endpoint --------------------------


class Client:
    """One chat connection: a bounded outbox, and a task that writes it to the socket.

    Broadcasting only puts a message in each outbox, so a client that reads slowly holds
    up its own sender task and nobody else. The bound keeps its backlog, and so the
    server's memory, in check.
    """

    def __init__(self, websocket: WebSocket) -> None:
        self.websocket = websocket
        self.outbox: asyncio.Queue[str] = asyncio.Queue(maxsize=MAX_BACKLOG_MESSAGES)
        # The client's handler runs inside this scope: cancelling it ends the handler even
        # while it waits for a message from a client that will never send one.
        self.handler_scope = anyio.CancelScope()
        self.blocked_on_socket = False
        # Set when the server cuts the client off: what its connection is closed with.
        self.close_code = status.WS_1000_NORMAL_CLOSURE
        self.close_reason = ""
        self.sender = asyncio.create_task(self.send_outbox())

    async def send_outbox(self) -> None:
        try:
            while True:
                message = await self.outbox.get()
                # send_text() returns at once unless the client's socket is full, so any
                # other task that sees this flag set knows the client is not reading.
                self.blocked_on_socket = True
                await self.websocket.send_text(message)
                self.blocked_on_socket = False
        except WebSocketDisconnect:
            pass  # The client left; its handler cleans up.


class ConnectionManager:
    def __init__(self) -> None:
        self.active_connections: dict[WebSocket, Client] = {}

    async def connect(self, websocket: WebSocket) -> Client:
        await websocket.accept()
        client = self.active_connections[websocket] = Client(websocket)
        return client

    def disconnect(self, websocket: WebSocket) -> None:
        # Safe to call twice: a client can be cut off, then leave.
        client = self.active_connections.pop(websocket, None)
        if client is not None:
            client.sender.cancel()

    async def send_personal_message(self, message: str, websocket: WebSocket) -> None:
        # Through the outbox too, so it keeps its place among the broadcasts.
        client = self.active_connections.get(websocket)
        if client is not None:
            await self.put_in_outbox(client, message)

    async def broadcast(self, message: str) -> None:
        # A copy: clients join and leave while we wait for room in an outbox.
        for client in list(self.active_connections.values()):
            await self.put_in_outbox(client, message)

    async def put_in_outbox(self, client: Client, message: str) -> None:
        try:
            client.outbox.put_nowait(message)
        except asyncio.QueueFull:
            await self.wait_for_room(client, message)

    async def wait_for_room(self, client: Client, message: str) -> None:
        # Waiting here holds up this broadcast, and so the writer: that is backpressure,
        # fine while the server is only busy. A client whose socket has taken nothing
        # for SEND_TIMEOUT_S is cut off instead, so it cannot stall the room.
        # A client whose sender task has ended has left: nothing to wait for.
        while client.websocket in self.active_connections and not client.sender.done():
            try:
                async with asyncio.timeout(SEND_TIMEOUT_S):
                    await client.outbox.put(message)
                return
            except TimeoutError:
                if client.blocked_on_socket:
                    self.cut_off(client, status.WS_1008_POLICY_VIOLATION, TOO_SLOW)

    def cut_off(self, client: Client, code: int, reason: str) -> None:
        """Take the client out of the room and end its handler, which then closes it."""
        self.disconnect(client.websocket)
        client.close_code, client.close_reason = code, reason
        client.handler_scope.cancel()


manager = ConnectionManager()


async def close_cut_off(client: Client) -> None:
    if client.websocket.application_state is not WebSocketState.CONNECTED:
        return  # Closed already: the client left while being cut off.
    # The close frame queues behind all the client has not read, and may never go out:
    # give up after a while (the server then drops the connection once it can).
    with anyio.move_on_after(CLOSE_TIMEOUT_S), contextlib.suppress(WebSocketDisconnect):
        await client.websocket.close(client.close_code, client.close_reason)


@app.websocket("/chat/{client_id}", dependencies=[Depends(check_origin)])
async def chat_endpoint(websocket: WebSocket, client_id: int) -> None:
    client = await manager.connect(websocket)
    try:
        with client.handler_scope:  # the manager cancels it to cut this client off
            while True:
                data = await receive_valid_text(websocket)
                await manager.send_personal_message(f"You wrote: {data}", websocket)
                await manager.broadcast(f"Client #{client_id} says: {data}")
    except WebSocketDisconnect:
        pass
    finally:
        manager.disconnect(websocket)
        await manager.broadcast(f"Client #{client_id} left the chat")
    # Cut off (too slow, or the chat lost Redis): tell the client why as it goes.
    if client.handler_scope.cancelled_caught:
        logger.info("Client #%d cut off: %s", client_id, client.close_reason)
        await close_cut_off(client)


# --- Scale out: one chat across processes and machines, through Redis --------------------
#
# The manager above lives in one process: with `uvicorn main:app --workers 4`, or two
# machines behind a load balancer, clients of different processes would never see each
# other. With REDIS_URL set, every broadcast is published to a Redis channel instead, and
# each process relays what the channel brings to its own clients. The endpoints do not
# change: the manager does, behind the same four methods.


class RedisConnectionManager(ConnectionManager):
    def __init__(self, url: str) -> None:
        super().__init__()
        self.url = without_password(url)  # for the log
        self.redis = redis.asyncio.Redis.from_url(
            url,
            decode_responses=True,
            socket_connect_timeout=REDIS_TIMEOUT_S,
            socket_timeout=REDIS_TIMEOUT_S,
            # One immediate retry, on a fresh connection, covers a connection that went
            # stale while Redis restarted. No backoff: a message held back for seconds
            # until Redis returns would arrive late and out of place.
            retry=redis.asyncio.retry.Retry(redis.backoff.NoBackoff(), retries=1),
        )
        self.relaying = False  # subscribed to the channel: chat clients are welcome

    async def connect(self, websocket: WebSocket) -> Client:
        if not self.relaying:
            # Accept first, so the page sees the code and reason, and retries.
            await websocket.accept()
            raise WebSocketException(status.WS_1013_TRY_AGAIN_LATER, REDIS_DOWN)
        return await super().connect(websocket)

    async def broadcast(self, message: str) -> None:
        # Redis delivers one publisher's messages in order, to every subscriber.
        try:
            await self.redis.publish(REDIS_CHANNEL, message)
        except redis.RedisError:
            self.close_chat()

    async def relay_messages(self) -> None:
        """Hand each message on the channel to this process's clients, while the app runs."""
        while True:
            try:
                async with self.redis.pubsub() as pubsub:
                    await pubsub.subscribe(REDIS_CHANNEL)
                    self.relaying = True
                    logger.info("Chat relayed through Redis at %s", self.url)
                    async for message in pubsub.listen():
                        if message["type"] == "message":
                            await super().broadcast(message["data"])
            except redis.RedisError as error:
                if self.relaying:
                    logger.warning(
                        "Lost Redis at %s (%s): chat closed", self.url, error
                    )
                self.relaying = False
                self.close_chat()
                await asyncio.sleep(REDIS_RETRY_S)

    def close_chat(self) -> None:
        # Without Redis, this process's clients would only see part of the room: close
        # them with 1013, Try Again Later. The page shows the reason, and retries.
        for client in list(self.active_connections.values()):
            self.cut_off(client, status.WS_1013_TRY_AGAIN_LATER, REDIS_DOWN)


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
    manager = RedisConnectionManager(REDIS_URL)
