"""Queue mode on Redis Streams: the front end enqueues jobs, workers in a consumer group produce results.

Keys (under one prefix, so tests and deployments never share state)::

    {p}:jobs            stream of jobs (XADD); consumer group "workers"
    {p}:results:{id}    stream of one job's result chunks, numbered; expires after the job ends
    {p}:deadlines       sorted set job id → deadline (epoch seconds), for the sweeper
    {p}:dead            dead-letter stream: jobs delivered more than ``max_deliveries`` times

A worker reads with ``XREADGROUP … COUNT batch_size BLOCK batch_timeout_ms`` (size-or-timeout batching),
re-reads its own pending entries first on start, and ``XACK``s a job only once its final chunk is written.
A reaper moves jobs idle longer than ``min_idle_ms`` from dead or stuck workers with ``XAUTOCLAIM``; a
worker that takes a job over reads the last chunk written and resumes after it (the models are
deterministic, so the continuation is exactly what the first worker would have sent).

Redis 7.0 caution: ``XADD … MAXLEN`` on the jobs stream can delete entries that are still pending, so
the jobs stream is never trimmed by length; ``trim_jobs`` trims by ``MINID`` below the oldest entry still
pending or undelivered.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from reference_server.queue.jobs import BadJob, Chunk, Job

GROUP = "workers"
RESULT_TTL_S = 300  # a finished job's results stay readable this long (resume after a front-end restart)

# One job's token source: given the job and how many tokens were already sent, yields the rest of the
# tokens with the seconds to wait before each (a simulated model's step cost), then a finish reason.
TokenSource = Callable[[Job, int], Iterator[tuple[float, str]]]


@dataclass
class QueueCounters:
    enqueued: int = 0
    completed: int = 0
    reclaimed: int = 0
    dead_lettered: int = 0
    expired: int = 0


@dataclass
class RedisStreams:
    """The keys and the operations on them that front ends and workers share."""

    client: aioredis.Redis
    prefix: str = "inferbench"
    counters: QueueCounters = field(default_factory=QueueCounters)

    @property
    def jobs(self) -> str:
        return f"{self.prefix}:jobs"

    @property
    def dead(self) -> str:
        return f"{self.prefix}:dead"

    @property
    def deadlines(self) -> str:
        return f"{self.prefix}:deadlines"

    def results(self, job_id: str) -> str:
        return f"{self.prefix}:results:{job_id}"

    async def ensure_group(self) -> None:
        try:
            await self.client.xgroup_create(self.jobs, GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    # --- front end ------------------------------------------------------------------------------------

    async def enqueue(self, job: Job) -> str:
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.xadd(self.jobs, job.fields())  # type: ignore[arg-type]  # redis-py's field type is too narrow
            pipe.zadd(self.deadlines, {job.id: job.deadline})
            entry_id, _ = await pipe.execute()
        self.counters.enqueued += 1
        return _text(entry_id)

    async def read_results(
        self, job_id: str, after: str = "0-0", block_ms: int = 1000, max_wait_s: float = 60.0
    ) -> AsyncIterator[tuple[str, Chunk]]:
        """Yield ``(stream id, chunk)`` after ``after`` until the final chunk (or ``max_wait_s`` of silence).

        The stream id is what a client resumes from (it serves as the SSE event id).
        """
        key = self.results(job_id)
        last = after
        silent_since = time.monotonic()
        while time.monotonic() - silent_since < max_wait_s:
            reply: Any = await self.client.xread({key: last}, count=256, block=block_ms)
            if not reply:
                continue
            silent_since = time.monotonic()
            for entry_id, fields in reply[0][1]:
                last = _text(entry_id)
                chunk = Chunk.from_fields(_decode(fields))
                yield last, chunk
                if chunk.final:
                    return

    # --- workers ---------------------------------------------------------------------------------------

    async def last_chunk(self, job_id: str) -> Chunk | None:
        reply: Any = await self.client.xrevrange(self.results(job_id), count=1)
        return Chunk.from_fields(_decode(reply[0][1])) if reply else None

    async def write(self, job_id: str, chunk: Chunk) -> None:
        key = self.results(job_id)
        if chunk.final:
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.xadd(key, chunk.fields())  # type: ignore[arg-type]
                pipe.expire(key, RESULT_TTL_S)
                pipe.zrem(self.deadlines, job_id)
                await pipe.execute()
        else:
            await self.client.xadd(key, chunk.fields())  # type: ignore[arg-type]

    async def trim_jobs(self) -> int:
        """Drop jobs stream entries every consumer has acknowledged; never one still pending or unread."""
        groups = await self.client.xinfo_groups(self.jobs)
        floor: str | None = None
        for group in groups:
            pending = await self.client.xpending(self.jobs, group["name"])
            candidates = [_text(group["last-delivered-id"])]
            if pending["pending"]:
                candidates.append(_text(pending["min"]))
            lowest = min(candidates, key=_id_key)
            floor = lowest if floor is None else min(floor, lowest, key=_id_key)
        if floor is None:
            return 0
        # MINID keeps entries >= floor; the last delivered entry itself is acknowledged only when not pending,
        # and keeping it costs one entry.
        trimmed: int = await self.client.xtrim(self.jobs, minid=floor, approximate=False)
        return trimmed


@dataclass
class Worker:
    """One worker process's consumer: reads batches, produces chunks, acknowledges, reclaims."""

    streams: RedisStreams
    name: str
    tokens: TokenSource
    batch_size: int = 8
    batch_timeout_ms: int = 50
    min_idle_ms: int = 2_000
    max_deliveries: int = 3
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
    clock: Callable[[], float] = time.time

    async def run(self, stop: asyncio.Event) -> None:
        """Until ``stop``: own pending jobs first (a restarted worker), then new ones, reclaiming idle ones."""
        await self.streams.ensure_group()
        for _ in range(1000):  # bounded: each round acknowledges what it read
            pending = await self._read("0")
            if not pending:
                break
            await self.process(pending)
        while not stop.is_set():
            await self.reclaim()
            await self.process(await self._read(">"))

    async def _read(self, start: str) -> list[tuple[str, dict[str, str]]]:
        block = None if start == "0" else self.batch_timeout_ms
        reply: Any = await self.streams.client.xreadgroup(
            GROUP, self.name, {self.streams.jobs: start}, count=self.batch_size, block=block
        )
        if not reply:
            return []
        return [(_text(entry_id), _decode(fields)) for entry_id, fields in reply[0][1] if fields]

    async def reclaim(self) -> int:
        """Take over jobs idle longer than ``min_idle_ms``; dead-letter those delivered too often."""
        client, jobs = self.streams.client, self.streams.jobs
        reply: Any = await client.xautoclaim(
            jobs, GROUP, self.name, self.min_idle_ms, start_id="0-0", count=self.batch_size
        )
        claimed = [(_text(entry_id), _decode(fields)) for entry_id, fields in reply[1] if fields]
        if not claimed:
            return 0
        details = await client.xpending_range(
            jobs, GROUP, min=claimed[0][0], max=claimed[-1][0], count=len(claimed) * 2
        )
        deliveries = {_text(d["message_id"]): int(d["times_delivered"]) for d in details}
        keep = []
        for entry_id, fields in claimed:
            if deliveries.get(entry_id, 1) > self.max_deliveries:
                await self._dead_letter(entry_id, fields, deliveries[entry_id])
            else:
                keep.append((entry_id, fields))
        self.streams.counters.reclaimed += len(keep)
        await self.process(keep)
        return len(keep)

    async def _dead_letter(self, entry_id: str, fields: dict[str, str], deliveries: int) -> None:
        streams = self.streams
        dead: Any = {**fields, "deliveries": str(deliveries), "entry": entry_id}
        await streams.client.xadd(streams.dead, dead)
        job_id = fields.get("id")
        if job_id:
            last = await streams.last_chunk(job_id)
            seq = 0 if last is None else last.seq + 1
            if last is None or not last.final:
                message = f"the job failed {deliveries} deliveries and was set aside"
                await streams.write(job_id, Chunk(seq, "error", message))
        await streams.client.xack(streams.jobs, GROUP, entry_id)
        streams.counters.dead_lettered += 1

    async def process(self, entries: list[tuple[str, dict[str, str]]]) -> None:
        """Run a batch: the jobs advance together, one token each per step, as a batching engine does."""
        if not entries:
            return
        running = []
        for entry_id, fields in entries:
            try:
                job = Job.from_fields(fields)
            except BadJob:
                await self.streams.client.xack(self.streams.jobs, GROUP, entry_id)  # never ours to run
                continue
            running.append(await self._resume(entry_id, job))
        while running:
            wait = max(step.wait for step in running)
            if wait > 0:
                await self.sleep(wait)
            still = []
            for state in running:
                if await state.advance(self):
                    still.append(state)
            running = still

    async def _resume(self, entry_id: str, job: Job) -> _Running:
        last = await self.streams.last_chunk(job.id)
        if last is not None and last.final:
            return _Running(entry_id, job, iter(()), last.seq + 1, done=True)  # finished before a crash: ack
        sent = 0 if last is None else last.seq + 1
        return _Running(entry_id, job, self.tokens(job, sent), sent)


