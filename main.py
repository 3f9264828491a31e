"""FastAPI WebSockets, step by step: echo, client ids, a chat, rooms, and several processes.

Python 3.11+; `pip install -r requirements.txt`. Follow along with `uvicorn main:app
--reload --timeout-graceful-shutdown 3 --ws websockets-sansio` and open
http://127.0.0.1:8000/. Beside it: index.html, that page; README.md: each flag, the tests,
and the production command, with guards this one lacks; BENCHMARKS.md: the runs.

Each step builds on those before it: 1, echo; 2, a client id; 3, the chat, a
ConnectionManager with the second tutorial's methods; 4, "Using Depends". 5 and 6 go where
a chat goes next, and can wait: 5, named rooms with history, built on step 3; 6, one chat
across processes through Redis, plugged into 3 and 5 by one call.

The guards every step shares are listed above step 1, and defined once, after step 6,
in "What every step shares": copy that section with any step. Last: the chat by HTTP.
"""

from __future__ import annotations  # a type hint may name a class defined further down

import asyncio
import collections
import contextlib
import dataclasses
import ipaddress
import itertools
import json
import logging
import os
import re
import secrets
import sys
import time
import weakref
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from pathlib import Path as FilePath
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Protocol
from urllib.parse import quote, urlsplit

import anyio
import h11
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
from pydantic import BaseModel, Field, TypeAdapter, ValidationError, field_validator
from pydantic.functional_validators import BeforeValidator
from starlette.datastructures import Headers
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.config import STARTUP_FAILURE  # a worker exiting so stops --workers

logger = logging.getLogger("uvicorn.error")  # uvicorn's main log, shown where it runs

INDEX_HTML = FilePath(__file__).with_name("index.html")
PAGE_MISSING = "index.html is not beside main.py: copy it from this project too"

app = FastAPI()


@app.get("/")
async def get() -> FileResponse:
    """The page, read from disk on each request. It opens any step, shows each close code
    and reason; it reconnects, but not after 4000 (taken over) or 5 refusals in a row."""
    if not INDEX_HTML.is_file():  # main.py copied alone
        raise HTTPException(status.HTTP_404_NOT_FOUND, PAGE_MISSING)
    return FileResponse(INDEX_HTML, headers={"Cache-Control": "no-cache"})


# The guards every step relies on (a first reading can skip to the close codes, below):
# - what a client may send: CheckWhatClientsSend refuses binary (1003), and text over
#   64 KiB (1009); SansIOBounded and H11Bounded, run by the README's production command,
#   bound what uvicorn parses at once; the first drops a client 5 s after closing it;
# - flood control: FloodControl slows a chat client that floods, then closes it: 1008;
# - closing: close_or_give_up closes with a code and a reason, waiting 5 s at most for a
#   client that reads nothing. GONE: what a write to a client that has gone raises, as
#   does one to a connection uvicorn closed itself (ServerClosedIsGone);
# - the origin check: CheckOrigin refuses another site's page (Origin is not Host): 403.
#   A page at 127.0.0.1 calling localhost, as the tutorials' pages do, is let in; one from
#   disk (Origin "null") only with ALLOWED_ORIGINS=null, as any site's sandboxed frame;
# - the log filters: ClientFaultsAsWarnings and BrokenHttpAsWarning log what a client
#   causes as a one-line warning, not a traceback.
# Close codes, as the page shows them: 1000 normal; 1003 binary; 1006 dropped, or a
# refused handshake; 1007 not UTF-8, or not step 5's JSON; 1008 flooding, or too slow;
# 1009 too big; 1011 server error, or no pong; 1012 restart; 1013 try later; 4000 taken over.


# --- Step 1: echo. Accept, then receive and send in a loop ---------------------------------
#
# Try it: http://127.0.0.1:8000/?endpoint=echo, then send "hi": "Message text was: hi".
# Or, without the page, any step's path in a terminal, with the client the websockets
# package comes with: `python -m websockets ws://127.0.0.1:8000/ws` (it sends no Origin).
# The tutorials' own page, saved and opened from disk, sends Origin "null": refused (a
# browser sees 1006) unless the server runs with ALLOWED_ORIGINS=null (the origin check).
# The tutorials' loop, with WebSocketDisconnect caught, as both tutorials end up doing.
# The guards above that wrap the app apply to it all the same: a binary frame, say,
# closes it with 1003, where the tutorials' code would raise a KeyError.


@app.websocket("/ws")
async def websocket_endpoint(websocket: WebSocket) -> None:
    await websocket.accept()
    try:
        while True:
            data = await websocket.receive_text()
            await websocket.send_text(f"Message text was: {data}")
    except WebSocketDisconnect:
        pass  # The tab closed: an ordinary event, not an error.


# --- Step 2: a client id in the path, and noticing when the client leaves ------------------
#
# The reply is one message, "Client #7 says: hi", as in the second tutorial; the first
# tutorial sends the text and the id as two messages.
#
# Try it: http://127.0.0.1:8000/?endpoint=client&client_id=7; close the tab, and the
# server's log says "Client #7 left the chat".


@app.websocket("/ws/{client_id}")
async def websocket_client_endpoint(websocket: WebSocket, client_id: int) -> None:
    await websocket.accept()
    try:
        while True:
            data = await websocket.receive_text()
            await websocket.send_text(f"Client #{client_id} says: {data}")
    except WebSocketDisconnect:
        logger.info("Client #%d left the chat", client_id)


# --- Step 3: a chat room. The ConnectionManager and its endpoints --------------------------
#
# Try it in two tabs: http://127.0.0.1:8000/?endpoint=chat&client_id=1, and the same with
# client_id=2. Each tab sees what the other writes, and its own messages twice: "You
# wrote: hi" to it alone, then "Client #1 says: hi" to all, as in FastAPI's docs (the
# second tutorial defines send_personal_message, but its endpoint never calls it). Open
# client_id=1 in a third tab, and the first tab is closed with 4000: one id, one
# connection. The chat is at /chat/{client_id}, not the second tutorial's
# /ws/{client_id}, which step 2 has: the first route on a path wins. /chat/ is the first
# tutorial's chat, with no ids.
#
# The tutorials' ConnectionManager keeps a list of WebSockets, and its broadcast writes
# to each in turn, waiting for each write to finish:
#
#     async def broadcast(self, message: str):
#         for connection in self.active_connections:
#             await connection.send_text(message)
#
# That loop breaks a real chat in two ways.
# - One client that stops reading stops the chat. Its socket fills up, and the write to
#   it waits: so do the broadcast and its sender, until every sender is stuck there. In
#   bench.py, with one such client among 30 senders of 100 messages each, a healthy
#   client of the tutorials' chat received 114 of the 3,000 messages, then nothing. Of
#   this chat's, it received all 3,000 (BENCHMARKS.md, run BW).
# - A write to a client that has gone raises in the sender's handler: the clients after
#   it in the list miss the message, the sender is taken out of the chat, and the
#   client that has gone stays in until its own handler hears that it left.
#
# Ours keeps the second tutorial's four method names, in order, to compare side by side,
# with changes: connect(websocket, client_id) returns a Client, which disconnect(client)
# takes; broadcast() returns whether the message was taken; say() is new. The comment
# just before `class ConnectionManager`, below, says why. Its broadcast waits on no
# client's socket: it adds the message to a batch, and one task writes the batch to
# every client:
# - a client whose socket has room gets it at once;
# - a client whose socket is full gets it later, from a queue of its own (its Backlog),
#   as the socket drains;
# - a client with 100 messages in its backlog, whose socket is still full when one more
#   comes (given three turns of the event loop to drain), is cut off. It is taken out of
#   the chat, and the others are told it left. It is closed with 1008, "Too slow: over
#   100 messages behind", behind what its buffers hold;
# - a write to a client that has gone takes that client out, and nobody else.
# In bench.py, with 10,000 clients, this cost 1.06x the tutorials' CPU per delivery in
# run BW (0.95x to 1.19x across runs AE to BW).
#
# First the manager, in the tutorials' shape; then what it is made of, and the
# endpoints; then "Step 3, continued": how the batch reaches everyone, in detail (a
# first reading can skip it: the list above is what it does).

MAX_BACKLOG_MESSAGES = 100  # queued for a client whose socket is full, at most
TURNS_TO_SEE_A_DRAIN = 3  # of the event loop, to see a drain: uvloop needs 2, asyncio 3
BATCH_BACKPRESSURE_MESSAGES = 100  # in the batch: then a sender waits till it is out
CLIENTS_PER_GROUP = 100  # written to in one go: then the event loop serves all else
WS_4000_TAKEN_OVER = 4000  # the same client id connected again: the page does not retry
# A page's JavaScript holds a number exactly up to 2**53 - 1. The bound keeps ids short
# too: each message names its sender.
MAX_CLIENT_ID = 2**53 - 1
CLIENT_ID = r"0|-?[1-9][0-9]{0,15}"  # one way to write each id, as the page does


# pydantic alone takes "+7", "07", "7.0", "1_000" and "7\n" for 7 too: a user who picks
# "07" would take over client 7's connection unawares. Here each id has one spelling.
def written_as_an_id(value: str) -> str:
    if re.fullmatch(CLIENT_ID, value) and abs(int(value)) <= MAX_CLIENT_ID:
        return value
    raise ValueError(f"Expected a whole number such as 7, within ±{MAX_CLIENT_ID}")


ClientId = Annotated[int, BeforeValidator(written_as_an_id)]
TOO_SLOW = f"Too slow: over {MAX_BACKLOG_MESSAGES} messages behind"
TAKEN_OVER = "Replaced by a newer connection with the same client id"
SERVER_ERROR = "Server error: try again later"
EVERYONE = None  # the recipient, in a batch, of a message to every client in the chat


# Ours beside the tutorials' manager, method by method:
# - active_connections: the tutorials' list of WebSockets, now made on demand from
#   self.chat, a LocalChat (below), which keeps a Client (below) for each client id. A
#   second connection with the same id takes over, and the older one is closed with 4000. As
#   in the tutorials, nothing checks that a client is who its id says: a real app
#   would, with a dependency, as FastAPI's docs show.
# - connect() takes the client's id too (None in the anonymous chat), and returns its
#   Client, which disconnect() takes where the tutorials take the WebSocket.
# - disconnect() tells the others who left, where the tutorials' endpoint broadcasts
#   it: several who leave at once get one notice.
# - send_personal_message() and broadcast() write to no socket: they add the message to a
#   batch, which one task writes to everyone ("Step 3, continued"). broadcast() goes
#   through self.relay, a ChatRelay (below), and returns whether the relay took the
#   message: DeliverHere, the default, adds it to this process's batch, and always does.
# - say(): the endpoint's call for FastAPI's docs' two sends, send_personal_message("You
#   wrote: ...") to the writer, then broadcast() of the message. DeliverHere puts both in
#   one batch: a shutdown never sends one without the other. Why say() goes through the
#   relay: see the comment above ChatRelay.
class ConnectionManager:
    def __init__(self) -> None:
        self.chat = LocalChat()  # who is connected here, and the delivery to them
        self.relay: ChatRelay = DeliverHere()
        self.departed: list[int | None] = []  # see `announce_leaving`
        self.announcer: asyncio.Task[None] | None = None

    @property
    def active_connections(self) -> list[WebSocket]:
        return [client.websocket for client in self.chat.clients.values()]

    async def connect(self, websocket: WebSocket, client_id: int | None) -> Client:
        await websocket.accept()
        client = Client(websocket, client_id)
        await self.relay.join(self.chat, client)  # an older one with this id gets 4000
        return client

    def disconnect(self, client: Client) -> None:
        self.chat.leave(client)
        if not (client.leaves_silently or cancelled_by_shutdown()):
            self.announce_leaving(client)

    async def send_personal_message(self, message: str, websocket: WebSocket) -> None:
        await self.chat.add_to_batch(websocket, message)

    async def broadcast(self, message: str) -> bool:
        return await self.relay.publish(self.chat, message)

    async def say(self, client: Client, ack: str, text: str) -> None:
        await self.relay.say(self.chat, client, ack, text)

    def announce_leaving(self, client: Client) -> None:
        """All who leave before the notice goes out are named in it, together."""
        self.departed.append(client.client_id)
        if self.announcer is None:
            self.announcer = asyncio.create_task(self.announce_departures())

    async def announce_departures(self) -> None:
        try:
            while self.departed:
                client_ids, self.departed = self.departed, []
                await self.broadcast(left_the_chat(client_ids))
        finally:
            self.announcer = None


# `Client #2 left the chat`, or `Clients #2, #5 and #9 left the chat`, each named once,
# even if it came back and left again before the notice went; in the anonymous chat,
# `A user left the chat`, or `3 users left the chat`.
def left_the_chat(client_ids: list[int | None]) -> str:
    names = [f"#{each}" for each in dict.fromkeys(client_ids) if each is not None]
    if not names:
        count = len(client_ids)
        return "A user left the chat" if count == 1 else f"{count} users left the chat"
    if len(names) == 1:
        return f"Client {names[0]} left the chat"
    return f"Clients {', '.join(names[:-1])} and {names[-1]} left the chat"


class ServerShutdown(WebSocketDisconnect):
    """The server shutting down: uvicorn's 1012, sent with no reason, unlike a client's."""


# In a handler's `finally`: whether the handler is cancelled, as uvicorn does once its
# graceful shutdown stops waiting, after its 1012 (a handler may still be asleep in flood
# control, say). A shutdown, as ServerShutdown is, told to nobody. (A cut-off cancels
# too, through cut_off_scope; anyio takes that cancel back as the scope ends.)
def cancelled_by_shutdown() -> bool:
    return (task := asyncio.current_task()) is not None and task.cancelling() > 0


# A Client: one chat connection, and what the manager keeps about it.
# cut_off_scope, an anyio.CancelScope (anyio is what Starlette runs on): chat_endpoint
# reads its client's messages in `with client.cut_off_scope:`, and LocalChat.cut_off,
# below, cancels it to cut the client off. Only that block ends, not the handler, as
# task.cancel() would: the handler goes on, to tell the others and close with a reason.
# close_code stays 1000 unless the connection ends (left_with), or cut_off sets one.
class Client:
    def __init__(self, websocket: WebSocket, client_id: int | None) -> None:
        self.websocket = websocket
        self.client_id = client_id
        self.key = id(self) if client_id is None else client_id  # anonymous: id(self)
        self.backlog: Backlog | None = None  # only while it is behind: see below
        self.cut_off_scope = anyio.CancelScope()
        self.close_code, self.close_reason = status.WS_1000_NORMAL_CLOSURE, ""
        self.leaves_silently = False  # a restart, a takeover: nobody is told it left

    def left_with(self, gone: WebSocketDisconnect) -> None:
        self.close_code = gone.code
        self.leaves_silently |= isinstance(gone, ServerShutdown)

    async def close_if_cut_off(self) -> None:
        if self.cut_off_scope.cancelled_caught:
            who = "(anonymous)" if self.client_id is None else f"#{self.client_id}"
            logger.info("Client %s cut off: %s", who, self.close_reason)
            await close_or_give_up(self.websocket, self.close_code, self.close_reason)


# A ChatRelay carries a manager's messages: DeliverHere, below, by default. The manager
# calls the relay's three methods: join, publish and say, each with its LocalChat.
# The relay calls the LocalChat's: enter() to let a client in (and leave() if its join
# then fails), add_to_batch() to queue a message for everyone, or for one client
# (add_to_batch_nowait() where it must not wait), and cut_off() for a client it can no
# longer serve.
#
# A relay may refuse a message: one that carries the chat over a network, say, when the
# network fails. Then publish() returns False, and so does broadcast(). That is why
# say() belongs to the relay: one that can refuse a message sends "You wrote" only once
# it has taken the message. DeliverHere takes every one.
class ChatRelay(Protocol):
    async def join(self, chat: LocalChat, client: Client) -> None: ...
    async def publish(self, chat: LocalChat, message: str) -> bool: ...
    async def say(
        self, chat: LocalChat, client: Client, ack: str, text: str
    ) -> None: ...


class DeliverHere:
    """The chat is this process's clients: to publish is to queue for them all."""

    async def join(self, chat: LocalChat, client: Client) -> None:
        chat.enter(client)

    async def publish(self, chat: LocalChat, message: str) -> bool:
        await chat.add_to_batch(EVERYONE, message)
        return True

    async def say(self, chat: LocalChat, client: Client, ack: str, text: str) -> None:
        chat.add_to_batch_nowait(client.websocket, ack)  # in the message's batch
        await self.publish(chat, text)


