"""``infer-bench worker``: N queue consumers in one process over the settings' ``tokens`` models.

Start: load the settings, build and pre-warm every ``tokens`` model version, then run ``concurrency``
consumers (each a ``Worker``, each reading its own batches). Stop: on SIGTERM or SIGINT each consumer
finishes the batch it is running and leaves; one that is not done within ``grace_s`` is cancelled, which
leaves its jobs pending in the group, where another worker reclaims them after ``min_idle_ms`` and
resumes them after their last written chunk.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

from reference_server.metrics import ServerMetrics
from reference_server.queue.backend import JobQueue
from reference_server.queue.jobs import Job
from reference_server.queue.model_source import ModelSource
from reference_server.queue.redis_streams import RedisStreams, connect
from reference_server.queue.worker import JobBucket, Worker
from reference_server.settings import ServerSettings

log = logging.getLogger("reference_server.queue")


@dataclass(frozen=True)
class WorkerOptions:
    queue_url: str
    concurrency: int = 1
    name: str | None = None  # consumer name prefix; stable names let a restarted worker re-read its pending jobs
    rate_per_s: float | None = None  # jobs a second this process takes from the queue (all consumers); None = no limit
    grace_s: float = 10.0
    prefix: str = "inferbench"


def consumer_names(options: WorkerOptions) -> list[str]:
    base = options.name or f"{socket.gethostname()}-{os.getpid()}"
    return [base if options.concurrency == 1 else f"{base}-{i}" for i in range(options.concurrency)]


async def serve_worker(
    settings: ServerSettings,
    options: WorkerOptions,
    stop: asyncio.Event,
    ready: Callable[[list[str]], None] | None = None,
) -> None:
    """Run the consumers until ``stop``, then stop them gracefully (see the module docstring)."""
    client = connect(options.queue_url)
    streams = RedisStreams(client, options.prefix)
    bucket = None
    if options.rate_per_s is not None:
        bucket = JobBucket(options.rate_per_s, max(1.0, options.rate_per_s))
    names = consumer_names(options)
    workers = build_workers(settings, streams, names, bucket)
    tasks = [asyncio.create_task(w.run(stop), name=f"worker {w.name}") for w in workers]
    if ready is not None:
        ready(names)
    try:
        await stop.wait()
        _, late = await asyncio.wait(tasks, timeout=options.grace_s)
        for task in late:  # its batch stays pending: another worker reclaims and resumes it
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        for task in tasks:
            task.cancel()
        with contextlib.suppress(Exception):
            await client.aclose()


def build_workers(
    settings: ServerSettings, streams: JobQueue, names: list[str], bucket: JobBucket | None = None
) -> list[Worker]:
    """One pre-warmed consumer per name over the settings' ``tokens`` models."""
    workers = []
    for name in names:
        source = ModelSource.from_settings(settings)
        source.warm_up()
        workers.append(make_worker(settings, streams, name, source, bucket))
    return workers


def make_worker(
    settings: ServerSettings, streams: JobQueue, name: str, source: ModelSource, bucket: JobBucket | None = None
) -> Worker:
    """A consumer running ``source``'s models, batching as the settings say."""
    worker = Worker(
        streams, name, source, batch_size=settings.max_num_seqs, bucket=bucket,
        min_idle_ms=settings.queue_reclaim_idle_ms, max_deliveries=settings.queue_max_deliveries,
    )  # fmt: skip
    # Redis's BLOCK 0 waits forever; the block only paces an idle loop, it never delays a batch.
    worker.batch_timeout_ms = max(1, int(settings.batch_timeout_ms)) if settings.batch_timeout_ms else 50
    worker.on_batch = lambda n: setattr(source, "running", n)
    return worker


async def run_in_process(
    settings: ServerSettings, streams: JobQueue, source: ModelSource, metrics: ServerMetrics
) -> None:
    """The worker of the in-process queue: one consumer in the server's own process, until cancelled. It
    runs ``source``: the server's own models, into which the front end pins each job's routed version.
    Its steps and queue waits go to the server's batch metrics, as the direct path's scheduler's do."""
    worker = make_worker(settings, streams, f"in-process-{os.getpid()}", source)
    sizes, steps = metrics.batch_size.child("generate"), metrics.batches.child("generate", "step")
    execution, queue_wait = metrics.batch_execution.child("generate"), metrics.queue_wait.child("generate")

    def on_step(running: int, wait_s: float) -> None:
        sizes.observe(running)
        steps.inc()
        execution.observe(wait_s)

    def on_start(job: Job) -> None:  # a job's deadline is its enqueue time plus job_ttl_s
        queue_wait.observe(max(0.0, time.time() - (job.deadline - settings.job_ttl_s)))

    worker.on_step, worker.on_start = on_step, on_start
    await worker.run(asyncio.Event())


def run_worker(settings: ServerSettings, options: WorkerOptions, announce: Callable[[str], None] | None = None) -> None:
    """Blocks until SIGTERM/SIGINT. ``announce`` gets one line once the consumers run."""

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)

        def ready(names: list[str]) -> None:
            if announce is not None:
                announce(f"infer-bench worker {', '.join(names)} on {options.queue_url} (prefix {options.prefix})")

        await serve_worker(settings, options, stop, ready)

    if importlib.util.find_spec("uvloop") is not None:
        import uvloop

        uvloop.run(main())
    else:
        asyncio.run(main())
