"""One reader of result streams per front end: a single ``XREAD BLOCK`` over every stream being followed.

A blocking ``XREAD`` holds its Redis connection until it returns, so one read per streaming client
costs one connection per client (measured: 51 connections to Redis for 50 open streams). Here one task
reads every followed job's results stream in one command, on one connection of its own, and hands each
job's new chunks to its followers (``Follower.inbox``). A follower that joins while the read blocks
wakes it with ``CLIENT UNBLOCK`` (the read returns as if it timed out, and the next one includes the
new stream), so a new stream never waits out a block.

Redis failing is told to every follower (the exception goes in its inbox: its stream ends in-band with
``queue_unavailable`` and a resume id); the reader keeps trying, for the followers that come next.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.abc
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from reference_server.queue.jobs import BadJob, Chunk
from reference_server.queue.redis_streams import RedisStreams, _decode, _id_key, _text

log = logging.getLogger("reference_server.queue")

_RETRY_S = 0.2  # after a failed read: Redis is away; followers were told
FOLLOWER_CAPACITY = 1024  # chunks a follower may hold unread; the rest waits in Redis, not in memory


@dataclass(eq=False)
class Follower:
    """One stream's view of a job's results: chunks after ``last`` arrive in ``inbox`` (or an exception).

    A follower that holds ``capacity`` chunks unread is full: the reader leaves it out of its reads, so a
    slow client's backlog stays in Redis, where it is anyway, and the front end holds a bounded amount.
    """

    job_id: str
    last: str
    reader: ResultReader | None = None
    capacity: int = FOLLOWER_CAPACITY
    held: int = 0  # chunks in ``inbox``
    inbox: asyncio.Queue[list[tuple[str, Chunk]] | BaseException] = field(default_factory=asyncio.Queue)

    @property
    def full(self) -> bool:
        return self.held >= self.capacity

    def take(self, chunks: list[tuple[str, Chunk]]) -> None:
        self.last = chunks[-1][0]
        self.held += len(chunks)
        self.inbox.put_nowait(chunks)

    async def next(self, timeout_s: float) -> list[tuple[str, Chunk]]:
        """The next chunks, [] if none came within ``timeout_s``.

        Raises:
            RedisError, OSError: the shared read failed (Redis went away).
        """
        try:
            got = await asyncio.wait_for(self.inbox.get(), timeout_s)
        except TimeoutError:
            return []
        if isinstance(got, BaseException):
            raise got
        was_full = self.full
        self.held -= len(got)
        if was_full and not self.full and self.reader is not None:
            await self.reader.rejoin()  # read for it again
        return got


@dataclass
class ResultReader:
    """The front end's one reader of results streams (see the module docstring)."""

    streams: RedisStreams
    url: str
    block_ms: int = 500
    followers: dict[str, set[Follower]] = field(default_factory=dict)
    _conn: aioredis.Redis | None = None
    _conn_id: int | None = None
    _joined: asyncio.Event = field(default_factory=asyncio.Event)
    _generation: int = 0  # bumped by each new follower
    _reading: int | None = None  # the generation a read under way was sent with; None between reads

    @property
    def connection(self) -> aioredis.Redis:
        if self._conn is None:  # made on first use: on the event loop that runs the reader
            # A pool of one: every command of the reader's runs on the connection ``CLIENT ID`` named.
            # (Not ``single_connection_client``: a read cancelled there can hang the cancel.)
            self._conn = aioredis.Redis.from_url(
                self.url, max_connections=1, socket_connect_timeout=1.0, socket_timeout=10.0,
                retry=Retry(NoBackoff(), 0), health_check_interval=0,
            )  # fmt: skip
        return self._conn

    async def follow(self, job_id: str, after: str) -> Follower:
        """Follow ``job_id``'s results after stream id ``after``; wakes a read under way to include it."""
        follower = Follower(job_id, after, self)
        self.followers.setdefault(job_id, set()).add(follower)
        await self.rejoin()
        return follower

    async def rejoin(self) -> None:
        """A follower joined or has room again: wake a read under way (or an idle reader) to include it."""
        self._generation += 1
        self._joined.set()
        await self._wake(self._generation)

    def unfollow(self, follower: Follower) -> None:
        group = self.followers.get(follower.job_id)
        if group is not None:
            group.discard(follower)
            if not group:
                del self.followers[follower.job_id]

    async def _wake(self, generation: int) -> None:
        """Unblock the read under way if it was sent before ``generation`` joined; retried while the read
        is still in flight but not yet blocked in Redis (an unblock then finds nothing to unblock)."""
        for _ in range(100):  # bounded: the read returns by itself within block_ms anyway
            if self._reading is None or self._reading >= generation or self._conn_id is None:
                return
            try:
                if await self.streams.client.client_unblock(self._conn_id):
                    return
            except (RedisError, OSError):
                return  # the read fails too, and its followers hear of it
            await asyncio.sleep(0.002)

    async def run(self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Read for the followers until cancelled."""
        task_status.started()
        task = asyncio.current_task()
        while True:
            if task is not None and task.cancelling():  # a cancel redis-py's read swallowed (seen on 3.11)
                raise asyncio.CancelledError
            positions = self._positions()
            if not positions:  # nobody to read for, or every follower full
                self._joined.clear()
                await self._joined.wait()
                continue
            try:
                reply = await self._read(positions)
            except (RedisError, OSError) as exc:
                self._conn_id = None
                for group in self.followers.values():
                    for follower in group:
                        follower.inbox.put_nowait(exc)
                await asyncio.sleep(_RETRY_S)
                continue
            self._dispatch(reply)

    def _positions(self) -> dict[Any, Any]:
        """Where to read each followed stream from: the earliest position of its followers with room."""
        positions: dict[Any, Any] = {}
        for job_id, group in self.followers.items():
            open_ = [f.last for f in group if not f.full]
            if open_:
                positions[self.streams.results(job_id)] = min(open_, key=_id_key)
        return positions

    async def _read(self, positions: dict[Any, Any]) -> Any:
        conn = self.connection
        if self._conn_id is None:
            self._conn_id = int(await conn.client_id())
        self._reading = self._generation
        try:
            return await conn.xread(positions, count=256, block=self.block_ms)
        finally:
            self._reading = None

    def _dispatch(self, reply: Any) -> None:
        skip = len(self.streams.results(""))
        for key, entries in reply or ():
            group = self.followers.get(_text(key)[skip:])
            if not group:
                continue
            chunks = []
            for entry_id, fields in entries:
                try:
                    chunks.append((_text(entry_id), Chunk.from_fields(_decode(fields))))
                except BadJob:  # not written by a worker of ours: nothing a client could use
                    log.warning("skipped a malformed result chunk of %s: %s", _text(key), fields)
            for follower in group:
                if follower.full:
                    continue  # it is read for again once it has room
                floor = _id_key(follower.last)
                new = [(i, c) for i, c in chunks if _id_key(i) > floor]
                if new:
                    follower.take(new)

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.aclose()
