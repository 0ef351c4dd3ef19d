"""Queue mode without Redis: the same queue operations on in-process structures, for ``--queue memory://``.

The front end and its workers (tasks in the server's process) run exactly the code they run on Redis —
enqueue, consumer-group reads, continuous batching, numbered result chunks, acknowledgements, deadlines,
claims — so one command with no services shows queue mode's behaviour and costs. What it cannot give is
what Redis exists for: nothing survives the process, and no other process can share it.

Entry ids have Redis's form, ``<ms>-<n>``, increasing, so event ids and ``Last-Event-ID`` look and parse
the same on both backends. Everything runs on one event loop: no locks; blocking reads wait on events.
"""

from __future__ import annotations

import asyncio
import bisect
import time
from collections import deque
from dataclasses import dataclass, field

from reference_server.queue.jobs import Chunk, Job, StepWrites, dead_letter_notice
from reference_server.queue.redis_streams import HEARTBEAT_TTL_S, RESULT_TTL_S, QueueCounters


def entry_key(entry_id: str) -> tuple[int, int]:
    """An entry id ``<ms>-<n>`` as a comparable pair ("" sorts first)."""
    millis, _, seq = entry_id.partition("-")
    return int(millis or 0), int(seq or 0)


@dataclass
class _Pending:
    consumer: str
    claimed_at: float  # monotonic
    deliveries: int


@dataclass
class _Results:
    entries: list[tuple[str, Chunk]] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    expires_at: float | None = None  # epoch seconds, once the final chunk is written
    trimmed: tuple[int, int] = (0, 0)  # the id of the last entry dropped as read (see ``trim_read``)

    def index_after(self, floor: tuple[int, int]) -> int:
        """The index of the first entry with an id past ``floor``: ids increase along the list, so a
        bisection, not a scan (readers of long streams ask often)."""
        return bisect.bisect_right(self.entries, floor, key=lambda e: entry_key(e[0]))


