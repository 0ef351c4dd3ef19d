"""The closed loop of a plain HTTP VU as callbacks: no coroutine, Future or Task per request.

A plain class (``protocol: http``, no think time, no burst, no iteration budget) sends the same bytes
again and again, each request as soon as the previous response ended. Here one ``PlainLane`` per
connection does that inside ``data_received``: it stamps the end, appends three integers to the class's
``PlainBatch`` and writes the next request at once. A response that ``SimpleResponses`` cannot be certain
of goes through the full parser (``Http1Connection``), and every request that did not end well (an HTTP
error, a disconnect, a protocol error, a timeout, a connect error) or that a connect preceded is recorded
through a ``Timeline``, as the general path records it. What the lane keeps from that path: intended start
= actual send, time to headers, E2E, the per-second series, warmup exclusion, graceful stop (the request
in flight at the deadline finishes), and a stop request or Ctrl-C cancels the VU, counted as interrupted.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import cast

from infer_bench.clients.exchange import http_error_text, keep_error_body
from infer_bench.clients.http1 import Clock, Http1Connection
from infer_bench.clients.requests import Target
from infer_bench.clients.vu import CONNECT_TIMEOUT_S, describe_connect_error
from infer_bench.metrics.recorder import PLAIN_FOLD_EVERY, PlainBatch, Recorder, TagKey
from infer_bench.metrics.timeline import Outcome
from infer_bench.wire.http1 import ResponseHead, SimpleResponses

NS = 1_000_000_000


@dataclass(frozen=True)
class LanePlan:
    """What every lane of one plain class shares."""

    target: Target
    request: bytes
    recorder: Recorder
    key: TagKey
    batch: PlainBatch
    measure_from_ns: int  # requests intended earlier are warmup
    deadline_ns: int  # no request is sent from then on
    timeout_s: float
    clock: Clock = time.perf_counter_ns

    def record(
        self, intended: int, sent: int, headers: int, status: int, outcome: Outcome, end: int, error: str | None
    ) -> None:
        """One request through a ``Timeline``, as the general path records it."""
        recorder = self.recorder
        measured = intended >= self.measure_from_ns
        tl = recorder.timeline(self.key, intended, measured)
        tl.sent_ns, tl.headers_ns, tl.status = sent, headers, status
        tl.finish(outcome, end, error)
        recorder.started(intended, intended)
        recorder.finished(self.key, tl, measured)


class PlainLane(Http1Connection):
    """One connection's closed loop; ``over`` resolves once it sends no more (closed, failed or past the
    deadline)."""

    def __init__(self, plan: LanePlan) -> None:
        super().__init__(plan.clock)
        self._plan = plan
        self._request = plan.request
        self._deadline = plan.deadline_ns
        self._timeout_ns = int(plan.timeout_s * NS)
        batch = plan.batch
        self._fold = batch.fold
        self._ends = batch.ends
        self._add_sent, self._add_end, self._add_status = batch.sent.append, batch.ends.append, batch.statuses.append
        self._match = SimpleResponses().match
        self._fast = True  # the full parser is between responses: the fast path may read the next one
        self._write = self._no_write
        self._intended = 0  # the start a connect preceded (the first request), else 0: intended = sent
        self._sent = 0
        self._headers_ns = 0  # the full parser's path: the head's stamp, status and the error body
        self._status = 0
        self._error_body = b""
        self._ended = False  # the full parser ended the response in this read
        self._timer: asyncio.TimerHandle | None = None
        self.over: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._write = cast(asyncio.Transport, transport).write

    @staticmethod
    def _no_write(data: bytes) -> None:
        raise RuntimeError("a lane sends only once connected")

    @property
    def in_flight(self) -> bool:
        return self._sink is self

    def start(self, intended: int) -> None:
        """Send the first request, intended at ``intended`` (before the connect), and arm the timeout."""
        self._intended = intended
        if self.closed:  # the peer hung up between the connect and this first request
            self._sent = self._clock()
            self._finish(Outcome.DISCONNECTED, self._sent, "the connection closed before the response ended")
            return
        self._send()
        left_s = (intended + self._timeout_ns - self._clock()) / NS
        self._timer = asyncio.get_running_loop().call_later(max(left_s, 0.0), self._check_timeout)

    # --- the hot path -----------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        now = self._clock()
        if self._sink is self and self._fast and (status := self._match(data)):
            self._sink = None
            if self._intended:
                self._plan.record(self._intended, self._sent, now, status, Outcome.COMPLETED, now, None)
            else:
                self._add_sent(self._sent)
                self._add_end(now)
                self._add_status(status)
                if len(self._ends) >= PLAIN_FOLD_EVERY:
                    self._fold()
            self._next(now)
            return
        self._receive(data, now)
        self._fast = self._parser.idle
        if self._ended:
            self._ended = False
            if self.closed:
                return
            if self._fast:
                self._next(now)
            else:  # bytes beyond the response's end, with no request to be theirs
                self.abort()

    def _next(self, now: int) -> None:
        if now >= self._deadline:
            self._over()
            return
        self._intended = 0
        self._send()

    def _send(self) -> None:
        self._sent = self._clock()
        self._sink = self
        self._write(self._request)

    # --- the full parser's events (ExchangeSink) ---------------------------------------------------

    def on_head(self, head: ResponseHead, now: int) -> None:
        self._headers_ns, self._status, self._error_body = now, head.status, b""

    def on_body(self, data: bytes, now: int) -> None:
        if self._status >= 400:
            self._error_body = keep_error_body(self._error_body, data)

    def on_end(self, keep_alive: bool, now: int) -> None:
        status = self._status
        if status < 400:
            self._finish(Outcome.COMPLETED, now, None)
        else:
            outcome = Outcome.RATE_LIMITED if status == 429 else Outcome.HTTP_ERROR
            self._finish(outcome, now, http_error_text(status, self._error_body))
        self._ended = True

    def on_failure(self, protocol_error: str | None, now: int) -> None:
        if protocol_error is not None:
            self._finish(Outcome.PROTOCOL_ERROR, now, protocol_error)
        else:
            self._finish(Outcome.DISCONNECTED, now, "the connection closed before the response ended")
        self._over()

    def _finish(self, outcome: Outcome, now: int, error: str | None) -> None:
        plan = self._plan
        plan.record(self._intended or self._sent, self._sent, self._headers_ns, self._status, outcome, now, error)
        self._headers_ns = self._status = 0

    # --- the end of the lane ------------------------------------------------------------------------

    def _check_timeout(self) -> None:
        """The timer sleeps a whole timeout and is re-armed for the request then in flight, not per request."""
        self._timer = None
        if not self.in_flight or self.closed:
            return
        now = self._clock()
        left_ns = (self._intended or self._sent) + self._timeout_ns - now
        if left_ns > 0:
            self._timer = asyncio.get_running_loop().call_later(left_ns / NS, self._check_timeout)
            return
        self._sink = None
        self._finish(Outcome.TIMED_OUT, now, "no complete response within the timeout")
        self.abort()

    def abort(self) -> None:
        super().abort()
        self._over()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self._over()

    def _over(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self.over.done():
            self.over.set_result(None)


async def run_plain_vu(plan: LanePlan) -> None:
    """One VU's closed loop until the deadline: a lane per connection, reconnecting after each that ends.

    A connect error is recorded and the next connect follows at once, as the general path does. Raises
    CancelledError when the run stops; the caller counts the VU's request as interrupted.
    """
    clock, target, loop = plan.clock, plan.target, asyncio.get_running_loop()
    lane: PlainLane | None = None
    try:
        while clock() < plan.deadline_ns:
            intended = clock()
            try:
                async with asyncio.timeout(min(plan.timeout_s, CONNECT_TIMEOUT_S)):
                    _, protocol = await loop.create_connection(
                        lambda: PlainLane(plan), target.host, target.port, ssl=target.tls,
                        server_hostname=target.server_hostname,
                    )  # fmt: skip
            except (OSError, TimeoutError) as exc:
                error = describe_connect_error(exc, target)
                plan.record(intended, 0, 0, 0, Outcome.CONNECT_ERROR, clock(), error)
                continue
            lane = protocol
            lane.start(intended)
            await lane.over
            lane.abort()
    finally:
        if lane is not None:
            lane.abort()
