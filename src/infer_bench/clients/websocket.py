"""A WebSocket client for the reference server's ``/ws`` protocol (docs/protocol.md).

The ``websockets`` library's sans-I/O ``ClientProtocol`` does the handshake, masks what we send and
handles control frames; this module drives it from a plain ``asyncio.Protocol`` (measured here: the
library's own asyncio client makes 43k messages/s, a plain protocol 99k). Once the socket is open, the
frames servers send nearly always (unmasked, unfragmented text) are read by ``read_text_frames`` here, at a
fraction of the library's cost (its parser was ~40 % of the client's time at its ceiling); the first frame
of any other kind (ping, close, binary, fragments) hands the bytes from there on to the library, which
then reads the rest of the connection. Several requests share one socket: each ``generate`` carries an id
the client chose, and every ``token``, ``done`` and ``error`` message is routed back by that id. As with
HTTP, every message is stamped at receipt and handled synchronously, and the tokens of one read are
counted at once per request.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import Any, cast

import orjson
from websockets.client import ClientProtocol
from websockets.frames import Frame, Opcode
from websockets.http11 import Response
from websockets.uri import parse_uri

from infer_bench.clients.http1 import Clock
from infer_bench.clients.requests import Target
from infer_bench.metrics.timeline import Outcome, Timeline
from infer_bench.scenario import WebSocketRequest

HANDSHAKE_TIMEOUT_S = 10.0


class _Request:
    """One generation in flight on a socket."""

    __slots__ = ("cancel_after", "done", "id", "tl")

    def __init__(self, request_id: str, tl: Timeline, cancel_after: int | None, done: asyncio.Future[None]) -> None:
        self.id = request_id
        self.tl = tl
        self.cancel_after = cancel_after
        self.done = done


class WsConnection(asyncio.Protocol):
    """One socket: the handshake, then JSON text messages routed to requests by id."""

    def __init__(self, uri: str, headers: dict[str, str], clock: Clock) -> None:
        self._clock = clock
        self._ws = ClientProtocol(parse_uri(uri), max_size=None)
        self._headers = headers
        self.transport: asyncio.Transport | None = None
        self.opened: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.requests: dict[str, _Request] = {}
        self.closed = False
        self.read_delay_s = 0.0
        self._fast = False  # frames read here, not by the library (see the module docstring)
        self._rest = b""  # an incomplete frame, on the fast path
        self._tokens: dict[str, int] = {}  # tokens of the current read, per request id

    # --- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        request = self._ws.connect()
        for name, value in self._headers.items():
            request.headers[name] = value
        self._ws.send_request(request)
        self._flush()

    def data_received(self, data: bytes) -> None:
        now = self._clock()
        handled = 0
        if self._fast:
            messages, rest, other = read_text_frames(self._rest + data if self._rest else data)
            for message in messages:
                self._on_message(message, now)
            handled = len(messages)
            self._rest = b""
            if other is None:
                self._rest = rest
                data = b""
            else:  # a frame we do not read ourselves: from here on the library reads everything
                self._fast = False
                data = other
        if data:
            self._ws.receive_data(data)
            for event in self._ws.events_received():
                if isinstance(event, Response):
                    self._on_handshake(event)
                elif isinstance(event, Frame) and event.opcode is Opcode.TEXT:
                    self._on_message(event.data, now)
                    handled += 1
            self._flush()
        self._count_tokens(now)
        if handled and self.read_delay_s > 0 and self.transport is not None:
            self.transport.pause_reading()
            asyncio.get_running_loop().call_later(self.read_delay_s * handled, self._resume)

    def eof_received(self) -> bool:
        self._ws.receive_eof()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        now = self._clock()
        if not self.opened.done():
            self.opened.set_exception(ConnectionError(str(exc) if exc else "closed during the handshake"))
        code = self._ws.close_code
        reason = f"the socket closed (code {code})" if code else "the socket closed"
        for request in list(self.requests.values()):
            self._finish(request, Outcome.DISCONNECTED, now, reason)

    # --- messages -------------------------------------------------------------------------------

    def _on_handshake(self, response: Response) -> None:
        if self._ws.handshake_exc is not None:
            if not self.opened.done():
                self.opened.set_exception(ConnectionError(f"handshake refused: {self._ws.handshake_exc}"))
            self.abort()
        elif not self.opened.done():
            self.opened.set_result(None)
            # Only at a frame boundary with nothing buffered may our reader take over from the library's.
            self._fast = not self._ws.reader.buffer

    def _on_message(self, data: bytes | bytearray | memoryview, now: int) -> None:
        try:
            message = orjson.loads(data)
            kind, request_id = message["type"], message.get("id")
        except (orjson.JSONDecodeError, KeyError, TypeError):
            self._fail_all(Outcome.PROTOCOL_ERROR, now, "a message that is not a JSON object with a type")
            return
        request = self.requests.get(request_id) if isinstance(request_id, str) else None
        if request is None:
            return  # a pong, or a late message about a request already ended (cancelled, timed out)
        if kind == "token":
            self._tokens[request_id] = self._tokens.get(request_id, 0) + 1
            return
        self._count_tokens(now)  # a request's tokens come before the message that ends it
        if kind in ("done", "result"):
            finish = Outcome.TRUNCATED if message.get("finish_reason") == "length" else Outcome.COMPLETED
            self._finish(request, finish, now, None)
        elif kind == "rate_limited" or message.get("error") == "rate_limited":
            self._finish(request, Outcome.RATE_LIMITED, now, str(message.get("message") or "rate_limited"))
        elif kind == "error":
            self._finish(request, Outcome.STREAM_ERROR, now, str(message.get("error") or message)[:300])

    def _count_tokens(self, now: int) -> None:
        """The tokens of this read, counted at once per request: one gap, then zero gaps."""
        if not self._tokens:
            return
        counts, self._tokens = self._tokens, {}
        for request_id, count in counts.items():
            request = self.requests.get(request_id)
            if request is None:
                continue
            tl, limit = request.tl, request.cancel_after
            if limit is not None and tl.tokens + count >= limit:
                tl.on_tokens(now, limit - tl.tokens)
                self.cancel(request_id, Outcome.CANCELLED, now, None)
            else:
                tl.on_tokens(now, count)

    # --- used by the client -----------------------------------------------------------------------

    def send(self, request: _Request, payload: bytes) -> None:
        self.requests[request.id] = request
        self._ws.send_text(payload)
        self._flush()

    def cancel(self, request_id: str, outcome: Outcome, now: int, error: str | None) -> None:
        """End a request from our side and tell the server to stop generating it."""
        request = self.requests.get(request_id)
        if request is None:
            return
        self._finish(request, outcome, now, error)
        if not self.closed:
            self._ws.send_text(orjson.dumps({"type": "cancel", "id": request_id}))
            self._flush()

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def close(self) -> None:
        if not self.closed and self.transport is not None:
            self._ws.send_close()
            self._flush()
            self.transport.close()
        self.closed = True

    def _finish(self, request: _Request, outcome: Outcome, now: int, error: str | None) -> None:
        request.tl.finish(outcome, now, error)
        self.requests.pop(request.id, None)
        if not request.done.done():
            request.done.set_result(None)

    def _fail_all(self, outcome: Outcome, now: int, error: str) -> None:
        for request in list(self.requests.values()):
            self._finish(request, outcome, now, error)
        self.abort()

    def _flush(self) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        for chunk in self._ws.data_to_send():
            if chunk:
                self.transport.write(chunk)
            else:  # the protocol asks to half-close: the close handshake is done
                self.transport.close()

    def _resume(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()


class WebSocketClient:
    """One VU's socket; ``in_flight`` lanes of the VU share it, each with one request at a time."""

    def __init__(self, target: Target, template: WebSocketRequest, clock: Clock = time.perf_counter_ns) -> None:
        self._target = target
        self._template = template
        self._clock = clock
        self._uri = f"{'wss' if target.tls else 'ws'}://{target.host_header}{template.path}"
        self._conn: WsConnection | None = None
        self._connecting: asyncio.Future[WsConnection] | None = None
        self._ids = itertools.count()
        extra: dict[str, Any] = dict(template.message)
        if template.max_tokens is not None:
            extra["max_tokens"] = template.max_tokens
        self._extra = extra

    async def _connection(self, timeout_s: float) -> WsConnection:
        if self._conn is not None and not self._conn.closed:
            return self._conn
        connecting = self._connecting
        if connecting is None:  # lanes sharing the socket wait for one handshake, not several
            connecting = self._connecting = asyncio.ensure_future(self._open(timeout_s))
        try:
            conn = self._conn = await asyncio.shield(connecting)
        finally:
            if connecting.done() and self._connecting is connecting:
                self._connecting = None
        return conn

    async def _open(self, timeout_s: float) -> WsConnection:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(min(timeout_s, HANDSHAKE_TIMEOUT_S)):
            _, conn = await loop.create_connection(
                lambda: WsConnection(self._uri, self._template.headers, self._clock),
                self._target.host,
                self._target.port,
                ssl=self._target.tls,
                server_hostname=self._target.server_hostname,
            )
            await conn.opened
        return conn

    async def request(
        self,
        tl: Timeline,
        prompt: str,
        *,
        timeout_s: float,
        cancel_after_tokens: int | None = None,
        read_delay_s: float = 0.0,
        reconnect: bool = False,  # SSE only: resumption on a WebSocket is the server's resume message
    ) -> None:
        """Run one generation to its end; every failure ends up on ``tl`` as an outcome, never raised."""
        clock = self._clock
        try:
            conn = await self._connection(timeout_s)
        except (OSError, TimeoutError, ConnectionError) as exc:
            reason = "timed out" if isinstance(exc, TimeoutError) else (str(exc) or type(exc).__name__)
            tl.finish(Outcome.CONNECT_ERROR, clock(), f"WebSocket connect to {self._uri}: {reason}")
            return
        conn.read_delay_s = read_delay_s
        request_id = str(next(self._ids))
        payload = orjson.dumps({**self._extra, "type": "generate", "id": request_id, "prompt": prompt})
        request = _Request(request_id, tl, cancel_after_tokens, asyncio.get_running_loop().create_future())
        timer = asyncio.get_running_loop().call_later(
            timeout_s,
            lambda: conn.cancel(request_id, Outcome.TIMED_OUT, clock(), f"no complete response within {timeout_s:g} s"),
        )
        tl.sent_ns = clock()
        conn.send(request, payload)
        try:
            await request.done
        except asyncio.CancelledError:
            conn.cancel(request_id, Outcome.CANCELLED, clock(), "interrupted")
            raise
        finally:
            timer.cancel()

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def read_text_frames(data: bytes) -> tuple[list[bytes], bytes, bytes | None]:
    """Unmasked, unfragmented text frames from the start of ``data`` (RFC 6455 §5.2).

    Returns ``(payloads, rest, other)``: the payloads of the complete text frames read, the bytes of an
    incomplete frame at the end (``rest``), or, at the first frame of any other kind (control, binary,
    fragmented, masked, reserved bits set), ``other``: the bytes from that frame on, for a full parser.
    """
    payloads: list[bytes] = []
    at, size_of_data = 0, len(data)
    while size_of_data - at >= 2:
        first, second = data[at], data[at + 1]
        if first != 0x81 or second & 0x80:  # FIN + text, no RSV bits; unmasked (servers never mask)
            return payloads, b"", data[at:]
        length = second
        start = at + 2
        if length == 126:
            if size_of_data - start < 2:
                break
            length = int.from_bytes(data[start : start + 2], "big")
            start += 2
        elif length == 127:
            if size_of_data - start < 8:
                break
            length = int.from_bytes(data[start : start + 8], "big")
            start += 8
        end = start + length
        if end > size_of_data:
            break
        payloads.append(data[start:end])
        at = end
    return payloads, data[at:], None