class LocalChat:
    """This process's clients of one chat, and the delivery to them."""

    def __init__(self) -> None:
        self.clients: dict[int, Client] = {}  # by Client.key: one each
        self.batch: list[tuple[WebSocket | None, str]] = []  # see `add_to_batch`
        self.batch_written = asyncio.Event()  # the batch being filled: set once written
        self.deliverer: asyncio.Task[None] | None = None

    def enter(self, client: Client) -> None:
        older = self.clients.get(client.key)
        if older is not None:
            self.cut_off(older, WS_4000_TAKEN_OVER, TAKEN_OVER, silently=True)
        self.clients[client.key] = client

    def leave(self, client: Client) -> None:
        # Does no harm called twice, or for a connection a newer one has replaced.
        if self.clients.get(client.key) is client:
            del self.clients[client.key]
        backlog, client.backlog = client.backlog, None  # dropped: it is out
        if backlog is not None and backlog.task is not None:
            backlog.task.cancel()
            backlog.had_a_turn.set()  # its task, cancelled before a turn, would not

    def cut_off(
        self, client: Client, code: int, reason: str, silently: bool = False
    ) -> None:
        """Out of the chat; its handler stops reading, and closes with `code`, `reason`."""
        self.leave(client)
        client.close_code, client.close_reason = code, reason
        client.leaves_silently = silently
        client.cut_off_scope.cancel()

    # A sender leaving BATCH_BACKPRESSURE_MESSAGES in the batch waits till it is written.
    async def add_to_batch(self, to: WebSocket | None, message: str) -> None:
        self.add_to_batch_nowait(to, message)
        if len(self.batch) >= BATCH_BACKPRESSURE_MESSAGES:
            await self.batch_written.wait()

    def add_to_batch_nowait(self, to: WebSocket | None, message: str) -> None:
        self.batch.append((to, message))
        if self.deliverer is None:
            self.deliverer = asyncio.create_task(deliver_batches(self))


# Not the tutorials' receive_text: once a write to this client has failed (in the
# delivery task, say), Starlette counts it disconnected, and receive_text raises a plain
# RuntimeError, not the WebSocketDisconnect the tutorials catch: the endpoint would not
# hear the close. (Steps 1 and 2 keep receive_text: only the handler writes, and a write
# that fails raises WebSocketDisconnect in it.) uvicorn 0.55 gives a close frame a
# "reason", and a dropped connection none (ASGI leaves it open): that tells them apart.
async def receive_chat_text(websocket: WebSocket) -> str:
    message = await websocket.receive()
    if message["type"] == "websocket.disconnect":
        if "reason" in message:  # the client's close frame, or uvicorn's (1007, 1009)
            raise WebSocketDisconnect(message["code"], message["reason"])
        if message["code"] == status.WS_1012_SERVICE_RESTART:  # uvicorn's own
            raise ServerShutdown(status.WS_1012_SERVICE_RESTART)
        raise WebSocketDisconnect(status.WS_1006_ABNORMAL_CLOSURE)  # dropped
    text: str = message["text"]  # binary frames: CheckWhatClientsSend refuses them
    return text


manager = ConnectionManager()
anonymous_manager = ConnectionManager()  # the first tutorial's /chat/


@app.websocket("/chat/{client_id}")
async def chat_endpoint(websocket: WebSocket, client_id: ClientId) -> None:
    client = await manager.connect(websocket, client_id)
    flood_control = FloodControl()  # a guard, in "What every step shares"
    try:
        # To cut this client off, the manager cancels this scope: only the `with` block
        # ends, and the handler goes on, to tell the others and to close with a reason.
        with client.cut_off_scope:
            while True:
                data = await receive_chat_text(websocket)
                await flood_control.slow_down(data)  # a flooder waits; or 1008, unsent
                # send_personal_message("You wrote: ...") and broadcast(), in one call
                await manager.say(
                    client, f"You wrote: {data}", f"Client #{client_id} says: {data}"
                )
    except WebSocketDisconnect as gone:
        client.left_with(gone)
    finally:
        manager.disconnect(client)  # "Client #N left the chat", or silently
    await client.close_if_cut_off()  # cut off by the server: it is told why


@app.websocket("/chat/")
async def anonymous_chat_endpoint(websocket: WebSocket) -> None:
    client = await anonymous_manager.connect(websocket, None)
    flood_control = FloodControl()
    try:
        with client.cut_off_scope:
            while True:
                data = await receive_chat_text(websocket)
                await flood_control.slow_down(data)
                await anonymous_manager.broadcast(f"Someone said: {data}")
    except WebSocketDisconnect as gone:
        client.left_with(gone)
    finally:
        anonymous_manager.disconnect(client)  # "A user left the chat", as above
    await client.close_if_cut_off()


# ~~~ Step 3, continued: how a message reaches everyone, and what a slow client costs ~~~~~~~
#
# No sender waits on any one client's socket. A message joins the manager's batch, and one
# task, deliver_batches, writes the whole batch to every client in turn, in groups of
# 100 (CLIENTS_PER_GROUP): between two groups, the event loop serves all else. Written
# to 10,000 in one pass, a burst of 100 held an echo up for 9 to 15 s; in groups, 0.3 s
# at most (BENCHMARKS.md, run BT). A batch holds what was said while the one before it
# was being written: in a quiet chat, one message (and, for a writer, its "You wrote").
# One task writes every batch, and a backlog keeps its order: everyone gets the messages
# in the same order. A sender adds its message, then, if the batch holds 100 or more
# (BATCH_BACKPRESSURE_MESSAGES), waits until that batch is written: senders run ahead of
# the delivery by a batch at most. A writer's "You wrote" goes in without waiting
# (add_to_batch_nowait), just before its message: the two go out in the same batch.
#
# The path of a message, through the functions below:
#
#     broadcast -> relay.publish -> add_to_batch; send_personal_message -> add_to_batch
#     say -> relay.say: add_to_batch_nowait ("You wrote"), then as broadcast
#     deliver_batches, one task: each batch in turn, sorted by by_recipient into what
#     everyone is sent and what a writer is (its "You wrote" too) -> write_to_everyone
#       -> write_without_waiting: the tutorials' loop, giving up a write that would wait
#       -> add_to_backlog_or_cut_off: keeps what a client was not sent, for it alone
#            -> write_backlog, one task per such client, writes it as its socket drains
#            -> or, 100 behind and its socket still full: cut_off, closed with 1008
#
# What happens to one client that stops reading:
# 1. Until its buffers (uvicorn's and the kernel's) are full, writes to it finish at
#    once, like anyone's.
# 2. Then write_without_waiting gives its write up, unsent, and goes on to the others.
#    What it was not sent goes to its backlog, and so does every later message, in
#    order (the very strings everyone is sent: a reference each). Its own task,
#    write_backlog, writes them as its socket drains.
# 3. Only here may the delivery task wait on it, briefly (and a sender waits on the
#    delivery only with 100 in the batch). With 100 in its backlog (MAX_BACKLOG_MESSAGES)
#    and one more to add, the delivery checks that the client's socket holds it up, not
#    a busy server. If the backlog's task has not yet had a turn to write, the server is
#    busy: the delivery waits for that turn. If the task's write waits on the socket,
#    the delivery gives it three turns of the event loop, as many as a drain takes to
#    wake it. If it still waits, the client is cut off: out of the chat, its backlog
#    dropped, the others told it left, and closed with 1008, "Too slow: over 100
#    messages behind".
# 4. That close frame waits behind what its buffers hold, 5 s at most: read within them,
#    it gets those messages, then the 1008; read later, at most those messages, then a
#    drop (1006, to a page). Its page reconnects, to a chat that has gone on. ASGI
#    cannot drop a TCP connection that never reads again: the README's production
#    command does, 5 s after the handler gives up on the close (SansIOBounded, a guard).
# If the chat goes quiet first, nothing more is added: the client stays, slowing nobody,
# until it reads, leaves, or is cut off once the chat goes on. Under the README's
# production command, it is also dropped within 45 s, for not answering uvicorn's pings
# (one every 20 s, 20 s to answer, then 5 s for the close: SansIOBounded).
# The rule counts messages, not time: a socket that stays full through a burst of over
# 100 is cut off within it.
#
# Why not the simplest cure, a queue and a task for every client, so that broadcast
# waits on nobody? Run beside the tutorials' chat (`bench.py --sketch`, run S in
# BENCHMARKS.md), it failed in two ways. Waking a task per client for every message
# cost 1.87x the tutorials' CPU per delivery at 10,000 clients. And a full queue is not
# always a slow client: beside 30 senders, a healthy client's queue filled while its
# task waited for a turn, and it was cut off after 32 of the 3,000 messages.
#
# Giving up a write relies on uvicorn's --ws websockets-sansio (uvicorn 0.55's default;
# this file's commands name it, the README's its subclass SansIOBounded): its send
# waits for room before it writes, so a write given up has sent nothing. (--ws wsproto
# waits first too, but the tests run websockets-sansio only.) --ws websockets writes,
# then waits: a write given up would reach the client twice, now and from its backlog,
# so under it the app refuses to start (refuse_to_start_under_ws_websockets, below).


class Backlog:
    """What a client whose socket is full is yet to be sent, and the task sending it."""

    def __init__(self) -> None:
        self.messages: collections.deque[str] = collections.deque()
        self.had_a_turn = asyncio.Event()  # its task took one out or ended, or it left
        self.task: asyncio.Task[None] | None = None
        self.write_waiting = False  # its task's write waits for the socket to drain


# What everyone is sent of a batch, and, by WebSocket, what those with messages
# of their own ("You wrote") are sent: theirs and everyone's, in order.
Outgoing = tuple[list[str], dict[WebSocket, list[str]]]


async def deliver_batches(chat: LocalChat) -> None:
    try:
        while chat.batch:
            batch, chat.batch = chat.batch, []
            this_batch_written, chat.batch_written = chat.batch_written, asyncio.Event()
            try:
                await write_to_everyone(chat, by_recipient(batch))
            except Exception:  # a bug, not a client's doing: the next batches still go
                logger.exception("Delivering %d chat messages failed", len(batch))
            finally:
                this_batch_written.set()
    finally:
        chat.deliverer = None


# A batch sorted into Outgoing, in one pass, even with "You wrote" for many clients:
# each client's list starts as a copy of everyone's so far, and grows with both. Each
# client's messages then go out back to back. Written message by message, to everyone in
# turn, bench.py's burst (one client's 100 messages, to 1,000 clients) cost 1.00x the
# tutorials' CPU per delivery, where this costs 0.48x (runs V and W, the same hour).
def by_recipient(batch: list[tuple[WebSocket | None, str]]) -> Outgoing:
    everyone: list[str] = []
    own: dict[WebSocket, list[str]] = {}
    for to, message in batch:
        if to is EVERYONE:
            everyone.append(message)
            for messages in own.values():
                messages.append(message)
        elif to in own:
            own[to].append(message)
        else:  # its first: after everyone's before it
            own[to] = [*everyone, message]
    return everyone, own


# CLIENTS_PER_GROUP clients at a time, one iterator for all the calls to each group:
# each call starts after the client the last stopped at.
async def write_to_everyone(chat: LocalChat, outgoing: Outgoing) -> None:
    in_chat = list(chat.clients.values())
    for first in range(0, len(in_chat), CLIENTS_PER_GROUP):
        clients = iter(in_chat[first : first + CLIENTS_PER_GROUP])
        while behind := await write_without_waiting(chat, clients, outgoing):
            client, unwritten = behind
            for message in unwritten:
                await add_to_backlog_or_cut_off(chat, client, message)
        await asyncio.sleep(0)  # the event loop serves all else, then the next group


# How a write is given up: asyncio.timeout(0) sets a deadline of now, and asyncio then
# cancels the task at the first await that suspends it (one that must wait). A write
# to a socket with room never waits, in any layer (Starlette's, the middlewares',
# uvicorn's). A write to a full socket waits for room, and websockets-sansio waits
# before it writes anything. So only a write to a full socket is cancelled, unsent.
# One deadline covers the whole loop, not one per write, and the first write given up
# ends it: write_to_everyone calls again, with the same iterator, for the clients after.
# The tutorials' loop, till a client is behind: it, and what it was not sent.
async def write_without_waiting(
    chat: LocalChat, clients: Iterator[Client], outgoing: Outgoing
) -> tuple[Client, list[str]] | None:
    everyone, own = outgoing
    client: Client | None = None
    try:
        async with asyncio.timeout(0):
            for listed in clients:  # or the newer connection that took it over since
                if (client := chat.clients.get(listed.key)) is None:
                    continue  # it left since this batch began
                messages, written = own.get(client.websocket, everyone), 0
                if client.backlog is not None:
                    return client, messages  # behind already: after its backlog
                for message in messages:
                    try:
                        await client.websocket.send_text(message)
                    except GONE:  # a client gone: a guard, in "What every step shares"
                        chat.leave(client)  # its handler tells the others
                        break
                    written += 1
    except TimeoutError:
        if client is None:  # only a write can be given up: this is a bug
            raise
        return client, messages[written:]
    return None


# Keep what its full socket did not take; past MAX_BACKLOG_MESSAGES, cut it off.
async def add_to_backlog_or_cut_off(
    chat: LocalChat, client: Client, message: str
) -> None:
    turns = 0  # waited for its socket to drain
    while chat.clients.get(client.key) is client:  # still in
        backlog = client.backlog
        if backlog is None:
            backlog = client.backlog = Backlog()
            backlog.task = asyncio.create_task(write_backlog(chat, client, backlog))
        if len(backlog.messages) < MAX_BACKLOG_MESSAGES:
            backlog.messages.append(message)  # the common case
            return
        if not backlog.write_waiting:  # its task has not had its turn: a busy server
            backlog.had_a_turn.clear()
            await backlog.had_a_turn.wait()  # for that turn, not for its socket
        elif turns < TURNS_TO_SEE_A_DRAIN:  # a drain the loop sees wakes its task
            turns += 1
            await asyncio.sleep(0)
        else:  # its write still waits, no drain seen: it stays behind
            chat.cut_off(client, status.WS_1008_POLICY_VIOLATION, TOO_SLOW)
            return


# Its own task: writes the backlog as the socket drains, while nobody waits on it.
async def write_backlog(chat: LocalChat, client: Client, backlog: Backlog) -> None:
    try:
        while backlog.messages:
            message = backlog.messages.popleft()
            backlog.had_a_turn.set()
            backlog.write_waiting = True  # till the write is done and this task runs on
            await client.websocket.send_text(message)
            backlog.write_waiting = False
    except GONE:
        chat.leave(client)  # cancels this task too, harmlessly: it ends here
    except Exception:  # a bug, not the client's doing: it is told, and may come back
        logger.exception("Writing a chat client's backlog failed")
        chat.cut_off(client, status.WS_1011_INTERNAL_ERROR, SERVER_ERROR)
    finally:
        client.backlog = None  # caught up, or gone
        backlog.had_a_turn.set()  # a delivery waiting for its turn goes on


@contextlib.asynccontextmanager
async def refuse_to_start_under_ws_websockets(_app: FastAPI) -> AsyncIterator[None]:
    # By start-up, uvicorn has imported the WebSocket implementation it runs.
    if "uvicorn.protocols.websockets.websockets_impl" in sys.modules:
        raise RuntimeError(
            "Run this app with --ws websockets-sansio: under --ws websockets, a chat "
            "client whose socket fills would get some messages twice"
        )
    yield


# A router's lifespan, once the router is included, is merged into the app's: it runs at
# start-up, and uvicorn exits if it fails.
app.include_router(APIRouter(lifespan=refuse_to_start_under_ws_websockets))

# --- Step 4, in FastAPI's docs, not the tutorials: "Using Depends and others" --------------
#
# Try it: http://127.0.0.1:8000/?endpoint=items&item_id=foo&token=some-key-token; with
# neither token nor cookie, the handshake is refused.
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
            data = await websocket.receive_text()
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
# Try it in two tabs: http://127.0.0.1:8000/?endpoint=rooms&room=lobby&client_id=7, and
# the same with client_id=8. A page that reconnects asks for what it missed (?since=).
#
# Step 3's chat in many rooms, with JSON frames and ids. Whatever step 3 does to a client
# that cannot go on (too slow: 1008; a restart; a network blip) ends with it closed, and
# the page reconnects; but it never learns what it missed. A client cut off as too slow
# has missed its backlog, 100 messages at least, and never gets them. Here a room keeps
# its latest messages, with ids, and a client that comes back with ?since=<the id of the
# last message it received> gets every one it missed; if the room no longer holds them,
# its welcome says "missed": true.
#
# The protocol, JSON text frames. From the server: a `welcome` first (the room, the
# members, whether some was missed, the history, and `last_id`, the id of the newest
# message it accounts for: the client's `since` until another comes); then each
# `message` ({"id", "client_id", "text"}, to everyone, the sender too), and `joined`
# and `left` ({"client_ids": [...]}). From the client: {"text": T}, T a string, not
# empty; other keys are ignored. Any other text closes with 1007.
#
# How it builds on step 3: a Room holds a step 3 LocalChat for its clients (the
# delivery, the takeovers, the cut-offs), a History, and who is joining and away. A
# doorkeeper task lets joiners in between two deliveries, so that a joiner's history
# and the messages it gets live meet exactly; the room's senders wait a moment for it,
# and what a joiner sends waits until it is in: it hears its own messages too.
# Where a room's messages, ids and members live is the rooms' relay: by default
# RoomsHere, this process; its six calls are the places where another relay would do
# something else, and here three do nothing.

