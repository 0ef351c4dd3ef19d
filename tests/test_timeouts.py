"""Stream time limits, the sweeper, heartbeats and counted cancellation.

The limits and the sweeper run on trio's virtual clock, so a 2 s inactivity limit lands at exactly 2 s
(plus at most one sweep interval); the wire tests check the in-band shape on a real server.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from types import SimpleNamespace
from typing import Any

import anyio
import httpx
import pytest

from polling import wait_until
from reference_server.admission import Admission
from reference_server.channels import EndReason, StreamEnd
from reference_server.metrics import ServerMetrics
from reference_server.models import TokensModel
from reference_server.resume import ResumeTable
from reference_server.scheduler import ContinuousScheduler, GenerationRequest, Sequence
from reference_server.serve import EmbeddedServer
from reference_server.settings import TokensModelSpec
from reference_server.sweeper import StreamLimits, Sweeper
from serverkit import open_socket, recv, send, stream

StartServer = Callable[..., EmbeddedServer]

ECHO = {"kind": "echo"}
PROMPT = "tell me about time limits"
SWEEP_S = 0.05


# --- the policy ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("created_at", "last_token_at", "now", "expected"),
    [
        pytest.param(0.0, None, 0.99, None, id="waiting-within-first-token"),
        pytest.param(0.0, None, 1.0, "first_token", id="no-first-token"),
        pytest.param(0.0, 5.0, 6.99, None, id="tokens-flowing"),
        pytest.param(0.0, 5.0, 7.0, "inactivity", id="stalled"),
        pytest.param(0.0, 9.9, 10.0, "total", id="total-wins"),
    ],
)
def test_stream_limits_name_the_limit_a_stream_is_past(
    created_at: float, last_token_at: float | None, now: float, expected: str | None
) -> None:
    limits = StreamLimits(first_token_s=1.0, inactivity_s=2.0, total_s=10.0)
    seq = SimpleNamespace(created_at=created_at, last_token_at=last_token_at)
    assert limits.exceeded(seq, now) == expected  # type: ignore[arg-type]


def test_no_limits_never_expire_anything() -> None:
    seq = SimpleNamespace(created_at=0.0, last_token_at=None)
    assert StreamLimits().exceeded(seq, 1e9) is None  # type: ignore[arg-type]


# --- the sweeper on virtual time -------------------------------------------------------------------


@pytest.fixture
def anyio_backend(virtual_time: tuple[str, dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    return virtual_time


class _Registry:
    def __init__(self, scheduler: ContinuousScheduler) -> None:
        self.scheduler = scheduler

    def engines(self) -> list[tuple[str, ContinuousScheduler]]:
        return [("tokens", self.scheduler)]


@asynccontextmanager
async def swept(limits: StreamLimits, max_num_seqs: int = 8, **spec: Any) -> AsyncIterator[ContinuousScheduler]:
    metrics = ServerMetrics()
    model = TokensModel(TokensModelSpec(base_ms=10, per_seq_ms=0, prefill_ms=0, per_input_token_ms=0, **spec))
    scheduler = ContinuousScheduler(model, max_num_seqs=max_num_seqs, max_queue=16, stream_buffer=4096, metrics=metrics)
    admission = Admission(
        rate_per_s=None, burst=1, max_streams=None, lease_ttl_s=1, max_clients=16, metrics=metrics,
        clock=anyio.current_time,
    )  # fmt: skip
    sweeper = Sweeper(
        _Registry(scheduler),  # type: ignore[arg-type]
        admission, ResumeTable(0, anyio.current_time), limits, SWEEP_S,
    )  # fmt: skip
    async with anyio.create_task_group() as tg:
        tg.start_soon(scheduler.run)
        tg.start_soon(sweeper.run)
        yield scheduler
        tg.cancel_scope.cancel()


async def read_to_end(seq: Sequence) -> tuple[int, StreamEnd, float]:
    """Tokens received, the end, and the virtual time the end arrived."""
    count = 0
    while True:
        tokens, end = await seq.channel.receive()
        count += len(tokens)
        if end is not None:
            return count, end, anyio.current_time()


@pytest.mark.anyio
async def test_a_stalled_stream_ends_with_an_inactivity_timeout_one_limit_after_its_last_token() -> None:
    async with swept(StreamLimits(inactivity_s=2.0), stall_rate=1.0, stall_ms=60_000) as scheduler:
        seq = scheduler.submit(GenerationRequest(PROMPT, max_tokens=50))
        count, end, at = await read_to_end(seq)
    assert (end.reason, end.detail) == (EndReason.TIMEOUT, "inactivity")
    assert 0 < count < 50
    assert seq.last_token_at is not None
    assert 2.0 <= at - seq.last_token_at <= 2.0 + SWEEP_S + 1e-9
    assert scheduler._metrics.timeouts.child("inactivity").value == 1
    assert scheduler._metrics.sequences.child("timeout").value == 1


@pytest.mark.anyio
async def test_a_queued_stream_times_out_waiting_for_its_first_token_and_leaves_the_queue() -> None:
    async with swept(StreamLimits(first_token_s=1.0), max_num_seqs=1) as scheduler:
        hog = scheduler.submit(GenerationRequest(PROMPT, max_tokens=1000))  # 10 s of steps
        queued = scheduler.submit(GenerationRequest(PROMPT, max_tokens=5))
        count, end, at = await read_to_end(queued)
        assert scheduler.waiting == 0
        assert scheduler.running == 1
        scheduler.cancel(hog)
    assert (count, end.reason, end.detail) == (0, EndReason.TIMEOUT, "first_token")
    assert 1.0 <= at <= 1.0 + SWEEP_S + 1e-9


@pytest.mark.anyio
async def test_the_total_limit_ends_a_stream_that_is_still_producing() -> None:
    async with swept(StreamLimits(total_s=0.5, inactivity_s=5.0)) as scheduler:
        seq = scheduler.submit(GenerationRequest(PROMPT, max_tokens=1000))
        count, end, _ = await read_to_end(seq)
        await anyio.sleep(0.05)  # the next step boundary takes it out of the batch
        assert scheduler.running == 0
    assert (end.reason, end.detail) == (EndReason.TIMEOUT, "total")
    assert 40 <= count <= 55  # ~50 steps of 10 ms


# --- on the wire -----------------------------------------------------------------------------------


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=httpx.Timeout(10.0), trust_env=False) as client:
        yield client


def test_sse_timeout_ends_the_stream_in_band_with_its_kind(http: httpx.Client, start_server: StartServer) -> None:
    server = start_server(
        models=[ECHO, {"kind": "tokens", "prefill_ms": 1000}], first_token_timeout_s=0.2, sweep_interval_s=0.02,
        graceful_shutdown_s=1,
    )  # fmt: skip
    got = stream(http, server, {"prompt": PROMPT, "max_tokens": 4})
    assert got.tokens == []
    assert got.last.event == "error"
    body = got.last.json()
    assert {k: body[k] for k in ("done", "error", "kind")} == {"done": True, "error": "timeout", "kind": "first_token"}
    assert server.state.metrics.timeouts.child("first_token").value == 1


def test_openai_non_streaming_timeout_is_a_504(http: httpx.Client, start_server: StartServer) -> None:
    server = start_server(
        models=[ECHO, {"kind": "tokens", "stall_rate": 1.0}], inactivity_timeout_s=0.2, sweep_interval_s=0.02,
        graceful_shutdown_s=1,
    )  # fmt: skip
    response = http.post(server.url + "/v1/completions", json={"model": "tokens", "prompt": PROMPT, "max_tokens": 50})
    assert response.status_code == 504
    assert response.json()["error"]["code"] == "timeout"


def test_websocket_idle_socket_gets_application_pings(start_server: StartServer) -> None:
    server = start_server(heartbeat_s=0.1)
    with open_socket(server) as ws:
        first, second = recv(ws), recv(ws)
        assert (first["type"], second["type"]) == ("ping", "ping")
        send(ws, {"type": "pong", "data": second["data"]})  # answering is allowed, and changes nothing
        send(ws, {"type": "generate", "id": "g", "prompt": PROMPT, "max_tokens": 1})
        while (message := recv(ws))["type"] == "ping":
            pass
        assert message["id"] == "g"
    assert server.state.metrics.heartbeats.child("websocket").value >= 2


@pytest.mark.direct
def test_a_websocket_peer_that_vanishes_has_its_generations_stopped_and_counted(start_server: StartServer) -> None:
    server = start_server(models=[ECHO, {"kind": "tokens", "base_ms": 20}], graceful_shutdown_s=1)
    scheduler = server.state.registry.schedulers["tokens"]
    with open_socket(server) as ws:
        send(ws, {"type": "generate", "id": "g", "prompt": PROMPT, "max_tokens": 4096})
        assert recv(ws)["type"] == "token"
        ws.socket.close()  # no close frame: the TCP connection just goes away
    wait_until(lambda: scheduler.running == 0)
    metrics = server.state.metrics
    wait_until(lambda: metrics.aborts.child("websocket", "disconnect").value == 1)
    assert metrics.sequences.child("cancelled").value == 1
