"""Resume: a client that lost its stream reconnects and gets exactly what it missed, then the rest.

Every end-to-end test compares the resumed stream with an uninterrupted one of the same prompt and seed
(the models are deterministic): the tokens must be the same, with no position missing or repeated.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import httpx
import pytest

from polling import wait_until
from reference_server.channels import EndReason, Token, TokenChannel
from reference_server.metrics import ServerMetrics
from reference_server.models import TokensModel
from reference_server.resume import parse_event_id
from reference_server.scheduler import ContinuousScheduler, GenerationRequest, Sequence
from reference_server.serve import EmbeddedServer
from reference_server.settings import TokensModelSpec
from serverkit import SseBlock, collect, open_socket, recv, send, sse_blocks, stream

StartServer = Callable[..., EmbeddedServer]

ECHO = {"kind": "echo"}
SLOW_TOKENS = {"kind": "tokens", "base_ms": 20}
BODY = {"prompt": "tell me about resuming streams", "max_tokens": 30, "seed": 7}


# --- the channel's history -------------------------------------------------------------------------


def _channel(capacity: int, history: int) -> TokenChannel:
    return TokenChannel(capacity, anyio.Event, history)


def test_replay_returns_the_tokens_after_a_position_and_takes_over_the_unread_buffer() -> None:
    channel = _channel(capacity=8, history=16)
    for i in range(10):
        channel._items.clear()  # a reader keeps up
        assert channel.put_nowait(Token(i, f"t{i}"))
    assert [t.seq for t in channel.replay_after(6) or []] == [7, 8, 9]
    assert channel.buffered == 0
    assert channel.replay_after(9) == []


def test_replay_beyond_the_history_is_refused_not_gapped() -> None:
    channel = _channel(capacity=2, history=4)
    for i in range(10):
        channel._items.clear()
        channel.put_nowait(Token(i, f"t{i}"))
    assert [t.seq for t in channel.replay_after(5) or []] == [6, 7, 8, 9]  # the oldest kept is 6
    assert channel.replay_after(4) is None  # 5 is gone


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param("abc:12", ("abc", 12), id="plain"),
        pytest.param("a:b:3", ("a:b", 3), id="colon-in-id"),
        pytest.param("abc", None, id="no-seq"),
        pytest.param("abc:-1", None, id="negative"),
        pytest.param(":3", None, id="no-id"),
    ],
)
def test_last_event_id_is_request_id_colon_seq(value: str, expected: tuple[str, int] | None) -> None:
    assert parse_event_id(value) == expected


# --- the scheduler continues a cancelled sequence ----------------------------------------------------


@pytest.fixture
def anyio_backend(virtual_time: tuple[str, dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    return virtual_time


@asynccontextmanager
async def running() -> AsyncIterator[ContinuousScheduler]:
    model = TokensModel(TokensModelSpec(base_ms=5))
    scheduler = ContinuousScheduler(
        model, max_num_seqs=4, max_queue=4, stream_buffer=64, history=64, metrics=ServerMetrics()
    )
    async with anyio.create_task_group() as tg:
        tg.start_soon(scheduler.run)
        yield scheduler
        tg.cancel_scope.cancel()


async def texts_until(seq: Sequence, count: int | None = None) -> tuple[list[str], EndReason | None]:
    texts: list[str] = []
    while True:
        tokens, end = await seq.channel.receive()
        texts += [t.text for t in tokens]
        if end is not None:
            return texts, end.reason
        if count is not None and len(texts) >= count:
            return texts, None


@pytest.mark.anyio
async def test_a_cancelled_sequence_resumes_where_it_stopped_with_the_same_tokens() -> None:
    request = GenerationRequest("resume me", max_tokens=20, seed=3)
    async with running() as scheduler:
        whole, _ = await texts_until(scheduler.submit(request))
        seq = scheduler.submit(request)
        head, _ = await texts_until(seq, 5)
        scheduler.cancel(seq)
        rest, reason = await texts_until(seq)
        assert reason is EndReason.CANCELLED
        seen = head + rest
        replay = seq.channel.replay_after(len(seen) - 1)
        assert replay == []
        scheduler.resume(seq)
        tail, reason = await texts_until(seq)
    assert reason is EndReason.FINISHED
    assert seen + tail == whole


# --- SSE: Last-Event-ID ------------------------------------------------------------------------------


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=httpx.Timeout(10.0), trust_env=False) as client:
        yield client


def read_then_drop(http: httpx.Client, server: EmbeddedServer, body: dict[str, Any], keep: int) -> list[SseBlock]:
    """Stream ``body`` and close the connection after ``keep`` token events."""
    seen: list[SseBlock] = []
    with http.stream("POST", server.url + "/v1/stream", json=body) as r:
        assert r.status_code == 200
        for block in sse_blocks(r.iter_raw()):
            if block.event == "token":
                seen.append(block)
            if len(seen) == keep:
                break
    return seen


def resume_sse(http: httpx.Client, server: EmbeddedServer, body: dict[str, Any], last_event_id: str) -> list[SseBlock]:
    with http.stream("POST", server.url + "/v1/stream", json=body, headers={"Last-Event-ID": last_event_id}) as r:
        assert r.status_code == 200, r.read()
        return list(sse_blocks(r.iter_raw()))


@pytest.mark.parametrize("kept", [10, 6], ids=["from-the-last-seen", "from-earlier-replays-the-buffer"])
@pytest.mark.direct
def test_sse_resume_with_last_event_id_gives_no_duplicated_or_missing_tokens(
    http: httpx.Client, start_server: StartServer, kept: int
) -> None:
    server = start_server(models=[ECHO, SLOW_TOKENS], graceful_shutdown_s=1)
    whole = stream(http, server, {**BODY, "request_id": "whole"})
    seen = read_then_drop(http, server, {**BODY, "request_id": "r1"}, keep=10)[:kept]
    metrics = server.state.metrics
    wait_until(lambda: metrics.aborts.child("sse", "disconnect").value == 1)
    rest = resume_sse(http, server, {**BODY, "request_id": "r1"}, f"r1:{kept - 1}")
    tokens = seen + [b for b in rest if b.event == "token"]
    assert [b.id for b in tokens] == [f"r1:{i}" for i in range(30)]
    assert [b.json()["token"] for b in tokens] == whole.texts
    assert rest[-1].event == "done"
    assert rest[-1].json()["usage"]["completion_tokens"] == 30
    assert metrics.resumes.child("resumed").value == 1
    wait_until(lambda: len(server.state.resumes) == 0)  # written out in full: forgotten


@pytest.mark.direct
def test_sse_resume_beyond_the_buffer_gets_a_clear_error_event(http: httpx.Client, start_server: StartServer) -> None:
    server = start_server(models=[ECHO, SLOW_TOKENS], resume_buffer=4, stream_buffer=4, graceful_shutdown_s=1)
    read_then_drop(http, server, {**BODY, "request_id": "r2"}, keep=10)
    wait_until(lambda: server.state.metrics.aborts.child("sse", "disconnect").value == 1)
    (error,) = [b for b in resume_sse(http, server, BODY, "r2:0") if b.event]
    assert error.event == "error"
    body = error.json()
    assert (body["done"], body["error"]) == (True, "resume_unavailable")
    assert "no longer buffered" in body["message"]
    assert server.state.metrics.resumes.child("gap").value == 1


@pytest.mark.direct
def test_sse_resume_of_an_unknown_stream_is_an_error_event_and_a_bad_id_a_400(
    http: httpx.Client, server: EmbeddedServer
) -> None:
    (error,) = [b for b in resume_sse(http, server, BODY, "never-seen:3") if b.event]
    assert (error.event, error.json()["error"]) == ("error", "resume_unavailable")
    bad = http.post(server.url + "/v1/stream", json=BODY, headers={"Last-Event-ID": "no-seq-here"})
    assert bad.status_code == 400
    assert bad.json()["field"] == "Last-Event-ID"


@pytest.mark.direct
def test_sse_only_the_same_client_may_resume_a_stream(http: httpx.Client, start_server: StartServer) -> None:
    server = start_server(models=[ECHO, SLOW_TOKENS], graceful_shutdown_s=1)
    mine = {"X-Client-Id": "me"}
    with http.stream("POST", server.url + "/v1/stream", json={**BODY, "request_id": "r3"}, headers=mine) as r:
        next(b for b in sse_blocks(r.iter_raw()) if b.event == "token")
    wait_until(lambda: server.state.metrics.aborts.child("sse", "disconnect").value == 1)
    theirs = {"Last-Event-ID": "r3:0", "X-Client-Id": "someone-else"}
    with http.stream("POST", server.url + "/v1/stream", json=BODY, headers=theirs) as r:
        (error,) = [b for b in sse_blocks(r.iter_raw()) if b.event]
    assert error.json()["error"] == "resume_unavailable"
    with http.stream("POST", server.url + "/v1/stream", json=BODY, headers={**mine, "Last-Event-ID": "r3:0"}) as r:
        assert [b for b in sse_blocks(r.iter_raw()) if b.event][-1].event == "done"


def test_sse_a_request_id_already_streaming_is_a_409(http: httpx.Client, start_server: StartServer) -> None:
    server = start_server(models=[ECHO, SLOW_TOKENS], graceful_shutdown_s=1)
    with http.stream("POST", server.url + "/v1/stream", json={**BODY, "max_tokens": 4096, "request_id": "dup"}) as r:
        assert r.status_code == 200
        clash = http.post(server.url + "/v1/stream", json={**BODY, "request_id": "dup"})
        assert clash.status_code == 409
        next(sse_blocks(r.iter_raw()))


# --- WebSocket: resume message -----------------------------------------------------------------------


def test_ws_resume_on_a_new_socket_gives_no_duplicated_or_missing_tokens(start_server: StartServer) -> None:
    server = start_server(models=[ECHO, SLOW_TOKENS], graceful_shutdown_s=1)
    generate = {"type": "generate", "prompt": BODY["prompt"], "max_tokens": 30, "seed": 7}
    with open_socket(server) as ws:
        send(ws, {**generate, "id": "whole"})
        whole = [m["token"] for m in collect(ws, {"whole"})["whole"] if m["type"] == "token"]
        send(ws, {**generate, "id": "w1"})
        seen = [recv(ws) for _ in range(10)]
    assert [m["seq"] for m in seen] == list(range(10))
    wait_until(lambda: server.state.metrics.aborts.child("websocket", "disconnect").value == 1)
    with open_socket(server) as ws:
        send(ws, {"type": "resume", "id": "w1", "last_seq": 9})
        rest = collect(ws, {"w1"})["w1"]
        send(ws, {"type": "resume", "id": "gone", "last_seq": 0})
        refused = recv(ws)
    tokens = seen + [m for m in rest if m["type"] == "token"]
    assert [m["seq"] for m in tokens] == list(range(30))
    assert [m["token"] for m in tokens] == whole
    assert rest[-1]["type"] == "done"
    assert (refused["type"], refused["id"], refused["error"]) == ("error", "gone", "resume_unavailable")