# The characters Django Channels allows in group names: no spaces or slashes, so that a
# name goes into a URL, a key or a channel's message unchanged. pydantic checks it with
# Rust's regex, whose `$` is the very end: a trailing newline is refused.
ROOM_NAME = r"^[A-Za-z0-9_.\-]{1,100}$"
WELCOME_HISTORY_MESSAGES = 50  # of the latest, in a welcome without `since`
HISTORY_MESSAGES = 500  # a room keeps at most this many messages
# A room keeps at most this many bytes of messages, as sent, and a welcome's history too.
# A welcome is one frame, which the websockets library (`python -m websockets` too)
# refuses past 1 MiB by default (1009): that leaves 256 KiB for its members, 14,500 ids
# of 16 digits and a sign.
HISTORY_BYTES = 768 * 1024
WELCOME_BYTES_AT_ONCE = 32 * 1024 * 1024  # built in one round of joiners, held as str
MAX_ROOM_MEMBERS = 10_000  # with those away and elsewhere; past it, a joiner gets 1013
ALL_HISTORY_BYTES = 256 * 1024 * 1024  # all rooms: past it, the least active forget
MAX_ROOMS = 1000  # with someone in each; past it, 1013 (an empty one makes room)
ROOM_IDLE_S = 600.0  # a room nobody is in is forgotten, history and all, after this
PRESENCE_INTERVAL_S = 0.25  # joiners are let in, and presence told, this often at most
# A dropped client may come back this long before it has left: time enough for a whole
# server's pages to be back after a network cut (10,000 took 10 to 28 s in bench.py).
PRESENCE_GRACE_S = 30.0
TOO_MANY_ROOMS = f"Too many rooms open (over {MAX_ROOMS}): try again later"
ROOM_FULL = f"Room full ({MAX_ROOM_MEMBERS} members): try again later"
EXPECTED_JSON = 'Expected a JSON object with a non-empty string "text": {"text": "hi"}'
# A message's id: the room's epoch, in hexadecimal, and a number. Any other `since` is
# one the room cannot place: ASCII digits only (`\d` takes the Arabic "١" too), no newline
# (`$` lets one through), no 5,000-digit number.
MESSAGE_ID = r"([0-9a-f]{1,16})-([0-9]{1,18})"

Joiner = tuple[Client, str | None]  # a client being let in, and the `since` it asked


class History:
    """A room's latest messages, each with its id, kept as sent: in UTF-8, so that its
    bounds are what it holds (in memory, Python keeps a str with one emoji in it at
    four bytes for each of its characters).

    An id is `{epoch}-{number}`, the epoch drawn at random as the room begins: an id
    from another room, from before a restart, or from before the room was forgotten, is
    not mistaken for one of this history's. (Not a clock's milliseconds: two rooms
    opened in the same one would share an epoch.)
    """

    def __init__(self) -> None:
        self.epoch = secrets.token_hex(6)  # 48 bits, in 12 hexadecimal digits
        self.next_number = 1
        self.messages: collections.deque[tuple[str, bytes]] = collections.deque()
        self.bytes = 0  # of the frames

    def next_id(self) -> str:
        message_id = f"{self.epoch}-{self.next_number}"
        self.next_number += 1
        return message_id

    def last_id(self) -> str:
        """The newest message's id; before the first, `{epoch}-0`."""
        return f"{self.epoch}-{self.next_number - 1}"

    def keep(self, message_id: str, frame: str) -> int:
        """Kept, with its id; how many bytes the history grew (or shrank)."""
        before, encoded = self.bytes, frame.encode()
        self.messages.append((message_id, encoded))
        self.bytes += len(encoded)
        while len(self.messages) > HISTORY_MESSAGES or self.bytes > HISTORY_BYTES:
            self.drop_oldest()
        return self.bytes - before

    def drop_oldest(self) -> int:
        dropped = len(self.messages.popleft()[1])
        self.bytes -= dropped
        return dropped

    def decoded(self) -> list[str]:
        """Every message's frame, as a str: each history below is a slice of one list."""
        return [frame.decode() for _, frame in self.messages]

    def owed(self, since: str | None) -> tuple[int, bool]:
        """Where a joiner's history starts in decoded(), and whether it missed some.
        Without `since`, the latest; after `since`, if the history holds it; else all of
        it: a client with a `since` it cannot place has seen none of it."""
        if since is None:
            return max(0, len(self.messages) - WELCOME_HISTORY_MESSAGES), False
        start = self.start_after(since)
        return (0, True) if start is None else (start, False)

    def start_after(self, since: str | None) -> int | None:
        """Where the messages after `since` start here; None if some of them are gone."""
        first = self.next_number - len(self.messages)
        number = self.number_of(since)
        # The message just dropped still counts (or, if none was, the 0 before the
        # first): nothing after it is missing.
        if number is None or not first - 1 <= number < self.next_number:
            return None
        return number - first + 1

    def number_of(self, message_id: str | None) -> int | None:
        """The number in an id of this history's; None for anything else."""
        match = re.fullmatch(MESSAGE_ID, message_id or "")
        return int(match[2]) if match and match[1] == self.epoch else None


class Room:
    """A step 5 room: step 3's delivery to its clients, a history, and who is in it."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.chat = LocalChat()  # step 3's clients, delivery and takeovers
        self.history = History()
        self.joining: list[Joiner] = []
        self.let_in: weakref.WeakSet[Client] = weakref.WeakSet()  # see `disconnect`
        self.joiners_let_in = asyncio.Event()  # set, then replaced, as joiners go in
        self.away: dict[int, float] = {}  # dropped, and when their grace ends
        self.told: set[int] = set()  # the members the others were last told of
        self.told_at = -PRESENCE_INTERVAL_S  # when, by the event loop's clock
        self.presence_to_tell = False
        self.doorkeeper: asyncio.Task[None] | None = None  # see `keep_the_door`
        self.may_post = asyncio.Event()  # cleared while joiners are let in
        self.may_post.set()
        self.empty_since = 0.0  # by the event loop's clock
        self.idle_timer: asyncio.TimerHandle | None = None  # see `update_who_is_away`

    def is_empty(self) -> bool:
        return not (self.chat.clients or self.joining or self.away)

    @contextlib.asynccontextmanager
    async def between_deliveries(self) -> AsyncIterator[None]:
        """Once no delivery is under way, each kept message has gone out. Senders here
        wait meanwhile: a room that never went quiet would never get there."""
        self.may_post.clear()
        try:
            while self.chat.deliverer is not None:
                await asyncio.wait([self.chat.deliverer])
            yield
        finally:
            self.may_post.set()


class RoomRelay(Protocol):
    """What carries step 5's rooms: this process, by default (RoomsHere, below): it is
    always open, posts into the room's own history, knows no members elsewhere, reads
    each joiner's history from the room, and has nobody else to tell of presence."""

    def check_open(self) -> None:
        """Raise WebSocketException, after accept(), if rooms cannot be served now."""

    async def post(
        self, room_manager: RoomManager, room: Room, client_id: int, text: str
    ) -> None:
        """Give the message its id and keep it; it reaches the members, the sender too,
        through room.chat's batch, in the order of the ids."""

    async def look_up(self, room: Room, joiners: list[Joiner]) -> set[int]:
        """Before the joiners are let in: who is in the room elsewhere. What it reads,
        histories returns; the members may get messages meanwhile."""

    def histories(
        self, room: Room, joiners: list[Joiner]
    ) -> dict[Client, tuple[list[str], bool]]:
        """By joiner: the frames it is owed, as History.owed says, and whether some it
        asked for are gone. Called with no delivery under way, right after look_up."""

    def last_id(self, room: Room) -> str:
        """The id of the newest message the welcomes account for, in their history or
        before it; one the room never had ends in "-0". A joiner's `since` from then."""

    async def share_presence(self, room: Room) -> None:
        """Tell the other processes, if any, who is in the room here."""


class RoomsHere:
    """The rooms are this process's: their members, their history, their ids."""

    def check_open(self) -> None:
        pass  # always open

    async def post(
        self, room_manager: RoomManager, room: Room, client_id: int, text: str
    ) -> None:
        message_id = room.history.next_id()
        frame = message_frame(message_id, said(client_id, text))
        room_manager.keep(room, message_id, frame)
        await room.chat.add_to_batch(EVERYONE, frame)

    async def look_up(self, room: Room, joiners: list[Joiner]) -> set[int]:
        return set()  # no members but this process's

    def histories(
        self, room: Room, joiners: list[Joiner]
    ) -> dict[Client, tuple[list[str], bool]]:
        # Joiners given the same history share it, and so their welcome: 10,000 back
        # after a restart, none placed, hold what the room has once, not 10,000 times.
        decoded = room.history.decoded()  # once: the other histories share its frames
        shared: dict[int, list[str]] = {}  # by where each starts
        histories = {}
        for client, since in joiners:
            start, missed = room.history.owed(since)
            if start not in shared:
                shared[start] = decoded[start:]
            histories[client] = (shared[start], missed)
        return histories

    def last_id(self, room: Room) -> str:
        return room.history.last_id()

    async def share_presence(self, room: Room) -> None:
        pass  # nobody else to tell


class RoomManager:
    """Step 5's rooms, each step 3's LocalChat with a history, and their comings and
    goings."""

    def __init__(self) -> None:
        # The rooms, the least recently active first: see `open_room`.
        self.by_name: collections.OrderedDict[str, Room] = collections.OrderedDict()
        self.history_bytes = 0  # of all rooms together: see `keep`
        self.relay: RoomRelay = RoomsHere()

    async def connect(
        self, websocket: WebSocket, room_name: str, client_id: int, since: str | None
    ) -> tuple[Room, Client]:
        await websocket.accept()
        client = Client(websocket, client_id)
        room = self.open_room(room_name)  # full (MAX_ROOMS): 1013; or the relay refuses
        room.joining.append((client, since))  # let in, with its welcome: see below
        self.call_the_doorkeeper(room)
        return room, client

    def disconnect(self, room: Room, client: Client) -> None:
        """Out of its room; the others are told who left, several in one notice."""
        was_let_in = client in room.let_in  # a joiner never let in was never here
        room.joining = [(c, since) for c, since in room.joining if c is not client]
        room.chat.leave(client)
        replaced = client.key in room.chat.clients  # by a newer one
        if was_let_in and not replaced and may_come_back(client):
            # Not gone yet: a page that lost its connection, or whose server restarts,
            # is back within seconds, and 10,000 coming back at once would cost a
            # `left` and a `joined` each.
            until = asyncio.get_running_loop().time() + PRESENCE_GRACE_S
            room.away[client.key] = until
            self.call_when_due(until, self.presence_changed, room)
        self.presence_changed(room)  # and, once nobody is left, see `forget_if_idle`

    async def wait_until_let_in(self, room: Room, client: Client) -> None:
        """A joiner's messages wait until it is in: sent before, they would reach
        everyone but it, and its welcome would hold only the latest of them."""
        while client not in room.let_in:
            await room.joiners_let_in.wait()

    async def broadcast(self, room: Room, client_id: int, text: str) -> None:
        """To everyone in the room, the sender too: its copy is its acknowledgement."""
        await room.may_post.wait()  # not while joiners are let in: see `keep_the_door`
        await self.relay.post(self, room, client_id, text)  # kept, with an id

    def open_room(self, name: str) -> Room:
        self.relay.check_open()
        room = self.by_name.get(name)
        if room is None:
            if len(self.by_name) >= MAX_ROOMS:
                self.forget_a_room_nobody_is_in()
            room = self.by_name[name] = Room(name)
        self.by_name.move_to_end(name)
        return room

    def forget_a_room_nobody_is_in(self) -> None:
        """The least recently active room nobody is in forgets itself to make room; if
        everyone is in one, 1013. So rooms opened and left lock nobody out: to hold
        MAX_ROOMS, a client must keep a connection open in each, or drop one there
        without a close frame every PRESENCE_GRACE_S: a proxy's limits stop that."""
        for room in self.by_name.values():  # the least recently active first
            if room.is_empty():
                self.forget(room)
                return
        raise WebSocketException(status.WS_1013_TRY_AGAIN_LATER, TOO_MANY_ROOMS)

    def forget(self, room: Room) -> None:
        if self.by_name.get(room.name) is room:
            del self.by_name[room.name]
            self.history_bytes -= room.history.bytes
            if room.idle_timer is not None:  # else it would hold the room ROOM_IDLE_S
                room.idle_timer.cancel()
            # A grace timer may hold it PRESENCE_GRACE_S yet: its history goes now.
            room.history = History()

    def call_when_due(
        self, due: float, callback: Callable[[Room], None], room: Room
    ) -> asyncio.TimerHandle | None:
        """Call back once the event loop's clock has reached `due`. Woken for anything,
        the loop runs every timer due within its clock's resolution (15.6 ms on
        Windows): one that fired early is set again."""
        loop = asyncio.get_running_loop()
        if loop.time() < due:
            delay = due - loop.time()
            return loop.call_later(delay, self.call_when_due, due, callback, room)
        callback(room)
        return None

    def forget_if_idle(self, room: Room) -> None:
        """Forget a room empty for ROOM_IDLE_S. One that people came back to and left
        again has had its timer set anew."""
        loop = asyncio.get_running_loop()
        if room.is_empty() and loop.time() >= room.empty_since + ROOM_IDLE_S:
            self.forget(room)

    def keep(self, room: Room, message_id: str, frame: str) -> None:
        """Into the room's history; past ALL_HISTORY_BYTES, the least active rooms
        forget their oldest messages first."""
        if self.by_name.get(room.name) is not room:
            return  # forgotten meanwhile
        self.history_bytes += room.history.keep(message_id, frame)
        self.by_name.move_to_end(room.name)
        for other in self.by_name.values():
            while self.history_bytes > ALL_HISTORY_BYTES and other.history.messages:
                self.history_bytes -= other.history.drop_oldest()
            if self.history_bytes <= ALL_HISTORY_BYTES:
                break

    def presence_changed(self, room: Room) -> None:
        room.presence_to_tell = True
        self.call_the_doorkeeper(room)

    def call_the_doorkeeper(self, room: Room) -> None:
        if room.doorkeeper is None:
            room.doorkeeper = asyncio.create_task(self.keep_the_door(room))

    async def keep_the_door(self, room: Room) -> None:
        """Let joiners in, and tell the others who joined and left, at most every
        PRESENCE_INTERVAL_S: 10,000 clients coming back to 100 rooms at once would cost
        a `joined` to everyone per joiner, about 500,000 deliveries, if told one by one.
        """
        loop = asyncio.get_running_loop()
        try:
            while room.joining or room.presence_to_tell:
                await asyncio.sleep(room.told_at + PRESENCE_INTERVAL_S - loop.time())
                joiners, room.presence_to_tell = list(room.joining), False
                elsewhere = await self.relay.look_up(room, joiners)
                # Between two deliveries, every message kept has gone to the members: a
                # joiner gets the history in its welcome, and every later message live.
                async with room.between_deliveries():
                    self.admit_joiners(room, joiners, elsewhere)
                room.told_at = loop.time()
                await self.relay.share_presence(room)
        except Exception:
            # A bug, not a client's doing: the joiners are told, not left waiting.
            logger.exception("Letting clients into room %s failed", room.name)
            for client, _ in room.joining:
                room.chat.cut_off(client, status.WS_1011_INTERNAL_ERROR, SERVER_ERROR)
            room.joining = []
        finally:
            room.doorkeeper = None

    def admit_joiners(
        self, room: Room, joiners: list[Joiner], elsewhere: set[int]
    ) -> None:
        """Let the joiners in, up to MAX_ROOM_MEMBERS, each with its welcome; tell the
        others who joined and left. `elsewhere`: members the relay knows of, beyond
        this process's."""
        joiners = [joiner for joiner in joiners if joiner in room.joining]
        histories = self.relay.histories(room, joiners)
        joiners = within_welcome_size(joiners, histories)  # the others: next time
        others = list(room.chat.clients.values())
        present = {*room.chat.clients, *room.away, *elsewhere}
        for client, _ in joiners:
            if client.key not in present and len(present) >= MAX_ROOM_MEMBERS:
                room.chat.cut_off(client, status.WS_1013_TRY_AGAIN_LATER, ROOM_FULL)
                continue
            present.add(client.key)
            room.chat.enter(client)  # an older connection with this id gets 4000
            room.let_in.add(client)
        self.update_who_is_away(room)
        present = {*room.chat.clients, *room.away, *elsewhere}
        tell_who_came_and_went(room, others, present)
        members = compact_json(sorted(present))  # once for all the joiners
        last_id = self.relay.last_id(room)
        # One welcome for all those with the same history: one string in every batch
        # and backlog it is in, as a message is (see `histories`).
        welcomes: dict[tuple[bool, tuple[str, ...]], str] = {}
        for client, _ in joiners:
            if room.chat.clients.get(client.key) is client:
                history, missed = histories[client]
                key = (missed, tuple(history))
                if key not in welcomes:
                    welcomes[key] = welcome(room, members, history, missed, last_id)
                room.chat.add_to_batch_nowait(client.websocket, welcomes[key])
        # Joining until welcomed: after a bug before this, keep_the_door closes them.
        room.joining = [joiner for joiner in room.joining if joiner not in joiners]
        room.joiners_let_in.set()
        room.joiners_let_in = asyncio.Event()

    def update_who_is_away(self, room: Room) -> None:
        """Away no more: those back, and those whose grace is over, who have left. A
        room left empty is forgotten after ROOM_IDLE_S."""
        loop = asyncio.get_running_loop()
        room.away = {
            client_id: until
            for client_id, until in room.away.items()
            if until > loop.time() and client_id not in room.chat.clients
        }
        if room.is_empty() and self.by_name.get(room.name) is room:  # not forgotten
            room.empty_since = loop.time()
            if room.idle_timer is not None:  # one a room, from when it last emptied
                room.idle_timer.cancel()
            room.idle_timer = self.call_when_due(
                room.empty_since + ROOM_IDLE_S, self.forget_if_idle, room
            )


