"""Queue mode end to end on real Redis: a front end, worker processes, and an SSE client.

Workers are killed with SIGKILL mid-stream, the front end is killed and replaced mid-stream, Redis is
stopped and started again: the client still gets every token exactly once, a clear 503 while Redis is
away, and service again when it is back. Nothing here asserts a speed; every wait is a bounded poll.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from polling import wait_until
from reference_server.queue.model_source import ModelSource
from reference_server.queue.redis_streams import GROUP
from reference_server.serve import EmbeddedServer
from reference_server.settings import load_settings
from serverkit import SseBlock, collect, open_socket, recv, send, sse_blocks

pytestmark = pytest.mark.slow

# A slow step, so a stream is long enough to be cut in the middle: 40 tokens at ~20 ms.
CONFIG = """
queue_prefix: {prefix}
queue_reclaim_idle_ms: 400
job_ttl_s: {ttl}
sweep_interval_s: 0.05
models:
  - {{kind: tokens, name: tokens, base_ms: 20, per_seq_ms: 0, prefill_ms: 0, per_input_token_ms: 0}}
"""


class Queue:
    """A key prefix of our own on a Redis, a settings file for it, and the processes started on it."""

    def __init__(self, url: str, tmp_path: Path, ttl_s: float = 60.0) -> None:
        self.url = url
        self.prefix = f"inferbench-test-{uuid.uuid4().hex[:12]}"
        self.config = tmp_path / "server.yaml"
        self.config.write_text(CONFIG.format(prefix=self.prefix, ttl=ttl_s))
        self.settings = load_settings(self.config, queue_url=url)
        self.procs: list[subprocess.Popen[str]] = []

    def worker(self, name: str) -> subprocess.Popen[str]:
        cmd = ["worker", "--queue", self.url, "--config", str(self.config), "--name", name, "--grace-s", "2"]
        proc = subprocess.Popen([sys.executable, "-m", "infer_bench.cli", *cmd], stdout=subprocess.PIPE, text=True)
        self.procs.append(proc)
        assert proc.stdout is not None
        assert "infer-bench worker" in proc.stdout.readline()  # the consumers run
        return proc

    def front_end(self) -> tuple[subprocess.Popen[str], str]:
        cmd = ["serve", "--queue", self.url, "--config", str(self.config), "--port", "0"]
        proc = subprocess.Popen([sys.executable, "-m", "infer_bench.cli", *cmd], stdout=subprocess.PIPE, text=True)
        self.procs.append(proc)
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "reference server on " in line, line
        return proc, line.rsplit(" ", 1)[1].strip()

    def embedded(self) -> EmbeddedServer:
        return EmbeddedServer(self.settings)

    def owner_of(self, job_id: str) -> str | None:
        """The consumer holding the job's entry right now."""
        client = redis.Redis.from_url(self.url)
        for entry in client.xpending_range(f"{self.prefix}:jobs", GROUP, "-", "+", 100):
            fields = client.xrange(f"{self.prefix}:jobs", entry["message_id"], entry["message_id"])[0][1]
            if fields[b"id"].decode() == job_id:
                return str(entry["consumer"].decode())
        return None

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
            if proc.stdout is not None:
                proc.stdout.close()
        client = redis.Redis.from_url(self.url, socket_connect_timeout=1)
        try:
            keys = list(client.scan_iter(match=f"{self.prefix}:*"))
            if keys:
                client.delete(*keys)
        except redis.RedisError:
            pass  # a Redis of our own that is already gone


@pytest.fixture
def queue(redis_url: str, tmp_path: Path) -> Iterator[Queue]:
    q = Queue(redis_url, tmp_path)
    try:
        yield q
    finally:
        q.close()


def expected_tokens(queue: Queue, prompt: str, max_tokens: int, seed: int | None = None) -> list[str]:
    """What the deterministic model generates, computed here, independently of any worker."""
    source = ModelSource.from_settings(queue.settings)
    model = source.resolve("tokens")
    plan = model.plan(prompt, max_tokens, seed)
    return [model.next_token(plan) for _ in range(plan.output_tokens)]


BODY = {"prompt": "tell me about queues", "max_tokens": 40}


