"""A virtual user's HTTP client: one keep-alive connection, one request at a time, reconnected on need."""

from __future__ import annotations

import asyncio
import time

from infer_bench.clients.exchange import Exchange
from infer_bench.clients.http1 import Clock, Http1Connection, connect
from infer_bench.clients.requests import RequestFactory, Target
from infer_bench.metrics.timeline import Outcome, Timeline

CONNECT_TIMEOUT_S = 10.0


class HttpClient:
    """Sends one VU's HTTP requests (plain, SSE, OpenAI) and waits for each to end."""

    def __init__(self, target: Target, factory: RequestFactory, clock: Clock = time.perf_counter_ns) -> None:
        self._target = target
        self._factory = factory
        self._clock = clock
        self._conn: Http1Connection | None = None

    async def request(
        self,
        tl: Timeline,
        prompt: str,
        *,
        timeout_s: float,
        cancel_after_tokens: int | None = None,
        read_delay_s: float = 0.0,
        reconnect: bool = False,
    ) -> None:
        """Run one request to its end; every failure ends up on ``tl`` as an outcome, never raised.

        With ``reconnect``, an SSE stream that drops mid-way is requested again on a new connection with
        ``Last-Event-ID`` (WHATWG SSE resumption), up to ``MAX_RECONNECTS`` times, on the same timeline:
        the outage shows as one long inter-token gap and the reconnects are counted.
        """
        clock = self._clock
        payload = self._factory.build(prompt)
        deadline = clock() + int(timeout_s * 1e9)
        last_event_id: str | None = None
        while True:
            exchange = await self._exchange_once(tl, payload, deadline, cancel_after_tokens, read_delay_s)
            if exchange is None:
                return
            last_event_id = exchange.last_event_id or last_event_id
            if not (reconnect and _resumable(tl, last_event_id) and tl.reconnects < MAX_RECONNECTS):
                return
            tl.reopen()
            assert last_event_id is not None
            payload = _with_header(payload, "last-event-id", last_event_id)

    async def _exchange_once(
        self, tl: Timeline, payload: bytes, deadline: int, cancel_after_tokens: int | None, read_delay_s: float
    ) -> Exchange | None:
        sent = await self._send_once(tl, payload, deadline, cancel_after_tokens, read_delay_s)
        if sent is None:
            return None
        exchange, unanswered = sent
        if unanswered and tl.outcome is Outcome.DISCONNECTED:
            # Closed as idle by the server just as the request left (its keep-alive timeout; uvicorn's is
            # 5 s, so think times near it meet this): the server never read it. Send it again, once, on a
            # new connection, as browsers and Go's HTTP client do.
            tl.resend()
            sent = await self._send_once(tl, payload, deadline, cancel_after_tokens, read_delay_s)
            return None if sent is None else sent[0]
        return exchange

    async def _send_once(
        self, tl: Timeline, payload: bytes, deadline: int, cancel_after_tokens: int | None, read_delay_s: float
    ) -> tuple[Exchange, bool] | None:
        """One attempt: the exchange, and whether its reused connection closed before any answer."""
        clock = self._clock
        left_s = max(0.0, (deadline - clock()) / 1e9)
        conn = self._conn
        if conn is None or conn.closed:
            try:
                target, timeout = self._target, min(left_s, CONNECT_TIMEOUT_S)
                conn = self._conn = await connect(target.host, target.port, timeout, clock, target.tls)
            except (OSError, TimeoutError) as exc:
                tl.finish(Outcome.CONNECT_ERROR, clock(), describe_connect_error(exc, self._target))
                return None
        exchange = self._factory.exchange(tl, conn, cancel_after_tokens=cancel_after_tokens, read_delay_s=read_delay_s)
        timer = asyncio.get_running_loop().call_later(
            left_s, lambda: exchange.stop(Outcome.TIMED_OUT, clock(), "no complete response within the timeout")
        )
        if not tl.sent_ns:
            tl.sent_ns = clock()
        conn.send(payload, exchange)
        try:
            await exchange.done
        except asyncio.CancelledError:  # the run is stopping: leave no half-read response behind
            conn.abort()
            raise
        finally:
            timer.cancel()
        if not exchange.keep_alive:
            self._conn = None
        return exchange, conn.closed_unanswered

    def close(self) -> None:
        if self._conn is not None:
            self._conn.abort()
            self._conn = None


MAX_RECONNECTS = 3


def _resumable(tl: Timeline, last_event_id: str | None) -> bool:
    return tl.outcome is Outcome.DISCONNECTED and tl.headers_ns != 0 and last_event_id is not None


def _with_header(request: bytes, name: str, value: str) -> bytes:
    """``request`` with the header ``name`` set to ``value`` (an earlier one of that name dropped)."""
    head, sep, body = request.partition(b"\r\n\r\n")
    prefix = name.lower().encode() + b":"
    lines = [line for line in head.split(b"\r\n") if not line.lower().startswith(prefix)]
    lines.append(f"{name}: {value}".encode("latin-1"))
    return b"\r\n".join(lines) + sep + body


def describe_connect_error(exc: BaseException, target: Target) -> str:
    if isinstance(exc, TimeoutError):
        return f"connect to {target.host_header} timed out"
    return f"connect to {target.host_header}: {exc.strerror or exc}" if isinstance(exc, OSError) else str(exc)