def within_welcome_size(
    joiners: list[Joiner], histories: dict[Client, tuple[list[str], bool]]
) -> list[Joiner]:
    """The joiners whose histories, each counted once, fit in WELCOME_BYTES_AT_ONCE (the
    first, always): each history is one more welcome to build. 300 joiners, each with a
    `since` of its own, grew the server 286 MB at once. Under this bound, 200 grew it
    44 MB, and 49 with an emoji in each message (149 counted in characters)."""
    counted: set[tuple[str, ...]] = set()
    total = 0
    taken: list[Joiner] = []
    for joiner in joiners:
        history = tuple(histories[joiner[0]][0])
        if history not in counted:
            size = held_bytes(history)
            if taken and total + size > WELCOME_BYTES_AT_ONCE:
                continue
            counted.add(history)
            total += size
        taken.append(joiner)
    return taken


def held_bytes(frames: tuple[str, ...]) -> int:
    """What one str of these frames takes in Python: a byte a character if all are
    ASCII; else up to four, as one emoji makes it."""
    width = 1 if all(frame.isascii() for frame in frames) else 4
    return width * sum(map(len, frames))


def may_come_back(client: Client) -> bool:
    """Ended in a way it did not choose, after which its page comes back by itself: the
    connection dropped without a close frame (1006: see receive_chat_text), the server
    cut it off as too slow, or the server's own silent ending (a restart, say). A
    close frame of its own, whatever its code (1005 for a page's ws.close()): it left.
    Taken over (4000): its id is in use already, maybe in another process."""
    if client.close_code == WS_4000_TAKEN_OVER:
        return False
    dropped = client.close_code == status.WS_1006_ABNORMAL_CLOSURE
    return client.leaves_silently or dropped or client.close_reason == TOO_SLOW


def tell_who_came_and_went(room: Room, others: list[Client], present: set[int]) -> None:
    """Tell the members already in (`others`) who left, and who joined, since they
    were last told."""
    for kind, client_ids in (
        ("left", room.told - present),
        ("joined", present - room.told),
    ):
        if client_ids:
            notice = compact_json({"type": kind, "client_ids": sorted(client_ids)})
            for other in others:
                if room.chat.clients.get(other.key) is other:
                    room.chat.add_to_batch_nowait(other.websocket, notice)
    room.told = present


def welcome(
    room: Room, members: str, history: list[str], missed: bool, last_id: str
) -> str:
    """`members` is encoded already, and the history as kept: both are spliced in. No
    client id: the client knows its own, and joiners share one welcome."""
    fields = {"type": "welcome", "room": room.name}
    after = f',"members":{members},"missed":{compact_json(missed)},'
    after += f'"last_id":"{last_id}","history":['
    return compact_json(fields)[:-1] + after + ",".join(history) + "]}"


def said(client_id: int, text: str) -> str:
    """Who said what, as kept: the message's frame without its type and id."""
    return compact_json({"client_id": client_id, "text": text})


def message_frame(message_id: str, what: str) -> str:
    """{"type":"message","id":...,"client_id":...,"text":...}: spliced, not re-encoded."""
    return f'{{"type":"message","id":"{message_id}",{what[1:]}'


def compact_json(value: object) -> str:
    # No spaces, and UTF-8 as it is: a frame is compressed for every client, and a
    # smaller one costs less ("é" is 2 bytes, not the 6 of "\u00e9").
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


async def receive_json_text(websocket: WebSocket) -> str:
    """The text of a step 5 message, {"text": T}, other keys ignored; else 1007."""
    data = await receive_chat_text(websocket)
    try:
        message = json.loads(data)
    except (ValueError, RecursionError):  # "[[[[…", nested past Python's limit
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


rooms = RoomManager()


@app.websocket("/rooms/{room_name}/{client_id}")
async def room_endpoint(
    websocket: WebSocket,
    room_name: Annotated[str, Path(pattern=ROOM_NAME)],
    client_id: ClientId,  # step 3's: a page holds it exactly, as a JSON number too
    since: str | None = None,  # the id of the last message this client received
) -> None:
    room, client = await rooms.connect(websocket, room_name, client_id, since)
    flood_control = FloodControl()
    try:
        with client.cut_off_scope:
            while True:
                text = await receive_json_text(websocket)  # {"text": ...}, else 1007
                await flood_control.slow_down(compact_json(text))  # as JSON, as sent
                await rooms.wait_until_let_in(room, client)  # it hears its own too
                await rooms.broadcast(room, client_id, text)
    except WebSocketDisconnect as gone:
        client.left_with(gone)
    finally:
        rooms.disconnect(room, client)  # and "left", unless it may be back
    await client.close_if_cut_off()


# --- Step 6: one chat across processes, through Redis -------------------------------------
#
# Without it, a chat cannot grow past one process: with `uvicorn main:app --workers 4`,
# or two machines behind a load balancer, clients of different processes never see
# each other, and a client coming back to another process finds none of its room's
# history. With REDIS_URL set, `use_redis` gives steps 3 and 5 another relay behind
# the interfaces they declare (ChatRelay, RoomRelay), as Django Channels swaps its channel
# layer: every broadcast goes through Redis, and each process hands what Redis brings to
# its own clients. Measured at 10,000 clients over 2 workers: 1.01x to 1.20x one
# process's CPU per delivery for step 3's chat (bench.py --redis, runs AG to AX).
#
# How it works, and what handles each thing that can go wrong:
# - every process subscribes to one channel, REDIS_CHANNEL: a broadcast, a takeover and
#   a room's message are published on it, and each process hands them to its own
#   clients (relay_messages, on_channel_message);
# - a room's message also goes into the room's Redis stream, in the Lua script that
#   publishes it: the stream gives its id and keeps the history, and all rooms' history
#   is bounded by ALL_HISTORY_BYTES, as in one process (run_publish);
# - who is in a room is a hash per room, a field per process; each process tells Redis
#   it is alive every REDIS_PING_INTERVAL_S (heartbeat), and one silent for
#   PROCESS_TTL_S is gone, its members with it;
# - Redis not answering at start-up: the app does not start (exit_unless_redis_answers);
#   lost right after, start-up waits for it, and the log says so (relay_messages);
# - Redis lost, or silent for REDIS_TIMEOUT_S, flushed, or cutting the subscription, or
#   a publish not taken: every chat and room here closes with 1013, pages retry, and the
#   relay subscribes again every REDIS_RETRY_S (relay_messages, relay_until_silent,
#   heartbeat, close_chats_and_rooms);
# - this process paused past PROCESS_TTL_S: it closes its clients with 1013, and starts
#   a new session (close_after_a_pause);
# - the same client id in two processes: the older is closed with 4000 (take_over);
# - a publish Redis does not take gets no "You wrote": so it is sent once Redis has the
#   message, and may come after the message itself, back from the channel.
# A message from the channel joins a batch without waiting (add_to_batch_nowait): the
# subscription must be read on. So through Redis, a batch past the backpressure bound
# (BATCH_BACKPRESSURE_MESSAGES) holds up nobody's message. It holds up only a chat
# sender's own "You wrote", in its own process. Other senders wait for Redis to take
# their messages, and no longer.

# Imported here, not at the top, to show that steps 1 to 5 use no Redis: a copy of them
# leaves these lines behind, and needs no redis-py; this whole file does need it.
import redis.asyncio
import redis.asyncio.client
import redis.asyncio.retry
import redis.backoff

# Unset or empty: one process, nothing else to run. Set: through Redis.
REDIS_URL = os.environ.get("REDIS_URL", "")
REDIS_CHANNEL = "chat"  # every process's messages, and who joined where
REDIS_TIMEOUT_S = 2.0  # a Redis silent this long is lost (whether it died or hangs)
REDIS_PING_INTERVAL_S = 0.5  # a quiet subscription is pinged, liveness told, this often
REDIS_RETRY_S = 1.0  # between attempts to reach Redis again once it is lost
HEARTBEAT_ATTEMPTS = 3  # a session's first, each run by Redis past its deadline: lost
# A publish that Redis runs later than this after it was sent, by Redis's own clock, is
# refused, before the sender gives up on it (REDIS_TIMEOUT_S) and closes the chat: one
# it gave up on never runs.
PUBLISH_DEADLINE_S = 1.5
PROCESS_TTL_S = 5.0  # a process silent this long is gone, and its room members with it
# A process's mark, kept as its liveness is: gone sooner, Redis lost it (FLUSHALL, say).
# Not the liveness key itself: a step of Redis's clock expires that one early. A room's
# members written by a session whose mark is gone are removed as joiners look it up.
SESSION_MARK_TTL_S = 3600.0
REDIS_CONNECTIONS = 50  # commands in flight at once, at most, from one process
REDIS_DOWN = "Chat unavailable: lost its Redis server; try again later"
SERVER_PAUSED = "Chat unavailable: this server was paused; try again later"
RELAY_NEVER_STARTED = (
    "REDIS_URL is set, but the app's lifespan never ran (uvicorn --lifespan off): "
    "nothing reaches Redis, and every chat and room client is closed with 1011"
)
# A publish's own key keeps its id this long: sent again meanwhile, it is not run twice.
PUBLISHED_TTL_S = 10.0
# What losing Redis raises. redis-py turns a failed write into a ConnectionError, but
# uvloop, uvicorn's event loop, raises RuntimeError for a write to a connection that has
# just closed (uvloop issue #506), and redis-py passes it on as it is. Any other
# RuntimeError is a bug, and is raised again: see `redis_lost`.
REDIS_FAILURES = (redis.RedisError, RuntimeError)
UVLOOP_CONNECTION_CLOSED = "; the handler is closed"  # how uvloop ends that error
# A Redis stream id, as `since` must be for Redis to take it: two numbers below 2**64.
STREAM_ID = r"([0-9]{1,19})-([0-9]{1,19})"

# Publishes the id, a space, prefix and text on the channel, unless Redis's clock is past
# the sender's deadline; in a room, first adds the text to the room's stream, KEYS[1],
# which gives it its id (elsewhere, "-"). One script: the stream's ids and the channel's
# order are the same for every process. The stream keeps max_count messages at most, and
# max_bytes of their frames, counted in KEYS[2]; both keys live keys_ttl_ms. All rooms
# together keep all_bytes at most, as in one process: the ledger, KEYS[3] to KEYS[5],
# holds when each room was last written, its bytes, and their total; past all_bytes, the
# least recently written lose their oldest first, and a room whose keys expired leaves
# the ledger with its bytes. (Its keys are named here, not passed: this needs one Redis,
# not a cluster.) The last key is the publish's own, which keeps its id for once_ttl_ms:
# sent twice (redis-py retries on a fresh connection when one breaks), it is published
# once. A frame is the text, its id and extra_bytes, FRAME_EXTRA_BYTES, below. A chat
# message that no process heard, kept in no stream, is lost: '' tells the sender so.
PUBLISH_ONCE_BEFORE_DEADLINE = """
local deadline_ms, channel, prefix, text = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local max_count, max_bytes = tonumber(ARGV[5]), tonumber(ARGV[6])
local keys_ttl_ms, once_ttl_ms, extra_bytes = ARGV[7], ARGV[8], tonumber(ARGV[9])
local all_bytes = tonumber(ARGV[10])
local stream, bytes_key, own_key = KEYS[1], KEYS[2], KEYS[#KEYS]
local written_at, sizes, total_key = KEYS[3], KEYS[4], KEYS[5]
local done = redis.call('GET', own_key)
if done then
  return done
end
local now = redis.call('TIME')
if tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) > tonumber(deadline_ms) then
  return false
end
local id = '-'
if #KEYS > 1 then
  id = redis.call('XADD', stream, '*', 'm', text)
  local bytes = redis.call('INCRBY', bytes_key, #text + #id + extra_bytes)
  local count = redis.call('XLEN', stream)
  while count > 1 and (count > max_count or bytes > max_bytes) do
    local oldest = redis.call('XRANGE', stream, '-', '+', 'COUNT', 1)[1]
    redis.call('XDEL', stream, oldest[1])
    bytes = redis.call('DECRBY', bytes_key, #oldest[2][2] + #oldest[1] + extra_bytes)
    count = count - 1
  end
  redis.call('PEXPIRE', stream, keys_ttl_ms)
  redis.call('PEXPIRE', bytes_key, keys_ttl_ms)
  local room = string.sub(prefix, 1, -2)
  local before = tonumber(redis.call('HGET', sizes, room) or 0)
  local total = redis.call('INCRBY', total_key, bytes - before)
  redis.call('HSET', sizes, room, bytes)
  redis.call('ZADD', written_at, now[1] .. string.format('%06d', now[2]), room)
  while total > all_bytes do
    local least = redis.call('ZRANGE', written_at, 0, 0)[1]
    local least_stream = 'chat:room:' .. least
    if least == room and redis.call('XLEN', stream) <= 1 then
      break  -- the message just added stays
    end
    local oldest = redis.call('XRANGE', least_stream, '-', '+', 'COUNT', 1)[1]
    if oldest == nil then  -- emptied, or its keys expired
      local size = tonumber(redis.call('HGET', sizes, least) or 0)
      total = redis.call('DECRBY', total_key, size)
      redis.call('HDEL', sizes, least)
      redis.call('ZREM', written_at, least)
    else
      local size = #oldest[2][2] + #oldest[1] + extra_bytes
      redis.call('XDEL', least_stream, oldest[1])
      if redis.call('EXISTS', 'chat:bytes:' .. least) == 1 then
        redis.call('DECRBY', 'chat:bytes:' .. least, size)
      end
      redis.call('HINCRBY', sizes, least, -size)
      total = redis.call('DECRBY', total_key, size)
    end
  end
end
-- A Redis out of memory refuses a script's first write: this one, before the publish.
redis.call('SET', own_key, id, 'PX', once_ttl_ms)
if redis.call('PUBLISH', channel, id .. ' ' .. prefix .. text) == 0 and id == '-' then
  redis.call('DEL', own_key)
  return ''  -- a chat message, in no stream, that no process was subscribed to hear
end
return id
"""
# Marks this process alive, KEYS[2], for process_ttl_ms, and its session, KEYS[1], for
# session_ttl_ms, unless Redis's clock is past the deadline: a heartbeat Redis runs late,
# once it continues after hanging, would revive a session the process has given up, and
# the members it listed. Returns whether the session's mark was there; -1, if late.
BEAT_BEFORE_DEADLINE = """
local deadline_ms, session_ttl_ms, process_ttl_ms = ARGV[1], ARGV[2], ARGV[3]
local now = redis.call('TIME')
if tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) > tonumber(deadline_ms) then
  return -1
end
local marked = redis.call('EXISTS', KEYS[1])
redis.call('SET', KEYS[1], 1, 'PX', session_ttl_ms)
redis.call('SET', KEYS[2], 1, 'PX', process_ttl_ms)
return marked
"""
# What message_frame() adds to what was said, beside the id.
FRAME_EXTRA_BYTES = len(message_frame("", "{}")) - len("{}")
# All rooms' history, for ALL_HISTORY_BYTES: when each was last written, by the
# microsecond; the bytes of each; and their total.
HISTORY_LEDGER = ["chat:history:written", "chat:history:sizes", "chat:history:bytes"]