def read_stream(
    http: httpx.Client, url: str, body: dict[str, Any], headers: dict[str, str] | None = None, stop_after: int = 0
) -> list[SseBlock]:
    """The event blocks of one stream; with ``stop_after``, hang up after that many tokens."""
    got: list[SseBlock] = []
    with http.stream("POST", url + "/v1/stream", json=body, headers=headers or {}) as r:
        assert r.status_code == 200, r.read()
        for block in sse_blocks(r.iter_raw()):
            got.append(block)
            if stop_after and sum(b.event == "token" for b in got) >= stop_after:
                break
    return got


def tokens_of(blocks: list[SseBlock]) -> list[tuple[int, str]]:
    return [(b.json()["seq"], b.json()["token"]) for b in blocks if b.event == "token"]


def test_a_worker_killed_mid_stream_costs_the_client_nothing(queue: Queue) -> None:
    """kill -9 the worker running the job: the other reclaims it; every token arrives once, then done."""
    workers = {"wa": queue.worker("wa"), "wb": queue.worker("wb")}
    with queue.embedded() as server, httpx.Client(timeout=30) as http:
        blocks: list[SseBlock] = []
        killed = None
        with http.stream("POST", server.url + "/v1/stream", json={**BODY, "request_id": "k1"}) as r:
            assert r.status_code == 200
            for block in sse_blocks(r.iter_raw()):
                blocks.append(block)
                if killed is None and block.event == "token" and block.json()["seq"] == 4:
                    killed = queue.owner_of("k1")
                    assert killed in workers
                    workers[killed].send_signal(signal.SIGKILL)
        assert killed is not None
        tokens = tokens_of(blocks)
        assert tokens == list(enumerate(expected_tokens(queue, BODY["prompt"], 40)))  # no dup, no gap
        assert blocks[-1].event == "done"
        done = blocks[-1].json()
        assert done["finish_reason"] == "length"
        assert done["usage"]["completion_tokens"] == 40
        assert done["model_version"] == "1"
        assert all(b.id is not None and b.id.startswith("k1:") for b in blocks if b.event == "token")
        wait_until(lambda: 'event="reclaimed"} 1.0' in http.get(server.url + "/metrics").text, timeout_s=5)


def test_a_front_end_restarted_mid_stream_is_resumed_with_last_event_id(queue: Queue) -> None:
    """The front end dies under the client; another one resumes from the Redis stream id: no dup, no gap."""
    queue.worker("wa")
    first, url = queue.front_end()
    with httpx.Client(timeout=30) as http:
        before = read_stream(http, url, {**BODY, "request_id": "r1"}, stop_after=6)
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=10)
        _, url2 = queue.front_end()
        last_id = [b for b in before if b.event == "token"][-1].id
        assert last_id is not None
        after = read_stream(http, url2, BODY, headers={"Last-Event-ID": last_id})
    tokens = tokens_of(before) + tokens_of(after)
    assert tokens == list(enumerate(expected_tokens(queue, BODY["prompt"], 40)))
    assert after[-1].event == "done"


def test_requests_and_resumes_that_cannot_run_get_a_reason(queue: Queue) -> None:
    with queue.embedded() as server, httpx.Client(timeout=10) as http:
        url = server.url + "/v1/stream"
        bad_id = http.post(url, json=BODY, headers={"Last-Event-ID": "r1:7"})
        assert bad_id.status_code == 400
        assert bad_id.json()["field"] == "Last-Event-ID"
        assert http.post(url, json={**BODY, "model": "nope"}).status_code == 404
        assert http.post(url, json={**BODY, "model": "tokens@9"}).status_code == 404
        unknown = read_stream(http, server.url, BODY, headers={"Last-Event-ID": "ghost:1-0"})
        assert [(b.event, b.json()["error"]) for b in unknown if b.event] == [("error", "resume_unavailable")]
        with http.stream("POST", url, json={**BODY, "request_id": "dup"}) as r:
            assert r.status_code == 200
            again = http.post(url, json={**BODY, "request_id": "dup"})
            assert again.status_code == 409
            assert again.json()["error"] == "conflict"


