"""``WS /ws``: several requests in flight on one socket, each tagged with the client's ``id``.

The protocol is in docs/protocol.md. A bad message gets an ``error`` message naming the field and the
socket stays open; only a transport failure closes it. Every send goes through one lock, so the
messages of concurrent requests never interleave inside a frame.
"""

from __future__ import annotations

from typing import Any

import anyio
import orjson
from pydantic import TypeAdapter, ValidationError
from starlette.websockets import WebSocket, WebSocketDisconnect

from reference_server.batcher import ModelFailed, RequestBatcher
from reference_server.endpoints.common import ServerState, invalid_from
from reference_server.errors import InvalidRequest, RequestError
from reference_server.scheduler import ContinuousScheduler, GenerationRequest, Sequence
from reference_server.schemas import REQUEST_ID, WsCancel, WsGenerate, WsMessage, WsPing, WsPredict
from reference_server.streams import end_payload

_MESSAGE = TypeAdapter[WsGenerate | WsPredict | WsCancel | WsPing](WsMessage)


class _Session:
    def __init__(self, websocket: WebSocket, state: ServerState) -> None:
        self.ws = websocket
        self.state = state
        self.lock = anyio.Lock()
        self.in_flight: dict[str, tuple[ContinuousScheduler, Sequence] | None] = {}
        self.gone = False

    async def send(self, message: dict[str, Any]) -> bool:
        """Send one message; False once the peer is gone (a failed send is a disconnect, not an error)."""
        if self.gone:
            return False
        data = orjson.dumps(message).decode()
        async with self.lock:
            try:
                await self.ws.send_text(data)
            except (WebSocketDisconnect, OSError, RuntimeError):  # RuntimeError: Starlette, after close
                self.gone = True
        return not self.gone

    async def refuse(self, request_id: str | None, exc: RequestError) -> None:
        body: dict[str, Any] = {"type": "error", "id": request_id, **exc.to_json()}
        await self.send(body)

    async def handle(self, raw: str, tg: anyio.abc.TaskGroup) -> None:
        try:
            msg = _MESSAGE.validate_json(raw)
        except ValidationError as exc:
            await self.refuse(_id_of(raw), invalid_from(exc, tagged=_has_known_type(raw)))
            return
        if isinstance(msg, WsPing):
            await self.send({"type": "pong", "data": msg.data})
        elif isinstance(msg, WsCancel):
            running = self.in_flight.get(msg.id)
            if running is not None:
                scheduler, seq = running
                scheduler.cancel(seq)
        elif msg.id in self.in_flight:
            await self.refuse(msg.id, InvalidRequest(f"id: request {msg.id!r} is already in flight", field="id"))
        elif len(self.in_flight) >= self.state.settings.ws_max_in_flight:
            limit = self.state.settings.ws_max_in_flight
            await self.refuse(msg.id, InvalidRequest(f"too many requests in flight on this socket (limit {limit})"))
        else:
            try:
                if isinstance(msg, WsGenerate):
                    scheduler = self.state.registry.scheduler(msg.model)
                    seq = scheduler.submit(GenerationRequest(msg.prompt, msg.max_tokens, msg.seed))
                    self.in_flight[msg.id] = (scheduler, seq)
                    tg.start_soon(self.pump, msg.id, scheduler, seq)
                else:
                    batcher = self.state.registry.batcher(msg.model)
                    self.in_flight[msg.id] = None
                    tg.start_soon(self.predict, msg.id, batcher, msg.input)
            except RequestError as exc:
                await self.refuse(msg.id, exc)

    async def pump(self, request_id: str, scheduler: ContinuousScheduler, seq: Sequence) -> None:
        try:
            while True:
                tokens, end = await seq.channel.receive()
                for t in tokens:
                    if not await self.send({"type": "token", "id": request_id, "seq": t.seq, "token": t.text}):
                        return
                if end is not None:
                    kind = "done" if end.ok else "error"
                    await self.send({"type": kind, "id": request_id, **end_payload(seq, end)})
                    return
        finally:
            self.in_flight.pop(request_id, None)
            if not seq.channel.closed:  # the peer is gone or we were cancelled: stop generating
                scheduler.cancel(seq)

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

    def cancel_all(self) -> None:
        for running in self.in_flight.values():
            if running is not None:
                scheduler, seq = running
                scheduler.cancel(seq)


def _has_known_type(raw: str) -> bool:
    """Whether pydantic's error locations start with the message type (a valid discriminator)."""
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return False
    return isinstance(obj, dict) and obj.get("type") in ("generate", "predict", "cancel", "ping")


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
    session = _Session(websocket, state)
    state.metrics.connection_opened("websocket")
    limit = state.settings.max_body_bytes
    try:
        async with anyio.create_task_group() as tg:
            try:
                while True:
                    message = await websocket.receive()
                    if message["type"] == "websocket.disconnect":
                        break
                    text = message.get("text")
                    if text is None:
                        await session.refuse(None, InvalidRequest("expected a text frame holding JSON, got binary"))
                    elif len(text) > limit or (4 * len(text) > limit and len(text.encode()) > limit):
                        await session.refuse(_id_of(text[:256]), InvalidRequest(f"message exceeds {limit} bytes"))
                    else:
                        await session.handle(text, tg)
            finally:
                session.cancel_all()
                tg.cancel_scope.cancel()
    except WebSocketDisconnect:
        session.cancel_all()
    finally:
        state.metrics.connection_closed("websocket")
