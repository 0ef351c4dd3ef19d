"""A keep-alive HTTP/1.1 client connection as a plain ``asyncio.Protocol``.

Measured here (MEASUREMENTS.md): on uvloop such a protocol client makes 78k requests/s on one core and
decodes 490k SSE events/s, where httpx makes a few hundred requests/s. The speed comes from doing no
per-chunk task switching: every chunk is stamped at receipt and handed synchronously to the request's
``Exchange``, which updates its timeline in place.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Callable
from typing import Protocol, cast

from infer_bench.wire import ProtocolError
from infer_bench.wire.http1 import BodyChunk, ResponseEnd, ResponseHead, ResponseParser, Upgraded

Clock = Callable[[], int]


class ExchangeSink(Protocol):
    """Receives one response's events; see ``infer_bench.clients.exchange``."""

    def on_head(self, head: ResponseHead, now: int) -> None: ...

    def on_body(self, data: bytes, now: int) -> None: ...

    def on_end(self, keep_alive: bool, now: int) -> None: ...

    def on_failure(self, protocol_error: str | None, now: int) -> None: ...


class Http1Connection(asyncio.Protocol):
    """One connection carrying one request at a time; ``closed`` once it cannot carry another."""

    def __init__(self, clock: Clock = time.perf_counter_ns) -> None:
        self._clock = clock
        self._parser = ResponseParser()
        self._sink: ExchangeSink | None = None
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.requests = 0  # sent on this connection
        self.answered = False  # a byte of the current request's response has arrived
        self._resume_handle: asyncio.TimerHandle | None = None
        self._resume_at = 0.0

    # --- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's

    def data_received(self, data: bytes) -> None:
        self.answered = True
        self._receive(data, self._clock())

    def _receive(self, data: bytes, now: int) -> None:
        """Parse ``data``, read at ``now``, and hand its events to the sink."""
        try:
            events = self._parser.feed(data)
        except ProtocolError as exc:
            self._fail(str(exc), now)
            return
        self._dispatch(events, now)

    def eof_received(self) -> bool:
        now = self._clock()
        try:
            events = self._parser.eof()
        except ProtocolError:  # the peer closed mid-response: a disconnect, not a malformed response
            sink, self._sink = self._sink, None
            self.abort()
            if sink is not None:
                sink.on_failure(None, now)
            return False
        self._dispatch(events, now)
        return False  # let the transport close

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        sink, self._sink = self._sink, None
        if sink is not None:
            sink.on_failure(None, self._clock())

    # --- used by exchanges --------------------------------------------------------------------

    def send(self, request: bytes, sink: ExchangeSink) -> None:
        assert self.transport is not None, "send before the connection was made"
        assert self._sink is None, "one request at a time"
        self._sink = sink
        self.requests += 1
        self.answered = False
        self.transport.write(request)

    @property
    def closed_unanswered(self) -> bool:
        """A reused connection closed before a byte of the response came: the server closed it as idle
        while the request was on its way (the keep-alive race), so it never read the request."""
        return self.closed and self.requests > 1 and not self.answered

    def abort(self) -> None:
        """Drop the connection now (cancel, timeout, protocol error); the sink hears nothing more."""
        self._sink = None
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def pause_reading_for(self, seconds: float) -> None:
        """Read ``seconds`` later (a slow reader): pauses add up, and the server sees TCP backpressure."""
        transport = self.transport
        if transport is None or self.closed or seconds <= 0:
            return
        loop = asyncio.get_running_loop()
        start = max(loop.time(), self._resume_at)
        self._resume_at = start + seconds
        if self._resume_handle is not None:
            self._resume_handle.cancel()
        else:
            transport.pause_reading()
        self._resume_handle = loop.call_at(self._resume_at, self._resume)

    def _resume(self) -> None:
        self._resume_handle = None
        self._resume_at = 0.0
        if self.transport is not None and not self.closed and not self.transport.is_closing():
            self.transport.resume_reading()

    def _end_pause(self) -> None:
        """A response ended: the next request on this connection starts with a reader that is ready."""
        if self._resume_handle is not None:
            self._resume_handle.cancel()
            self._resume()

    def _dispatch(self, events: list[ResponseHead | BodyChunk | ResponseEnd | Upgraded], now: int) -> None:
        for event in events:
            sink = self._sink
            if sink is None:  # data with no request waiting for it: the connection is unusable
                self.abort()
                return
            if type(event) is BodyChunk:
                sink.on_body(event.data, now)
            elif type(event) is ResponseHead:
                sink.on_head(event, now)
            elif type(event) is ResponseEnd:
                self._sink = None
                self._end_pause()
                if not event.keep_alive:
                    self.abort()
                sink.on_end(event.keep_alive, now)
            else:  # an upgrade: not a response this connection can carry on from
                self._fail("unexpected protocol upgrade", now)
                return

    def _fail(self, reason: str, now: int) -> None:
        sink, self._sink = self._sink, None
        self.abort()
        if sink is not None:
            sink.on_failure(reason, now)


async def connect(
    host: str,
    port: int,
    timeout_s: float,
    clock: Clock = time.perf_counter_ns,
    tls: ssl.SSLContext | None = None,
) -> Http1Connection:
    """Open a connection (TCP_NODELAY is asyncio's and uvloop's default for TCP), over TLS if given.

    Raises:
        OSError: refused, unreachable, or not connected within ``timeout_s`` (TimeoutError).
    """
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(timeout_s):
        _, protocol = await loop.create_connection(
            lambda: Http1Connection(clock), host, port, ssl=tls, server_hostname=host if tls else None
        )
    return protocol