@dataclass
class MemoryQueue:
    """In-process jobs, consumer group, result streams, deadlines and counters (see module docstring)."""

    prefix: str = "inferbench"
    counters: QueueCounters = field(default_factory=QueueCounters)
    # How long a finished job's results (and its id) are kept for a resume. Redis keeps them RESULT_TTL_S
    # for a front end restarted meanwhile; in one process there is none, so the server keeps them as long
    # as a dropped direct stream (resume_ttl_s). Results a reader took to their end are forgotten at once
    # (``detach``), as a direct stream written out in full is: under load, memory holds the jobs under way.
    keep_s: float = RESULT_TTL_S
    _jobs: dict[str, dict[str, str]] = field(default_factory=dict)
    _undelivered: deque[str] = field(default_factory=deque)
    _pending: dict[str, _Pending] = field(default_factory=dict)
    _new_job: asyncio.Event = field(default_factory=asyncio.Event)
    _results: dict[str, _Results] = field(default_factory=dict)
    _owners: dict[str, tuple[str, float]] = field(default_factory=dict)
    _deadlines: dict[str, float] = field(default_factory=dict)
    _dead: list[dict[str, str]] = field(default_factory=list)
    _workers: dict[str, float] = field(default_factory=dict)
    _shared: dict[str, int] = field(default_factory=dict)
    _aliases: dict[str, tuple[str, float]] = field(default_factory=dict)
    _cancels: dict[str, tuple[str, float]] = field(default_factory=dict)  # job id → (cause, forget at)
    _abandoned: dict[str, float] = field(default_factory=dict)  # job id → when to cancel it
    _readers: dict[str, int] = field(default_factory=dict)  # job id → readers following it now
    _names_of: dict[str, list[str]] = field(default_factory=dict)  # job id → aliases remembered for it
    _last_id: tuple[int, int] = (0, 0)

    def _next_id(self) -> str:
        millis = int(time.time() * 1000)
        last_ms, last_seq = self._last_id
        self._last_id = (millis, 0) if millis > last_ms else (last_ms, last_seq + 1)
        return f"{self._last_id[0]}-{self._last_id[1]}"

    # --- shared ---------------------------------------------------------------------------------------

    async def count(self, name: str, n: int = 1) -> None:
        if hasattr(self.counters, name):
            setattr(self.counters, name, getattr(self.counters, name) + n)
        self._shared[name] = self._shared.get(name, 0) + n

    async def last_chunk(self, job_id: str) -> Chunk | None:
        results = self._results.get(job_id)
        return results.entries[-1][1] if results and results.entries else None

    async def write(self, job_id: str, chunk: Chunk) -> None:
        results = self._results.setdefault(job_id, _Results())
        results.entries.append((self._next_id(), chunk))
        if chunk.final:
            results.expires_at = time.time() + self.keep_s
            self._deadlines.pop(job_id, None)
            self._cancels.pop(job_id, None)  # read at the job's steps and start: no longer needed
            if (held := self._owners.get(job_id)) is not None:
                self._owners[job_id] = (held[0], results.expires_at)
        results.changed.set()
        results.changed = asyncio.Event()

    async def close(self) -> None:
        return None

    # --- front end ------------------------------------------------------------------------------------

    async def enqueue(self, job: Job, owner: str = "", reader: bool = False) -> str | None:
        now = time.time()
        held = self._owners.get(job.id)
        if held is not None and held[1] > now:
            return None
        self._owners[job.id] = (owner or "-", job.deadline + RESULT_TTL_S)
        entry_id = self._next_id()
        self._jobs[entry_id] = job.fields()
        self._undelivered.append(entry_id)
        self._deadlines[job.id] = job.deadline
        if reader:
            self._readers[job.id] = self._readers.get(job.id, 0) + 1
        await self.count("enqueued")
        self._new_job.set()
        self._new_job = asyncio.Event()
        return entry_id

    async def owner_of(self, job_id: str) -> str | None:
        held = self._owners.get(job_id)
        return held[0] if held is not None and held[1] > time.time() else None

    async def remember(self, name: str, value: str, ttl_s: float, job_id: str = "") -> None:
        self._aliases[name] = (value, time.time() + ttl_s)
        if job_id:  # forgotten with the job's results, not ttl_s later (see _forget_results)
            self._names_of.setdefault(job_id, []).append(name)

    async def recall(self, name: str) -> str | None:
        held = self._aliases.get(name)
        return held[0] if held is not None and held[1] > time.time() else None

    async def cancel(self, job_id: str, cause: str, ttl_s: float) -> None:
        if job_id not in self._deadlines:
            return  # it ended already (or never was): a mark would only wait out ttl_s
        self._cancels.setdefault(job_id, (cause, time.time() + ttl_s))
        self._abandoned.pop(job_id, None)

    async def attach(self, job_id: str, ttl_s: float) -> None:
        self._readers[job_id] = self._readers.get(job_id, 0) + 1
        self._abandoned.pop(job_id, None)

    async def detach(self, job_id: str, cancel_at: float | None) -> None:
        left = self._readers.get(job_id, 0) - 1
        if left > 0:
            self._readers[job_id] = left
            return
        self._readers.pop(job_id, None)
        if cancel_at is not None:
            self._abandoned[job_id] = cancel_at
        elif (results := self._results.get(job_id)) is not None and results.expires_at is not None:
            self._forget_results(job_id)  # its last reader took it to the end: nothing is left to resume

    def _forget_results(self, job_id: str) -> None:
        """Drop a finished job's results and what only a resume of them needs; its id stays taken (keep_s)."""
        self._results.pop(job_id, None)
        self._cancels.pop(job_id, None)
        for name in self._names_of.pop(job_id, ()):
            self._aliases.pop(name, None)

    async def cancel_abandoned(self, now: float, ttl_s: float, limit: int = 100) -> int:
        due = sorted((at, job_id) for job_id, at in self._abandoned.items() if at <= now)[:limit]
        for _, job_id in due:
            await self.cancel(job_id, "abandoned", ttl_s)
        return len(due)

    def _cause(self, job_id: str) -> str | None:
        held = self._cancels.get(job_id)
        return held[0] if held is not None else None

    async def results_kept(self, job_id: str) -> bool:
        return job_id in self._results or job_id in self._deadlines

    def unread(self, job_id: str, after: str) -> int:
        """How many of ``job_id``'s results follow stream id ``after``: a reader's backlog while the job
        runs (0 once it ended: a backlog that no longer grows is only read)."""
        results = self._results.get(job_id)
        if results is None or results.expires_at is not None:
            return 0
        return len(results.entries) - results.index_after(entry_key(after))

    def trim_read(self, job_id: str, upto: str, keep: int) -> None:
        """Drop the results every reader has read (up to stream id ``upto``) except the last ``keep`` of
        them, kept for a resume: a long job's memory is its readers' backlog and ``keep``, not its length."""
        results = self._results.get(job_id)
        if results is None:
            return
        cut = results.index_after(entry_key(upto)) - keep
        if cut > 0:
            results.trimmed = entry_key(results.entries[cut - 1][0])
            del results.entries[:cut]

    async def read_after(self, job_id: str, after: str, block_ms: int) -> list[tuple[str, Chunk]]:
        results = self._results.setdefault(job_id, _Results())
        floor = entry_key(after)
        if floor < results.trimmed:  # a resume from before what is kept: say so rather than skip results
            first = results.entries[0][1].seq if results.entries else 0
            message = "the results after that event are no longer kept (resume_buffer); start a new request"
            return [("", Chunk(first, "error", "resume_unavailable", message))]
        for _ in range(2):  # once now; once more after a wait for a write
            got = results.entries[results.index_after(floor) :]
            if got or block_ms <= 0:
                return got
            try:
                await asyncio.wait_for(results.changed.wait(), block_ms / 1000)
            except TimeoutError:
                return []
        return []

    @property
    def waiting(self) -> int:
        """Jobs no consumer took yet."""
        return len(self._undelivered)

    async def expire_jobs(self, now: float, limit: int = 100) -> int:
        """End jobs past their deadline with a timeout chunk; forget expired results and owners."""
        ended = 0
        for job_id, deadline in sorted(self._deadlines.items(), key=lambda kv: kv[1])[:limit]:
            if deadline > now:
                break
            del self._deadlines[job_id]
            last = await self.last_chunk(job_id)
            if last is None or not last.final:
                await self.write(job_id, Chunk(0 if last is None else last.next_seq, "error", "timeout",
                                               "the job passed its deadline"))  # fmt: skip
                await self.count("expired")
                ended += 1
        for job_id in [j for j, r in self._results.items() if r.expires_at is not None and r.expires_at < now]:
            self._forget_results(job_id)
        for job_id in [j for j, (_, until) in self._owners.items() if until < now]:
            del self._owners[job_id]
        for name in [n for n, (_, until) in self._aliases.items() if until < now]:
            del self._aliases[name]
        for job_id in [j for j, (_, until) in self._cancels.items() if until < now]:
            del self._cancels[job_id]
        return ended

    async def heartbeat(self, name: str, now: float) -> None:
        self._workers[name] = now

    async def live_workers(self, now: float) -> int:
        return sum(1 for seen in self._workers.values() if seen >= now - HEARTBEAT_TTL_S)

    async def figures(self, now: float) -> dict[str, float]:
        out = {
            "pending": float(len(self._pending)),
            "waiting": float(len(self._undelivered)),
            "dead_letters": float(len(self._dead)),
            "workers": float(await self.live_workers(now)),
            "deadlines": float(len(self._deadlines)),
        }
        out.update({"count:" + k: float(v) for k, v in self._shared.items()})
        return out

    # --- workers --------------------------------------------------------------------------------------

    async def ensure_group(self) -> None:
        return None

    async def read_group(
        self, consumer: str, start: str, count: int, block_ms: int | None
    ) -> list[tuple[str, dict[str, str]]]:
        if start == "0":
            own = [i for i, p in self._pending.items() if p.consumer == consumer][:count]
            return [(i, self._jobs[i]) for i in own]
        if not self._undelivered and block_ms:
            try:
                await asyncio.wait_for(self._new_job.wait(), block_ms / 1000)
            except TimeoutError:
                return []
        taken: list[tuple[str, dict[str, str]]] = []
        now = time.monotonic()
        while self._undelivered and len(taken) < count:
            entry_id = self._undelivered.popleft()
            self._pending[entry_id] = _Pending(consumer, now, 1)
            taken.append((entry_id, self._jobs[entry_id]))
        return taken

    async def autoclaim(self, consumer: str, min_idle_ms: int, count: int) -> list[tuple[str, dict[str, str], int]]:
        now = time.monotonic()
        claimed: list[tuple[str, dict[str, str], int]] = []
        for entry_id, pending in self._pending.items():
            if len(claimed) >= count:
                break
            if (now - pending.claimed_at) * 1000 >= min_idle_ms:
                pending.consumer, pending.claimed_at = consumer, now
                pending.deliveries += 1
                claimed.append((entry_id, self._jobs[entry_id], pending.deliveries))
        return claimed

    async def refresh_claims(self, consumer: str, groups: list[tuple[int, list[str]]]) -> set[str]:
        now = time.monotonic()
        ours = set()
        for min_idle, ids in groups:
            for entry_id in ids:
                pending = self._pending.get(entry_id)
                if pending is not None and (now - pending.claimed_at) * 1000 >= min_idle:
                    pending.consumer, pending.claimed_at = consumer, now
                    ours.add(entry_id)
        return ours

    async def ack(self, entry_id: str) -> None:
        if self._pending.pop(entry_id, None) is not None:
            self._jobs.pop(entry_id, None)  # acknowledged: nothing will read it again (trimmed at once)

    async def dead_letter(self, entry_id: str, fields: dict[str, str], deliveries: int) -> None:
        self._dead.append({**fields, "deliveries": str(deliveries), "entry": entry_id})
        job_id = fields.get("id")
        if job_id and (notice := dead_letter_notice(await self.last_chunk(job_id), deliveries)) is not None:
            await self.write(job_id, notice)
        await self.ack(entry_id)
        await self.count("dead_lettered")

    async def resume_point(self, job_id: str) -> tuple[Chunk | None, str | None]:
        return await self.last_chunk(job_id), self._cause(job_id)

    async def commit_step(self, step: StepWrites) -> dict[str, str]:
        for job_id, chunk in step.chunks:
            await self.write(job_id, chunk)
        for entry_id, deliveries in step.acks:
            await self.ack(entry_id)
            step.count(f"deliveries:{min(deliveries, 4)}")
        for name, n in step.counts.items():
            await self.count(name, n)
        return {job_id: cause for job_id in step.watch if (cause := self._cause(job_id)) is not None}

    async def leave(self, consumer: str) -> None:
        self._workers.pop(consumer, None)