# Reads a room for joiners in one go, so that every joiner's history comes from the same
# moment of its stream, KEYS[1]: the members, KEYS[3], by process; the latest
# latest_count messages, if a joiner has no `since`, or all, if one has a `since` Redis
# cannot place; and the stream from the oldest `since` the joiners asked (ARGV[7]; the
# others follow), since_count at most: one range holds every joiner's, and is sent once;
# with it, the id of the last message trimmed off the stream (Redis 7), which still
# counts as placed, as in one process. A room's first look-up makes its stream, with an
# entry trimmed off at once: its id is a welcome's last_id before any message, of this
# stream alone, as a room's epoch is in one process; one from before the stream expired,
# or before Redis restarted empty, cannot be placed. First writes this process's members
# ('-' leaves them, '' removes them), and the room's keys live keys_ttl_ms more; removes
# those of sessions long gone (see SESSION_MARK_TTL_S): in a room never idle, each
# session of every process would leave its own for good.
LOOK_UP_ROOM = """
local process, members, keys_ttl_ms = ARGV[1], ARGV[2], ARGV[3]
local since_count, latest_count = ARGV[4], ARGV[5]
local latest_needed = ARGV[6] == '1'
local stream, members_key = KEYS[1], KEYS[3]
if redis.call('EXISTS', stream) == 0 then
  redis.call('XDEL', stream, redis.call('XADD', stream, '*', 'm', ''))
end
if members == '' then
  redis.call('HDEL', members_key, process)
elseif members ~= '-' then
  redis.call('HSET', members_key, process, members)
end
for i = 1, 3 do
  redis.call('PEXPIRE', KEYS[i], keys_ttl_ms)
end
local listed = redis.call('HGETALL', members_key)
local kept = {}
for i = 1, #listed, 2 do
  if redis.call('EXISTS', 'chat:session:' .. listed[i]) == 1 then
    table.insert(kept, listed[i])
    table.insert(kept, listed[i + 1])
  else
    redis.call('HDEL', members_key, listed[i])
  end
end
local found = {kept, {}, {}, ''}
local info = redis.call('XINFO', 'STREAM', stream)
for i = 1, #info, 2 do
  if info[i] == 'max-deleted-entry-id' then
    found[4] = info[i + 1]
  end
end
if #ARGV >= 7 then
  local after = redis.pcall('XRANGE', stream, ARGV[7], '+', 'COUNT', since_count)
  if after.err then
    after = {}  -- a `since` Redis refuses: those joiners missed some, nobody else
  end
  local ids_read = {}
  for _, entry in ipairs(after) do
    ids_read[entry[1]] = true
  end
  for i = 7, #ARGV do
    if not ids_read[ARGV[i]] and ARGV[i] ~= found[4] then
      latest_needed, latest_count = true, since_count  -- not placed: all it holds
    end
  end
  found[3] = after
end
if latest_needed then
  found[2] = redis.call('XREVRANGE', stream, '+', '-', 'COUNT', latest_count)
end
return found
"""

StreamEntry = tuple[str, str]  # a message's id in its room's stream, and its frame


@dataclasses.dataclass
class LookedUp:
    """What Redis said of a room as joiners were let in."""

    latest: list[StreamEntry]  # oldest first
    after: dict[str, list[StreamEntry]]  # by `since`: from it on, if Redis holds it
    newest: tuple[int, int]  # the id of the newest message of either
    trimmed: str  # the id of the last message trimmed off: all that follow it are held


@dataclasses.dataclass
class RoomInRedis:
    """What the relay keeps of a room, beside step 5's."""

    elsewhere: dict[str, list[int]] = dataclasses.field(default_factory=dict)
    written: list[int] | None = None  # the members last written to Redis as here
    shown_upto: tuple[int, int] = (0, 0)  # the id of the last message delivered here
    shown_more: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    looked_up: LookedUp | None = None  # for the joiners being let in
    # What came on the channel while joiners were let in, and the task that delivers it.
    held: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    releaser: asyncio.Task[None] | None = None


# What the processes tell each other on the channel, beside rooms' messages, as JSON.
class ChatBroadcast(BaseModel):
    chat: str  # which of step 3's managers: a key of RedisRelay.chats
    text: str


class ChatTakeover(BaseModel):
    """A connection with this client id joined the chat: see `take_over`."""

    chat: str
    takeover: int  # the client id
    token: str  # the connection's own


class RoomNotice(BaseModel):
    """From `share_presence`: the process `presence` let joiners in, or its members in
    the room changed."""

    room: str
    presence: str
    takeovers: list[tuple[int, str]]  # each joiner's client id and token


Notice = ChatBroadcast | ChatTakeover | RoomNotice
NOTICES: TypeAdapter[Notice] = TypeAdapter(Notice)


