"""Queue mode on Redis Streams: the front end enqueues jobs, workers in a consumer group produce results.

Keys (under one prefix, so tests and deployments never share state)::

    {p}:jobs            stream of jobs (XADD); consumer group "workers"
    {p}:results:{id}    stream of one job's result chunks, numbered; expires after the job ends
    {p}:deadlines       sorted set job id → deadline (epoch seconds), for the sweeper
    {p}:dead            dead-letter stream: jobs delivered more than ``max_deliveries`` times
    {p}:owner:{id}      the client identity that enqueued a job (resume is theirs only); also claims the id
    {p}:workers         sorted set consumer name → last heartbeat (epoch seconds): the live worker count
    {p}:counters        hash of counters every process adds to (reclaimed, dead-lettered, deliveries, ...)
    {p}:alias:{name}    a WebSocket request id's job (per client), for a resume from another socket
    {p}:cancel:{id}     a cancelled job's cause (cancel, abandoned); workers MGET these once a step
    {p}:readers:{id}    how many readers (streams on any front end) follow a job now
    {p}:abandoned       sorted set job id → when to cancel it: its last reader left; a reader attaching removes it

Workers (``queue.worker``) read in the consumer group, write numbered result chunks and acknowledge a job
once its final chunk is written; the front end (``queue.front``) enqueues and reads result streams.

Redis 7.0 caution: ``XADD … MAXLEN`` on the jobs stream can delete entries that are still pending, so
the jobs stream is never trimmed by length; ``trim_jobs`` trims by ``MINID`` below the oldest entry still
pending or undelivered.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from reference_server.queue.jobs import Chunk, Job, StepWrites, dead_letter_notice

GROUP = "workers"
RESULT_TTL_S = 300  # a finished job's results stay readable this long (resume after a front-end restart)
HEARTBEAT_TTL_S = 10.0  # a worker silent this long no longer counts as live

# What "Redis is unreachable" looks like from redis-py: the caller answers 503 / retries, never a 500.
UNREACHABLE = (RedisConnectionError, RedisTimeoutError, OSError)


def connect(url: str) -> aioredis.Redis:
    """A client that fails fast when Redis is down (one retry: a pooled connection may be stale after a
    Redis restart) and whose socket timeout outlasts every ``BLOCK`` we send."""
    return aioredis.Redis.from_url(
        url, socket_connect_timeout=1.0, socket_timeout=10.0, retry=Retry(NoBackoff(), 1), health_check_interval=0
    )


@dataclass
class QueueCounters:
    """This process's counts; ``RedisStreams.count`` also adds them to the shared ``{p}:counters`` hash."""

    enqueued: int = 0
    completed: int = 0
    failed: int = 0  # ended by the model's error (model_error, unknown_model)
    cancelled: int = 0  # stopped early: its client cancelled or abandoned it
    reclaimed: int = 0
    dead_lettered: int = 0
    expired: int = 0


