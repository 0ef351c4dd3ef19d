"""Queue mode on real Redis Streams: batching reads, exactly-once tokens across a killed worker, dead
letters, deadlines, and trimming that never loses a pending job.

Redis: 127.0.0.1:6379 when it answers (the development machines and CI run one), else a `redis-server`
started on a free port, else the tests skip and say why — unless INFERBENCH_REQUIRE_REDIS=1, which turns
that skip into a failure. Every test uses its own key prefix and deletes its keys.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from reference_server.queue import GROUP, Chunk, Job, RedisStreams, Worker

pytestmark = pytest.mark.slow


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # redis-py's client is asyncio's


@pytest.fixture
async def streams(redis_url: str) -> AsyncIterator[RedisStreams]:
    client = aioredis.Redis.from_url(redis_url)
    prefix = f"inferbench-test-{uuid.uuid4().hex[:12]}"
    try:
        yield RedisStreams(client, prefix)
    finally:
        keys = [key async for key in client.scan_iter(match=f"{prefix}:*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()


def tokens_of(job: Job, sent: int, count: int = 6, step_s: float = 0.01) -> Iterator[tuple[float, Chunk]]:
    """A deterministic model: token i of a job is always the same text, whoever computes it."""
    for i in range(sent, job.max_tokens or count):
        yield step_s, Chunk(i, "token", f"{job.prompt}-{i}")


def job(job_id: str, max_tokens: int = 6, deadline_s: float = 60.0) -> Job:
    return Job(job_id, "tokens", f"p{job_id}", max_tokens, 1, time.time() + deadline_s)


async def collect(streams: RedisStreams, job_id: str, max_wait_s: float = 20.0) -> list[Chunk]:
    return [chunk async for _, chunk in streams.read_results(job_id, block_ms=200, max_wait_s=max_wait_s)]


@pytest.mark.anyio
async def test_a_worker_streams_every_token_once_then_done_and_acknowledges(streams: RedisStreams) -> None:
    await streams.ensure_group()
    await streams.enqueue(job("a", 5))
    worker = Worker(streams, "w1", tokens_of, batch_size=4, batch_timeout_ms=50)
    await worker.process(await worker._read(">"))
    chunks = await collect(streams, "a")
    assert [(c.seq, c.kind, c.data) for c in chunks] == [
        *((i, "token", f"pa-{i}") for i in range(5)),
        (5, "done", "length"),
    ]
    assert (await streams.client.xpending(streams.jobs, GROUP))["pending"] == 0
    assert await streams.client.ttl(streams.results("a")) > 0  # finished results expire


@pytest.mark.anyio
async def test_reads_are_size_or_timeout_batches(streams: RedisStreams) -> None:
    await streams.ensure_group()
    for i in range(5):
        await streams.enqueue(job(f"b{i}"))
    worker = Worker(streams, "w1", tokens_of, batch_size=2, batch_timeout_ms=30)
    assert len(await worker._read(">")) == 2  # size: a full batch at once
    assert len(await worker._read(">")) == 2
    assert len(await worker._read(">")) == 1  # what there is
    started = time.monotonic()
    assert await worker._read(">") == []  # timeout: nothing came within batch_timeout_ms
    assert time.monotonic() - started >= 0.02


WORKER_SCRIPT = """
import asyncio, sys, time
import redis.asyncio as aioredis
from reference_server.queue import Chunk, RedisStreams, Worker

def tokens(job, sent):
    for i in range(sent, job.max_tokens):
        yield 0.05, Chunk(i, "token", f"{job.prompt}-{i}")

async def main():
    streams = RedisStreams(aioredis.Redis.from_url(sys.argv[1]), sys.argv[2])
    worker = Worker(streams, "doomed", tokens, batch_size=1)
    await worker.run(asyncio.Event())

