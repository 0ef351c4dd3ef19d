"""The queue figures issue 7 asks for, on a front end's /metrics: pending and waiting jobs, reclaimed and
dead-lettered jobs, deliveries per job, and the live worker count — each made to happen once on Redis."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest
import redis
import redis.asyncio as aioredis

from polling import wait_until
from reference_server.queue import Chunk, Job, RedisStreams, Worker
from reference_server.serve import EmbeddedServer
from reference_server.settings import ServerSettings

pytestmark = pytest.mark.slow


def tokens_of(job: Job, sent: int) -> Iterator[tuple[float, Chunk]]:
    for i in range(sent, 3):
        yield 0.0, Chunk(i, "token", f"t{i}")


def _job(job_id: str) -> Job:
    return Job(job_id, "tokens", "p", 3, 1, time.time() + 60)


async def make_history(url: str, prefix: str) -> None:
    """b: dead-lettered on its third delivery; a: reclaimed on its second and finished; c: finished on its
    first; d: pending on a consumer that never acknowledges; e: never read. One worker's heartbeat."""
    client = aioredis.Redis.from_url(url)
    streams = RedisStreams(client, prefix)
    try:
        await streams.ensure_group()
        await streams.enqueue(_job("b"))
        assert len(await streams.read_group("ghost", ">", 1, None)) == 1
        assert len(await streams.autoclaim("ghost2", 0, 10)) == 1  # b's second delivery
        await streams.enqueue(_job("a"))
        assert len(await streams.read_group("ghost", ">", 1, None)) == 1
        worker = Worker(streams, "w1", tokens_of, min_idle_ms=0, max_deliveries=2)
        assert await worker.reclaim() == 1  # a (2nd delivery) kept and run; b (3rd) dead-lettered
        await streams.enqueue(_job("c"))
        await worker.process(await worker._read(">", 1, wait=False))
        await streams.enqueue(_job("d"))
        assert len(await streams.read_group("ghost", ">", 1, None)) == 1
        await streams.enqueue(_job("e"))
        await streams.heartbeat("w1", time.time())
    finally:
        await client.aclose()


def test_pending_reclaimed_dead_lettered_deliveries_and_workers_are_on_metrics(redis_url: str) -> None:
    prefix = f"inferbench-test-{uuid.uuid4().hex[:12]}"
    settings = ServerSettings.model_validate({"queue_url": redis_url, "queue_prefix": prefix})
    try:
        asyncio.run(make_history(redis_url, prefix))
        with EmbeddedServer(settings) as server, httpx.Client(timeout=10, trust_env=False) as http:
            expected = [
                'inferbench_queue_jobs{state="pending"} 1.0',
                'inferbench_queue_jobs{state="waiting"} 1.0',
                "inferbench_queue_workers 1.0",
                "inferbench_queue_dead_letters 1.0",
                'inferbench_queue_jobs_total{event="enqueued"} 5.0',
                'inferbench_queue_jobs_total{event="completed"} 2.0',
                'inferbench_queue_jobs_total{event="reclaimed"} 1.0',
                'inferbench_queue_jobs_total{event="dead_lettered"} 1.0',
                'inferbench_queue_job_deliveries_total{deliveries="1"} 1.0',
                'inferbench_queue_job_deliveries_total{deliveries="2"} 1.0',
                "inferbench_queue_reachable 1.0",
            ]

            def missing() -> list[str]:
                text = http.get(server.url + "/metrics").text
                return [line for line in expected if line not in text.splitlines()]

            wait_until(lambda: not missing(), timeout_s=5, interval_s=0.05)
            figures = http.get(server.url + "/stats").json()["queue"]["figures"]
            assert (figures["pending"], figures["workers"], figures["count:reclaimed"]) == (1, 1, 1)
    finally:
        client = redis.Redis.from_url(redis_url)
        keys = list(client.scan_iter(match=f"{prefix}:*"))
        if keys:
            client.delete(*keys)
