"""Queue workers on the real ``tokens`` model: deterministic tokens, exact resumes, a graceful SIGTERM."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from reference_server.models.tokens import TokensModel
from reference_server.queue import Chunk, Job, JobBucket, RedisStreams
from reference_server.queue.model_source import ModelSource
from reference_server.settings import ServerSettings, TokensModelSpec
from test_queue_redis import anyio_backend, collect, streams

__all__ = ["anyio_backend", "streams"]  # fixtures, imported to be found


def _job(prompt: str = "the quick brown fox", max_tokens: int | None = 12, seed: int | None = 7) -> Job:
    return Job("j", "tokens", prompt, max_tokens, seed, time.time() + 60)


def test_the_source_gives_the_models_tokens_and_a_resume_skips_exactly_the_sent_ones() -> None:
    source = ModelSource.from_settings(ServerSettings())
    model = TokensModel(TokensModelSpec())
    plan = model.plan("the quick brown fox", 12, 7)
    expected = [model.next_token(plan) for _ in range(12)]
    whole = [chunk for _, chunk in source(_job(), 0)]
    assert [c.data for c in whole[:-1]] == expected
    assert (whole[-1].kind, whole[-1].data, whole[-1].seq, whole[-1].model_version) == ("done", "length", 12, "1")
    resumed = [chunk for _, chunk in source(_job(), 5)]
    assert [(c.seq, c.data) for c in resumed[:-1]] == [(i, expected[i]) for i in range(5, 12)]


def test_the_source_charges_prefill_once_and_the_batch_step_cost() -> None:
    source = ModelSource.from_settings(ServerSettings())
    source.running = 4
    waits = [wait for wait, chunk in source(_job("a b", 3), 0) if chunk.kind == "token"]
    assert waits[0] == pytest.approx(0.005 + 0.0004 + 0.001 + 0.00002)  # step of 4, plus prefill of 2 words
    assert waits[1:] == [pytest.approx(0.0054)] * 2


def test_without_max_tokens_the_job_stops_with_the_models_drawn_length() -> None:
    chunks = [c for _, c in ModelSource.from_settings(ServerSettings())(_job(max_tokens=None), 0)]
    assert chunks[-1].data == "stop"
    assert 16 <= chunks[-1].seq <= 128


def test_an_unknown_model_ends_the_job_with_an_error_chunk() -> None:
    job = Job("j", "nope", "p", 3, None, time.time() + 60)
    assert [c.kind for _, c in ModelSource.from_settings(ServerSettings())(job, 0)] == ["error"]


def test_the_job_bucket_limits_jobs_per_second() -> None:
    bucket = JobBucket(rate=10, burst=2)
    assert bucket.available(100.0) == 2
    bucket.take(2)
    assert bucket.available(100.05) == 0
    assert bucket.wait_s() == pytest.approx(0.05)
    assert bucket.available(100.1) == 1


@pytest.mark.slow
@pytest.mark.anyio
async def test_a_worker_process_serves_jobs_and_leaves_on_sigterm(
    streams: RedisStreams, redis_url: str, tmp_path: Path
) -> None:
    path = tmp_path / "server.yaml"
    path.write_text(f"queue_prefix: {streams.prefix}\n")
    proc = subprocess.Popen(  # noqa: ASYNC220 - a PID to signal
        [sys.executable, "-m", "infer_bench.cli", "worker", "--queue", redis_url, "--config", str(path),
         "--concurrency", "2"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        await streams.enqueue(Job("w", "tokens", "hello there", 4, 1, time.time() + 60))
        chunks = await collect(streams, "w")
        assert [c.seq for c in chunks] == [0, 1, 2, 3, 4]
        assert chunks[-1] == Chunk(4, "done", "length", model_version="1")
        for _ in range(100):
            if await streams.live_workers(time.time()) == 2:
                break
            await asyncio.sleep(0.05)
        assert await streams.live_workers(time.time()) == 2
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=15)
    assert proc.returncode == 0, out
    assert "infer-bench worker" in out
    assert await streams.live_workers(time.time()) == 0  # a clean exit leaves the live set
