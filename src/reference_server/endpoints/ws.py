"""``WS /ws``: several requests in flight on one socket, each tagged with the client's ``id``.

The protocol is in docs/protocol.md. A bad or refused message gets an ``error`` (or ``rate_limited``)
message and the socket stays open; every send goes through one lock, so the messages of concurrent
requests never interleave inside a frame. The socket is closed by the server only when it cannot serve
it: overloaded at connect or a slow reader (1013, try again later), or shutdown (1001, going away).

Heartbeats: after ``heartbeat_s`` without a message to the client the server sends an application-level
``ping`` (browsers cannot send protocol pings, and their scripts can see these); protocol pings from
uvicorn (``ws_ping_interval_s``) find dead peers, whose generations are then cancelled.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import anyio
import anyio.abc
import orjson
from pydantic import TypeAdapter, ValidationError
from starlette.websockets import WebSocket, WebSocketDisconnect

from reference_server.batcher import ModelFailed, RequestBatcher
from reference_server.channels import EndReason, Token
from reference_server.endpoints.common import ServerState, client_of, invalid_from
from reference_server.endpoints.streaming import StreamGuard, open_stream, rejoin_stream
from reference_server.endpoints.ws_queued import QueuedReader, run_queued
from reference_server.errors import InvalidRequest, Overloaded, RateLimited, RequestError
from reference_server.resume import ResumeUnavailable
from reference_server.scheduler import GenerationRequest
from reference_server.schemas import (
    REQUEST_ID,
    WS_TYPES,
    WsAny,
    WsCancel,
    WsGenerate,
    WsMessage,
    WsPing,
    WsPong,
    WsResume,
)  # fmt: skip
from reference_server.streams import end_payload, slow_consumer_warning

_MESSAGE = TypeAdapter[WsAny](WsMessage)

TRY_AGAIN_LATER = 1013  # RFC 6455 §7.4.1 (IANA registry): overloaded, or this client is too slow
GOING_AWAY = 1001  # the server is shutting down
_CLOSE_WAIT_S = 1.0  # the longest a close handshake may take
_DRAIN_POLL_S = 0.01


class _Session:
    def __init__(self, websocket: WebSocket, state: ServerState, tg: anyio.abc.TaskGroup) -> None:
        self.ws = websocket
        self.state = state
        self.tg = tg
        self.lock = anyio.Lock()
        self.in_flight: dict[str, StreamGuard | None] = {}
        self.queued: dict[str, QueuedReader] = {}  # queue mode: the readers of this socket's jobs
        self.gone = False  # the peer went away, or we closed
        self.closed = False  # we sent a close
        self.slow = False  # dropped as a slow consumer
        self.send_started: float | None = None  # for the send watchdog
        self.client = client_of(websocket)  # once per socket: limits, A/B routing, and who may resume
        self.sent_at = anyio.current_time()
        self.pings = 0

    async def send(self, message: dict[str, Any]) -> bool:
        """Send one message; False once the peer is gone (a failed send is a disconnect, not an error).

        The send watchdog drops the socket as a slow consumer (1013) if one send takes longer than
        ``send_timeout_s``.
        """
        if self.gone:
            return False
        data = orjson.dumps(message).decode()
        async with self.lock:
            self.send_started = time.monotonic()
            try:
                await self.ws.send_text(data)
            except (WebSocketDisconnect, OSError, RuntimeError):  # RuntimeError: Starlette, after close
                self.gone = True
            finally:
                self.send_started = None
            self.sent_at = anyio.current_time()
        return not self.gone

    def send_stuck(self) -> None:
        """A send took longer than ``send_timeout_s``: end this socket's streams as slow consumers and
        stop the session; the endpoint then closes the socket with 1013."""
        self.slow = True
        self.state.metrics.slow_drops.child("websocket", "send_timeout").inc()
        for guard in list(self.in_flight.values()):
            if guard is not None:
                guard.drop_slow(count=False)
        self.tg.cancel_scope.cancel()

    async def close(self, code: int, reason: str) -> None:
        """Close the socket (at most once) and cancel what it still has in flight."""
        if self.closed:
            return
        self.closed = self.gone = True
        self.cancel_all()
        with (
            anyio.move_on_after(_CLOSE_WAIT_S),
            anyio.CancelScope(shield=True),
            contextlib.suppress(WebSocketDisconnect, OSError, RuntimeError),
        ):
            await self.ws.close(code, reason)

    async def refuse(self, request_id: str | None, exc: RequestError) -> None:
        if isinstance(exc, RateLimited):
            await self.send({"type": "rate_limited", "id": request_id, **exc.to_json()})
            return
        await self.send({"type": "error", "id": request_id, **exc.to_json()})

    async def handle(self, raw: str) -> None:
        try:
            msg = _MESSAGE.validate_json(raw)
        except ValidationError as exc:
            await self.refuse(_id_of(raw), invalid_from(exc, tagged=_has_known_type(raw)))
            return
        if isinstance(msg, WsPing):
            await self.send({"type": "pong", "data": msg.data})
        elif isinstance(msg, WsPong):
            pass  # any message shows the peer is alive; uvicorn's protocol pings judge dead peers
        elif isinstance(msg, WsCancel):
            if msg.id in self.queued:
                self.state.metrics.aborts.child("websocket", "cancel").inc()
                self.queued[msg.id].cancel()
                return
            guard = self.in_flight.get(msg.id)
            if guard is not None and not guard.seq.channel.closed and guard.seq.cancel_reason is None:
                self.state.metrics.aborts.child("websocket", "cancel").inc()
                guard.scheduler.cancel(guard.seq)
        elif msg.id in self.in_flight:
            await self.refuse(msg.id, InvalidRequest(f"id: request {msg.id!r} is already in flight", field="id"))
        elif len(self.in_flight) >= self.state.settings.ws_max_in_flight:
            limit = self.state.settings.ws_max_in_flight
            await self.refuse(msg.id, InvalidRequest(f"too many requests in flight on this socket (limit {limit})"))
        else:
            try:
                self._start(msg)
            except RequestError as exc:
                await self.refuse(msg.id, exc)

    def _start(self, msg: WsGenerate | WsResume | Any) -> None:
        state = self.state
        queued = state.queue is not None and isinstance(msg, WsGenerate | WsResume)
        if not (queued and state.admission.shared is not None):  # on Redis, the shared bucket decides alone
            state.admission.check_rate(self.client)
        if queued:
            if state.draining:
                raise Overloaded("the server is shutting down", reason="draining")
            self.in_flight[msg.id] = None  # the job's reader keeps the id in flight until it ends
            self.tg.start_soon(run_queued, self, msg)
        elif isinstance(msg, WsGenerate):
            scheduler = state.registry.scheduler(msg.model, self.client)
            request = GenerationRequest(msg.prompt, msg.max_tokens, msg.seed)
            # Ids are the socket's own: a clash with another socket's live id only makes this one unresumable.
            guard = open_stream(state, "websocket", self.client, scheduler, request, "ws:" + msg.id, strict_key=False)
            self.in_flight[msg.id] = guard
            self.tg.start_soon(self.pump, msg.id, guard, None)
        elif isinstance(msg, WsResume):
            self._resume(msg)
        else:
            batcher = state.registry.batcher(msg.model, self.client)
            self.in_flight[msg.id] = None
            self.tg.start_soon(self.predict, msg.id, batcher, msg.input)

    def _resume(self, msg: WsResume) -> None:
        state = self.state
        metrics = state.metrics
        try:
            entry = state.resumes.attach("ws:" + msg.id, self.client)
        except ResumeUnavailable:
            metrics.resumes.child("unavailable").inc()
            raise
        replay = entry.seq.channel.replay_after(msg.last_seq)
        if replay is None:
            state.resumes.detach(entry, complete=False)
            metrics.resumes.child("gap").inc()
            raise ResumeUnavailable(f"events of {msg.id!r} after seq {msg.last_seq} are no longer buffered")
        guard = rejoin_stream(state, "websocket", self.client, entry)
        self.in_flight[msg.id] = guard
        self.tg.start_soon(self.pump, msg.id, guard, replay)

    async def pump(self, request_id: str, guard: StreamGuard, replay: list[Token] | None) -> None:
        seq = guard.seq
        counters = guard.counters
        try:
            if replay and not await self._send_tokens(request_id, replay):
                return
            while True:
                tokens, end = await seq.channel.receive()
                if seq.channel.warning_pending:
                    seq.channel.warning_pending = False
                    counters.warnings.inc()
                    await self.send({"type": "warning", "id": request_id, **slow_consumer_warning(seq)})
                if not await self._send_tokens(request_id, tokens):
                    return
                if end is not None:
                    kind = "done" if end.ok else "error"
                    guard.complete = await self.send({"type": kind, "id": request_id, **end_payload(seq, end)})
                    if end.reason is EndReason.SLOW_CONSUMER:
                        await self.close(TRY_AGAIN_LATER, "slow consumer: the stream buffer overflowed")
                    return
        finally:
            if self.in_flight.get(request_id) is guard:
                del self.in_flight[request_id]
            guard.close()  # the peer is gone or we were cancelled: stop generating

    async def _send_tokens(self, request_id: str, tokens: list[Token]) -> bool:
        for t in tokens:
            if not await self.send({"type": "token", "id": request_id, "seq": t.seq, "token": t.text}):
                return False
        return True

    async def predict(self, request_id: str, batcher: RequestBatcher, value: Any) -> None:
        try:
            result = await batcher.predict(value)
        except RequestError as exc:
            await self.refuse(request_id, exc)
        except ModelFailed as exc:
            await self.send({"type": "error", "id": request_id, "error": "model_error", "message": str(exc)})
        else:
            await self.send({
                "type": "result", "id": request_id, "output": result.output, "model": result.model,
                "model_version": result.model_version, "batch_size": result.batch_size,
                "queue_ms": round(result.queue_s * 1000, 3),
            })  # fmt: skip
        finally:
            self.in_flight.pop(request_id, None)

    async def heartbeat(self) -> None:
        """An application-level ``ping`` whenever the socket was quiet for ``heartbeat_s``."""
        interval = self.state.settings.heartbeat_s
        counter = self.state.metrics.heartbeats.child("websocket")
        while not self.gone:
            await anyio.sleep(max(0.0, self.sent_at + interval - anyio.current_time()))
            if anyio.current_time() - self.sent_at >= interval:
                self.pings += 1
                counter.inc()
                await self.send({"type": "ping", "data": str(self.pings)})

    def cancel_all(self) -> None:
        for guard in list(self.in_flight.values()):
            if guard is not None:
                guard.close()

    async def drain(self) -> None:
        """Server stopping: once every stream of this socket has ended, close it with 1001.

        New requests are refused meanwhile (``overloaded``, ``draining``); at the end of the grace period
        the server ends what is left with an in-band ``shutdown``, which empties ``in_flight``.
        """
        while self.in_flight and not self.gone:  # noqa: ASYNC110 - pumps end on their own; a poll is enough here
            await anyio.sleep(_DRAIN_POLL_S)
        await self.close(GOING_AWAY, "server shutting down")


def _has_known_type(raw: str) -> bool:
    """Whether pydantic's error locations start with the message type (a valid discriminator)."""
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return False
    return isinstance(obj, dict) and obj.get("type") in WS_TYPES


