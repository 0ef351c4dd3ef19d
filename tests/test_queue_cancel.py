"""Cancelling queued jobs, on Redis and on the in-process queue: a client's ``cancel`` stops the job at its
worker's next step; a client that goes away abandons its job, which is cancelled after the grace period
unless a resume comes back within it; a cancelled job is never run again by a worker that reclaims it.

Nothing here asserts a speed: the model makes a token per 20 ms, so a job of 2,000 tokens would run 40 s,
and "stopped early" is read from the job's own results (its token count), never from a clock.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from websockets.sync.client import ClientConnection, connect

from polling import wait_until
from reference_server.queue import GROUP, Chunk, Job, RedisStreams, Worker
from reference_server.queue.backend import JobQueue
from reference_server.queue.memory import MemoryQueue
from reference_server.serve import EmbeddedServer
from reference_server.settings import ServerSettings, TokensModelSpec, load_settings
from serverkit import SseBlock, collect, recv, send
from test_queue_frontend import Queue, read_stream
from test_queue_memory import results_to_end
from test_queue_redis import kill_a_worker_mid_job, streams

__all__ = ["streams"]  # a fixture, imported to be found

pytestmark = pytest.mark.slow

GRACE_S = 1.0  # queue_cancel_after_s of the servers here; the front end sweeps every 0.5 s
LONG = 2000  # tokens: 40 s of work at 20 ms a token, so a job that ends in seconds was stopped
SPEC = TokensModelSpec(base_ms=20, per_seq_ms=0, prefill_ms=0, per_input_token_ms=0)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# --- the worker: stop at a step boundary, and never again after a reclaim ---------------------------------


def slow_tokens(job: Job, sent: int) -> Iterator[tuple[float, Chunk]]:
    for i in range(sent, job.max_tokens or LONG):
        yield 0.005, Chunk(i, "token", f"{job.prompt}-{i}")


async def _until_seq(queue: JobQueue, job_id: str, seq: int) -> Chunk:
    for _ in range(800):
        if (last := await queue.last_chunk(job_id)) is not None and last.seq >= seq:
            return last
        await asyncio.sleep(0.01)
    raise AssertionError(f"job {job_id} never reached token {seq}")


async def _pending(queue: JobQueue) -> float:
    return (await queue.figures(time.time()))["pending"]


async def _cancel_stops_the_running_job(queue: JobQueue) -> None:
    await queue.ensure_group()
    await queue.enqueue(Job("c", "tokens", "p", LONG, None, time.time() + 60))
    await queue.enqueue(Job("other", "tokens", "q", 30, None, time.time() + 60))
    worker = Worker(queue, "w", slow_tokens, batch_size=4, batch_timeout_ms=20)
    task = asyncio.create_task(worker.process(await worker._read(">")))
    await _until_seq(queue, "c", 3)
    await queue.cancel("c", "cancel", 60)
    await asyncio.wait_for(task, 10)  # the batch ends: "other" finished, "c" stopped
    chunks = await results_to_end(queue, "c")
    end = chunks[-1]
    assert (end.kind, end.data) == ("error", "cancelled")
    assert end.seq < 200  # far fewer than LONG tokens were made
    assert [c.seq for c in chunks[:-1]] == list(range(end.seq))  # every token once, then the end
    other = await results_to_end(queue, "other")
    assert (other[-1].kind, other[-1].seq) == ("done", 30)  # a job of the same batch is untouched
    assert await _pending(queue) == 0
    figures = await queue.figures(time.time())
    assert (figures["count:cancelled"], figures["count:cancelled:cancel"]) == (1, 1)
    assert (queue.counters.cancelled, queue.counters.completed) == (1, 1)


@pytest.mark.anyio
async def test_a_cancelled_job_stops_at_the_next_step_on_the_in_process_queue() -> None:
    await _cancel_stops_the_running_job(MemoryQueue())


@pytest.mark.anyio
async def test_a_cancelled_job_stops_at_the_next_step_on_redis(streams: RedisStreams) -> None:
    await _cancel_stops_the_running_job(streams)


@dataclass
class _Recording:
    """A token source that notes every job it is asked to run."""

    asked: list[str]

    def __call__(self, job: Job, sent: int) -> Iterator[tuple[float, Chunk]]:
        self.asked.append(job.id)
        return slow_tokens(job, sent)


async def _reclaimed_cancelled_job_is_not_run(queue: JobQueue, cut: Chunk) -> None:
    await queue.cancel("k", "cancel", 60)
    source = _Recording([])
    rescuer = Worker(queue, "rescuer", source, min_idle_ms=200)
    for _ in range(100):
        if await rescuer.reclaim():
            break
        await asyncio.sleep(0.05)
    else:
        pytest.fail("the job was never reclaimed")
    chunks = await results_to_end(queue, "k")
    assert source.asked == []  # the model was never asked for it again
    assert [c.seq for c in chunks[:-1]] == list(range(cut.seq + 1))  # nothing after the cut but the end
    assert (chunks[-1].kind, chunks[-1].data, chunks[-1].seq) == ("error", "cancelled", cut.seq + 1)
    assert await _pending(queue) == 0
    assert (await queue.figures(time.time()))["count:cancelled:cancel"] == 1


@pytest.mark.anyio
async def test_a_cancelled_job_of_a_dead_worker_is_reclaimed_and_not_run_again_in_process() -> None:
    queue = MemoryQueue()
    await queue.enqueue(Job("k", "tokens", "p", LONG, None, time.time() + 60))
    doomed = Worker(queue, "doomed", slow_tokens)
    task = asyncio.create_task(doomed.process(await doomed._read(">")))
    await _until_seq(queue, "k", 3)
    task.cancel()  # the worker dies mid-job: its entry stays pending
    await asyncio.gather(task, return_exceptions=True)
    cut = await queue.last_chunk("k")
    assert cut is not None
    await _reclaimed_cancelled_job_is_not_run(queue, cut)


@pytest.mark.anyio
async def test_a_cancelled_job_of_a_killed_worker_is_reclaimed_and_not_run_again_on_redis(
    streams: RedisStreams, redis_url: str, tmp_path: Path
) -> None:
    await streams.ensure_group()
    await streams.enqueue(Job("k", "tokens", "p", LONG, 1, time.time() + 60))
    cut = await kill_a_worker_mid_job(streams, redis_url, tmp_path, "k", 3)
    await _reclaimed_cancelled_job_is_not_run(streams, cut)
    assert (await streams.client.xpending(streams.jobs, GROUP))["pending"] == 0


# --- end to end: a front end (two on Redis) and workers -----------------------------------------------------


@dataclass
class Served:
    urls: list[str]  # front ends on one queue: a resume may go to any of them

    @property
    def url(self) -> str:
        return self.urls[0]

    def metric(self, http: httpx.Client, line: str) -> float:
        """The value of the /metrics sample named ``line`` (0 when absent)."""
        for text in http.get(self.url + "/metrics").text.splitlines():
            name, _, value = text.rpartition(" ")
            if name == line:
                return float(value)
        return 0.0


CANCELLED = 'inferbench_queue_jobs_cancelled_total{cause="%s"}'
PENDING = 'inferbench_queue_jobs{state="pending"}'


@pytest.fixture(scope="module", params=["memory", "redis"])
def served(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    if request.param == "memory":
        settings = ServerSettings(queue_url="memory://", models=[SPEC], queue_cancel_after_s=GRACE_S)
        with EmbeddedServer(settings) as server:
            yield Served([server.url])
        return
    url = request.getfixturevalue("redis_url")
    queue = Queue(url, tmp_path_factory.mktemp("cancel"))
    with queue.config.open("a") as config:
        config.write(f"queue_cancel_after_s: {GRACE_S}\n")
    queue.settings = load_settings(queue.config, queue_url=url)
    try:
        queue.worker("w1")
        with queue.embedded() as first, queue.embedded() as second:
            yield Served([first.url, second.url])
    finally:
        queue.close()


def _tokens(blocks: list[SseBlock]) -> list[int]:
    return [b.json()["seq"] for b in blocks if b.event == "token"]


def test_a_websocket_cancel_stops_the_job_and_a_resume_reads_its_cancelled_end(served: Served) -> None:
    with httpx.Client(timeout=10, trust_env=False) as http:
        before = served.metric(http, CANCELLED % "cancel")
        with open_socket_at(served.url) as ws:
            send(ws, {"type": "generate", "id": "ws-cancel", "prompt": "stop me", "max_tokens": LONG})
            assert [recv(ws)["seq"] for _ in range(3)] == [0, 1, 2]
            send(ws, {"type": "cancel", "id": "ws-cancel"})
            while (message := recv(ws))["type"] == "token":
                pass
            assert (message["type"], message["error"]) == ("error", "cancelled")
        with open_socket_at(served.urls[-1]) as ws:  # on Redis: the other front end
            send(ws, {"type": "resume", "id": "ws-cancel", "last_seq": 2})
            rest = collect(ws, {"ws-cancel"})["ws-cancel"]
        end = rest[-1]
        assert (end["type"], end["error"]) == ("error", "cancelled")
        made = end["usage"]["completion_tokens"]
        assert made < 200  # of LONG: the worker stopped
        assert [m["seq"] for m in rest[:-1]] == list(range(3, made))
        wait_until(lambda: served.metric(http, CANCELLED % "cancel") == before + 1, timeout_s=5)
        wait_until(lambda: served.metric(http, PENDING) == 0, timeout_s=5)


def test_a_stream_whose_client_hangs_up_is_cancelled_after_the_grace(served: Served) -> None:
    with httpx.Client(timeout=10, trust_env=False) as http:
        before = served.metric(http, CANCELLED % "abandoned")
        body = {"prompt": "abandon me", "max_tokens": LONG, "request_id": "gone"}
        first = read_stream(http, served.url, body, stop_after=3)
        wait_until(lambda: served.metric(http, CANCELLED % "abandoned") == before + 1, timeout_s=GRACE_S + 5)
        last_id = [b for b in first if b.event == "token"][-1].id
        assert last_id is not None
        rest = read_stream(http, served.urls[-1], body, headers={"Last-Event-ID": last_id})
        end = rest[-1].json()
        assert (rest[-1].event, end["error"]) == ("error", "cancelled")
        assert end["usage"]["completion_tokens"] < 500  # of LONG: stopped about a grace period after the hang-up
        assert _tokens(first) + _tokens(rest) == list(range(end["usage"]["completion_tokens"]))
        wait_until(lambda: served.metric(http, PENDING) == 0, timeout_s=5)


def test_a_resume_within_the_grace_keeps_the_job_and_gets_every_token_once(served: Served) -> None:
    """The job (100 tokens, ~2 s) outlives the grace: had the resume not kept it, it would end cancelled."""
    with httpx.Client(timeout=10, trust_env=False) as http:
        before = served.metric(http, CANCELLED % "abandoned")
        body = {"prompt": "come back", "max_tokens": 100, "request_id": "back"}
        first = read_stream(http, served.url, body, stop_after=5)
        last_id = [b for b in first if b.event == "token"][-1].id
        assert last_id is not None
        rest = read_stream(http, served.urls[-1], body, headers={"Last-Event-ID": last_id})
        assert rest[-1].event == "done"
        assert rest[-1].json()["usage"]["completion_tokens"] == 100
        assert _tokens(first) + _tokens(rest) == list(range(100))  # every token once
        assert served.metric(http, CANCELLED % "abandoned") == before


def test_a_websocket_closed_mid_generation_abandons_its_job(served: Served) -> None:
    with httpx.Client(timeout=10, trust_env=False) as http:
        before = served.metric(http, CANCELLED % "abandoned")
        with open_socket_at(served.url) as ws:
            send(ws, {"type": "generate", "id": "closing", "prompt": "close me", "max_tokens": LONG})
            assert recv(ws)["seq"] == 0
        wait_until(lambda: served.metric(http, CANCELLED % "abandoned") == before + 1, timeout_s=GRACE_S + 5)
        wait_until(lambda: served.metric(http, PENDING) == 0, timeout_s=5)


def open_socket_at(url: str) -> ClientConnection:
    # proxy=None: no proxy from the environment may take loopback traffic elsewhere.
    return connect(url.replace("http://", "ws://") + "/ws", open_timeout=5, close_timeout=2, proxy=None)


def test_an_openai_stream_whose_client_hangs_up_is_cancelled_at_once(served: Served) -> None:
    """OpenAI's routes have no resume, so no grace: the job is cancelled at the front end's next sweep."""
    with httpx.Client(timeout=10, trust_env=False) as http:
        before = served.metric(http, CANCELLED % "abandoned")
        body = {"model": "tokens", "messages": [{"role": "user", "content": "hang up"}], "max_tokens": LONG,
                "stream": True}  # fmt: skip
        with http.stream("POST", served.url + "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            assert sum(1 for line, _ in zip(lines, range(6), strict=False) if line.startswith("data: ")) >= 3
        wait_until(lambda: served.metric(http, CANCELLED % "abandoned") == before + 1, timeout_s=5)
        wait_until(lambda: served.metric(http, PENDING) == 0, timeout_s=5)
