"""One client's relay of a queued job's results: what the SSE, WebSocket and OpenAI queued routes share.

The relay follows the job's results stream and hands its chunks on in batches, as they come. It keeps
the stream's time limits as the sweeper does for direct streams (the first token, the gap between
tokens, the whole stream: ``first_token_timeout_s``, ``inactivity_timeout_s``, ``total_timeout_s``), so
a client of a queued job is never left waiting longer than a client of a direct one; past a limit the
job is cancelled and the relay ends with ``timeout`` and its kind. It ends in-band too when the server
stops or Redis goes away. Every batch it yields is non-empty except the heartbeat ticks: an empty batch
each ``heartbeat_s`` without results, on which the route sends its keep-alive.

The relay of the request that enqueued the job records what the server saw of it, as the scheduler
does for direct streams: time to first token and between tokens (both as the front end receives them:
queue transit included), tokens, the whole duration and the outcome. A resumed relay records nothing
twice: only the time limits it hit.
"""

from __future__ import annotations

import math
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field

from redis.exceptions import RedisError

from reference_server.metrics import ServerMetrics
from reference_server.queue.front import READ_BLOCK_MS, Feed, QueueFront
from reference_server.queue.jobs import Chunk
from reference_server.settings import ServerSettings

# A final chunk's error kind → the outcome label of ``sequences_total`` (the direct path's end reasons).
_OUTCOMES = {
    "model_error": "model_error", "timeout": "timeout", "cancelled": "cancelled", "shutdown": "shutdown",
    "slow_consumer": "slow_consumer",
}  # fmt: skip


