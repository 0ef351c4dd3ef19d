"""One request's life on a connection: response events in, timeline stamps and an outcome out.

Everything here runs synchronously inside ``data_received`` with the chunk's receipt stamp, so a token
is timed when its bytes arrived, not when a task got round to it. Failures are data: every way a request
can end is an ``Outcome`` on its timeline; nothing here raises for what a peer did.
"""

from __future__ import annotations

import asyncio

import orjson

from infer_bench.clients.http1 import Http1Connection
from infer_bench.metrics.timeline import Outcome, Timeline
from infer_bench.wire import ProtocolError
from infer_bench.wire.http1 import ResponseHead
from infer_bench.wire.openai import parse_openai_data
from infer_bench.wire.sse import SSEDecoder, SSEEvent

ERROR_BODY_LIMIT = 2048


class Exchange:
    """Base: status handling, cancellation, timeout and completion; subclasses read the body."""

    def __init__(
        self,
        timeline: Timeline,
        conn: Http1Connection,
        *,
        cancel_after_tokens: int | None = None,
        read_delay_s: float = 0.0,
    ) -> None:
        self.tl = timeline
        self.conn = conn
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.cancel_after_tokens = cancel_after_tokens
        self.read_delay_s = read_delay_s
        self._error_body = b""
        self._terminal: Outcome | None = None  # how the body said the stream ended
        self._terminal_error: str | None = None
        self.keep_alive = False

    # --- events from the connection -------------------------------------------------------------

    def on_head(self, head: ResponseHead, now: int) -> None:
        self.tl.headers_ns = now
        self.tl.status = head.status

    def on_body(self, data: bytes, now: int) -> None:
        if self.tl.status >= 400:
            self._error_body = keep_error_body(self._error_body, data)
            return
        self.read(data, now)

    def on_end(self, keep_alive: bool, now: int) -> None:
        self.keep_alive = keep_alive
        status = self.tl.status
        if status == 429:
            self.tl.finish(Outcome.RATE_LIMITED, now, self._error_text())
        elif status >= 400:
            self.tl.finish(Outcome.HTTP_ERROR, now, self._error_text())
        else:
            self.end_of_body(now)
        self._resolve()

    def on_failure(self, protocol_error: str | None, now: int) -> None:
        if protocol_error is not None:
            self.tl.finish(Outcome.PROTOCOL_ERROR, now, protocol_error)
        else:
            self.tl.finish(Outcome.DISCONNECTED, now, "the connection closed before the response ended")
        self._resolve()

    # --- for subclasses ---------------------------------------------------------------------------

    def read(self, data: bytes, now: int) -> None:
        """A chunk of a successful response's body."""

    def end_of_body(self, now: int) -> None:
        """The body ended; finish the timeline (the base: a plain response is complete)."""
        self.tl.finish(self._terminal or Outcome.COMPLETED, now, self._terminal_error)

    def tokens(self, now: int, count: int = 1) -> None:
        """``count`` tokens arrived in one read; a cancelling client reads no further than its limit."""
        limit = self.cancel_after_tokens
        if limit is not None and self.tl.tokens + count >= limit:
            self.tl.on_tokens(now, limit - self.tl.tokens)
            self.stop(Outcome.CANCELLED, now, None)
        else:
            self.tl.on_tokens(now, count)

    def stop(self, outcome: Outcome, now: int, error: str | None) -> None:
        """End the request from our side (cancel, timeout, protocol error): drop the connection."""
        self.tl.finish(outcome, now, error)
        self.conn.abort()
        self._resolve()

    def mark_end(self, outcome: Outcome, error: str | None = None) -> None:
        """The stream said how it ends; the outcome applies when the body ends."""
        if self._terminal is None:
            self._terminal, self._terminal_error = outcome, error

    @property
    def last_event_id(self) -> str | None:
        """The SSE last event ID seen (None for non-SSE responses): where a resumed stream goes on."""
        return None

    def _error_text(self) -> str:
        return http_error_text(self.tl.status, self._error_body)

    def _resolve(self) -> None:
        if not self.done.done():
            self.done.set_result(None)


class HttpExchange(Exchange):
    """A plain request/response: the response body is read and discarded."""


