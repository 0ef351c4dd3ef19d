"""Progress, log and complete events of queued jobs: written by the worker between tokens, numbered like
them, streamed to SSE and WebSocket clients, and never repeated by a worker that takes a job over."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from reference_server.queue import Chunk, Job, Worker
from reference_server.queue.memory import MemoryQueue
from reference_server.queue.model_source import ModelSource
from reference_server.settings import ServerSettings, load_settings
from serverkit import collect, open_socket, send
from test_queue_frontend import Queue, expected_tokens, read_stream


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


FREE = {"kind": "tokens", "name": "tokens", "base_ms": 0, "per_seq_ms": 0, "prefill_ms": 0, "per_input_token_ms": 0}


def expected_kinds(tokens: int, every: int) -> list[tuple[str, int]]:
    """(kind, seq) of a job's chunks: a log, tokens with progress after each ``every``-th, complete, done."""
    out = [("log", 0)]
    for i in range(tokens):
        out.append(("token", i))
        if (i + 1) % every == 0 and i + 1 < tokens:
            out.append(("progress", i + 1))
    return [*out, ("complete", tokens), ("done", tokens)]


def test_the_source_publishes_a_log_progress_every_n_tokens_and_complete() -> None:
    source = ModelSource.from_settings(ServerSettings.model_validate({"models": [FREE]}))
    job = Job("p", "tokens", "a long job", 7, 1, time.time() + 60, progress_every=3)
    chunks = [chunk for _, chunk in source(job, 0)]
    assert [(c.kind, c.seq) for c in chunks] == expected_kinds(7, 3)
    assert chunks[4].data == '{"percent":42.9,"step":3,"steps":7}'
    assert chunks[-2].message == "generated 7 tokens"
    resumed = [chunk for _, chunk in source(job, 3)]  # taken over after token 2 (or the progress after it)
    assert resumed[0].kind == "log"
    assert resumed[0].message.startswith("job resumed after 3 of 7 tokens")
    assert [(c.kind, c.seq) for c in resumed[1:]] == expected_kinds(7, 3)[5:]


@pytest.mark.anyio
async def test_a_job_taken_over_after_a_progress_event_repeats_no_token_and_no_progress() -> None:
    queue = MemoryQueue()
    source = ModelSource.from_settings(ServerSettings.model_validate({"models": [FREE]}))
    await queue.enqueue(Job("k", "tokens", "long", 12, 1, time.time() + 60, progress_every=4))
    doomed = Worker(queue, "doomed", source, min_idle_ms=50)
    task = asyncio.create_task(doomed.process(await doomed._read(">")))
    for _ in range(2000):  # bounded: stop the worker once its first progress event is written
        last = await queue.last_chunk("k")
        if last is not None and last.kind == "progress":
            break
        await asyncio.sleep(0)
    task.cancel()  # the worker dies right after a progress event: its entry stays pending
    await asyncio.gather(task, return_exceptions=True)
    rescuer = Worker(queue, "rescuer", source, min_idle_ms=50)
    for _ in range(200):
        if await rescuer.reclaim():
            break
        await asyncio.sleep(0.01)
    chunks: list[Chunk] = [chunk for _, chunk in await queue.read_after("k", "0-0", 0)]
    tokens = [c.seq for c in chunks if c.kind == "token"]
    assert tokens == list(range(12))
    assert [c.seq for c in chunks if c.kind == "progress"] == [4, 8]
    assert [c.kind for c in chunks if c.kind in ("log", "complete", "done")] == ["log", "log", "complete", "done"]


def seq_of(payload: dict[str, Any]) -> int:
    """An event's seq; the final event's is its count of tokens."""
    return int(payload["seq"] if "seq" in payload else payload["usage"]["completion_tokens"])


@pytest.fixture
def queue(redis_url: str, tmp_path: Path) -> Iterator[Queue]:
    q = Queue(redis_url, tmp_path)
    q.config.write_text(q.config.read_text() + "queue_progress_every: 10\n")
    q.settings = load_settings(q.config, queue_url=redis_url)
    try:
        yield q
    finally:
        q.close()


@pytest.mark.slow
def test_progress_log_and_complete_events_stream_over_sse_and_websocket_from_a_real_worker(queue: Queue) -> None:
    queue.worker("wa")
    prompt = "a long job"
    expected = expected_tokens(queue, prompt, 25)
    with queue.embedded() as server, httpx.Client(timeout=30, trust_env=False) as http:
        blocks = read_stream(http, server.url, {"prompt": prompt, "max_tokens": 25})
        events = [b for b in blocks if b.event]
        assert [(b.event, seq_of(b.json())) for b in events] == expected_kinds(25, 10)
        assert [b.json()["token"] for b in events if b.event == "token"] == expected
        progress = [b.json() for b in events if b.event == "progress"]
        assert progress == [{"percent": 40.0, "step": 10, "steps": 25, "seq": 10},
                            {"percent": 80.0, "step": 20, "steps": 25, "seq": 20}]  # fmt: skip
        assert events[0].json()["message"] == "job started on model tokens@1"
        complete = events[-2].json()
        assert (complete["percent"], complete["message"]) == (100.0, "generated 25 tokens")
        assert all(b.id is not None for b in events[:-1])  # each resumable by its stream id

        with open_socket(server) as ws:
            send(ws, {"type": "generate", "id": "g", "prompt": prompt, "max_tokens": 25})
            messages = collect(ws, {"g"})["g"]
        assert [(m["type"], seq_of(m)) for m in messages] == expected_kinds(25, 10)
        assert [m["percent"] for m in messages if m["type"] == "progress"] == [40.0, 80.0]
        assert messages[-1]["usage"]["completion_tokens"] == 25
