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
    ) -> None:
        """Run one request to its end; every failure ends up on ``tl`` as an outcome, never raised."""
        clock = self._clock
        payload = self._factory.build(prompt)
        exchange_cls: type[Exchange] = self._factory.exchange
        conn = self._conn
        if conn is None or conn.closed:
            try:
                conn = self._conn = await connect(
                    self._target.host, self._target.port, min(timeout_s, CONNECT_TIMEOUT_S), clock
                )
            except (OSError, TimeoutError) as exc:
                tl.finish(Outcome.CONNECT_ERROR, clock(), _describe(exc, self._target))
                return
        exchange = exchange_cls(tl, conn, cancel_after_tokens=cancel_after_tokens, read_delay_s=read_delay_s)
        timer = asyncio.get_running_loop().call_later(
            timeout_s, lambda: exchange.stop(Outcome.TIMED_OUT, clock(), f"no complete response within {timeout_s:g} s")
        )
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

    def close(self) -> None:
        if self._conn is not None:
            self._conn.abort()
            self._conn = None


def _describe(exc: BaseException, target: Target) -> str:
    if isinstance(exc, TimeoutError):
        return f"connect to {target.host_header} timed out"
    return f"connect to {target.host_header}: {exc.strerror or exc}" if isinstance(exc, OSError) else str(exc)