@dataclass(eq=False)  # one per reader: kept in a set by identity
class Relay:
    """Args:
    enqueued_at: when this request enqueued the job (on ``clock``); None for a resume.
    clock: monotonic seconds; ``time.monotonic``, not anyio's clock: a relay reads it a few times per
        batch of tokens, and anyio's costs a lookup of the running library each time (seen in profiles).
    grace_s: counts the relay as one of the job's readers (see ``QueueFront.follow``); None: it is not.
    """

    front: QueueFront
    job_id: str
    transport: str  # sse, websocket: the label of the abort counted when the client leaves early
    settings: ServerSettings
    metrics: ServerMetrics
    enqueued_at: float | None
    after: str = "0-0"
    grace_s: float | None = None
    last: str = field(init=False)  # the stream id of the last chunk handed out: where a resume goes on
    seq: int = field(default=0, init=False)  # the number of the next token (the usage of an early end)
    _last_token_at: float | None = field(default=None, init=False)
    clock: Callable[[], float] = time.monotonic
    _ended: bool = field(default=False, init=False)
    _feed: Feed | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self.last = self.after

    async def batches(self) -> AsyncGenerator[list[tuple[str, Chunk]]]:
        """The job's chunks to its final one, which is the last item of the last batch (see the module
        docstring); the final chunk of an end the relay made itself has stream id ""."""
        started = self.clock() if self.enqueued_at is None else self.enqueued_at
        heartbeat_s = self.settings.heartbeat_s
        # Bounded: the job's deadline ends it with a timeout chunk; past that (no sweeper ran?) we stop too.
        give_up_at = self.clock() + self.front.job_ttl_s + 60
        self.front.readers.add(self)
        try:
            # A new job's reader was counted when it was enqueued (submit(reader=True)); a resume's is now.
            new = self.enqueued_at is not None
            async with self.front.follow(self.job_id, self.after, grace_s=self.grace_s, attached=new) as feed:
                self._feed = feed
                next_ping = self.clock() + heartbeat_s
                while True:
                    now = self.clock()
                    if self.front.stopping:
                        yield [("", self._end("shutdown", "the server is shutting down"))]
                        return
                    if now >= give_up_at:
                        yield [("", self._end("timeout", f"no result for job {self.job_id!r} within its time limit"))]
                        return
                    kind, deadline = self._next_limit(started)
                    if deadline <= now:
                        yield [("", await self._time_out(kind))]
                        return
                    try:
                        # Woken at least every READ_BLOCK_MS to notice a shutdown, sooner for a ping or a limit.
                        wake = min(next_ping, deadline, now + READ_BLOCK_MS / 1000)
                        got = await feed.next(max(1, math.ceil((wake - now) * 1000)))
                    except (RedisError, OSError) as exc:
                        self.metrics.rejections.child("queue_unavailable").inc()
                        self._ended = True  # not the job's end: it may run on, and a resume reads it
                        message = f"the job queue is unreachable ({exc})"
                        yield [("", Chunk(self.seq, "error", "queue_unavailable", message))]
                        return
                    if got:
                        next_ping = self.clock() + heartbeat_s
                        self._record(got)
                        yield got
                        if self._ended:
                            return
                    elif self.clock() >= next_ping - 1e-3:
                        next_ping = self.clock() + heartbeat_s
                        yield []
        finally:
            self.front.readers.discard(self)
            if not self._ended:  # the client left before the end
                self.metrics.aborts.child(self.transport, "disconnect").inc()

    def fell_behind(self) -> None:
        """The front end found this reader too far behind and cancels its job (see ``QueueFront``)."""
        self.metrics.slow_drops.child(self.transport, "buffer_full").inc()

    def stop(self, outcome: str) -> None:
        """The reader stops following on purpose (a client's ``cancel``): count the end as ``outcome``,
        not as a reader who went away."""
        if not self._ended:
            self._count_end(Chunk(self.seq, "error", outcome, ""))
        if self._feed is not None:
            self._feed.ended = True  # the job is cancelled, not abandoned: no abandonment to time

    def _next_limit(self, started: float) -> tuple[str, float]:
        """The next time limit to pass (its kind and when), ``("", inf)`` if none applies."""
        s = self.settings
        limits = [("total", started + s.total_timeout_s if s.total_timeout_s is not None else math.inf)]
        if self._last_token_at is None:
            if self.enqueued_at is not None and s.first_token_timeout_s is not None:
                limits.append(("first_token", started + s.first_token_timeout_s))
        elif s.inactivity_timeout_s is not None:
            limits.append(("inactivity", self._last_token_at + s.inactivity_timeout_s))
        return min(limits, key=lambda limit: limit[1])

    async def _time_out(self, kind: str) -> Chunk:
        """End the stream for a time limit: cancel the job (nobody will read it) and say which limit."""
        self.metrics.timeouts.child(kind).inc()
        await self.front.cancel(self.job_id, "timeout")
        return self._end("timeout", f"no {kind.replace('_', ' ')} within the time limit", kind)

    def _record(self, got: list[tuple[str, Chunk]]) -> None:
        self.last = got[-1][0]
        self.seq = got[-1][1].next_seq
        now = self.clock()
        tokens = sum(1 for _, chunk in got if chunk.kind == "token")
        if tokens:
            if self.enqueued_at is not None:
                metrics = self.metrics
                metrics.tokens.child().inc(tokens)
                if self._last_token_at is None:
                    metrics.ttft.child().observe(now - self.enqueued_at)
                else:
                    metrics.itl.child().observe((now - self._last_token_at) / tokens, tokens)
            self._last_token_at = now
        final = got[-1][1]
        if final.final:
            self._count_end(final)

    def _end(self, code: str, message: str, detail: str = "") -> Chunk:
        """A final chunk of the relay's own (the job itself may run on: a resume reads its real end)."""
        chunk = Chunk(self.seq, "error", code, message, detail=detail)
        self._count_end(chunk)
        return chunk

    def _count_end(self, chunk: Chunk) -> None:
        self._ended = True
        if self.enqueued_at is not None:
            outcome = "finished" if chunk.kind == "done" else _OUTCOMES.get(chunk.data, "error")
            self.metrics.sequences.child(outcome).inc()
            self.metrics.e2e.child("generate").observe(self.clock() - self.enqueued_at)