def test_a_job_no_worker_takes_ends_with_a_timeout_at_its_deadline(redis_url: str, tmp_path: Path) -> None:
    queue = Queue(redis_url, tmp_path, ttl_s=0.3)
    try:
        with queue.embedded() as server, httpx.Client(timeout=10) as http:
            blocks = read_stream(http, server.url, BODY)
            assert blocks[-1].event == "error"
            end = blocks[-1].json()
            assert (end["error"], end["kind"], end["done"]) == ("timeout", "total", True)
            stats = http.get(server.url + "/stats").json()
            assert stats["queue"]["prefix"] == queue.prefix
            wait_until(lambda: 'event="expired"} 1.0' in http.get(server.url + "/metrics").text, timeout_s=5)
    finally:
        queue.close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _start_redis(binary: str, port: int, workdir: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(workdir)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    client = redis.Redis(port=port, socket_connect_timeout=0.2)

    def up() -> bool:
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False

    wait_until(up, timeout_s=10, interval_s=0.02)
    return proc


def test_redis_going_away_is_a_clear_503_and_service_returns_with_it(tmp_path: Path) -> None:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("needs a redis-server binary to start and stop a Redis of its own")
    port = _free_port()
    own = _start_redis(binary, port, tmp_path)
    queue = Queue(f"redis://127.0.0.1:{port}/0", tmp_path)
    try:
        queue.worker("wa")
        with queue.embedded() as server, httpx.Client(timeout=10) as http:
            assert read_stream(http, server.url, {**BODY, "max_tokens": 3})[-1].event == "done"
            own.terminate()
            own.wait(timeout=10)
            down = http.post(server.url + "/v1/stream", json=BODY)
            assert down.status_code == 503
            assert down.headers["Retry-After"] == "1"
            assert down.json()["reason"] == "queue_unavailable"
            assert f"127.0.0.1:{port}" in down.json()["message"]
            wait_until(lambda: "inferbench_queue_reachable 0.0" in http.get(server.url + "/metrics").text)

            own = _start_redis(binary, port, tmp_path)  # an empty Redis again: the group is made anew

            def served() -> bool:
                r = http.post(server.url + "/v1/stream", json={**BODY, "max_tokens": 3})
                return r.status_code == 200 and json.loads(r.text.strip().rsplit("data: ", 1)[1])["done"]

            wait_until(served, timeout_s=15, interval_s=0.1)
    finally:
        queue.close()
        own.terminate()
        own.wait(timeout=10)


def test_streams_still_open_at_the_end_of_the_grace_period_end_in_band_with_their_resume_id(queue: Queue) -> None:
    """No worker takes the job; the front end shuts down: the client gets `shutdown` and an id to resume."""
    settings = queue.settings.model_copy(update={"graceful_shutdown_s": 1.0})
    server = EmbeddedServer(settings).start()
    stopper = threading.Thread(target=server.stop)
    try:
        with httpx.Client(timeout=10) as http, http.stream("POST", server.url + "/v1/stream", json=BODY) as r:
            assert r.status_code == 200
            blocks = sse_blocks(r.iter_raw())
            assert next(blocks).retry == 3000
            stopper.start()
            end = next(b for b in blocks if b.event)
        assert end.event == "error"
        assert end.json()["error"] == "shutdown"
        assert "Last-Event-ID: " in end.json()["message"]
    finally:
        if stopper.ident is None:  # failed before the stop began
            server.stop()
        else:
            stopper.join(timeout=15)


def test_a_websocket_generation_resumes_on_another_front_end(queue: Queue) -> None:
    queue.worker("wa")
    expected = expected_tokens(queue, BODY["prompt"], 40)
    with queue.embedded() as first, open_socket(first) as ws:
        send(ws, {"type": "generate", "id": "g", "prompt": BODY["prompt"], "max_tokens": 40})
        head = [recv(ws) for _ in range(5)]
    assert [(m["seq"], m["token"]) for m in head] == list(enumerate(expected))[:5]
    with queue.embedded() as second, open_socket(second) as ws:
        send(ws, {"type": "resume", "id": "g", "last_seq": 4})
        rest = collect(ws, {"g"})["g"]
    assert [(m["seq"], m["token"]) for m in rest if m["type"] == "token"] == list(enumerate(expected))[5:]
    assert rest[-1]["type"] == "done"
