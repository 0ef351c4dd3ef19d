"""Queue mode on the in-process backend (``--queue memory://``): the same worker and front-end code as on
Redis, with no service to run — tokens exactly once across a worker that died, resume by stream id."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator

import httpx
import pytest

from polling import wait_until
from reference_server.queue import Chunk, Job, Worker
from reference_server.queue.backend import JobQueue
from reference_server.queue.memory import MemoryQueue
from reference_server.queue.model_source import ModelSource
from reference_server.serve import EmbeddedServer
from reference_server.settings import ServerSettings, TokensModelSpec
from serverkit import SseBlock, collect, open_socket, recv, send, sse_blocks


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def tokens_of(job: Job, sent: int, step_s: float = 0.005) -> Iterator[tuple[float, Chunk]]:
    for i in range(sent, job.max_tokens or 6):
        yield step_s, Chunk(i, "token", f"{job.prompt}-{i}")


def _job(job_id: str, max_tokens: int = 20) -> Job:
    return Job(job_id, "tokens", f"p{job_id}", max_tokens, None, time.time() + 60)


async def results_to_end(queue: JobQueue, job_id: str) -> list[Chunk]:
    """Every result chunk of ``job_id`` up to its final one, read as a front end reads them."""
    out: list[Chunk] = []
    after = "0-0"
    for _ in range(1000):  # bounded: each read waits at most 200 ms
        for entry_id, chunk in await queue.read_after(job_id, after, 200):
            out.append(chunk)
            after = entry_id
            if chunk.final:
                return out
    raise AssertionError(f"job {job_id} did not end")


@pytest.mark.anyio
async def test_a_job_of_a_dead_worker_is_reclaimed_and_every_token_arrives_once() -> None:
    queue = MemoryQueue()
    await queue.enqueue(_job("k"))
    doomed = Worker(queue, "doomed", tokens_of, min_idle_ms=100)
    task = asyncio.create_task(doomed.process(await doomed._read(">")))
    for _ in range(400):
        if (last := await queue.last_chunk("k")) is not None and last.seq >= 5:
            break
        await asyncio.sleep(0.005)
    task.cancel()  # the worker dies mid-job: its entry stays pending
    await asyncio.gather(task, return_exceptions=True)
    rescuer = Worker(queue, "rescuer", tokens_of, min_idle_ms=100)
    for _ in range(100):
        if await rescuer.reclaim():
            break
        await asyncio.sleep(0.02)
    chunks = await results_to_end(queue, "k")
    assert [c.seq for c in chunks] == list(range(21))
    assert [c.data for c in chunks[:20]] == [f"pk-{i}" for i in range(20)]
    assert queue.counters.reclaimed == 1
    assert (await queue.figures(time.time()))["pending"] == 0


@pytest.mark.anyio
async def test_a_claim_taken_by_another_consumer_is_not_refreshed() -> None:
    queue = MemoryQueue()
    await queue.enqueue(_job("c"))
    [(entry_id, _)] = await queue.read_group("a", ">", 10, None)
    assert await queue.refresh_claims("a", [(0, [entry_id])]) == {entry_id}
    [(_, _, deliveries)] = await queue.autoclaim("b", 0, 10)
    assert deliveries == 2
    assert await queue.refresh_claims("a", [(60_000, [entry_id])]) == set()  # b's claim is fresh


@pytest.mark.anyio
async def test_a_job_delivered_too_often_is_dead_lettered_and_its_client_told() -> None:
    queue = MemoryQueue()
    await queue.enqueue(_job("d"))
    await queue.read_group("ghost", ">", 1, None)
    assert await Worker(queue, "w", tokens_of, min_idle_ms=0, max_deliveries=1).reclaim() == 0
    assert [(c.kind, c.data) for c in await results_to_end(queue, "d")] == [("error", "dead_lettered")]
    assert (await queue.figures(time.time()))["dead_letters"] == 1


@pytest.mark.anyio
async def test_expired_jobs_end_with_a_timeout_and_expired_results_are_forgotten() -> None:
    queue = MemoryQueue()
    await queue.enqueue(Job("t", "tokens", "p", 3, None, time.time() - 1))
    assert await queue.expire_jobs(time.time()) == 1
    assert [(c.kind, c.data) for c in await results_to_end(queue, "t")] == [("error", "timeout")]
    await queue.expire_jobs(time.time() + 10_000)
    assert not await queue.results_kept("t")
    assert await queue.owner_of("t") is None


def _stream(
    http: httpx.Client, url: str, body: dict[str, object], headers: dict[str, str], stop_after: int = 0
) -> list[SseBlock]:
    got: list[SseBlock] = []
    with http.stream("POST", url + "/v1/stream", json=body, headers=headers) as r:
        assert r.status_code == 200, r.read()
        for block in sse_blocks(r.iter_raw()):
            got.append(block)
            if stop_after and sum(b.event == "token" for b in got) >= stop_after:
                break
    return got


@pytest.mark.slow
def test_serve_on_the_in_process_queue_streams_the_models_tokens_and_resumes_by_stream_id() -> None:
    spec = TokensModelSpec(base_ms=5, per_seq_ms=0, prefill_ms=0, per_input_token_ms=0)
    settings = ServerSettings(queue_url="memory://", models=[spec])
    model = ModelSource.from_settings(settings).resolve("tokens")
    plan = model.plan("in process", 30, None)
    expected = [(i, model.next_token(plan)) for i in range(30)]
    body = {"prompt": "in process", "max_tokens": 30, "request_id": "m1"}
    with EmbeddedServer(settings) as server, httpx.Client(timeout=10) as http:
        before = _stream(http, server.url, body, {}, stop_after=7)
        last = [b for b in before if b.event == "token"][-1].id
        assert last is not None
        after = _stream(http, server.url, body, {"Last-Event-ID": last})
        tokens = [(b.json()["seq"], b.json()["token"]) for b in before + after if b.event == "token"]
        assert tokens == expected
        assert after[-1].event == "done"
        assert after[-1].json()["usage"]["completion_tokens"] == 30
        assert http.post(server.url + "/v1/stream", json=body).status_code == 409
        wait_until(lambda: "inferbench_queue_workers 1.0" in http.get(server.url + "/metrics").text)


@pytest.mark.anyio
async def test_a_model_failure_ends_the_job_with_model_error_after_the_tokens_before_it() -> None:
    queue = MemoryQueue()
    source = ModelSource.from_settings(ServerSettings(models=[TokensModelSpec(fail_rate=1.0, base_ms=0)]))
    await queue.enqueue(Job("f", "tokens", "fails", 40, 3, time.time() + 60))
    worker = Worker(queue, "w", source)
    await worker.process(await worker._read(">"))
    chunks = await results_to_end(queue, "f")
    assert [c.kind for c in chunks[:-1]] == ["token"] * (len(chunks) - 1)
    assert (chunks[-1].kind, chunks[-1].data, chunks[-1].model_version) == ("error", "model_error", "1")
    assert (queue.counters.failed, queue.counters.completed) == (1, 0)


@pytest.mark.slow
def test_websocket_generations_go_through_the_queue_and_resume_from_another_socket() -> None:
    spec = TokensModelSpec(base_ms=5, per_seq_ms=0, prefill_ms=0, per_input_token_ms=0)
    settings = ServerSettings(queue_url="memory://", models=[spec])
    model = ModelSource.from_settings(settings).resolve("tokens")
    plan = model.plan("over a socket", 20, None)
    expected = [model.next_token(plan) for _ in range(20)]
    with EmbeddedServer(settings) as server:
        with open_socket(server) as ws:
            send(ws, {"type": "generate", "id": "g1", "prompt": "over a socket", "max_tokens": 20})
            got = collect(ws, {"g1"})["g1"]
            assert [m["token"] for m in got if m["type"] == "token"] == expected
            assert got[-1]["type"] == "done"
            assert got[-1]["usage"]["completion_tokens"] == 20
            send(ws, {"type": "generate", "id": "g2", "prompt": "over a socket", "max_tokens": 2000})
            first = [recv(ws) for _ in range(3)]
            assert [m["seq"] for m in first] == [0, 1, 2]
            send(ws, {"type": "cancel", "id": "g2"})
            while (message := recv(ws))["type"] == "token":
                pass
            assert (message["type"], message["error"]) == ("error", "cancelled")
        with open_socket(server) as ws:  # another socket of the same client: what was made, then the cancel
            send(ws, {"type": "resume", "id": "g2", "last_seq": 2})
            rest = collect(ws, {"g2"})["g2"]
            tokens = [(m["seq"], m["token"]) for m in rest if m["type"] == "token"]
            long_plan = model.plan("over a socket", 2000, None)
            made = [model.next_token(long_plan) for _ in range(3 + len(tokens))]
            assert tokens == list(enumerate(made))[3:]
            assert (rest[-1]["type"], rest[-1]["error"]) == ("error", "cancelled")
            assert rest[-1]["usage"]["completion_tokens"] < 2000
            send(ws, {"type": "resume", "id": "nope"})
            assert (recv(ws)["error"]) == "resume_unavailable"


@pytest.mark.slow
def test_queued_streams_keep_the_direct_paths_time_limits_queue_bound_and_metrics() -> None:
    slow = TokensModelSpec(base_ms=0, per_seq_ms=0, prefill_ms=1000, per_input_token_ms=0)
    settings = ServerSettings(
        queue_url="memory://", models=[slow], first_token_timeout_s=0.2, max_num_seqs=1, max_queue=1,
        graceful_shutdown_s=1,
    )  # fmt: skip
    with EmbeddedServer(settings) as server, httpx.Client(timeout=10) as http:
        timed_out = _stream(http, server.url, {"prompt": "slow", "max_tokens": 4}, {})
        assert [b.event for b in timed_out if b.event] == ["error"]
        body = timed_out[-1].json()
        assert (body["error"], body["kind"], body["usage"]["completion_tokens"]) == ("timeout", "first_token", 0)
        metrics = server.state.metrics
        assert metrics.timeouts.child("first_token").value == 1
        assert metrics.sequences.child("timeout").value == 1
        front = server.state.queue
        assert front is not None
        wait_until(lambda: front.figures.get("count:cancelled:timeout") == 1)  # the worker is free again
        # The worker holds one job (its prefill takes 1 s), one waits; a third is refused with queue_full.
        with http.stream("POST", server.url + "/v1/stream", json={"prompt": "a", "max_tokens": 2}) as running:
            assert running.status_code == 200
            wait_until(lambda: front.figures.get("pending") == 1)
            with http.stream("POST", server.url + "/v1/stream", json={"prompt": "b", "max_tokens": 2}) as waiting:
                assert waiting.status_code == 200
                refused = http.post(server.url + "/v1/stream", json={"prompt": "c", "max_tokens": 2})
        assert refused.status_code == 503
        assert (refused.json()["reason"], int(refused.headers["retry-after"]) >= 1) == ("queue_full", True)
        assert metrics.rejections.child("queue_full").value == 1


@pytest.mark.slow
def test_queued_streams_record_the_servers_ttft_inter_token_and_outcome_metrics() -> None:
    spec = TokensModelSpec(base_ms=5, per_seq_ms=0, prefill_ms=0, per_input_token_ms=0)
    settings = ServerSettings(queue_url="memory://", models=[spec], heartbeat_s=0.05)
    with EmbeddedServer(settings) as server, httpx.Client(timeout=10) as http:
        got = _stream(http, server.url, {"prompt": "measured", "max_tokens": 12}, {})
        assert got[-1].event == "done"
        metrics = server.state.metrics
        wait_until(lambda: metrics.sequences.child("finished").value == 1)
        assert metrics.tokens.child().value == 12
        assert metrics.ttft.child().count == 1
        assert 1 <= metrics.itl.child().count <= 11  # tokens read together share one averaged gap
        assert metrics.e2e.child("generate").count == 1
        # The in-process worker's steps are the server's batches, as the scheduler's are in direct mode.
        assert metrics.batches.child("generate", "step").value >= 12
        assert metrics.batch_size.child("generate").count == metrics.batches.child("generate", "step").value
        assert metrics.batch_execution.child("generate").count >= 12
        assert metrics.queue_wait.child("generate").count == 1
        text = http.get(server.url + "/metrics").text
        assert 'inferbench_sequences_total{outcome="finished"} 1.0' in text


@pytest.mark.anyio
async def test_results_read_to_their_end_are_forgotten_and_others_kept_for_a_resume() -> None:
    queue = MemoryQueue(keep_s=30)
    for job_id in ("read", "dropped"):
        await queue.enqueue(_job(job_id, max_tokens=3), "me", reader=True)
    worker = Worker(queue, "w", tokens_of)
    await worker.process(await worker._read(">"))
    for job_id in ("read", "dropped"):
        assert [c.kind for c in await results_to_end(queue, job_id)] == ["token", "token", "token", "done"]
    for job_id in ("read", "dropped"):
        await queue.remember(f"ws.{job_id}", job_id, 900, job_id)  # a WebSocket request id's job
    await queue.cancel("read", "cancel", 900)  # after its end: no mark is kept
    assert queue._cancels == {}
    await queue.detach("read", None)  # its reader saw the end
    await queue.detach("dropped", time.time() + 30)  # its reader left early
    assert not await queue.results_kept("read")
    assert await queue.recall("ws.read") is None  # forgotten with the results, not 900 s later
    assert await queue.results_kept("dropped")
    assert await queue.recall("ws.dropped") == "dropped"
    assert await queue.enqueue(_job("read"), "me") is None  # the id stays taken for keep_s


@pytest.mark.anyio
async def test_read_results_are_trimmed_to_the_resume_buffer_and_a_resume_before_them_is_refused() -> None:
    queue = MemoryQueue()
    await queue.enqueue(_job("t", max_tokens=10))
    for i in range(10):
        await queue.write("t", Chunk(i, "token", f"w{i}"))
    got = await queue.read_after("t", "0-0", 0)
    queue.trim_read("t", got[7][0], keep=3)  # read through token 7: tokens 5-7 kept for a resume, 8-9 unread
    assert [c.seq for _, c in await queue.read_after("t", got[4][0], 0)] == [5, 6, 7, 8, 9]
    assert queue.unread("t", got[7][0]) == 2
    ((_, refused),) = await queue.read_after("t", got[2][0], 0)  # token 3 is gone: no silent gap
    assert (refused.kind, refused.data, refused.seq) == ("error", "resume_unavailable", 5)


@pytest.mark.slow
def test_a_queued_stream_that_is_never_read_has_its_job_cancelled_as_a_slow_consumer() -> None:
    fast = TokensModelSpec(base_ms=1, per_seq_ms=0, prefill_ms=0, per_input_token_ms=0, max_tokens_limit=100_000)
    settings = ServerSettings(queue_url="memory://", models=[fast], stream_buffer=256, send_buffer_bytes=8192)
    with EmbeddedServer(settings) as server:
        host, port = server.url.removeprefix("http://").rsplit(":", 1)
        body = b'{"prompt": "never read", "max_tokens": 100000}'
        head = b"POST /v1/stream HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
        with socket.create_connection((host, int(port))) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.sendall(head % len(body) + body)
            front = server.state.queue
            assert front is not None
            wait_until(lambda: front.figures.get("count:cancelled:slow_consumer") == 1, timeout_s=20)
        metrics = server.state.metrics
        assert metrics.slow_drops.child("sse", "buffer_full").value == 1
        assert front.figures.get("count:completed", 0) == 0  # stopped long before its 100,000 tokens


@pytest.mark.slow
def test_queued_streams_ping_after_heartbeat_s_of_silence_and_not_before() -> None:
    slow_start = TokensModelSpec(base_ms=1, per_seq_ms=0, prefill_ms=1200, per_input_token_ms=0)
    for heartbeat_s, pings in ((5.0, range(1)), (0.25, range(3, 6))):  # 1.2 s of silence: none, or one a 0.25 s
        settings = ServerSettings(queue_url="memory://", models=[slow_start], heartbeat_s=heartbeat_s)
        with EmbeddedServer(settings) as server, httpx.Client(timeout=10) as http:
            text = http.post(server.url + "/v1/stream", json={"prompt": "p", "max_tokens": 2}).text
        before_first_token = text.split("event: token", 1)[0]
        assert before_first_token.count(": ping") in pings, (heartbeat_s, before_first_token)
