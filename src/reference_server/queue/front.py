"""The front end's side of queue mode: enqueue jobs, read their results, end expired jobs, keep figures.

The front end does no inference: ``/v1/stream`` enqueues a ``Job`` and streams the chunks workers write
to the job's results stream. A background task (``run``) ends jobs past their deadline with a
``timeout`` chunk (so a client whose job no worker took is not left hanging) and refreshes the queue's
figures for ``/metrics`` and ``/stats``, which are read from Redis there and never on a scrape.

Cancellation: a client's ``cancel`` marks its job cancelled at once (``cancel``). The queue counts each
job's readers (``follow``); the last one leaving before the job's end abandons it, and the sweeper of
any front end cancels it once the grace has passed unless a reader attached again first (a resume). The
grace lives in the queue (a sorted set on Redis), so a resume on another front end, or after this one
restarted, keeps the job; a reader still open elsewhere keeps it too.

Redis being unreachable is an answer, not a crash: requests get ``503 queue_unavailable`` with the
reason, streams under way end in-band with the same error (and resume later with ``Last-Event-ID``).
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

import anyio
import anyio.abc
from redis.exceptions import RedisError

from reference_server.errors import Overloaded
from reference_server.metrics import ServerMetrics
from reference_server.queue.backend import JobQueue
from reference_server.queue.jobs import CANCEL_CAUSES, Chunk, Job
from reference_server.queue.memory import MemoryQueue, entry_key
from reference_server.queue.model_source import ModelSource
from reference_server.queue.reader import Follower, ResultReader
from reference_server.queue.redis_streams import RESULT_TTL_S, RedisStreams, connect

log = logging.getLogger("reference_server.queue")

READ_BLOCK_MS = 500  # one XREAD waits this long at most: a stream notices shutdown and heartbeats in time
_MARK_WAIT_S = 2.0  # the longest a reader that went away spends marking its job (Redis may be away too)


class QueueUnavailable(Overloaded):
    """Redis cannot be reached (or refused the command): 503, retry later."""

    def __init__(self, url: str, exc: BaseException) -> None:
        detail = str(exc) or type(exc).__name__
        super().__init__(f"the job queue at {url} is unreachable ({detail}); retry later", reason="queue_unavailable")


@dataclass
class QueueFront:
    """One front-end process's handle on the queue."""

    streams: JobQueue
    url: str
    job_ttl_s: float
    sweep_interval_s: float = 0.5
    clock: Callable[[], float] = time.time
    figures: dict[str, float] = field(default_factory=dict)  # the last refresh, for gauges
    reachable: bool = True
    stopping: bool = False  # set at the end of the shutdown grace period: streams end in-band

    reader: ResultReader | None = None  # on Redis: the one reader of every stream this front end follows
    progress_every: int | None = None  # jobs publish progress every this many tokens (queue_progress_every)
    # In-process: the worker's models, into which each job's routed version is pinned (see ModelSource.pin).
    models: ModelSource | None = None
    # Jobs no worker took yet, past which a new one is refused (max_queue): exact in process; on Redis as
    # of the last refresh (sweep_interval_s old at most), as a count there costs a round trip per request.
    max_waiting: int | None = None
    # In-process: the readers following jobs here, and how many unread results one may leave behind before
    # its job is cancelled as a slow consumer (stream_buffer). On Redis a backlog waits in Redis instead.
    readers: set[Backlogged] = field(default_factory=set)
    max_unread: int | None = None
    keep_read: int = 256  # in process: read results kept per job for a resume (resume_buffer)

    @classmethod
    def connect(cls, url: str, prefix: str, job_ttl_s: float, keep_s: float = RESULT_TTL_S) -> QueueFront:
        """On Redis at ``url``, or on an in-process queue for ``memory://`` that keeps finished results
        ``keep_s`` for a resume (see ``queue.memory``)."""
        if url.startswith("memory://"):
            return cls(MemoryQueue(prefix, keep_s=keep_s), url, job_ttl_s, models=ModelSource({}))
        streams = RedisStreams(connect(url), prefix)
        return cls(streams, url, job_ttl_s, reader=ResultReader(streams, url, READ_BLOCK_MS))

    @property
    def in_process(self) -> bool:
        return isinstance(self.streams, MemoryQueue)

    def job(self, job_id: str, model: str, prompt: str, max_tokens: int | None, seed: int | None) -> Job:
        return Job(job_id, model, prompt, max_tokens, seed, self.clock() + self.job_ttl_s, self.progress_every)

    async def submit(self, job: Job, owner: str, *, reader: bool = False) -> bool:
        """Enqueue ``job``; False when its id is taken (a job with that id runs or its results are kept).
        ``reader``: the caller will follow it with ``attached=True`` (counted as a reader at once).

        Raises:
            QueueUnavailable: Redis cannot be reached.
            Overloaded: ``max_waiting`` jobs wait already (``queue_full``).
        """
        if self.max_waiting is not None:
            waiting = self.streams.waiting if isinstance(self.streams, MemoryQueue) else self.figures.get("waiting", 0)
            if waiting >= self.max_waiting:
                raise Overloaded(f"the job queue is full ({self.max_waiting} jobs waiting)", reason="queue_full")
        try:  # the workers make the consumer group (from id 0): jobs enqueued before it are still read
            return await self.streams.enqueue(job, owner, reader) is not None
        except (RedisError, OSError) as exc:
            raise QueueUnavailable(self.url, exc) from None

    async def owner_of(self, job_id: str) -> str | None:
        """Who enqueued ``job_id`` (None: unknown, or its results expired).

        Raises:
            QueueUnavailable: Redis cannot be reached.
        """
        try:
            owner = await self.streams.owner_of(job_id)
            return owner if owner is not None and await self.streams.results_kept(job_id) else None
        except (RedisError, OSError) as exc:
            raise QueueUnavailable(self.url, exc) from None

    async def remember(self, name: str, value: str, job_id: str = "") -> None:
        """Keep ``value`` as long as a job's results (``job_ttl_s`` and then some; in process, as long as
        ``job_id``'s results are kept).

        Raises:
            QueueUnavailable: Redis cannot be reached.
        """
        try:
            await self.streams.remember(name, value, self.job_ttl_s + RESULT_TTL_S, job_id)
        except (RedisError, OSError) as exc:
            raise QueueUnavailable(self.url, exc) from None

    async def recall(self, name: str) -> str | None:
        """Raises: QueueUnavailable: Redis cannot be reached."""
        try:
            return await self.streams.recall(name)
        except (RedisError, OSError) as exc:
            raise QueueUnavailable(self.url, exc) from None

    async def read(self, job_id: str, after: str, wait_ms: int = READ_BLOCK_MS) -> list[tuple[str, Chunk]]:
        """Result chunks after stream id ``after`` (waits up to ``wait_ms``); RedisError passes up."""
        return await self.streams.read_after(job_id, after, wait_ms)

    @property
    def cancel_ttl_s(self) -> float:
        """How long a cancel mark is kept: past any job's life (a reclaim much later still sees it)."""
        return self.job_ttl_s + RESULT_TTL_S

    async def cancel(self, job_id: str, cause: str) -> bool:
        """Mark ``job_id`` cancelled; its worker ends it at the next step. False if Redis is away (the job
        then runs on to its end, as before cancellation existed)."""
        try:
            await self.streams.cancel(job_id, cause, self.cancel_ttl_s)
        except (RedisError, OSError) as exc:
            log.warning("could not cancel job %s: %s", job_id, exc)
            return False
        return True

    @contextlib.asynccontextmanager
    async def follow(
        self, job_id: str, after: str, *, grace_s: float | None = None, attached: bool = False
    ) -> AsyncIterator[Feed]:
        """A feed of ``job_id``'s result chunks after stream id ``after``: through the shared reader on
        Redis, by direct reads on the in-process queue (they cost no connection there).

        With ``grace_s`` the feed counts as one of the job's readers: attaching calls off a pending
        abandonment (a resume), and the last reader leaving before the job's final chunk abandons the
        job, which is cancelled ``grace_s`` later unless a reader attaches first (0: at the next sweep,
        for streams nobody can resume). ``attached``: ``submit(reader=True)`` counted this reader already.
        """
        if grace_s is not None and not attached:
            await self._mark(self.streams.attach(job_id, self.cancel_ttl_s), job_id)
        if self.reader is None:
            feed: _DirectFeed | _SharedFeed = _DirectFeed(self, job_id, after)
            follower = None
        else:
            follower = await self.reader.follow(job_id, after)
            feed = _SharedFeed(follower)
        try:
            yield feed
        finally:
            if self.reader is not None and follower is not None:
                self.reader.unfollow(follower)
            if grace_s is not None:
                cancel_at = None if feed.ended else self.clock() + grace_s
                with anyio.CancelScope(shield=True), anyio.move_on_after(_MARK_WAIT_S):
                    await self._mark(self.streams.detach(job_id, cancel_at), job_id)

    async def _mark(self, op: Awaitable[None], job_id: str) -> None:
        """Count a reader in or out. Redis away: the stream's reads fail and say so; the job runs on."""
        try:
            await op
        except (RedisError, OSError) as exc:
            log.warning("could not count a reader of job %s: %s", job_id, exc)

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Every ``sweep_interval_s``: end expired jobs, refresh the figures; and the shared reader.
        Outlives Redis outages."""
        async with anyio.create_task_group() as tg:
            if self.reader is not None:
                await tg.start(self.reader.run)
            task_status.started()
            await self._sweep()

    async def _sweep(self) -> None:
        while True:
            try:
                self._trim_read()
                await self._drop_slow_readers()
                now = self.clock()
                await self.streams.expire_jobs(now)
                await self.streams.cancel_abandoned(now, self.cancel_ttl_s)
                self.figures = await self.streams.figures(now)
                if not self.reachable:
                    log.warning("the job queue at %s is reachable again", self.url)
                self.reachable = True
            except (RedisError, OSError) as exc:
                if self.reachable:
                    log.warning("the job queue at %s is unreachable: %s", self.url, exc)
                self.reachable = False
            await anyio.sleep(self.sweep_interval_s)

    def _trim_read(self) -> None:
        """In process: drop what every reader of a job has read, but the last ``keep_read`` results."""
        if not isinstance(self.streams, MemoryQueue):
            return
        slowest: dict[str, str] = {}
        for reader in self.readers:
            held = slowest.get(reader.job_id)
            if held is None or entry_key(reader.last) < entry_key(held):
                slowest[reader.job_id] = reader.last
        for job_id, upto in slowest.items():
            self.streams.trim_read(job_id, upto, self.keep_read)

    async def _drop_slow_readers(self) -> None:
        """In process: cancel the job of every reader whose unread results passed ``max_unread``, as the
        direct path ends a stream whose buffer overflows: the worker stops, so memory holds no more."""
        limit = self.max_unread
        if limit is None or not isinstance(self.streams, MemoryQueue):
            return
        for reader in [r for r in self.readers if self.streams.unread(r.job_id, r.last) > limit]:
            self.readers.discard(reader)
            reader.fell_behind()
            await self.cancel(reader.job_id, "slow_consumer")

    def describe(self) -> dict[str, object]:
        """For /stats: where the queue is (credentials masked), whether it answers, its last figures."""
        url = re.sub(r"//[^@/]*@", "//***@", self.url)
        return {"url": url, "prefix": self.streams.prefix, "reachable": self.reachable, "figures": self.figures}

    async def close(self) -> None:
        with contextlib.suppress(RedisError, OSError):
            if self.reader is not None:
                await self.reader.close()
            await self.streams.close()


class Backlogged(Protocol):
    """A reader of a job's results, watched for how far behind it falls."""

    job_id: str
    last: str  # the stream id of the last result it took

    def fell_behind(self) -> None:
        """Its job is being cancelled as a slow consumer (count it)."""
        ...