class SSEExchange(Exchange):
    """A server-sent event stream: the reference server's ``/v1/stream`` or any SSE endpoint.

    Token events are ``event: token`` (or unnamed ``message`` events); ``done`` ends the stream well,
    ``error`` ends it with the server's in-band error.
    """

    def __init__(
        self, timeline: Timeline, conn: Http1Connection, *, cancel_after_tokens: int | None = None,
        read_delay_s: float = 0.0,
    ) -> None:  # fmt: skip
        super().__init__(timeline, conn, cancel_after_tokens=cancel_after_tokens, read_delay_s=read_delay_s)
        self.decoder = SSEDecoder()

    @property
    def last_event_id(self) -> str | None:
        return self.decoder.last_event_id

    def read(self, data: bytes, now: int) -> None:
        try:
            counted, events = self.decode(data)
        except ProtocolError as exc:
            self.stop(Outcome.PROTOCOL_ERROR, now, str(exc))
            return
        if not counted and not events:
            return
        # All tokens of one read arrived together: they are counted in one go (one gap, then zero gaps).
        tokens = counted + (self.take(events, now) if events else 0)
        if tokens and self.tl.outcome is None:
            self.tokens(now, tokens)
        if self.read_delay_s > 0 and self.tl.outcome is None:
            self.conn.pause_reading_for(self.read_delay_s * (counted + len(events)))

    def decode(self, data: bytes) -> tuple[int, list[SSEEvent]]:
        """Token events counted (never built: they carry nothing we read), and the other events."""
        return self.decoder.feed_tally(data, "token")

    def take(self, events: list[SSEEvent], now: int) -> int:
        """Act on one read's events; returns how many tokens they carried."""
        tokens = 0
        for kind, data, _ in events:
            if kind == "token" or kind == "message":
                tokens += 1
            elif kind == "done":
                finish = _field(data, "finish_reason")
                self.mark_end(Outcome.TRUNCATED if finish == "length" else Outcome.COMPLETED)
            elif kind == "error":
                self.mark_end(Outcome.STREAM_ERROR, _field(data, "error") or data[:300])
        return tokens

    def end_of_body(self, now: int) -> None:
        if self._terminal is None:
            self.tl.finish(Outcome.DISCONNECTED, now, "the stream ended without its final event")
        else:
            super().end_of_body(now)


class OpenAIExchange(SSEExchange):
    """An OpenAI-compatible stream: ``data:`` chunks, role-only deltas skipped, ``[DONE]`` last."""

    def decode(self, data: bytes) -> tuple[int, list[SSEEvent]]:
        return 0, self.decoder.feed(data)  # every chunk is parsed: whether it carries text is in its JSON

    def take(self, events: list[SSEEvent], now: int) -> int:
        tokens = 0
        for event in events:
            try:
                delta = parse_openai_data(event.data)
            except ProtocolError as exc:
                if tokens:  # they arrived before the bad chunk
                    self.tokens(now, tokens)
                self.stop(Outcome.PROTOCOL_ERROR, now, str(exc))
                return 0
            if delta.error is not None:
                self.mark_end(Outcome.STREAM_ERROR, delta.error)
            elif delta.done:
                self.mark_end(Outcome.COMPLETED)
            else:
                if delta.text:
                    tokens += 1
                if delta.finish_reason == "length":
                    self.mark_end(Outcome.TRUNCATED)
                elif delta.finish_reason is not None:
                    self.mark_end(Outcome.COMPLETED)
        return tokens


def keep_error_body(kept: bytes, data: bytes) -> bytes:
    """``kept`` with as much of ``data`` as fits under the limit of an error body we keep."""
    return kept + data[: ERROR_BODY_LIMIT - len(kept)] if len(kept) < ERROR_BODY_LIMIT else kept


def http_error_text(status: int, body: bytes) -> str:
    """How a failed response reads in the error sample: its status and the start of its body."""
    text = body.decode("utf-8", "replace").strip()
    return f"HTTP {status}: {text[:300]}" if text else f"HTTP {status}"


def _field(data: str, name: str) -> str | None:
    try:
        value = orjson.loads(data).get(name)
    except (orjson.JSONDecodeError, AttributeError):
        return None
    return value if isinstance(value, str) else None