asyncio.run(main())
"""


async def kill_a_worker_mid_job(
    streams: RedisStreams, redis_url: str, tmp_path: Path, job_id: str, at_seq: int
) -> Chunk:
    """Start a worker process on ``streams``, SIGKILL it once ``job_id`` has token ``at_seq``; the job's last
    chunk then (a token: the job was cut mid-way)."""
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(WORKER_SCRIPT))
    doomed = subprocess.Popen([sys.executable, str(script), redis_url, streams.prefix])  # noqa: ASYNC220 - a PID to kill -9
    try:
        for _ in range(400):  # until the doomed worker is mid-job
            if (last := await streams.last_chunk(job_id)) is not None and last.seq >= at_seq:
                break
            await asyncio.sleep(0.025)
        else:
            pytest.fail("the worker never started the job")
    finally:
        doomed.send_signal(signal.SIGKILL)
        doomed.wait(timeout=10)
    cut = await streams.last_chunk(job_id)
    assert cut is not None
    assert cut.kind == "token"
    return cut


@pytest.mark.anyio
async def test_a_job_of_a_killed_worker_is_reclaimed_and_every_token_arrives_exactly_once(
    streams: RedisStreams, redis_url: str, tmp_path: Path
) -> None:
    await streams.ensure_group()
    await streams.enqueue(job("k", 30))
    cut = await kill_a_worker_mid_job(streams, redis_url, tmp_path, "k", 5)
    assert cut.seq < 29

    rescuer = Worker(streams, "rescuer", lambda j, sent: tokens_of(j, sent, step_s=0.001), min_idle_ms=200)
    for _ in range(100):
        if await rescuer.reclaim():
            break
        await asyncio.sleep(0.05)
    chunks = await collect(streams, "k")
    assert [c.seq for c in chunks] == list(range(31))  # 30 tokens and done: none repeated, none missing
    assert [c.data for c in chunks[:30]] == [f"pk-{i}" for i in range(30)]
    assert chunks[-1].kind == "done"
    assert streams.counters.reclaimed == 1
    assert (await streams.client.xpending(streams.jobs, GROUP))["pending"] == 0


@pytest.mark.anyio
async def test_a_job_delivered_too_often_is_dead_lettered_and_its_client_told(streams: RedisStreams) -> None:
    await streams.ensure_group()
    await streams.enqueue(job("d"))
    await streams.client.xreadgroup(GROUP, "ghost", {streams.jobs: ">"}, count=1)  # delivered once, never acked
    worker = Worker(streams, "w1", tokens_of, min_idle_ms=0, max_deliveries=1)
    assert await worker.reclaim() == 0  # the claim is its second delivery: one too many
    chunks = await collect(streams, "d")
    assert [(c.kind, c.data) for c in chunks] == [("error", "dead_lettered")]
    assert "set aside" in chunks[0].message
    assert await streams.client.xlen(streams.dead) == 1
    assert (await streams.client.xpending(streams.jobs, GROUP))["pending"] == 0


@pytest.mark.anyio
async def test_a_job_past_its_deadline_ends_with_a_timeout(streams: RedisStreams) -> None:
    await streams.ensure_group()
    await streams.enqueue(job("t", deadline_s=-1))
    worker = Worker(streams, "w1", tokens_of)
    await worker.process(await worker._read(">"))
    chunks = await collect(streams, "t")
    assert [(c.kind, c.data) for c in chunks] == [("error", "timeout")]
    assert streams.counters.expired == 1


@pytest.mark.anyio
async def test_trimming_never_deletes_a_pending_or_unread_job(streams: RedisStreams) -> None:
    await streams.ensure_group()
    ids = [await streams.enqueue(job(f"j{i}")) for i in range(6)]
    await streams.client.xreadgroup(GROUP, "ghost", {streams.jobs: ">"}, count=3)  # j0..j2 pending
    await streams.trim_jobs()
    assert await streams.client.xlen(streams.jobs) == 6  # pending and unread entries all kept
    await streams.client.xack(streams.jobs, GROUP, ids[0], ids[1])
    await streams.trim_jobs()
    remaining = [entry_id.decode() for entry_id, _ in await streams.client.xrange(streams.jobs)]
    assert remaining == ids[2:]  # only acknowledged entries went


@pytest.mark.anyio
async def test_a_long_job_keeps_its_claim_while_another_worker_tries_to_reclaim(streams: RedisStreams) -> None:
    """The running worker refreshes its claim well within min_idle_ms, so a live job is never taken over."""
    await streams.ensure_group()
    await streams.enqueue(job("long", 30))
    runner = Worker(streams, "runner", lambda j, sent: tokens_of(j, sent, step_s=0.02), min_idle_ms=200)
    reaper = Worker(streams, "reaper", tokens_of, min_idle_ms=200)
    task = asyncio.create_task(runner.process(await runner._read(">")))
    reclaimed = 0
    while not task.done():  # bounded by the job: 30 steps of 20 ms
        reclaimed += await reaper.reclaim()
        await asyncio.sleep(0.02)
    await task
    assert reclaimed == 0
    chunks = await collect(streams, "long")
    assert [c.seq for c in chunks] == list(range(31))


@pytest.mark.anyio
async def test_new_jobs_join_a_running_batch_at_a_step_boundary(streams: RedisStreams) -> None:
    await streams.ensure_group()
    await streams.enqueue(job("first", 20))
    worker = Worker(streams, "w1", lambda j, sent: tokens_of(j, sent, step_s=0.01), batch_size=4)
    task = asyncio.create_task(worker.step())
    for _ in range(200):
        if (last := await streams.last_chunk("first")) is not None and last.seq >= 2:
            break
        await asyncio.sleep(0.005)
    await streams.enqueue(job("second", 3))
    await asyncio.wait_for(task, 10)
    second = [entry_id async for entry_id, _ in streams.read_results("second", block_ms=100, max_wait_s=5)]
    first = [entry_id async for entry_id, _ in streams.read_results("first", block_ms=100, max_wait_s=5)]

    def position(entry_id: str) -> tuple[int, ...]:
        return tuple(int(part) for part in entry_id.split("-"))

    assert position(second[-1]) < position(first[-1])  # "second" ended inside "first"'s batch, not after it


@pytest.mark.anyio
async def test_a_job_is_resumable_while_it_runs_or_its_results_are_kept(streams: RedisStreams) -> None:
    assert await streams.enqueue(job("r"), owner="id:alice") is not None
    assert await streams.enqueue(job("r"), owner="id:bob") is None  # the id is taken
    assert await streams.owner_of("r") == "id:alice"
    assert await streams.results_kept("r")  # queued: its deadline is there
    await streams.write("r", Chunk(0, "done", "length"))
    assert await streams.results_kept("r")  # ended: its results are kept
    await streams.client.delete(streams.results("r"))  # as their expiry will
    assert not await streams.results_kept("r")


@pytest.mark.anyio
async def test_an_expired_job_is_ended_once_even_by_two_sweepers(streams: RedisStreams) -> None:
    await streams.enqueue(job("x", deadline_s=-1))
    other = RedisStreams(streams.client, streams.prefix)
    ended = await asyncio.gather(streams.expire_jobs(time.time()), other.expire_jobs(time.time()))
    assert sorted(ended) == [0, 1]
    chunks = await collect(streams, "x")
    assert [(c.kind, c.data) for c in chunks] == [("error", "timeout")]