class Feed(Protocol):
    ended: bool  # a final chunk was handed out (the reader saw the job's end), or the reader cancelled it

    async def next(self, wait_ms: int = READ_BLOCK_MS) -> list[tuple[str, Chunk]]:
        """The next chunks, [] after ``wait_ms`` without any.

        Raises:
            RedisError, OSError: Redis cannot be reached.
        """
        ...


@dataclass
class _DirectFeed:
    front: QueueFront
    job_id: str
    last: str
    ended: bool = False

    async def next(self, wait_ms: int = READ_BLOCK_MS) -> list[tuple[str, Chunk]]:
        got = await self.front.read(self.job_id, self.last, wait_ms)
        if got:
            self.last = got[-1][0]
            self.ended = self.ended or any(chunk.final for _, chunk in got)
        return got


@dataclass
class _SharedFeed:
    follower: Follower
    ended: bool = False

    async def next(self, wait_ms: int = READ_BLOCK_MS) -> list[tuple[str, Chunk]]:
        got = await self.follower.next(wait_ms / 1000)
        self.ended = self.ended or any(chunk.final for _, chunk in got)
        return got


def register_queue_gauges(metrics: ServerMetrics, front: QueueFront) -> None:
    """Queue figures on /metrics and /stats, from ``front``'s last refresh (never Redis on a scrape)."""

    def jobs() -> dict[tuple[str, ...], float]:
        f = front.figures
        return {(k,): f[k] for k in ("pending", "waiting") if k in f}

    def one(key: str) -> Callable[[], dict[tuple[str, ...], float]]:
        return lambda: {(): front.figures[key]} if key in front.figures else {}

    def events() -> dict[tuple[str, ...], float]:
        names = ("enqueued", "completed", "failed", "cancelled", "reclaimed", "dead_lettered", "expired")
        return {(n,): front.figures.get("count:" + n, 0.0) for n in names}

    def cancelled() -> dict[tuple[str, ...], float]:
        return {(cause,): front.figures.get("count:cancelled:" + cause, 0.0) for cause in CANCEL_CAUSES}

    def deliveries() -> dict[tuple[str, ...], float]:
        out: dict[tuple[str, ...], float] = {}
        for key, value in front.figures.items():
            if key.startswith("count:deliveries:"):
                n = key.removeprefix("count:deliveries:")
                out[("4+" if n == "4" else n,)] = value
        return out

    metrics.gauge_callback("queue_jobs", "Queued jobs: pending (delivered, not acknowledged), waiting (undelivered)",
                           ("state",), jobs)  # fmt: skip
    metrics.gauge_callback("queue_workers", "Live queue workers (a heartbeat within 10 s)", (), one("workers"))
    metrics.gauge_callback("queue_dead_letters", "Jobs in the dead-letter stream", (), one("dead_letters"))
    metrics.gauge_callback(
        "queue_reachable", "1 when the last refresh reached Redis, else 0", (), lambda: {(): float(front.reachable)}
    )
    metrics.counter_callback("queue_jobs_total", "Queue events summed over every process, by event", ("event",), events)
    metrics.counter_callback(
        "queue_jobs_cancelled_total", "Jobs their worker stopped early, summed over every process, by cause",
        ("cause",), cancelled,
    )  # fmt: skip
    metrics.counter_callback(
        "queue_job_deliveries_total", "Finished jobs by how many deliveries they took", ("deliveries",), deliveries
    )