@dataclass
class _Running:
    entry_id: str
    job: Job
    source: Iterator[tuple[float, str]]
    seq: int
    done: bool = False
    wait: float = 0.0
    _next: tuple[float, str] | None = None

    def __post_init__(self) -> None:
        self._pull()

    def _pull(self) -> None:
        self._next = next(self.source, None)
        self.wait = self._next[0] if self._next else 0.0

    async def advance(self, worker: Worker) -> bool:
        """Write this job's next chunk; False once it ended (and was acknowledged)."""
        streams = worker.streams
        if not self.done:
            if worker.clock() > self.job.deadline:
                await streams.write(self.job.id, Chunk(self.seq, "error", "timeout"))
                streams.counters.expired += 1
            elif self._next is None:
                await streams.write(self.job.id, Chunk(self.seq, "done", "length"))
                streams.counters.completed += 1
            else:
                await streams.write(self.job.id, Chunk(self.seq, "token", self._next[1]))
                self.seq += 1
                self._pull()
                return True
        await streams.client.xack(streams.jobs, GROUP, self.entry_id)
        return False


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _decode(fields: dict[Any, Any]) -> dict[str, str]:
    return {_text(k): _text(v) for k, v in fields.items()}


def _id_key(entry_id: str) -> tuple[int, int]:
    millis, _, seq = entry_id.partition("-")
    return int(millis), int(seq or 0)