class RedisRelay:
    """Every process's clients in each room: steps 3 and 5 broadcast through Redis.

    Step 3's chat publishes on a channel. Each step 5 room has a Redis stream, which
    gives its messages their ids and keeps its history, and each message is published
    on the channel too, in the same script: a stream per room for what a client missed,
    the channel for what happens now, as Centrifugo and Discourse's MessageBus do. Who is
    in a room is a hash per room, a field per process.
    """

    def __init__(
        self,
        url: str,
        managers: dict[str, ConnectionManager],
        room_manager: RoomManager,
    ) -> None:
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
            # stale while Redis restarted. A publish that ran before its connection
            # broke is not published twice: it carries a key of its own. A command that
            # timed out is not retried: Redis may still run it, late.
            retry=redis.asyncio.retry.Retry(
                redis.backoff.NoBackoff(),
                retries=1,
                supported_errors=(redis.ConnectionError,),
            ),
        )
        self.publish_script = self.redis.register_script(PUBLISH_ONCE_BEFORE_DEADLINE)
        self.look_up_script = self.redis.register_script(LOOK_UP_ROOM)
        self.beat_script = self.redis.register_script(BEAT_BEFORE_DEADLINE)
        self.publishes = itertools.count()  # each its own key: see the script
        # Thousands of handlers may publish at once: each waits for a connection here,
        # rather than redis-py failing past its pool's size ("Too many connections").
        self.connections = asyncio.Semaphore(REDIS_CONNECTIONS)
        # Each manager's LocalChat, by the name it has in Redis's messages.
        self.chats = {name: each.chat for name, each in managers.items()}
        self.chat_names = {chat: name for name, chat in self.chats.items()}
        self.room_manager = room_manager
        self.in_rooms: weakref.WeakKeyDictionary[Room, RoomInRedis] = (
            weakref.WeakKeyDictionary()
        )
        # Tells a chat client from another connection with its id, on any process.
        self.tokens: weakref.WeakKeyDictionary[Client, str] = (
            weakref.WeakKeyDictionary()
        )
        self.announced: weakref.WeakSet[Client] = weakref.WeakSet()  # token came back
        self.relaying = False  # subscribed, and Redis answers: chat clients are welcome
        self.unavailable = REDIS_DOWN  # why clients are refused while not relaying
        self.subscribed = asyncio.Event()
        self.started = False  # by the app's lifespan, which `--lifespan off` skips
        self.said_it_never_started = False
        self.process = ""  # this process's name in Redis, new for each session
        self.redis_clock_offset_ms = 0.0  # Redis's clock minus this process's
        self.best_round_trip_ms = float("inf")  # of the answers that measured it
        self.alive_at = 0.0  # when Redis last took this process's liveness
        self.rooms_kept_at = 0.0  # when the rooms with people in them were last kept
        self.others_alive: set[str] = set()  # other processes seen in rooms, alive
        self.to_announce: set[str] = set()  # rooms whose members here were rewritten

    @contextlib.asynccontextmanager
    async def running(self, _app: FastAPI) -> AsyncIterator[None]:
        self.started = True
        relay_task = asyncio.create_task(self.relay_messages())
        try:
            # Start-up completes once chat clients can be welcome.
            await self.subscribed.wait()
            yield
        finally:
            # Until it ends: on Python 3.11, redis-py's asyncio.wait_for may swallow a
            # cancel that comes as its write ends, and the process never exited.
            while not relay_task.done():
                relay_task.cancel()
                await asyncio.wait({relay_task}, timeout=REDIS_PING_INTERVAL_S)
            await self.stay_alive_through_a_restart()
            await self.redis.aclose()

    async def stay_alive_through_a_restart(self) -> None:
        """Stopping, as for a deploy: the other processes count this one's members for
        PRESENCE_GRACE_S more, as one process counts a client whose server restarts."""
        if self.relaying:
            grace_ms = int(PRESENCE_GRACE_S * 1000)
            try:
                await self.redis.set(alive_key(self.process), 1, px=grace_ms)
            except REDIS_FAILURES as error:
                if not redis_lost(error):
                    raise

    # Step 3's chat: ChatRelay.

    async def join(self, chat: LocalChat, client: Client) -> None:
        self.check_open()
        chat.enter(client)
        if client.client_id is not None:
            # Other processes close their connection with this id, if they have one.
            self.tokens[client] = secrets.token_hex(8)
            name, token = self.chat_names[chat], self.tokens[client]
            takeover = ChatTakeover(chat=name, takeover=client.client_id, token=token)
            try:
                await self.publish_notice(takeover)
            except BaseException:  # a bug, or cancelled: its read loop never began
                chat.leave(client)
                raise

    async def publish(self, chat: LocalChat, message: str) -> bool:
        return await self.publish_notice(
            ChatBroadcast(chat=self.chat_names[chat], text=message)
        )

    async def say(self, chat: LocalChat, client: Client, ack: str, text: str) -> None:
        # "You wrote" only once Redis has the message: a publish can fail. The message
        # may come back through the channel first: here, the ack can follow it.
        if await self.publish(chat, text):
            await chat.add_to_batch(client.websocket, ack)

    # Step 5's rooms: RoomRelay.

    def check_open(self) -> None:
        if not self.started:  # Redis is not lost: it was never reached
            if not self.said_it_never_started:
                self.said_it_never_started = True
                logger.error(RELAY_NEVER_STARTED)
            raise WebSocketException(status.WS_1011_INTERNAL_ERROR, SERVER_ERROR)
        if not self.relaying:
            # Raised after accept(), so the page sees the code and reason, and retries.
            raise WebSocketException(status.WS_1013_TRY_AGAIN_LATER, self.unavailable)

    async def post(
        self, room_manager: RoomManager, room: Room, client_id: int, text: str
    ) -> None:
        # Delivered, to the sender too, once it comes back through the channel.
        stream, frame_bytes, _ = room_keys(room)
        keys = [stream, frame_bytes, *HISTORY_LEDGER]
        await self.run_publish(keys, f"{room.name} ", said(client_id, text))

    async def look_up(self, room: Room, joiners: list[Joiner]) -> set[int]:
        """Who is in the room elsewhere, and what each joiner is owed, read at one moment
        of its stream; and, for the others, who is here, the joiners included."""
        state = self.in_rooms.setdefault(room, RoomInRedis())
        state.looked_up = None
        joining = [client.key for client, _ in joiners]
        here = sorted({*room.chat.clients, *room.away, *joining})
        write = members_to_write(here, state.written)
        # A `since` Redis would refuse counts as none: that joiner missed some.
        asked = {s for _, s in joiners if s and re.fullmatch(STREAM_ID, s)}
        sinces = sorted(asked, key=stream_order)  # the oldest first
        not_read = {s for _, s in joiners} - asked  # None, or one Redis would refuse
        latest_needed = "1" if not_read else "0"
        all_held = not_read - {None}  # as for one Redis cannot place
        latest_count = HISTORY_MESSAGES + 1 if all_held else WELCOME_HISTORY_MESSAGES
        args: list[str | int] = [self.process, write, int(ROOM_IDLE_S * 1000)]
        args += [HISTORY_MESSAGES + 1, latest_count, latest_needed, *sinces]
        try:
            async with self.connections:
                reply = await self.look_up_script(keys=room_keys(room), args=args)
            members, newest_first, oldest_since_on, trimmed = reply
            if write != "-":
                self.wrote_members(room, here)
            processes = members[::2]
            others = [p for p in processes if p != self.process]
            alive = await self.which_are_alive(others) if others else []
        except REDIS_FAILURES as error:
            if not redis_lost(error):
                raise
            self.close_chats_and_rooms(f"looking up room {room.name}: {error}")
            return set()
        listed = dict(zip(processes, members[1::2], strict=True))
        state.elsewhere = {p: json.loads(listed[p]) for p, a in zip(others, alive) if a}
        self.others_alive |= state.elsewhere.keys()
        latest = stream_entries(reversed(newest_first))
        from_oldest = stream_entries(oldest_since_on)
        # Each joiner's share of the one range: a slice, its frames shared, not copied.
        starts = {message_id: n for n, (message_id, _) in enumerate(from_oldest)}
        newest_of_each = latest[-1:] + from_oldest[-1:]
        state.looked_up = LookedUp(
            latest,
            {since: from_oldest[starts[since] :] for since in sinces if since in starts}
            | ({trimmed: from_oldest} if trimmed in asked else {}),
            max((stream_order(i) for i, _ in newest_of_each), default=(0, 0)),
            trimmed,
        )
        placed = [stream_order(since) for since in state.looked_up.after]
        await self.catch_up(room, state, max(placed, default=(0, 0)))
        return set(itertools.chain.from_iterable(state.elsewhere.values()))

    async def catch_up(
        self, room: Room, state: RoomInRedis, message_id: tuple[int, int]
    ) -> None:
        """Until this process has delivered `message_id` to its members, for
        REDIS_TIMEOUT_S at most: a joiner that had it, let in while this process is
        behind the channel, would get again, live, what came between."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(REDIS_TIMEOUT_S):
                while room.chat.clients and state.shown_upto < message_id:
                    state.shown_more.clear()
                    await state.shown_more.wait()

    async def which_are_alive(self, processes: list[str]) -> list[bool]:
        async with self.connections:
            keys = [alive_key(process) for process in processes]
            return [value is not None for value in await self.redis.mget(keys)]

    def wrote_members(self, room: Room, here: list[int]) -> None:
        """Who is here, written for the other processes: to be told of it."""
        self.in_rooms.setdefault(room, RoomInRedis()).written = here
        self.to_announce.add(room.name)

    def histories(
        self, room: Room, joiners: list[Joiner]
    ) -> dict[Client, tuple[list[str], bool]]:
        """Each joiner's history: from Redis, and what came here since, up to the last
        message delivered here (later ones reach it live), none twice."""
        state = self.in_rooms.setdefault(room, RoomInRedis())
        found = state.looked_up
        if found is None:
            return {client: ([], since is not None) for client, since in joiners}
        newest = found.newest
        if not room.chat.clients:
            # Nobody here yet: what Redis had is in the welcomes, the rest comes live.
            state.shown_upto = max(state.shown_upto, newest)
        # Decoded once for all the joiners: their histories share the frames.
        here = [(i, frame.decode()) for i, frame in room.history.messages]
        histories = {}
        for client, since in joiners:
            after = found.after.get(since or "", [])
            since_found = bool(after) and after[0][0] == since
            placed = since_found or (since is not None and since == found.trimmed)
            if placed:
                kept = after[1:] if since_found else after
            elif since is None:
                kept = found.latest[-WELCOME_HISTORY_MESSAGES:]
            else:  # not placed: all the stream holds, none of which it has seen
                kept = found.latest
            last = max(stream_order(kept[-1][0]) if kept else (0, 0), newest)
            # Placed or not (Redis restarted empty, say), it has what came up to it.
            last = max(last, stream_order(since or ""))
            since_then = [(i, frame) for i, frame in here if stream_order(i) > last]
            history, cut = latest_within_bytes(
                [
                    frame
                    for message_id, frame in kept + since_then
                    if stream_order(message_id) <= state.shown_upto
                ]
            )
            missed = since is not None and (cut or not placed)
            histories[client] = (history, missed)
        return histories

    def last_id(self, room: Room) -> str:
        """The newest message shown here; or, with the stream empty, the last one trimmed
        off it, if newer (before any message, or once Redis restarted empty): it counts
        as placed (see `histories`)."""
        state = self.in_rooms.setdefault(room, RoomInRedis())
        found, last = state.looked_up, state.shown_upto
        if found is not None and found.newest == (0, 0):
            last = max(last, stream_order(found.trimmed))
        return "{}-{}".format(*last)

    async def share_presence(self, room: Room) -> None:
        """Tell the other processes to look again at who is in the room; and take over
        from their connections with the joiners' ids."""
        state = self.in_rooms.setdefault(room, RoomInRedis())
        # The welcomes are made: kept till the room's next joiners, what was read for
        # them held 150 MB for 200 rooms with 720 KB of history each.
        state.looked_up = None
        here = sorted({*room.chat.clients, *room.away})
        if here != state.written:
            # Someone left, or never came in.
            stream, frame_bytes, members = room_keys(room)
            try:
                async with self.redis.pipeline(transaction=False) as tell:
                    if here:
                        tell.hset(members, self.process, json.dumps(here))
                    else:
                        tell.hdel(members, self.process)
                    for key in (stream, frame_bytes, members):
                        tell.pexpire(key, int(ROOM_IDLE_S * 1000))
                    async with self.connections:
                        await tell.execute()
            except REDIS_FAILURES as error:
                if not redis_lost(error):
                    raise
                self.close_chats_and_rooms(
                    f"telling who is in room {room.name}: {error}"
                )
                return
            self.wrote_members(room, here)
        # One notice for all the joiners let in: 10,000 clients coming back at once
        # cost a notice per room each PRESENCE_INTERVAL_S, not one each.
        joined = {  # by client id: a room's clients all have one
            key: client
            for key, client in room.chat.clients.items()
            if client not in self.tokens
        }
        for client in joined.values():
            self.tokens[client] = secrets.token_hex(8)
        if room.name in self.to_announce or joined:
            self.to_announce.discard(room.name)
            takeovers = [(key, self.tokens[client]) for key, client in joined.items()]
            notice = RoomNotice(
                room=room.name, presence=self.process, takeovers=takeovers
            )
            await self.publish_notice(notice)

    # Both.

    async def publish_notice(self, notice: Notice) -> bool:
        return await self.run_publish([], "", notice.model_dump_json()) is not None

    async def run_publish(self, keys: list[str], prefix: str, text: str) -> str | None:
        """The id Redis gave the message (`-` off the streams); None if it was not
        taken: the chat is closed then, if it was not already."""
        own_key = f"chat:published:{self.process}:{next(self.publishes)}"
        limits = [HISTORY_MESSAGES, HISTORY_BYTES, int(ROOM_IDLE_S * 1000)]
        limits += [int(PUBLISHED_TTL_S * 1000), FRAME_EXTRA_BYTES, ALL_HISTORY_BYTES]
        try:
            for attempt in ("first", "once Redis's clock was learned again"):
                async with self.connections:
                    if not self.relaying:  # lost, maybe while the first was late
                        return None
                    # The deadline once a connection is ours: it is sent at once.
                    deadline_ms = int(self.redis_now_ms() + PUBLISH_DEADLINE_S * 1000)
                    args: list[str | int] = [deadline_ms, REDIS_CHANNEL, prefix, text]
                    message_id: str | None = await self.publish_script(
                        keys=[*keys, own_key], args=[*args, *limits]
                    )
                if message_id == "":  # no process was subscribed: nobody heard it
                    self.close_chats_and_rooms("no process was subscribed to a publish")
                    return None
                if message_id is not None:
                    return message_id
                # Refused as late, it ran nothing: Redis's clock may have stepped.
                await self.learn_redis_clock()
        except REDIS_FAILURES as error:
            if not redis_lost(error):
                raise
            self.close_chats_and_rooms(f"publish failed: {error}")
            return None
        self.close_chats_and_rooms(
            f"a publish reached Redis after its deadline, {attempt}"
        )
        return None

    def redis_now_ms(self) -> float:
        return time.monotonic() * 1000 + self.redis_clock_offset_ms

    async def relay_messages(self) -> None:
        """Hand each message on the channel to this process's clients, while the app runs."""
        while True:
            try:
                async with self.redis.pubsub() as pubsub:
                    await pubsub.subscribe(REDIS_CHANNEL)
                    await self.relay_until_silent(pubsub)
            except Exception as error:
                # Redis lost, or a bug: a bug is logged, then handled as Redis lost.
                if not redis_lost(error):
                    logger.exception("Relaying from Redis failed")
                elif not self.subscribed.is_set():  # start-up waits for it: say why
                    logger.warning(
                        "Start-up waits for Redis at %s (%s)", self.url, error
                    )
                self.close_chats_and_rooms(str(error))
                await asyncio.sleep(REDIS_RETRY_S)

    async def relay_until_silent(self, pubsub: redis.asyncio.client.PubSub) -> None:
        """Relay until Redis leaves a ping unanswered for REDIS_TIMEOUT_S, or a publish
        failed.

        Waiting for the next message would wait forever on a Redis that hangs (stopped,
        cut off by the network, stuck in a slow command) rather than dies: so a quiet
        subscription is pinged, and a ping unanswered is taken for an outage. Silence
        is timed from the ping: a loop that was busy, not Redis, is not an outage.
        """
        loop = asyncio.get_running_loop()
        beat_at = loop.time()
        pinged_at: float | None = None  # a ping not answered yet
        in_session = False  # this subscription confirmed, and clients welcomed
        while True:
            message = await pubsub.get_message(timeout=REDIS_PING_INTERVAL_S)
            now = loop.time()
            if in_session and time.monotonic() - self.alive_at > PROCESS_TTL_S:
                self.close_after_a_pause()
                raise redis.ConnectionError("this process was silent: a new session")
            if message is None and pinged_at is None:
                await pubsub.ping()
                pinged_at = now
            elif message is None:
                if now - (pinged_at or now) > REDIS_TIMEOUT_S:
                    raise redis.TimeoutError(f"no answer for {REDIS_TIMEOUT_S} s")
            elif message["type"] == "subscribe" and in_session:
                # redis-py subscribed again on a new connection, after Redis cut the
                # old one (a subscriber too far behind, say): what was published
                # between the two never came. Clients here may have missed it.
                raise redis.ConnectionError("subscription cut, then taken again")
            elif message["type"] == "subscribe":
                pinged_at, in_session = None, True
                await self.start_session()
            else:
                pinged_at = None
                try:
                    self.on_channel_message(message)
                except Exception:
                    # A bug, not Redis's doing: that message is lost, the relay goes on.
                    logger.exception("Relaying %.80r failed", message)
            if in_session and now - beat_at > REDIS_PING_INTERVAL_S:
                beat_at = now
                await self.heartbeat()
            if in_session and not self.relaying:
                raise redis.ConnectionError("a publish failed")

    def close_after_a_pause(self) -> None:
        """Silent past PROCESS_TTL_S (stopped, starved of CPU), this process has been
        counted gone by the others, and its members with it: it closes its clients
        with 1013, and starts a new session, which they come back to with `since`.
        Carrying on instead would keep clients that may have missed messages."""
        silent_s = time.monotonic() - self.alive_at
        if self.relaying:
            logger.warning("This process was silent for %.1f s: chat closed", silent_s)
            # Not "Lost Redis": close_chats_and_rooms says so only while relaying.
            self.relaying, self.unavailable = False, SERVER_PAUSED
        self.close_chats_and_rooms(f"silent for {silent_s:.1f} s", SERVER_PAUSED)

    async def start_session(self) -> None:
        # A new name for each session: what an earlier one left in Redis is stale, and
        # every room's members here are to be written again, under the new name.
        self.process = secrets.token_hex(6)
        for state in self.in_rooms.values():
            state.written = None
        await self.learn_redis_clock()  # Redis may have restarted, its clock with it
        # Marked before it relays: a later beat that finds no mark takes Redis as lost.
        for _ in range(HEARTBEAT_ATTEMPTS):
            if await self.heartbeat():
                break
        else:
            raise redis.TimeoutError("every heartbeat reached Redis past its deadline")
        self.relaying = True
        self.subscribed.set()
        logger.info("Chat relayed through Redis at %s", self.url)
        for room in self.room_manager.by_name.values():
            if room.away:  # members cut off with Redis: here, within their grace
                self.room_manager.presence_changed(room)

    async def heartbeat(self) -> bool:
        """Tell Redis this process is alive, and keep its rooms with people in them;
        learn Redis's clock, and who else is alive. False: Redis ran it past its
        deadline, and it marked nothing; the clock it read tells the next."""
        others = sorted(self.others_alive)
        sent_ms = time.monotonic() * 1000
        keys = [session_key(self.process), alive_key(self.process)]
        deadline_ms = int(self.redis_now_ms() + PUBLISH_DEADLINE_S * 1000)
        ttls_ms = [int(SESSION_MARK_TTL_S * 1000), int(PROCESS_TTL_S * 1000)]
        # `async with`: the connection goes back to the pool whatever fails. Else one that
        # timed out loading the script stayed taken: 57 hangs left a quiet process none.
        async with self.redis.pipeline(transaction=False) as beat:
            beat.time()
            await self.beat_script(keys=keys, args=[deadline_ms, *ttls_ms], client=beat)
            # MGET takes one key at least: "-" is one nobody sets.
            beat.mget([alive_key(process) for process in others] or ["-"])
            if sent_ms / 1000 - self.rooms_kept_at > ROOM_IDLE_S / 4:
                # A room's keys live ROOM_IDLE_S from its last message or joiner: one
                # that someone is in, however quiet, is kept anew every quarter of that.
                self.rooms_kept_at = sent_ms / 1000
                for room in self.room_manager.by_name.values():
                    for key in room_keys(room) if not room.is_empty() else ():
                        beat.pexpire(key, int(ROOM_IDLE_S * 1000))
            (seconds, microseconds), marked, alive, *_ = await beat.execute()
        self.adopt_redis_clock(sent_ms, seconds * 1000 + microseconds / 1000)
        if marked == -1:
            return False
        if self.relaying and not marked:
            # Flushed, or evicted: the others count this process gone, and its members.
            raise redis.ConnectionError("Redis no longer held this process's keys")
        self.alive_at = sent_ms / 1000
        # With no others, `alive` is the answer for "-": zip stops at the shorter.
        lapsed = {p for p, a in zip(others, alive, strict=False) if not a}
        self.others_alive -= lapsed
        for room in self.room_manager.by_name.values():  # their members have left
            state = self.in_rooms.get(room)
            if state is not None and lapsed & state.elsewhere.keys():
                self.room_manager.presence_changed(room)
        return True

    async def learn_redis_clock(self) -> None:
        """Learn Redis's clock anew, whatever was known of it."""
        async with self.connections:
            sent_ms = time.monotonic() * 1000
            seconds, microseconds = await self.redis.time()
        self.best_round_trip_ms = float("inf")
        self.adopt_redis_clock(sent_ms, seconds * 1000 + microseconds / 1000)

    def adopt_redis_clock(self, sent_ms: float, redis_ms: float) -> None:
        """How Redis's clock stands against this process's, from an answer with its time.

        The quickest answer tells best: a busy event loop may read an answer late. But
        one that no round trip can explain tells of a step of Redis's clock (an NTP
        correction, say): that one is taken at once.
        """
        round_trip_ms = time.monotonic() * 1000 - sent_ms
        offset_ms = redis_ms - (sent_ms + round_trip_ms / 2)
        unexplained_ms = abs(offset_ms - self.redis_clock_offset_ms)
        if (
            round_trip_ms <= self.best_round_trip_ms
            or unexplained_ms > round_trip_ms + self.best_round_trip_ms
        ):
            self.best_round_trip_ms = round_trip_ms
            self.redis_clock_offset_ms = offset_ms

    def on_channel_message(self, message: dict[str, Any]) -> None:
        """A message from the channel, to this process's clients it is for."""
        if message["type"] != "message":
            return  # a pong
        message_id, _, rest = message["data"].partition(" ")
        if message_id != "-":
            name, _, what = rest.partition(" ")
            self.deliver_room_message(name, message_id, what)
            return
        try:
            notice = NOTICES.validate_json(rest)
        except ValidationError:
            # Someone else publishing on the channel: not ours, not fatal.
            logger.warning("Ignored a message on %s: %.80r", REDIS_CHANNEL, message)
            return
        if isinstance(notice, RoomNotice):
            self.on_room_notice(notice)
            return
        chat = self.chats.get(notice.chat)
        if chat is None:
            return
        if isinstance(notice, ChatTakeover):
            self.take_over(chat, notice.takeover, notice.token)
        else:
            chat.add_to_batch_nowait(EVERYONE, notice.text)

    def on_room_notice(self, notice: RoomNotice) -> None:
        room = self.room_manager.by_name.get(notice.room)
        if room is None:
            return  # nobody here in that room
        for client_id, token in notice.takeovers:
            self.take_over(room.chat, client_id, token)
            if notice.presence != self.process:  # back elsewhere: not away here
                room.away.pop(client_id, None)
        if notice.presence != self.process:
            self.room_manager.presence_changed(room)

    def deliver_room_message(self, name: str, message_id: str, what: str) -> None:
        """A room's message, to this process's members of the room, unless they have it.
        While joiners are let in, it waits, as this process's senders do: other
        processes' messages would otherwise keep a busy room's delivery under way."""
        room = self.room_manager.by_name.get(name)
        if room is None:
            return
        state = self.in_rooms.setdefault(room, RoomInRedis())
        if state.held or not room.may_post.is_set():
            state.held.append((message_id, what))
            if state.releaser is None:
                state.releaser = asyncio.create_task(self.release_held(room, state))
            return
        self.show(room, state, message_id, what)

    async def release_held(self, room: Room, state: RoomInRedis) -> None:
        """Once the joiners are in, what came meanwhile: to them too, unless welcomed."""
        try:
            await room.may_post.wait()
            held, state.held = state.held, []
            for message_id, what in held:
                self.show(room, state, message_id, what)
        finally:
            state.releaser = None

    def show(self, room: Room, state: RoomInRedis, message_id: str, what: str) -> None:
        if stream_order(message_id) <= state.shown_upto:
            return  # delivered here already, or in the joiners' welcomes
        state.shown_upto = stream_order(message_id)
        state.shown_more.set()
        frame = message_frame(message_id, what)
        self.room_manager.keep(room, message_id, frame)
        room.chat.add_to_batch_nowait(EVERYONE, frame)

    def take_over(self, chat: LocalChat, client_id: int, token: str) -> None:
        """Another connection with this id joined: close ours if it joined earlier.

        Redis orders the notices: a connection whose own notice has come back joined
        before the notice at hand, one whose notice is still to come joined after it.
        """
        client = chat.clients.get(client_id)
        if client is None:
            return
        if self.tokens.get(client) == token:
            self.announced.add(client)
        elif client in self.announced:
            chat.cut_off(client, WS_4000_TAKEN_OVER, TAKEN_OVER, silently=True)

    def close_chats_and_rooms(self, why: str, reason: str = REDIS_DOWN) -> None:
        # Without Redis, this process's clients would only see part of the room: close
        # them with 1013, Try Again Later, and no leave notices. The page retries.
        if self.relaying:
            logger.warning("Lost Redis at %s (%s): chat closed", self.url, why)
            self.unavailable = reason  # till it relays again, whatever fails meanwhile
        self.relaying = False
        for chat in self.chats.values():
            for client in list(chat.clients.values()):
                chat.cut_off(
                    client, status.WS_1013_TRY_AGAIN_LATER, reason, silently=True
                )
        for room in self.room_manager.by_name.values():
            clients = [*room.chat.clients.values()]
            clients += [client for client, _ in room.joining]
            room.joining = []
            self.in_rooms.setdefault(room, RoomInRedis()).elsewhere = {}
            for client in clients:
                room.chat.cut_off(
                    client, status.WS_1013_TRY_AGAIN_LATER, reason, silently=True
                )


def redis_lost(error: BaseException) -> bool:
    """Redis lost, not a bug: redis-py's errors, and uvloop's for a closed connection."""
    if isinstance(error, RuntimeError):
        return str(error).endswith(UVLOOP_CONNECTION_CLOSED)
    return isinstance(error, redis.RedisError)


def members_to_write(here: list[int], written: list[int] | None) -> str:
    """What the look-up script writes of this process's members: "-" leaves them as
    written, "" removes them, else the list."""
    if here == written:
        return "-"
    return json.dumps(here) if here else ""


def room_keys(room: Room) -> list[str]:
    """The room's stream, the bytes of its frames, and its members by process."""
    return [f"chat:{kind}:{room.name}" for kind in ("room", "bytes", "members")]


def stream_entries(entries: Iterable[tuple[str, list[str]]]) -> list[StreamEntry]:
    """Redis's stream entries, each `[id, ["m", what]]`, as ids and frames."""
    return [(i, message_frame(i, fields[1])) for i, fields in entries]


def alive_key(process: str) -> str:
    """The key a process keeps while it is alive: see PROCESS_TTL_S."""
    return f"chat:alive:{process}"


def session_key(process: str) -> str:
    """The mark a process keeps in Redis for its session: see SESSION_MARK_TTL_S."""
    return f"chat:session:{process}"


def stream_order(message_id: str) -> tuple[int, int]:
    """Ids compare as their two numbers do: `1733040000000-7` before `1733040000001-0`."""
    match = re.fullmatch(STREAM_ID, message_id)
    return (int(match[1]), int(match[2])) if match else (0, 0)


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
            url, socket_connect_timeout=REDIS_TIMEOUT_S, socket_timeout=REDIS_TIMEOUT_S
        ) as client:
            client.ping()
    except (redis.RedisError, ValueError) as error:  # ValueError: a URL it cannot read
        logger.error(
            "Cannot reach Redis at %s (%s): start it, or unset REDIS_URL",
            without_password(url),
            error,
        )
        raise SystemExit(STARTUP_FAILURE) from None


def use_redis(
    url: str, managers: dict[str, ConnectionManager], room_manager: RoomManager
) -> None:
    """Steps 3 and 5 through Redis: one relay for the chats and the rooms, running while
    the app does."""
    exit_unless_redis_answers(url)
    relay = RedisRelay(url, managers, room_manager)
    for chat_manager in managers.values():
        chat_manager.relay = relay
    room_manager.relay = relay
    app.include_router(APIRouter(lifespan=relay.running))


@contextlib.asynccontextmanager
async def log_that_the_chat_stays_in_one_process(_app: FastAPI) -> AsyncIterator[None]:
    logger.info(
        "Chat room kept in this process: with --workers or several machines, "
        "set REDIS_URL so that they share one room"
    )
    yield


if REDIS_URL:
    use_redis(REDIS_URL, {"chat": manager, "anonymous": anonymous_manager}, rooms)
else:
    app.include_router(APIRouter(lifespan=log_that_the_chat_stays_in_one_process))


# --- What every step shares: what a client may send, flood control, closing, origins, logs
#
# These guards stop what the tutorials' code lets any client do: crash a handler with a
# binary frame, send 16 MiB at a time, flood the room, fill the log with tracebacks, and,
# from another site's page, connect with the user's cookies.