def _id_of(raw: str) -> str | None:
    """The ``id`` of a message that failed validation, when it has a usable one."""
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    found = obj.get("id") if isinstance(obj, dict) else None
    return found if isinstance(found, str) and REQUEST_ID.fullmatch(found) else None


async def websocket_endpoint(websocket: WebSocket) -> None:
    state: ServerState = websocket.app.state.server
    await websocket.accept()
    if state.draining or not state.ready:
        reason = "server shutting down" if state.draining else "server starting"
        await websocket.close(TRY_AGAIN_LATER, reason)
        return
    state.metrics.connection_opened("websocket")
    limit = state.settings.max_body_bytes
    session: _Session | None = None
    try:
        async with anyio.create_task_group() as tg:
            session = _Session(websocket, state, tg)
            state.closers.add(session)
            state.watchdog.watch(session)
            tg.start_soon(session.heartbeat)
            try:
                while not session.gone:
                    message = await websocket.receive()
                    if message["type"] == "websocket.disconnect":
                        break
                    text = message.get("text")
                    if text is None:
                        await session.refuse(None, InvalidRequest("expected a text frame holding JSON, got binary"))
                    elif len(text) > limit or (4 * len(text) > limit and len(text.encode()) > limit):
                        await session.refuse(_id_of(text[:256]), InvalidRequest(f"message exceeds {limit} bytes"))
                    else:
                        await session.handle(text)
            finally:
                session.gone = True
                session.cancel_all()
                tg.cancel_scope.cancel()
    except WebSocketDisconnect:
        pass
    finally:
        if session is not None:
            session.cancel_all()
            state.closers.discard(session)
            state.watchdog.unwatch(session)
            if session.slow:
                await session.close(TRY_AGAIN_LATER, "slow consumer: a send took too long")
        state.metrics.connection_closed("websocket")
