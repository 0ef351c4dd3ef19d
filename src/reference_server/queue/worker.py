"""A queue worker: reads batches of jobs in the consumer group, produces their chunks, acknowledges, reclaims.

A worker reads with ``XREADGROUP … COUNT batch_size BLOCK batch_timeout_ms`` (size-or-timeout batching),
re-reads its own pending entries first on start, and ``XACK``s a job only once its final chunk is written.
It moves jobs idle longer than ``min_idle_ms`` from dead or stuck workers to itself with ``XAUTOCLAIM``,
and refreshes the claim on its own running jobs well within that time (``XCLAIM … JUSTID``, which does
not count as a delivery), so a long job is never taken from a live worker. A worker that takes a job over
reads the last chunk written and resumes after it: the models are deterministic, so the continuation is
exactly what the first worker would have sent, and the client sees every token once.

Cancellation: a front end marks a job cancelled (its client sent ``cancel``, or went away and did not
come back within the grace period). Each step's write round trip also reads the marks of the jobs still
running (one ``MGET`` in the same pipeline: no extra round trip), so a cancelled job writes a final
``cancelled`` chunk at its next step and is acknowledged. A job found cancelled when it starts — new,
restarted or reclaimed — is ended the same way without generating anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field

from redis.exceptions import ResponseError

from reference_server.queue.backend import JobQueue
from reference_server.queue.jobs import EVENT_KINDS, BadJob, Chunk, Job, StepWrites, cancelled_end
from reference_server.queue.redis_streams import UNREACHABLE

# One job's token source: given the job and how many tokens were already sent, yields the rest of its
# chunks, numbered from ``sent``, each with the seconds to wait before it (a simulated model's cost). A
# source that stops without a final chunk ends the job with ``done`` / ``length``.
TokenSource = Callable[[Job, int], Iterator[tuple[float, Chunk]]]

log = logging.getLogger("reference_server.queue")

_BACKOFF_S = (0.1, 0.25, 0.5, 1.0, 2.0)  # retry delays while Redis is unreachable (the last repeats)


@dataclass
class JobBucket:
    """A token bucket over jobs taken from the queue: ``rate`` a second, at most ``burst`` at once."""

    rate: float
    burst: float
    tokens: float = 0.0
    updated_at: float | None = None

    def available(self, now: float) -> int:
        if self.updated_at is None:
            self.tokens, self.updated_at = self.burst, now
        self.tokens = min(self.burst, self.tokens + (now - self.updated_at) * self.rate)
        self.updated_at = now
        return int(self.tokens + 1e-9)  # 0.9999999 of a token after float refills is a token

    def take(self, n: int) -> None:
        self.tokens -= n

    def wait_s(self) -> float:
        """Seconds until one job may be taken."""
        return max(0.0, (1.0 - self.tokens) / self.rate)


@dataclass
class Worker:
    """One consumer of the group: a batch at a time."""

    streams: JobQueue
    name: str
    tokens: TokenSource
    batch_size: int = 8
    batch_timeout_ms: int = 50
    min_idle_ms: int = 2_000
    max_deliveries: int = 3
    bucket: JobBucket | None = None
    on_batch: Callable[[int], None] | None = None  # told each batch's size (the model's step cost depends on it)
    # Told each step's batch size and model time, and each new job as it starts (the in-process worker
    # records them in the server's batch metrics, as the direct path's scheduler does).
    on_step: Callable[[int, float], None] | None = None
    on_start: Callable[[Job], None] | None = None
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
    clock: Callable[[], float] = time.time
    _last_reclaim: float = field(default=0.0, repr=False)
    _last_beat: float = field(default=0.0, repr=False)
    _stop: asyncio.Event | None = field(default=None, repr=False)  # no new jobs join once it is set

    async def run(self, stop: asyncio.Event) -> None:
        """Until ``stop``: own pending jobs first (a restarted worker), then new ones, reclaiming idle ones.

        A batch under way when ``stop`` is set is finished; a caller that cannot wait cancels the task,
        which leaves the batch's jobs pending for another worker to reclaim. Redis going away is waited
        out (with backoff), not fatal.
        """
        failures = 0
        recovered = False
        self._stop = stop
        while not stop.is_set():
            try:
                if not recovered:
                    await self.streams.ensure_group()
                    await self._recover_own()
                    recovered = True
                await self.step()
                failures = 0
            except (*UNREACHABLE, ResponseError) as exc:
                # A Redis that came back empty answers NOGROUP: make the group again, then go on.
                recovered = False
                delay = _BACKOFF_S[min(failures, len(_BACKOFF_S) - 1)]
                failures += 1
                log.warning("worker %s: Redis failed (%s); retrying in %g s", self.name, exc, delay)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
        await self._leave()

    async def _recover_own(self) -> None:
        for _ in range(1000):  # bounded: each round acknowledges what it read
            pending = await self._read("0", self.batch_size)
            if not pending:
                return
            await self.process(pending)

    async def step(self) -> None:
        """One round: a heartbeat, a reclaim now and then, one batch read and run."""
        now = time.monotonic()
        if now - self._last_beat >= 1.0:
            self._last_beat = now
            await self.streams.heartbeat(self.name, self.clock())
        if now - self._last_reclaim >= self.min_idle_ms / 4000:
            self._last_reclaim = now
            await self.reclaim()
        count = self._allowed(self.batch_size)
        if count < 1:
            await self.sleep(min(self.bucket.wait_s() if self.bucket else 0.0, 1.0))
            return
        entries = await self._read(">", count)
        if self.bucket is not None:
            self.bucket.take(len(entries))
        await self.process(entries, admit_new=True)

    def _allowed(self, count: int) -> int:
        """How many of ``count`` jobs the bucket lets us take now."""
        if self.bucket is None:
            return count
        return min(count, self.bucket.available(time.monotonic()))

    async def _leave(self) -> None:
        """Leave the live-worker set (a clean exit; a crashed worker ages out of it)."""
        with contextlib.suppress(*UNREACHABLE):
            await self.streams.leave(self.name)

    async def _read(
        self, start: str, count: int | None = None, *, wait: bool = True
    ) -> list[tuple[str, dict[str, str]]]:
        block = self.batch_timeout_ms if start == ">" and wait else None
        return await self.streams.read_group(self.name, start, count or self.batch_size, block)

    async def reclaim(self) -> int:
        """Take over jobs idle longer than ``min_idle_ms``; dead-letter those delivered too often."""
        claimed = await self.streams.autoclaim(self.name, self.min_idle_ms, self.batch_size)
        keep, deliveries = [], {}
        for entry_id, fields, delivered in claimed:
            if delivered > self.max_deliveries:
                await self.streams.dead_letter(entry_id, fields, delivered)
            else:
                keep.append((entry_id, fields))
                deliveries[entry_id] = delivered
        if keep:
            await self.streams.count("reclaimed", len(keep))
        await self.process(keep, deliveries)
        return len(keep)

    async def process(
        self,
        entries: list[tuple[str, dict[str, str]]],
        deliveries: dict[str, int] | None = None,
        *,
        admit_new: bool = False,
    ) -> None:
        """Run a batch: its jobs advance together, one token each per step, as a batching engine does.

        With ``admit_new``, new jobs join at step boundaries while the batch has room (continuous
        batching: one non-blocking read per step), until ``stop`` is set.
        """
        running = await self._start(entries, deliveries)
        while running:
            # Always a real suspension, even at zero cost: on the in-process queue nothing else would yield,
            # and the worker would starve the front end sharing its event loop.
            wait = max(step.wait for step in running)
            await self.sleep(wait)
            if self.on_step is not None:
                self.on_step(len(running), wait)
            if any(time.monotonic() - r.claimed_at >= self.min_idle_ms / 3000 for r in running):
                running = await self._refresh(running)
            running = await self._advance(running)
            room = self.batch_size - len(running)
            if (
                admit_new
                and room > 0
                and not (self._stop and self._stop.is_set())
                and (count := self._allowed(room)) > 0
            ):
                joined = await self._read(">", count, wait=False)
                if joined:
                    if self.bucket is not None:
                        self.bucket.take(len(joined))
                    running += await self._start(joined, None, len(running))

    async def _advance(self, running: list[_Running]) -> list[_Running]:
        """One step: every job's next chunk (and the acknowledgements of ended jobs) in one round trip."""
        now = self.clock()
        step = StepWrites()
        still = [state for state in running if state.advance(step, now)]
        step.watch = [state.job.id for state in still]
        cancelled = await self.streams.commit_step(step)
        for state in still:
            if (cause := cancelled.get(state.job.id)) is not None:
                state.cancel = cause
        return still

    async def _start(
        self, entries: list[tuple[str, dict[str, str]]], deliveries: dict[str, int] | None, already: int = 0
    ) -> list[_Running]:
        if not entries:
            return []
        if self.on_batch is not None:
            self.on_batch(already + len(entries))
        started = []
        for entry_id, fields in entries:
            try:
                job = Job.from_fields(fields)
            except BadJob:
                await self.streams.ack(entry_id)  # never ours to run
                continue
            if self.on_start is not None:
                self.on_start(job)
            started.append(await self._resume(entry_id, job, (deliveries or {}).get(entry_id, 1)))
        return started

    async def _refresh(self, running: list[_Running]) -> list[_Running]:
        """Reset the idle time of our running jobs so no reaper takes them; drop any taken already.

        Per group of jobs claimed at one moment, ``min_idle_time`` is the time since that claim, less a
        margin: a job another worker claimed meanwhile has been idle for less (its claim reset it), so our
        claim fails and we stop writing it. ``JUSTID`` keeps the delivery count as it is.
        """
        now = time.monotonic()
        groups: dict[float, list[str]] = {}
        for r in running:
            groups.setdefault(r.claimed_at, []).append(r.entry_id)
        claims = [(max(0, int((now - at) * 1000) - 50), ids) for at, ids in groups.items()]
        ours = await self.streams.refresh_claims(self.name, claims)
        kept = []
        for r in running:
            if r.entry_id in ours:
                r.claimed_at = now
                kept.append(r)
            else:
                log.warning("worker %s: job %s was taken over by another worker; leaving it", self.name, r.job.id)
        return kept

    async def _resume(self, entry_id: str, job: Job, deliveries: int) -> _Running:
        last, cause = await self.streams.resume_point(job.id)
        if last is not None and last.final:  # finished before a crash: only acknowledge
            return _Running(entry_id, job, iter(()), last.seq, deliveries, done=True)
        sent = 0 if last is None else last.next_seq
        if cause is not None:  # cancelled before it started (or before a reclaim): end it, never run it
            return _Running(entry_id, job, iter(()), sent, deliveries, cancel=cause)
        return _Running(entry_id, job, self.tokens(job, sent), sent, deliveries)