# What the file relies on in uvicorn 0.55, each where the file says why, and the test
# that fails if an upgrade changes it:
# - under --ws websockets, a write is sent before it waits: the app refuses to start
#   (test_server.py:
#   test_start_up_is_refused_where_a_given_up_write_would_have_been_sent);
# - a close frame reaches the app with a "reason", a dropped connection without one
#   (receive_chat_text; test_server.py:
#   test_a_room_client_closed_with_a_frame_has_left_at_once, and
#   test_a_dropped_room_client_is_a_member_for_its_grace_then_has_left);
# - its own 1012, at shutdown, has no "reason" (ServerShutdown; test_redis.py:
#   test_a_room_member_s_process_restarting_is_not_heard_as_a_leaving);
# - the log lines ClientFaultsAsWarnings rewords (test_server.py:
#   test_invalid_utf8_closes_with_1007_without_a_traceback, and the SIGTERM tests);
# - no layer of a send pauses on a socket with room: if one did, every write would go
#   through a backlog, in order and once, but at a cost bench.py's chat figure shows;
# - and none pauses once it has written: a write given up then would be sent twice;
# - the words that end its RuntimeError for a write after its own close
#   (ServerClosedIsGone; test_main.py:
#   test_only_uvicorn_s_error_for_a_write_after_its_own_close_means_gone);
# - websockets-sansio's data_received, receive, read_paused, its frame handlers,
#   frames, conn, close_sent, disconnected, handle_parser_exception, run_asgi,
#   keepalive_timeout and pong_timer (SansIOBounded; test_server.py: the tests from
#   test_a_client_flooding_pings_or_pongs_is_closed_with_1008 on,
#   test_a_client_cut_off_that_never_reads_is_dropped,
#   test_a_stalled_client_in_a_quiet_chat_leaves_once_it_misses_the_pings, and
#   test_a_client_whose_pong_waits_behind_its_slowed_messages_stays);
# - h11's data_received, eof_received, flow and its resume_reading, cycle.keep_alive,
#   and the handshake handed over by transport.set_protocol (H11Bounded; test_server.py:
#   the tests from test_a_body_sent_in_one_byte_chunks_holds_nobody_else_up on);
# - it answers a handshake too big for websockets to parse with 431, and closes it:
#   uvicorn 0.54 keeps it open, unanswered (test_server.py:
#   test_a_handshake_too_big_to_parse_is_answered_431_and_closed).

# uvicorn must enforce the size limit too, before it buffers a message: `--ws-max-size
# 65536` in the README's production command.
MAX_MESSAGE_BYTES = 64 * 1024  # longer text closes the connection with 1009
FLOOD_BURST_MESSAGES = 100  # a chat client may send this many at full speed
FLOOD_MESSAGES_PER_S = 10  # after the burst; a faster client's next read waits
FLOOD_BYTES_PER_MESSAGE = 1024  # a message counts once, and once more per full KiB
FLOOD_MAX_SLOWED_MESSAGES = 20  # reads made to wait in a row; one more closes: 1008
# Waited in a row, at most; a longer wait closes: 1008. Meanwhile uvicorn reads nothing
# from the client, its pongs included: alone, it closes it with 1011 20 s after a ping.
FLOOD_MAX_SLOWED_S = 10.0
FLOODING = f"Flooding: over {FLOOD_MESSAGES_PER_S} messages (or KiB) a second"
BINARY_REFUSED = "Binary frames are not supported: send text"
TOO_BIG = f"Message over {MAX_MESSAGE_BYTES} bytes"
CLOSE_TIMEOUT_S = 5.0  # how long closing a client that reads nothing may take
MAX_PINGS_AND_PONGS_PER_S = 10  # from one client; one more closes it with 1008
MAX_MESSAGE_FRAMES = 100  # pieces of one message; one more closes it with 1009
READ_SLICE_BYTES = 4096  # parsed at a time by SansIOBounded, below
RESET_AFTER_CLOSE_S = 5.0  # by SansIOBounded: a connection closed, still open this long
PINGING = f"Flooding: over {MAX_PINGS_AND_PONGS_PER_S} pings and pongs a second"
TOO_MANY_FRAMES = f"Message in over {MAX_MESSAGE_FRAMES} frames"


