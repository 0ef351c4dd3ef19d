"""The front end's one reader of result streams: many followed jobs, one blocking read, one connection.

Every wait here is bounded and none asserts a speed: a follower that joins while the read blocks gets
its chunks whether or not the wake-up lands (it only saves waiting out the block).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import redis
import redis.asyncio as aioredis

from polling import wait_until
from reference_server.queue import Chunk, RedisStreams
from reference_server.queue.reader import Follower, ResultReader
from reference_server.serve import EmbeddedServer
from reference_server.settings import ServerSettings
from serverkit import sse_blocks

pytestmark = pytest.mark.slow


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def streams(redis_url: str, prefix: str) -> AsyncIterator[RedisStreams]:
    client = aioredis.Redis.from_url(redis_url)
    try:
        yield RedisStreams(client, prefix)
    finally:
        await client.aclose()


async def drain(follower: Follower, until_seq: int) -> list[int]:
    seqs: list[int] = []
    for _ in range(40):  # bounded: each wait is at most 0.5 s
        seqs += [chunk.seq for _, chunk in await follower.next(0.5)]
        if seqs and seqs[-1] >= until_seq:
            break
    return seqs


@pytest.mark.anyio
async def test_one_read_feeds_every_follower_its_own_chunks_in_order(redis_url: str, streams: RedisStreams) -> None:
    reader = ResultReader(streams, redis_url, block_ms=2000)
    task = asyncio.create_task(reader.run())
    try:
        first = await reader.follow("a", "0-0")
        await asyncio.sleep(0)  # the reader blocks on job a alone
        late = [await reader.follow(job, "0-0") for job in ("b", "c")]  # joins the blocked read
        twin = await reader.follow("a", "0-0")  # two streams of one job (a resume beside a live stream)
        for seq in range(5):
            for job in ("a", "b", "c"):
                await streams.write(job, Chunk(seq, "token", f"{job}{seq}"))
        assert await drain(first, 4) == [0, 1, 2, 3, 4]
        assert await drain(twin, 4) == [0, 1, 2, 3, 4]
        for follower in late:
            assert await drain(follower, 4) == [0, 1, 2, 3, 4]
        reader.unfollow(first)
        reader.unfollow(twin)
        assert "a" not in reader.followers
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await reader.close()


@pytest.mark.anyio
async def test_a_follower_that_does_not_read_holds_a_bounded_backlog_and_later_gets_it_all(
    redis_url: str, streams: RedisStreams
) -> None:
    """A slow client's backlog waits in Redis: the front end holds at most its capacity (plus one read)."""
    reader = ResultReader(streams, redis_url, block_ms=200)
    task = asyncio.create_task(reader.run())
    try:
        slow = await reader.follow("s", "0-0")
        slow.capacity = 4
        brisk = await reader.follow("s", "0-0")  # reads as it goes: the slow one must not hold it back
        for seq in range(40):
            await streams.write("s", Chunk(seq, "token", f"t{seq}"))
            if seq % 8 == 7:  # writes come in several reads, each a chance to overfill the slow one
                assert await drain(brisk, seq) == list(range(seq - 7, seq + 1))
        await asyncio.sleep(0.5)  # the reader's chances to hand the slow follower more than its room
        assert slow.full
        assert slow.held <= 4 + 8  # its capacity, plus what came in the read that filled it
        assert await drain(slow, 39) == list(range(40))  # reading makes room; the rest comes from Redis
        assert slow.held == 0
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await reader.close()


@pytest.mark.anyio
async def test_a_follower_resuming_mid_stream_gets_only_what_follows(redis_url: str, streams: RedisStreams) -> None:
    for seq in range(3):
        await streams.write("r", Chunk(seq, "token", f"t{seq}"))
    ids = [entry_id async for entry_id, _ in streams.read_results("r", block_ms=10, max_wait_s=0.2)]
    reader = ResultReader(streams, redis_url)
    task = asyncio.create_task(reader.run())
    try:
        follower = await reader.follow("r", ids[0])
        await streams.write("r", Chunk(3, "done", "length"))
        assert await drain(follower, 3) == [1, 2, 3]
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await reader.close()


@pytest.mark.anyio
async def test_redis_unreachable_is_told_to_every_follower(streams: RedisStreams) -> None:
    reader = ResultReader(streams, "redis://127.0.0.1:1/0")  # nothing listens on port 1
    task = asyncio.create_task(reader.run())
    try:
        follower = await reader.follow("x", "0-0")
        with pytest.raises(redis.ConnectionError):
            await follower.next(10.0)  # a bound: the failure comes at the first read
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await reader.close()


def redis_connections(redis_port: int) -> int:
    """This process's established TCP connections to ``redis_port`` (Linux /proc)."""
    inodes = set()
    for fd in Path("/proc/self/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    count = 0
    for line in Path("/proc/self/net/tcp").read_text().splitlines()[1:]:
        cols = line.split()
        if int(cols[2].split(":")[1], 16) == redis_port and cols[3] == "01" and cols[9] in inodes:
            count += 1
    return count


@pytest.mark.skipif(not Path("/proc/self/net/tcp").exists(), reason="counts connections through Linux /proc")
def test_many_open_streams_cost_the_front_end_a_few_redis_connections(redis_url: str, prefix: str) -> None:
    """No worker runs: 20 streams wait on their jobs, each followed by the one reader."""
    port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    settings = ServerSettings.model_validate({"queue_url": redis_url, "queue_prefix": prefix, "graceful_shutdown_s": 1})
    with EmbeddedServer(settings) as server, httpx.Client(timeout=10, trust_env=False) as http:
        before = redis_connections(port)
        body = {"prompt": "held", "max_tokens": 3}
        responses = [http.stream("POST", server.url + "/v1/stream", json=body) for _ in range(20)]
        held = [r.__enter__() for r in responses]
        readers = [sse_blocks(r.iter_raw()) for r in held]  # kept: a discarded one closes its connection
        try:
            assert all(next(blocks).retry is not None for blocks in readers)
            wait_until(lambda: len(server.state.queue.reader.followers) == 20)  # type: ignore[union-attr]
            assert redis_connections(port) - before <= 3  # the reader's, and a pooled one or two
        finally:
            for response in responses:
                response.__exit__(None, None, None)