@dataclass
class _Running:
    entry_id: str
    job: Job
    source: Iterator[tuple[float, Chunk]]
    seq: int
    deliveries: int = 1
    done: bool = False
    cancel: str | None = None  # the cause, once the job is found cancelled: it ends at its next step
    claimed_at: float = field(default_factory=time.monotonic)  # when it was delivered or last refreshed
    wait: float = 0.0
    _next: Chunk | None = None

    def __post_init__(self) -> None:
        self._pull()

    def _pull(self) -> None:
        step = next(self.source, None)
        self.wait, self._next = step if step is not None else (0.0, None)

    def advance(self, step: StepWrites, now: float) -> bool:
        """Add this job's next chunk to ``step``; False once it ended (its acknowledgement added too)."""
        if not self.done:
            chunk = self._next
            if self.cancel is not None:
                step.chunks.append((self.job.id, cancelled_end(self.seq, self.cancel)))
                step.count("cancelled")
                step.count(f"cancelled:{self.cancel}")
            elif now > self.job.deadline:
                step.chunks.append((self.job.id, Chunk(self.seq, "error", "timeout", "the job passed its deadline")))
                step.count("expired")
            elif chunk is None or chunk.final:
                step.chunks.append((self.job.id, chunk or Chunk(self.seq, "done", "length")))
                step.count("completed" if chunk is None or chunk.kind == "done" else "failed")
            else:
                step.chunks.append((self.job.id, chunk))
                self.seq = chunk.next_seq
                self._pull()
                # Events that follow a chunk at no cost (progress after a token) go out in the same step.
                while self._next is not None and self._next.kind in EVENT_KINDS and self.wait == 0:
                    step.chunks.append((self.job.id, self._next))
                    self.seq = self._next.next_seq
                    self._pull()
                return True
        step.acks.append((self.entry_id, self.deliveries))
        return False