class WebSocketMiddleware:
    """Pure ASGI middleware that acts on WebSockets alone: HTTP goes straight through."""

    def __init__(self, inner: ASGIApp) -> None:
        self.app = inner  # the app inside this middleware

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            await self.websocket(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    async def websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        raise NotImplementedError


class CheckWhatClientsSend(WebSocketMiddleware):
    """No handler is handed a message it cannot take. A binary frame (a KeyError in
    receive_text) or text over MAX_MESSAGE_BYTES raises, from the handler's receive,
    the WebSocketException that closes it with 1003 or 1009."""

    async def websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def receive_checked() -> Message:
            message = await receive()
            refuse_what_no_handler_takes(message)
            return message

        await self.app(scope, receive_checked, send)


def refuse_what_no_handler_takes(message: Message) -> None:
    if message["type"] != "websocket.receive":
        return  # the handshake, or the client's close
    text: str | None = message.get("text")
    if text is None:
        raise WebSocketException(status.WS_1003_UNSUPPORTED_DATA, BINARY_REFUSED)
    if len(text.encode()) > MAX_MESSAGE_BYTES:
        raise WebSocketException(status.WS_1009_MESSAGE_TOO_BIG, TOO_BIG)


# A token bucket: FLOOD_BURST_MESSAGES at once, then FLOOD_MESSAGES_PER_S, a long
# message counting as several: one client's 64 KiB messages, 10 a second, to 100
# readers that asked for compression (as browsers do) took all of the server's CPU,
# 1.00 s a second (run BE); counted so, 0.13 s (run BK). A flooder's next messages wait
# in its own connection, unread by its handler: it slows itself, not the room. Slowed
# over FLOOD_MAX_SLOWED_S in a row, each wait counted as a 20th of it at least (so
# that 21 waits do too), it is closed: 1008.
class FloodControl:
    def __init__(self) -> None:
        self.allowance = float(FLOOD_BURST_MESSAGES)  # messages it may send at once
        self.counted_at = time.monotonic()
        self.slowed_for_s = 0.0  # in a row, as counted: see `slow_down`

    async def slow_down(self, message: str) -> None:
        now = time.monotonic()
        earned = (now - self.counted_at) * FLOOD_MESSAGES_PER_S
        counts_as = 1 + len(message.encode()) // FLOOD_BYTES_PER_MESSAGE
        self.allowance = min(FLOOD_BURST_MESSAGES, self.allowance + earned) - counts_as
        self.counted_at = now
        if self.allowance >= 0:
            self.slowed_for_s = 0.0
            return
        wait_s = -self.allowance / FLOOD_MESSAGES_PER_S
        self.slowed_for_s += max(wait_s, FLOOD_MAX_SLOWED_S / FLOOD_MAX_SLOWED_MESSAGES)
        await asyncio.sleep(wait_s)  # first: what it sent before reaches it meanwhile
        if self.slowed_for_s > FLOOD_MAX_SLOWED_S:
            raise WebSocketException(status.WS_1008_POLICY_VIOLATION, FLOODING)


# A write to a client that has gone fails with an OSError (ASGI's rule), which Starlette
# turns into WebSocketDisconnect; so does one to a connection that uvicorn has closed
# itself, through ServerClosedIsGone, below. A RuntimeError is a bug, and is not taken
# for a client gone: the chats write to no client after they let it go.
GONE = (OSError, WebSocketDisconnect)


# Closes with a code and reason, unless the client has gone. The close frame waits
# behind all the client has not read: so, CLOSE_TIMEOUT_S at most.
async def close_or_give_up(websocket: WebSocket, code: int, reason: str) -> None:
    if websocket.application_state is WebSocketState.DISCONNECTED:
        return  # closed already, or a write found the client gone
    with anyio.move_on_after(CLOSE_TIMEOUT_S), contextlib.suppress(*GONE):
        await websocket.close(code, reason)


@app.exception_handler(WebSocketException)
async def close_on_websocket_exception(
    websocket: WebSocket, refusal: WebSocketException
) -> None:
    # Starlette's own handler calls close() even when the client's close frame arrived
    # with the refused message, and the close then fails with a traceback.
    if websocket.application_state is WebSocketState.CONNECTED:
        path = as_logged(websocket.scope["path"])
        logger.info("Closed %s with %d: %s", path, refusal.code, refusal.reason)
    await close_or_give_up(websocket, refusal.code, refusal.reason or "")


# Of a client's text in a log line: one refusal, one short line, whatever it sent.
MAX_LOGGED_CHARACTERS = 200


def as_logged(client_text: str) -> str:
    # Percent-encoded, as uvicorn logs a path (":" kept, for an origin): a path or a
    # header may hold a line break or a terminal's escape, to forge a line or recolour
    # the log (step 4's item id takes any; an Origin may hold latin-1's "\x85").
    shown = quote(client_text[:MAX_LOGGED_CHARACTERS], safe="/:")
    if max(len(client_text), len(shown)) <= MAX_LOGGED_CHARACTERS:
        return shown
    cut = re.sub(r"%[0-9A-F]?$", "", shown[:MAX_LOGGED_CHARACTERS])  # no "%0" left
    return f"{cut}... ({len(client_text)} characters)"


# Under --http h11, a client that breaks HTTP once its request is answered, or as it is,
# is answered 400 by uvicorn all the same, and h11 raises; the event loop or uvicorn
# logs that as an error with a traceback, and the connection closes, as it should.
BROKE_HTTP = "Closed an HTTP connection: its client sent what HTTP does not allow"


# One WARNING line, not an ERROR with a traceback, for what clients cause: uvicorn logs
# so a text frame that is not UTF-8 (it closes with 1007), a graceful shutdown that gave
# up on a client that read nothing or a handler asleep in flood control, each handler it
# then cancelled, and BROKE_HTTP.
class ClientFaultsAsWarnings(logging.Filter):
    REWORDED: ClassVar[dict[str, str]] = {
        "Invalid UTF-8 sequence received from client.": (
            "Closed a WebSocket with 1007: its text was not valid UTF-8"
        ),
        "Cancel %s running task(s), timeout graceful shutdown exceeded": (
            "Shut down without waiting any longer for connections still open "
            "(--timeout-graceful-shutdown); %s task(s) cancelled"
        ),
    }
    CANCELLED = "Cancelled a handler still running when the graceful shutdown ended"
    # How uvicorn cancels a handler once it gave up: any other CancelledError is a bug.
    GAVE_UP = ("Task cancelled, timeout graceful shutdown exceeded",)

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        ended = isinstance(error, asyncio.CancelledError) and error.args == self.GAVE_UP
        reworded = self.CANCELLED if ended else self.REWORDED.get(str(record.msg))
        if isinstance(error, h11.LocalProtocolError):
            reworded = BROKE_HTTP
        if reworded is not None:
            record.msg = reworded
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.exc_info, record.exc_text = None, None
        return True


logger.addFilter(ClientFaultsAsWarnings())


class BrokenHttpAsWarning(logging.Filter):
    """The event loop's log of BROKE_HTTP, logged as uvicorn's is, with its level."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], h11.LocalProtocolError):
            logger.warning(BROKE_HTTP)
            return False
        return True


logging.getLogger("asyncio").addFilter(BrokenHttpAsWarning())

# Browsers send Origin on every WebSocket handshake; other sites' pages are refused: a
# browser may attach the user's cookies whatever page opens a WebSocket (those with
# SameSite=None; any, from a page of the same site, such as another subdomain), and the
# same-origin policy does not cover WebSockets (cross-site WebSocket hijacking).
DEFAULT_PORTS = {"http": 80, "https": 443}


# A host as browsers send it: letters, digits, hyphens and dots, in lower case, or an
# IPv6 address. A name with other letters (bücher) goes in punycode (xn--bcher-kva).
ORIGIN_HOST = r"[a-z0-9-]+(\.[a-z0-9-]+)*\.?|\[[0-9a-f:.]+\]"
# A host whose last label is a number is an IPv4 address, which browsers send as four
# decimals: 127.1, or 0x7f.0.0.1, as 127.0.0.1.
IPV4_HOST = r"(.*\.)?([0-9]+|0x[0-9a-f]*)\.?"


# An origin as browsers send it: https://chat.example, in lower case, no default port.
# None for what is not one: chat.example:8000, https://*.chat.example, a path.
def as_sent_by_browsers(origin: str) -> str | None:
    if origin == "null":
        return origin
    try:
        page = urlsplit(origin.rstrip("/"))
        port, host = page.port, page.hostname or ""
    except ValueError:  # a port of letters, "http://[::1"
        return None
    host = f"[{host}]" if ":" in host else host  # IPv6
    if page.scheme not in DEFAULT_PORTS or not re.fullmatch(ORIGIN_HOST, host):
        return None
    if re.fullmatch(IPV4_HOST, host) and not is_dotted_quad(host):
        return None
    if "@" in page.netloc or page.path or page.query or page.fragment:
        return None
    return f"{page.scheme}://{host}" + (
        "" if port in {None, DEFAULT_PORTS[page.scheme]} else f":{port}"
    )


def is_dotted_quad(host: str) -> bool:
    with contextlib.suppress(ValueError):
        return str(ipaddress.IPv4Address(host)) == host
    return False


def allowed_origins(setting: str) -> frozenset[str]:
    """ALLOWED_ORIGINS, comma-separated; an entry that is not an origin stops the start."""
    origins = set()
    for entry in filter(None, (each.strip() for each in setting.split(","))):
        if (origin := as_sent_by_browsers(entry)) is None:
            logger.error(
                "ALLOWED_ORIGINS: %r is not an origin as browsers send it, such as "
                "https://chat.example or http://127.0.0.1:8000 (a name's non-ASCII "
                "letters in punycode: xn--)",
                entry,
            )
            raise SystemExit(STARTUP_FAILURE)
        origins.add(origin)
    if "null" in origins:
        logger.warning(
            "ALLOWED_ORIGINS=null lets in pages opened from disk, and any site's "
            "sandboxed frames: use it only to try such a page"
        )
    return frozenset(origins)


ALLOWED_ORIGINS = allowed_origins(os.environ.get("ALLOWED_ORIGINS", ""))


class CheckOrigin(WebSocketMiddleware):
    """Refuse WebSocket handshakes from pages on other sites: another host or port.

    The page's own host is let in, and so are scripts and tests, which send no Origin.
    So is a site whose name its owner points at your machine (DNS rebinding): page and
    Host then name that site. Starlette's TrustedHostMiddleware, given the names you
    serve, refuses such a Host. Schemes are not compared: behind a proxy that ends TLS,
    the app sees ws, not wss, so a page at http://chat.example counts as the https one.
    Refused before accept(), a browser gets an HTTP 403 instead of a WebSocket: its page
    sees 1006, and no reason. Starlette's TestClient shows the code and the reason.
    """

    async def websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = Headers(scope=scope)
        origin = headers.get("origin")
        if origin_allowed(origin, headers.get("host", "")):
            await self.app(scope, receive, send)
            return
        logger.warning(
            "Refused WebSocket from origin %s: add it to ALLOWED_ORIGINS to allow it",
            as_logged(origin or ""),
        )
        refusal = f"Origin {origin} is not allowed"
        code = status.WS_1008_POLICY_VIOLATION
        await send({"type": "websocket.close", "code": code, "reason": refusal})


# Names of this machine, as a page's address and a WebSocket's may each spell it.
LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})


# The page's host and port, as its address bar has them, must be the server's, as the
# WebSocket's address has them (Host). One machine's names count as one: the tutorials'
# pages, opened at 127.0.0.1:8000 as uvicorn says, connect to localhost:8000. Behind a
# proxy that rewrites Host, list the site's own origin in ALLOWED_ORIGINS.
def origin_allowed(origin: str | None, host: str) -> bool:
    if origin is None or origin in ALLOWED_ORIGINS:
        return True
    try:
        page, server = urlsplit(origin), urlsplit(f"//{host}")
        same_port = page.port == server.port  # .port raises for a port of letters
    except ValueError:  # "http://[::1", "http://host:abc": no page has that address
        return False
    if page.netloc == server.netloc:
        return True
    return {page.hostname, server.hostname} <= LOOPBACK_HOSTS and same_port


# How uvicorn 0.55 ends the RuntimeError it raises for a message sent after its close.
UVICORN_SENT_AFTER_CLOSE = "after sending 'websocket.close'."


class ServerClosedIt(OSError):
    """A write to a connection uvicorn closed itself: as gone as a client that left."""


class ServerClosedIsGone(WebSocketMiddleware):
    """A write to a connection that uvicorn has closed itself (a message over
    --ws-max-size, a protocol error), before its handler heard, raises uvicorn's
    RuntimeError, where ASGI asks for an OSError. This raises ServerClosedIt, an
    OSError, instead: Starlette then raises WebSocketDisconnect, as for any client gone,
    and each step's handler ends as it does when the client leaves."""

    async def websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_or_gone(message: Message) -> None:
            try:
                await send(message)
            except RuntimeError as error:
                if not str(error).endswith(UVICORN_SENT_AFTER_CLOSE):
                    raise
                raise ServerClosedIt(str(error)) from None

        await self.app(scope, receive, send_or_gone)


app.add_middleware(CheckOrigin)
app.add_middleware(CheckWhatClientsSend)
app.add_middleware(ServerClosedIsGone)


# Imported here, beside SansIOBounded and H11Bounded, their only users.
import socket
import struct

from uvicorn.config import Config
from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.websockets.websockets_sansio_impl import (
    WebSocketsSansIOProtocol,
)
from websockets.frames import Frame
from websockets.protocol import State

if TYPE_CHECKING:  # a private module of uvicorn's: for the type checker alone
    from uvicorn._types import ASGIReceiveEvent, ASGISendEvent


# uvicorn's websockets-sansio parses all it reads at once, 250 KiB a read, read after
# read. It stops reading once it holds a message for the app, queueing all the others
# it found: tens of thousands of one-letter messages. Frames the app never sees (pings,
# pongs, the pieces of a message) never stop it, and the app cannot limit them. So one
# client held another's echo up for 6 s with empty pings, 2 ms under this class (run
# AZ). And a connection uvicorn closes stays open until the client has read all it was
# sent. The README's production command runs this class: `--ws main:SansIOBounded`.
class SansIOBounded(WebSocketsSansIOProtocol):
    """uvicorn's websockets-sansio, parsing READ_SLICE_BYTES at a time, none while the
    app has a message to take; closing a client that sends over
    MAX_PINGS_AND_PONGS_PER_S pings and pongs in a second (1008), or a message in over
    MAX_MESSAGE_FRAMES frames (1009); waiting for a pong behind what the app has yet to
    take; and resetting a connection still open RESET_AFTER_CLOSE_S after closing it,
    or, once the kernel has it, 5 s after the pings would have."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.unparsed = bytearray()  # read, and kept while the app has messages
        self.parsing = False  # a piece is due, next turn
        self.second_started = 0.0  # the loop's clock
        self.pings_and_pongs = 0  # since second_started
        self.reset_timer: asyncio.TimerHandle | None = None  # see drop_unless_closed_in
        self.refused = False  # closed for what it sent: see handle_parser_exception

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        drop_once_its_window_stays_shut(transport, self.config)

    def data_received(self, data: bytes) -> None:
        if self.refused:  # read no more: see handle_parser_exception
            self.transport.pause_reading()
            return
        self.unparsed += data
        if not self.parsing:  # reading resumed by another (H11Bounded, handing over)
            self.parse_what_the_app_can_take()

    async def receive(self) -> ASGIReceiveEvent:
        message = await super().receive()  # resumes reading once the app took them all
        self.parse_on_if_resumed()
        return message

    async def send(self, message: ASGISendEvent) -> None:
        await super().send(message)  # a close resumes reading: its close is due
        self.parse_on_if_resumed()

    def parse_on_if_resumed(self) -> None:
        # uvicorn resumed reading, which reads nothing of what was read already (the
        # client's close, say): that is parsed, from the next turn.
        if self.unparsed and not self.read_paused and not self.parsing:
            self.transport.pause_reading()
            self.parse_next_turn()

    def parse_next_turn(self) -> None:
        self.parsing = True
        self.loop.call_soon(self.parse_what_the_app_can_take)  # every other one first

    def parse_what_the_app_can_take(self) -> None:
        """One piece a turn of the event loop: every other connection has its turn."""
        self.parsing = False
        if self.read_paused or self.transport.is_closing() or self.refused:
            return
        piece = bytes(self.unparsed[:READ_SLICE_BYTES])
        del self.unparsed[:READ_SLICE_BYTES]
        super().data_received(piece)  # pauses reading once it has a message
        if self.read_paused or self.transport.is_closing() or self.refused:
            return
        if self.unparsed:
            self.transport.pause_reading()  # what it read already comes first
            self.parse_next_turn()
        else:
            self.transport.resume_reading()  # does nothing if reading

    def shutdown(self) -> None:
        if self.conn.close_rcvd is not None and not self.close_sent:
            # The client's own close came first, and was answered: uvicorn's 1012 would
            # raise InvalidState, and end its shutdown of every connection after this.
            self.stop_keepalive()
            self.transport.close()
            return
        # uvicorn sends its 1012 at once, and queues its disconnect behind every message
        # the app has yet to take: the app would go on relaying those, after the 1012
        # and unanswered, as long as the shutdown waits. They are dropped. (A closing
        # transport has queued a close, which stays.)
        closing = self.close_sent or self.transport.is_closing()
        if self.handshake_complete and not closing:
            while not self.queue.empty():
                self.queue.get_nowait()
        super().shutdown()

    async def run_asgi(self) -> None:
        await super().run_asgi()  # closes the connection once the app has returned
        self.drop_unless_closed_in(RESET_AFTER_CLOSE_S)

    def keepalive_timeout(self) -> None:
        # While the app has yet to take what the client sent, its pong may wait behind
        # that, unread: the silence is the server's, and the pong is waited for again.
        if self.ping_timeout is not None and (self.read_paused or self.unparsed):
            self.pong_timer = self.loop.call_later(
                self.ping_timeout, self.keepalive_timeout
            )
            return
        super().keepalive_timeout()  # closes the connection, unanswered
        self.drop_unless_closed_in(RESET_AFTER_CLOSE_S)

    def drop_unless_closed_in(self, timeout_s: float) -> None:
        # A closing connection waits until the client has read all it is sent, and one
        # that reads nothing would be kept open, with all it holds, for as long as it is.
        # One timer, from the first close (a ping unanswered, or the handler's end), and
        # none once closed: a timer holds the connection, and all it holds, till it runs.
        # (uvicorn cancels one set as its close_timer, to close without a reset.)
        timer = self.reset_timer
        if not self.disconnected and (timer is None or timer.cancelled()):
            self.reset_timer = self.loop.call_later(timeout_s, self.drop_unless_closed)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if self.reset_timer is not None:  # closed in time
            self.reset_timer.cancel()

    def drop_unless_closed(self) -> None:
        # A reset, not a close: the kernel keeps nothing of it either.
        reset = struct.pack("ii", 1, 0)  # SO_LINGER: on, for 0 s
        with contextlib.suppress(OSError):  # closed as this ran: abort() does nothing
            sock = self.transport.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, reset)
        self.transport.abort()

    def handle_ping(self) -> None:
        if not self.refused and self.one_more_ping_or_pong_allowed():
            super().handle_ping()  # writes the pong

    def handle_pong(self, event: Frame) -> None:
        if self.one_more_ping_or_pong_allowed():
            super().handle_pong(event)

    def handle_cont(self, event: Frame) -> None:
        if len(self.frames) < MAX_MESSAGE_FRAMES:
            super().handle_cont(event)
        else:
            self.refuse(status.WS_1009_MESSAGE_TOO_BIG, TOO_MANY_FRAMES)

    def send_receive_event_to_app(self) -> None:
        if self.conn.state is not State.OPEN and self.curr_msg_data_type == "text":
            # Read with the client's close, which is answered: uvicorn's 1007 for text
            # that is not UTF-8 would raise. The text is dropped; the client closed.
            try:
                b"".join(self.frames).decode()
            except UnicodeDecodeError:
                self.frames = []
                return
        super().send_receive_event_to_app()

    def one_more_ping_or_pong_allowed(self) -> bool:
        now = self.loop.time()
        if now - self.second_started >= 1:
            self.second_started, self.pings_and_pongs = now, 0
        self.pings_and_pongs += 1
        if self.pings_and_pongs <= MAX_PINGS_AND_PONGS_PER_S:
            return True
        self.refuse(status.WS_1008_POLICY_VIOLATION, PINGING)
        return False

    def handle_parser_exception(self) -> None:
        # uvicorn sends its close (1009, say), then closes the connection at once, the
        # rest of what the client sent unread: so the kernel resets it, and drops what
        # the client has yet to receive, that close too. Here nothing more is read, and
        # the close, and the end of what is sent, wait behind the rest, for
        # RESET_AFTER_CLOSE_S at most.
        if self.refused:
            return
        self.refused = True
        assert self.conn.close_sent is not None
        code, reason = self.conn.close_sent.code, self.conn.close_sent.reason
        self.queue.put_nowait(
            {"type": "websocket.disconnect", "code": code, "reason": reason}
        )
        self.transport.write(b"".join(self.conn.data_to_send()))
        self.transport.write_eof()  # the client closes once it has read the close
        self.close_sent = True
        self.unparsed.clear()
        self.transport.pause_reading()
        self.drop_unless_closed_in(RESET_AFTER_CLOSE_S)
        self.close_timer = self.reset_timer  # uvicorn closes at once without one

    def refuse(self, code: int, reason: str) -> None:
        """As uvicorn closes a message over --ws-max-size: the app hears the close."""
        if self.close_sent:  # refused already, or closed by the app
            return
        path = as_logged(self.scope["path"])
        logger.info("Closed %s with %d: %s", path, code, reason)
        self.frames = []
        self.conn.fail(code, reason)
        self.handle_parser_exception()


# A connection closed with all it is yet to be sent in the kernel's buffer is the
# kernel's, which held 311 MB of 300 joiners' unread welcomes 5 minutes; and one open,
# whose client sent 200 GET / at once and read nothing, 4 MB for good. So the kernel
# gives up on a client whose window stays shut as long as a WebSocket's pings allow.
def drop_once_its_window_stays_shut(
    transport: asyncio.BaseTransport, config: Config
) -> None:
    user_timeout = getattr(socket, "TCP_USER_TIMEOUT", None)  # Linux's alone
    interval, timeout = config.ws_ping_interval, config.ws_ping_timeout
    if interval and timeout and user_timeout is not None:
        shut_ms = (interval + timeout + RESET_AFTER_CLOSE_S) * 1000
        sock = transport.get_extra_info("socket")
        with contextlib.suppress(OSError):  # closed already
            sock.setsockopt(socket.IPPROTO_TCP, user_timeout, int(shut_ms))


# uvicorn's h11 protocol parses all it reads at once too, and uvloop reads up to 32 times
# in a row: h11 takes about 13 µs for each chunk of a chunked body, and one client's
# body of one-byte chunks, 6 MB over 3 s, held a chat member's message 12 s; 0.04 s at
# most under this class. The README's production command runs it: `--http main:H11Bounded`.
class H11Bounded(H11Protocol):
    """uvicorn's h11, parsing READ_SLICE_BYTES a turn of the event loop, as SansIOBounded
    does, and reading nothing more until what it read is parsed. What follows a request
    that said it would close is not parsed (h11 would answer it 400); a client that shuts
    its side once its request is sent is answered, then closed."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.unparsed = bytearray()  # read, and parsed a piece a turn
        self.parsing = False  # a piece is due, next turn
        self.eof = False  # the client shut its side, after what is unparsed

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[arg-type]
        self.flow = ParsedBeforeReading(self)
        drop_once_its_window_stays_shut(transport, self.config)

    def data_received(self, data: bytes) -> None:
        self.unparsed += data
        if not self.parsing:
            self.parse_a_piece()

    def parse_a_piece(self) -> None:
        self.parsing = False
        if self.transport.get_protocol() is not self or self.transport.is_closing():
            return
        if self.flow.read_paused:  # by uvicorn: its resume_reading parses on
            return
        if self.conn.their_state is h11.MUST_CLOSE:
            self.unparsed.clear()
        piece = bytes(self.unparsed[:READ_SLICE_BYTES])
        del self.unparsed[:READ_SLICE_BYTES]
        try:
            if piece:
                super().data_received(piece)
        except Exception:  # uvicorn's 400 raises, once answered: the loop logs it
            self.transport.abort()  # as the loop does when data_received raises
            raise
        if self.transport.get_protocol() is not self:  # a WebSocket's from now on
            self.transport.resume_reading()  # as uvicorn, it drops what followed
        elif self.unparsed:
            self.transport.pause_reading()  # even if uvicorn resumed it meanwhile
            self.parse_next_turn()
        elif self.eof and not self.end_of_stream():
            self.transport.close()
        elif not self.flow.read_paused and not self.transport.is_closing():
            self.transport.resume_reading()  # does nothing if reading

    def parse_next_turn(self) -> None:
        self.parsing = True
        self.loop.call_soon(self.parse_a_piece)  # every other connection first

    def eof_received(self) -> bool:  # type: ignore[override]  # asyncio: bool | None
        self.eof = True
        return bool(self.unparsed) or self.end_of_stream()  # True: it stays open

    def end_of_stream(self) -> bool:
        """Whether the connection stays open for the answer to a request sent whole."""
        waiting = self.cycle is not None and not self.cycle.response_complete
        if waiting and self.conn.their_state in (h11.DONE, h11.MUST_CLOSE):
            self.cycle.keep_alive = False  # answered, then closed
            return True
        return False


class ParsedBeforeReading(FlowControl):
    """uvicorn's flow control, where reading on waits until H11Bounded has parsed what
    it read: uvicorn resumes reading as its app reads a body, or has answered one of
    several requests sent at once."""

    def __init__(self, protocol: H11Bounded) -> None:
        super().__init__(protocol.transport)
        self.protocol = protocol

    def resume_reading(self) -> None:
        if not self.read_paused:
            return
        self.read_paused = False
        if self.protocol.parsing:
            return  # a piece is due: it reads on once all is parsed
        if self.protocol.unparsed or self.protocol.eof:
            self.protocol.parse_next_turn()
        else:
            self._transport.resume_reading()


# --- Sending into step 3's chat from HTTP, or from this app's own code --------------------
#
# manager.broadcast() is all it takes, from an endpoint, a background job or a scheduled
# task on this app's event loop. A POST that anyone can send, of any size, is refused:
# the token is checked, then the body is read, and never more of it than a message can
# take.

# Unset or empty: POST /chat/messages refuses everyone. Set: the bearer token it takes.
ANNOUNCE_TOKEN = os.environ.get("ANNOUNCE_TOKEN", "")
# HTTPBearer strips from the token what Python counts as space, in the header's bytes
# read as latin-1: the last byte of "à" in UTF-8 is one. Such a token never matched.
TOKEN_AS_READ = ANNOUNCE_TOKEN.encode().decode("latin-1")
if TOKEN_AS_READ != TOKEN_AS_READ.strip():
    logger.error(
        "ANNOUNCE_TOKEN would never match: FastAPI's HTTPBearer strips its first or "
        "last character (a space, or the end of à, Å or ♠ in UTF-8)"
    )
    raise SystemExit(STARTUP_FAILURE)
# A body past this is refused before the app reads it (uvicorn then reads the rest, and
# drops it): six bytes for each of a message's, as if each were spelled as a JSON escape
# (`\u0001`), and 1 KiB for the rest of the object.
MAX_POST_BYTES = 6 * MAX_MESSAGE_BYTES + 1024
POST_TOO_LARGE = (
    f"Body over {MAX_POST_BYTES} bytes: "
    f"a message is {MAX_MESSAGE_BYTES // 1024} KiB at most"
)
CHAT_UNAVAILABLE = "Chat unavailable: the message was not sent; try again later"
POST_CUT_SHORT = "The connection closed before the body ended"


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
    # Starlette decodes a header's bytes as latin-1: encoded so, they are the bytes sent.
    if not secrets.compare_digest(given.encode("latin-1"), ANNOUNCE_TOKEN.encode()):
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "Missing or wrong token: send Authorization: Bearer <ANNOUNCE_TOKEN>",
            headers={"WWW-Authenticate": "Bearer"},
        )


async def read_chat_message(request: Request) -> ChatMessage:
    """The body, read once the token has passed, and never more than MAX_POST_BYTES:
    a body parameter would be read whole, whatever its size, before the token."""
    too_large = HTTPException(status.HTTP_413_CONTENT_TOO_LARGE, POST_TOO_LARGE)
    with contextlib.suppress(ValueError):
        if int(request.headers.get("content-length", "0")) > MAX_POST_BYTES:
            raise too_large
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_POST_BYTES:
                raise too_large
    except ClientDisconnect:  # gone mid-body: a 400 nobody reads, as FastAPI's own
        raise HTTPException(status.HTTP_400_BAD_REQUEST, POST_CUT_SHORT) from None
    try:
        return ChatMessage.model_validate_json(body)
    except ValidationError as invalid:
        # Without the input: FastAPI's answer would echo the body, and its encoder
        # fails on a body's bytes with a traceback (a 500, where the client erred).
        errors = invalid.errors(include_input=False)
        raise RequestValidationError(errors) from None


@app.post(
    "/chat/messages",
    status_code=status.HTTP_202_ACCEPTED,
    dependencies=[Depends(check_announce_token)],  # before the body is read
)
async def post_chat_message(
    message: Annotated[ChatMessage, Depends(read_chat_message)],
) -> dict[str, str]:
    if not await manager.broadcast(f"Server says: {message.text}"):
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, CHAT_UNAVAILABLE)
    return {"status": "sent"}