@dataclass
class RedisStreams:
    """The keys and the operations on them that front ends and workers share."""

    client: aioredis.Redis
    prefix: str = "inferbench"
    counters: QueueCounters = field(default_factory=QueueCounters)
    _detach_script: Any = field(default=None, repr=False)

    @property
    def jobs(self) -> str:
        return f"{self.prefix}:jobs"

    @property
    def dead(self) -> str:
        return f"{self.prefix}:dead"

    @property
    def deadlines(self) -> str:
        return f"{self.prefix}:deadlines"

    @property
    def workers(self) -> str:
        return f"{self.prefix}:workers"

    @property
    def shared_counters(self) -> str:
        return f"{self.prefix}:counters"

    def results(self, job_id: str) -> str:
        return f"{self.prefix}:results:{job_id}"

    def owner(self, job_id: str) -> str:
        return f"{self.prefix}:owner:{job_id}"

    def cancel_key(self, job_id: str) -> str:
        return f"{self.prefix}:cancel:{job_id}"

    def readers(self, job_id: str) -> str:
        return f"{self.prefix}:readers:{job_id}"

    @property
    def abandoned(self) -> str:
        return f"{self.prefix}:abandoned"

    async def count(self, name: str, n: int = 1) -> None:
        """Add ``n`` to counter ``name`` here and in the shared hash (every front end shows the sum)."""
        if hasattr(self.counters, name):
            setattr(self.counters, name, getattr(self.counters, name) + n)
        await self.client.hincrby(self.shared_counters, name, n)

    async def ensure_group(self) -> None:
        try:
            await self.client.xgroup_create(self.jobs, GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    # --- front end ------------------------------------------------------------------------------------

    async def enqueue(self, job: Job, owner: str = "", reader: bool = False) -> str | None:
        """Add ``job``; None when a job with its id exists (still running or its results still kept).

        ``reader``: the caller streams the results, and counts as the job's first reader here (the same
        round trip, instead of an ``attach`` of its own)."""
        keep_s = max(1, int(job.deadline - time.time()) + RESULT_TTL_S)
        if not await self.client.set(self.owner(job.id), owner or "-", nx=True, ex=keep_s):
            return None
        try:
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.xadd(self.jobs, job.fields())  # type: ignore[arg-type]  # redis-py's field type is too narrow
                pipe.zadd(self.deadlines, {job.id: job.deadline})
                pipe.hincrby(self.shared_counters, "enqueued", 1)
                if reader:
                    pipe.incr(self.readers(job.id))
                    pipe.expire(self.readers(job.id), keep_s)
                entry_id, *_ = await pipe.execute()
        except BaseException:
            with contextlib.suppress(*UNREACHABLE):  # free the id for a retry, if Redis still answers
                await self.client.delete(self.owner(job.id))
            raise
        self.counters.enqueued += 1
        return _text(entry_id)

    async def remember(self, name: str, value: str, ttl_s: float, job_id: str = "") -> None:
        """Keep a small value under ``name`` for ``ttl_s`` (a WebSocket request id's job, for a resume).
        ``job_id``: the job it is about (the in-process queue forgets it with the job's results)."""
        await self.client.set(f"{self.prefix}:alias:{name}", value, ex=max(1, int(ttl_s)))

    async def recall(self, name: str) -> str | None:
        value = await self.client.get(f"{self.prefix}:alias:{name}")
        return None if value is None else _text(value)

    async def results_kept(self, job_id: str) -> bool:
        """Whether a resume can still read the job: it is running, or its results have not expired."""
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.exists(self.results(job_id))
            pipe.zscore(self.deadlines, job_id)
            exists, deadline = await pipe.execute()
        return bool(exists) or deadline is not None

    async def owner_of(self, job_id: str) -> str | None:
        value = await self.client.get(self.owner(job_id))
        return None if value is None else _text(value)

    async def read_after(self, job_id: str, after: str, block_ms: int) -> list[tuple[str, Chunk]]:
        """The chunks after stream id ``after``, waiting up to ``block_ms`` for the first; [] if none came."""
        reply: Any = await self.client.xread({self.results(job_id): after}, count=256, block=block_ms)
        if not reply:
            return []
        return [(_text(entry_id), Chunk.from_fields(_decode(f))) for entry_id, f in reply[0][1]]

    async def cancel(self, job_id: str, cause: str, ttl_s: float) -> None:
        """Mark ``job_id`` cancelled (the first cause stays); its worker stops at its next step."""
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.set(self.cancel_key(job_id), cause, nx=True, ex=max(1, int(ttl_s)))
            pipe.zrem(self.abandoned, job_id)
            await pipe.execute()

    async def attach(self, job_id: str, ttl_s: float) -> None:
        """A reader follows ``job_id``: count it, and call off an abandonment (a resume within the grace)."""
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.incr(self.readers(job_id))
            pipe.expire(self.readers(job_id), max(1, int(ttl_s)))
            pipe.zrem(self.abandoned, job_id)
            await pipe.execute()

    async def detach(self, job_id: str, cancel_at: float | None) -> None:
        """A reader stops following; the last one, leaving before the job's end (``cancel_at`` given),
        abandons it. One script, so a reader attaching meanwhile on another front end is never missed."""
        keys: list[Any] = [self.readers(job_id), self.abandoned]
        args: list[Any] = ["" if cancel_at is None else repr(cancel_at), job_id]
        await self._detach(keys=keys, args=args)

    @property
    def _detach(self) -> Any:
        if self._detach_script is None:
            self._detach_script = self.client.register_script(_DETACH)
        return self._detach_script

    async def cancel_abandoned(self, now: float, ttl_s: float, limit: int = 100) -> int:
        """Cancel jobs abandoned past their grace; any front end's sweeper may run it (ZREM decides who)."""
        due = await self.client.zrangebyscore(self.abandoned, "-inf", now, start=0, num=limit)
        cancelled = 0
        for raw in due:
            job_id = _text(raw)
            if await self.client.zrem(self.abandoned, job_id):  # else a resume (or another sweeper) took it
                await self.cancel(job_id, "abandoned", ttl_s)
                cancelled += 1
        return cancelled

    async def read_results(
        self, job_id: str, after: str = "0-0", block_ms: int = 1000, max_wait_s: float = 60.0
    ) -> AsyncIterator[tuple[str, Chunk]]:
        """Yield ``(stream id, chunk)`` after ``after`` until the final chunk (or ``max_wait_s`` of silence).

        The stream id is what a client resumes from (it serves as the SSE event id).
        """
        last = after
        silent_since = time.monotonic()
        while time.monotonic() - silent_since < max_wait_s:
            got = await self.read_after(job_id, last, block_ms)
            if not got:
                continue
            silent_since = time.monotonic()
            for last, chunk in got:
                yield last, chunk
                if chunk.final:
                    return

    # --- workers ---------------------------------------------------------------------------------------

    async def last_chunk(self, job_id: str) -> Chunk | None:
        reply: Any = await self.client.xrevrange(self.results(job_id), count=1)
        return Chunk.from_fields(_decode(reply[0][1])) if reply else None

    async def resume_point(self, job_id: str) -> tuple[Chunk | None, str | None]:
        """The job's last chunk and its cancel cause (None: not cancelled), in one round trip."""
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.xrevrange(self.results(job_id), count=1)
            pipe.get(self.cancel_key(job_id))
            last, cause = await pipe.execute()
        return (Chunk.from_fields(_decode(last[0][1])) if last else None), (None if cause is None else _text(cause))

    async def write(self, job_id: str, chunk: Chunk) -> None:
        async with self.client.pipeline(transaction=True) as pipe:
            self.write_into(pipe, job_id, chunk)
            await pipe.execute()

    async def read_group(
        self, consumer: str, start: str, count: int, block_ms: int | None
    ) -> list[tuple[str, dict[str, str]]]:
        """``XREADGROUP``: new entries (``start`` ``>``) or the consumer's own pending ones (``0``)."""
        reply: Any = await self.client.xreadgroup(GROUP, consumer, {self.jobs: start}, count=count, block=block_ms)
        if not reply:
            return []
        return [(_text(entry_id), _decode(fields)) for entry_id, fields in reply[0][1] if fields]

    async def autoclaim(self, consumer: str, min_idle_ms: int, count: int) -> list[tuple[str, dict[str, str], int]]:
        """Entries idle at least ``min_idle_ms``, now ``consumer``'s, each with its delivery count."""
        reply: Any = await self.client.xautoclaim(self.jobs, GROUP, consumer, min_idle_ms, start_id="0-0", count=count)
        claimed = [(_text(entry_id), _decode(fields)) for entry_id, fields in reply[1] if fields]
        if not claimed:
            return []
        details = await self.client.xpending_range(
            self.jobs, GROUP, min=claimed[0][0], max=claimed[-1][0], count=len(claimed) * 2
        )
        deliveries = {_text(d["message_id"]): int(d["times_delivered"]) for d in details}
        return [(entry_id, fields, deliveries.get(entry_id, 1)) for entry_id, fields in claimed]

    async def refresh_claims(self, consumer: str, groups: list[tuple[int, list[str]]]) -> set[str]:
        """``XCLAIM … JUSTID`` per (min idle ms, entry ids) group: the ids still ours, their idle time reset."""
        async with self.client.pipeline(transaction=False) as pipe:
            for min_idle, ids in groups:
                entry_ids: list[Any] = list(ids)
                pipe.xclaim(self.jobs, GROUP, consumer, min_idle, entry_ids, justid=True)
            replies = await pipe.execute()
        return {_text(entry_id) for reply in replies for entry_id in reply}

    async def ack(self, entry_id: str) -> None:
        await self.client.xack(self.jobs, GROUP, entry_id)

    async def dead_letter(self, entry_id: str, fields: dict[str, str], deliveries: int) -> None:
        """Set a job aside in the dead-letter stream, tell its client, acknowledge it."""
        dead: Any = {**fields, "deliveries": str(deliveries), "entry": entry_id}
        await self.client.xadd(self.dead, dead)
        job_id = fields.get("id")
        if job_id and (notice := dead_letter_notice(await self.last_chunk(job_id), deliveries)) is not None:
            await self.write(job_id, notice)
        await self.ack(entry_id)
        await self.count("dead_lettered")

    async def commit_step(self, step: StepWrites) -> dict[str, str]:
        """A worker step's writes in one round trip (a pipeline runs in order: chunks before acks), and
        which of ``step.watch`` were cancelled (job id → cause): one MGET more in the same round trip."""
        async with self.client.pipeline(transaction=False) as pipe:
            for job_id, chunk in step.chunks:
                self.write_into(pipe, job_id, chunk)
            for entry_id, deliveries in step.acks:
                pipe.xack(self.jobs, GROUP, entry_id)
                step.count(f"deliveries:{min(deliveries, 4)}")
            for name, n in step.counts.items():
                self.count_into(pipe, name, n)
            if step.watch:
                pipe.mget([self.cancel_key(job_id) for job_id in step.watch])
            replies = await pipe.execute()
        if not step.watch:
            return {}
        causes = zip(step.watch, replies[-1], strict=True)
        return {job_id: _text(cause) for job_id, cause in causes if cause is not None}

    async def leave(self, consumer: str) -> None:
        """Leave the live-worker set (a clean exit; a crashed worker ages out of it)."""
        await self.client.zrem(self.workers, consumer)

    async def close(self) -> None:
        await self.client.aclose()

    def write_into(self, pipe: Pipeline, job_id: str, chunk: Chunk) -> None:
        """Queue the writes of one chunk on ``pipe``: a final chunk also starts its stream's expiry.

        Commands of one pipeline run in order on one connection, so a job's acknowledgement queued after
        its final chunk never lands without it.
        """
        key = self.results(job_id)
        pipe.xadd(key, chunk.fields())  # type: ignore[arg-type]  # redis-py's field type is too narrow
        if chunk.final:
            pipe.expire(key, RESULT_TTL_S)
            pipe.zrem(self.deadlines, job_id)

    def count_into(self, pipe: Pipeline, name: str, n: int = 1) -> None:
        """``count`` as a command queued on ``pipe``."""
        if hasattr(self.counters, name):
            setattr(self.counters, name, getattr(self.counters, name) + n)
        pipe.hincrby(self.shared_counters, name, n)

    async def expire_jobs(self, now: float, limit: int = 100) -> int:
        """End jobs past their deadline with a ``timeout`` error chunk, so no client waits forever.

        A worker still running such a job sees the deadline itself and stops; one that picks it up later
        finds the final chunk and only acknowledges it.
        """
        due = await self.client.zrangebyscore(self.deadlines, "-inf", now, start=0, num=limit)
        ended = 0
        for raw in due:
            job_id = _text(raw)
            if not await self.client.zrem(self.deadlines, job_id):
                continue  # another front end took this one (or the job just ended)
            last = await self.last_chunk(job_id)
            if last is not None and last.final:
                continue
            seq = 0 if last is None else last.next_seq
            await self.write(job_id, Chunk(seq, "error", "timeout", "the job passed its deadline"))
            await self.count("expired")
            ended += 1
        return ended

    async def heartbeat(self, name: str, now: float) -> None:
        await self.client.zadd(self.workers, {name: now})

    async def live_workers(self, now: float) -> int:
        live: int = await self.client.zcount(self.workers, now - HEARTBEAT_TTL_S, "+inf")
        return live

    async def figures(self, now: float) -> dict[str, float]:
        """Queue-wide figures for /metrics and /stats: pending, lag, dead letters, workers, counters."""
        out: dict[str, float] = {}
        try:
            pending = await self.client.xpending(self.jobs, GROUP)
            out["pending"] = float(pending["pending"])
            groups = await self.client.xinfo_groups(self.jobs)
        except ResponseError:  # no group yet: nothing was ever enqueued or read
            pending, groups = None, []
        out["waiting"] = float(sum(g.get("lag") or 0 for g in groups))
        out["dead_letters"] = float(await self.client.xlen(self.dead))
        out["workers"] = float(await self.live_workers(now))
        out["deadlines"] = float(await self.client.zcard(self.deadlines))
        shared = await self.client.hgetall(self.shared_counters)
        for key, value in shared.items():
            out["count:" + _text(key)] = float(_text(value))
        return out

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


# KEYS: readers count, abandoned set; ARGV: when to cancel ('' = the reader saw the end), job id.
_DETACH = """
local left = redis.call('DECR', KEYS[1])
if left <= 0 then
  redis.call('DEL', KEYS[1])
  if ARGV[1] ~= '' then redis.call('ZADD', KEYS[2], ARGV[1], ARGV[2]) end
end
return left
"""


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _decode(fields: dict[Any, Any]) -> dict[str, str]:
    return {_text(k): _text(v) for k, v in fields.items()}


def _id_key(entry_id: str) -> tuple[int, int]:
    millis, _, seq = entry_id.partition("-")
    return int(millis), int(seq or 0)
