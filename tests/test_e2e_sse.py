"""``POST /v1/stream`` end to end: a real uvicorn on loopback, read by httpx as bytes arrive."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from polling import wait_until
from reference_server.serve import EmbeddedServer
from reference_server.settings import ServerSettings
from serverkit import SseBlock, sse_blocks, stream

pytestmark = pytest.mark.slow  # real servers on loopback; still run in CI

StartServer = Callable[..., EmbeddedServer]

ECHO = {"kind": "echo"}
PROMPT = "tell me about continuous batching"


@pytest.fixture(scope="module")
def small_body_server() -> Iterator[EmbeddedServer]:
    """One server for the table of refusals: a refused request leaves nothing behind to isolate."""
    with EmbeddedServer(ServerSettings(max_body_bytes=4096)) as server:
        yield server


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    # trust_env=False: no proxy from the environment may take loopback traffic elsewhere.
    with httpx.Client(timeout=httpx.Timeout(10.0), trust_env=False) as client:
        yield client


# --- framing ---------------------------------------------------------------------------------------


@pytest.mark.direct
def test_sse_stream_opens_with_retry_and_numbers_token_ids_in_order(http: httpx.Client, server: EmbeddedServer) -> None:
    got = stream(http, server, {"prompt": PROMPT, "max_tokens": 8, "request_id": "req-1"})
    assert got.blocks[0].retry == server.settings.sse_retry_ms
    assert [b.id for b in got.tokens] == [f"req-1:{i}" for i in range(8)]
    assert [b.json()["seq"] for b in got.tokens] == list(range(8))
    assert all(text for text in got.texts)


def test_sse_stream_ends_with_done_event_carrying_usage(http: httpx.Client, server: EmbeddedServer) -> None:
    got = stream(http, server, {"prompt": PROMPT, "max_tokens": 6})
    assert [b.event for b in got.blocks].count("done") == 1
    assert got.last.event == "done"
    assert got.last.json() == {
        "done": True,
        "usage": {"prompt_tokens": 5, "completion_tokens": 6, "total_tokens": 11},
        "finish_reason": "length",
        "model": "tokens",
        "model_version": "1",
    }


def test_sse_without_max_tokens_finishes_with_stop_within_the_model_output_range(
    http: httpx.Client, start_server: StartServer
) -> None:
    server = start_server(models=[ECHO, {"kind": "tokens", "output_tokens": {"min": 3, "max": 5}}])
    got = stream(http, server, {"prompt": PROMPT})
    done = got.last.json()
    assert done["finish_reason"] == "stop"
    assert 3 <= len(got.tokens) <= 5
    assert done["usage"]["completion_tokens"] == len(got.tokens)


@pytest.mark.parametrize(
    ("body_id", "header_id", "expected"),
    [
        pytest.param("from-body", None, "from-body", id="body-field"),
        pytest.param(None, "from-header", "from-header", id="request-header"),
        pytest.param("from-body", "from-header", "from-body", id="body-wins-over-header"),
    ],
)
@pytest.mark.direct
def test_sse_x_request_id_header_and_event_ids_use_the_given_request_id(
    http: httpx.Client, server: EmbeddedServer, body_id: str | None, header_id: str | None, expected: str
) -> None:
    body: dict[str, Any] = {"prompt": PROMPT, "max_tokens": 2}
    if body_id is not None:
        body["request_id"] = body_id
    headers = {"X-Request-Id": header_id} if header_id is not None else {}
    got = stream(http, server, body, headers=headers)
    assert got.headers["x-request-id"] == expected
    assert got.headers["x-model-version"] == "1"
    assert [b.id for b in got.tokens] == [f"{expected}:0", f"{expected}:1"]


@pytest.mark.direct
def test_sse_without_a_request_id_gets_a_generated_one(http: httpx.Client, server: EmbeddedServer) -> None:
    first = stream(http, server, {"prompt": PROMPT, "max_tokens": 1})
    second = stream(http, server, {"prompt": PROMPT, "max_tokens": 1})
    generated = first.headers["x-request-id"]
    assert generated
    assert first.tokens[0].id == f"{generated}:0"
    assert second.headers["x-request-id"] != generated


# --- determinism -----------------------------------------------------------------------------------


def test_sse_same_prompt_and_seed_give_the_same_tokens(http: httpx.Client, server: EmbeddedServer) -> None:
    body = {"prompt": PROMPT, "max_tokens": 16, "seed": 7}
    assert stream(http, server, body).texts == stream(http, server, body).texts


def test_sse_different_seeds_give_different_tokens(http: httpx.Client, server: EmbeddedServer) -> None:
    one = stream(http, server, {"prompt": PROMPT, "max_tokens": 16, "seed": 1}).texts
    two = stream(http, server, {"prompt": PROMPT, "max_tokens": 16, "seed": 2}).texts
    assert one != two


# --- heartbeats and faults -------------------------------------------------------------------------


def test_sse_sends_ping_comments_while_tokens_are_slower_than_the_heartbeat(
    http: httpx.Client, start_server: StartServer
) -> None:
    server = start_server(heartbeat_s=0.05, models=[ECHO, {"kind": "tokens", "base_ms": 200}])
    got = stream(http, server, {"prompt": PROMPT, "max_tokens": 2})
    pings = [b for b in got.blocks if b.comments]
    assert pings, "no heartbeat arrived although each token took 4 heartbeat periods"
    # A heartbeat is a bare comment: no event, id or data that a client would dispatch.
    assert all(b.comments == ["ping"] and b.event is None and not b.data and b.id is None for b in pings)
    assert len(got.tokens) == 2
    assert got.last.event == "done"


@pytest.mark.direct
def test_sse_injected_model_fault_ends_the_stream_with_an_error_event(
    http: httpx.Client, start_server: StartServer
) -> None:
    server = start_server(models=[ECHO, {"kind": "tokens", "fail_rate": 1.0}])
    got = stream(http, server, {"prompt": PROMPT, "max_tokens": 20, "request_id": "faulty"})
    assert got.last.event == "error"
    assert "done" not in [b.event for b in got.blocks]
    error = got.last.json()
    assert error["error"] == "model_error"
    assert error["message"]
    assert error["usage"]["completion_tokens"] == len(got.tokens) < 20
    assert [b.id for b in got.tokens] == [f"faulty:{i}" for i in range(len(got.tokens))]
    assert server.state.metrics.sequences.child("model_error").value == 1


# --- cancellation ----------------------------------------------------------------------------------


@pytest.mark.direct
def test_sse_client_disconnect_mid_stream_cancels_the_generation(http: httpx.Client, start_server: StartServer) -> None:
    server = start_server(models=[ECHO, {"kind": "tokens", "base_ms": 20}], graceful_shutdown_s=2)
    metrics, scheduler = server.state.metrics, server.state.registry.schedulers["tokens"]
    with http.stream("POST", server.url + "/v1/stream", json={"prompt": PROMPT, "max_tokens": 100_000}) as r:
        blocks = sse_blocks(r.iter_raw())
        seen: list[SseBlock] = []
        for block in blocks:
            if block.event == "token":
                seen.append(block)
            if len(seen) == 2:
                break
        assert scheduler.running == 1
    # Leaving the block closes the connection mid-stream.
    wait_until(lambda: metrics.sequences.child("cancelled").value == 1)
    wait_until(lambda: scheduler.running == 0 and scheduler.waiting == 0)
    wait_until(lambda: metrics.active_connections.get(("sse",)) == 0)
    assert metrics.sequences.child("finished").value == 0
    assert metrics.aborts.child("sse", "disconnect").value == 1


# --- refusals over the socket ----------------------------------------------------------------------


def _oversize() -> Iterator[bytes]:
    """A body sent chunked (no Content-Length), so the limit must be enforced while reading."""
    yield b'{"prompt": "'
    for _ in range(10):
        yield b"x" * 1000
    yield b'"}'


@pytest.mark.parametrize(
    ("request_kwargs", "status", "error", "field"),
    [
        pytest.param({"json": {"prompt": "x", "max_tokens": -1}}, 400, "invalid_request", "max_tokens", id="neg-max"),
        pytest.param({"json": {"prompt": "x", "max_tokens": "many"}}, 400, "invalid_request", "max_tokens", id="str"),
        pytest.param({"json": {"max_tokens": 3}}, 400, "invalid_request", "prompt", id="missing-prompt"),
        pytest.param({"json": {"prompt": "x", "temperature": 1}}, 400, "invalid_request", "temperature", id="extra"),
        pytest.param({"json": {"prompt": "x", "model": "gpt-9"}}, 404, "unknown_model", "model", id="unknown-model"),
        pytest.param({"json": {"prompt": "x", "model": "echo"}}, 400, "invalid_request", "model", id="predict-model"),
        pytest.param({"content": b"{not json"}, 400, "invalid_request", None, id="malformed-json"),
        pytest.param(
            {"content": b"prompt=x", "headers": {"content-type": "application/x-www-form-urlencoded"}},
            415,
            "unsupported_media_type",
            None,
            id="form-body",
        ),
        pytest.param({"json": {"prompt": "x" * 5000}}, 413, "payload_too_large", None, id="oversize-declared"),
        pytest.param({"content": _oversize}, 413, "payload_too_large", None, id="oversize-chunked"),
    ],
)
def test_sse_bad_requests_get_a_json_4xx_naming_the_field(
    http: httpx.Client,
    small_body_server: EmbeddedServer,
    request_kwargs: dict[str, Any],
    status: int,
    error: str,
    field: str | None,
) -> None:
    server = small_body_server
    steps = server.state.registry.schedulers["tokens"].steps
    if callable(request_kwargs.get("content")):
        request_kwargs = {**request_kwargs, "content": request_kwargs["content"]()}
    response = http.post(server.url + "/v1/stream", **request_kwargs)
    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["error"] == error
    assert body["message"]
    assert body.get("field") == field
    # The refusal never reached the scheduler, and the server still serves.
    assert server.state.registry.schedulers["tokens"].steps == steps
    assert stream(http, server, {"prompt": "x", "max_tokens": 1}).last.event == "done"


@pytest.mark.direct
def test_sse_full_queue_answers_503_with_retry_after(http: httpx.Client, start_server: StartServer) -> None:
    server = start_server(
        max_num_seqs=1, max_queue=1, graceful_shutdown_s=2, models=[ECHO, {"kind": "tokens", "base_ms": 20}]
    )
    scheduler = server.state.registry.schedulers["tokens"]
    url, long = server.url + "/v1/stream", {"prompt": PROMPT, "max_tokens": 100_000}
    with http.stream("POST", url, json=long) as running:
        assert running.status_code == 200
        wait_until(lambda: scheduler.running == 1)
        with http.stream("POST", url, json=long) as waiting:
            assert waiting.status_code == 200
            wait_until(lambda: scheduler.waiting == 1)
            refused = http.post(url, json={"prompt": PROMPT, "max_tokens": 1})
    assert refused.status_code == 503
    assert refused.headers["retry-after"].isdigit()
    assert int(refused.headers["retry-after"]) >= 1
    body = refused.json()
    assert (body["error"], body["reason"]) == ("overloaded", "queue_full")
    assert body["retry_after_ms"] >= 0
    assert server.state.metrics.rejections.child("queue_full").value == 1
    # Once the two streams are gone, the slot and the queue are free again.
    wait_until(lambda: scheduler.running == 0 and scheduler.waiting == 0)
    assert stream(http, server, {"prompt": PROMPT, "max_tokens": 1}).last.event == "done"
