"""Admission: client identity, token buckets, stream leases, and the 429s they give — on a manual clock
for the policies, on a real server for the wire."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import httpx
import pytest

from polling import wait_until
from reference_server.admission import LeaseTable, RateLimiter, TokenBucket, client_identity
from reference_server.errors import TooManyStreams
from reference_server.serve import EmbeddedServer
from serverkit import collect, open_socket, recv, send, sse_blocks

StartServer = Callable[..., EmbeddedServer]

ECHO = {"kind": "echo"}
SLOW_TOKENS = {"kind": "tokens", "base_ms": 20}
PROMPT = "tell me about admission"


class ManualClock:
    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=httpx.Timeout(10.0), trust_env=False) as client:
        yield client


# --- identity --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "peer", "expected"),
    [
        pytest.param([(b"x-api-key", b"k"), (b"x-client-id", b"alice")], "10.0.0.1", "id:alice", id="header-wins"),
        pytest.param([(b"x-api-key", b"secret")], "10.0.0.1", None, id="api-key-digest"),
        pytest.param([(b"authorization", b"Bearer secret")], "10.0.0.1", None, id="bearer-same-digest"),
        pytest.param([(b"authorization", b"Basic eDp5")], "10.0.0.1", "peer:10.0.0.1", id="not-a-bearer"),
        pytest.param([], "10.0.0.1", "peer:10.0.0.1", id="peer-address"),
        pytest.param([], None, "peer:unknown", id="no-peer"),
    ],
)
def test_client_identity_prefers_the_header_then_the_api_key_then_the_peer(
    headers: list[tuple[bytes, bytes]], peer: str | None, expected: str | None
) -> None:
    got = client_identity(headers, peer)
    if expected is None:  # an API key is kept only as a digest, the same for either header
        assert got == client_identity([(b"x-api-key", b"secret")], None)
        assert got.startswith("key:")
        assert "secret" not in got
    else:
        assert got == expected


# --- token bucket ----------------------------------------------------------------------------------


def test_token_bucket_grants_a_burst_then_says_exactly_when_the_next_token_comes() -> None:
    bucket = TokenBucket(tokens=3.0, updated_at=0.0)
    assert [bucket.take(0.0, rate=2.0, burst=3.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take(0.0, rate=2.0, burst=3.0) == pytest.approx(0.5)
    assert bucket.take(0.25, rate=2.0, burst=3.0) == pytest.approx(0.25)  # half a token back, lazily
    assert bucket.take(0.5, rate=2.0, burst=3.0) == 0.0


def test_token_bucket_refill_is_capped_at_the_burst() -> None:
    bucket = TokenBucket(tokens=0.0, updated_at=0.0)
    assert bucket.take(1000.0, rate=1.0, burst=2.0) == 0.0
    assert bucket.take(1000.0, rate=1.0, burst=2.0) == 0.0
    assert bucket.take(1000.0, rate=1.0, burst=2.0) > 0


def test_rate_limiter_keeps_one_bucket_per_client_and_forgets_full_idle_ones() -> None:
    limiter = RateLimiter(1.0, 1.0, max_clients=16)
    assert limiter.check("a", 0.0) == 0.0
    assert limiter.check("a", 0.0) == pytest.approx(1.0)
    assert limiter.check("b", 0.0) == 0.0  # another client has its own bucket
    for i in range(20):  # past max_clients: buckets idle long enough to be full are dropped
        limiter.check(f"c{i}", 10.0 + i)
    assert len(limiter) <= 16


# --- leases ----------------------------------------------------------------------------------------


def test_leases_cap_concurrent_streams_per_client_and_free_on_release() -> None:
    clock = ManualClock()
    table = LeaseTable(limit=2, ttl_s=60.0, clock=clock)
    first, _second = table.acquire("a"), table.acquire("a")
    with pytest.raises(TooManyStreams):
        table.acquire("a")
    table.acquire("b")  # limits are per client
    table.release(first)
    table.release(first)  # twice is harmless
    table.acquire("a")
    assert table.held("a") == 2


def test_a_lease_that_was_never_released_lapses_after_its_ttl() -> None:
    clock = ManualClock()
    table = LeaseTable(limit=1, ttl_s=30.0, clock=clock)
    leaked = table.acquire("a")
    clock.now += 29.9
    with pytest.raises(TooManyStreams):
        table.acquire("a")
    clock.now += 0.1
    assert table.sweep(clock.now) == 1
    assert leaked.released
    table.acquire("a")
    assert table.expired == 1


# --- on the wire -----------------------------------------------------------------------------------


def test_over_the_rate_limit_http_gets_429_with_retry_after_and_retry_after_ms(
    http: httpx.Client, start_server: StartServer
) -> None:
    server = start_server(rate_limit_per_s=0.1, rate_limit_burst=2)
    url = server.url + "/predict"
    assert [http.post(url, json={"input": 1}).status_code for _ in range(2)] == [200, 200]
    refused = http.post(url, json={"input": 1})
    assert refused.status_code == 429
    body = refused.json()
    assert body["error"] == "rate_limited"
    assert 9_000 < body["retry_after_ms"] <= 10_000  # one token every 10 s
    assert refused.headers["retry-after"] == "10"  # whole seconds, rounded up
    # Another client (X-Client-Id) has its own bucket; the metric counts without naming anyone.
    assert http.post(url, json={"input": 1}, headers={"X-Client-Id": "other"}).status_code == 200
    assert server.state.metrics.rejections.child("rate_limited").value == 1
    assert "other" not in http.get(server.url + "/metrics").text


def test_over_the_rate_limit_a_websocket_gets_an_in_band_message_and_stays_open(start_server: StartServer) -> None:
    server = start_server(rate_limit_per_s=0.1, rate_limit_burst=1)
    with open_socket(server) as ws:
        send(ws, {"type": "predict", "id": "p1", "input": 1})
        assert recv(ws)["type"] == "result"
        send(ws, {"type": "generate", "id": "g1", "prompt": PROMPT, "max_tokens": 2})
        limited = recv(ws)
        assert limited["type"] == "rate_limited"
        assert limited["id"] == "g1"
        assert limited["retry_after_ms"] > 0
        send(ws, {"type": "ping", "data": "open?"})
        assert recv(ws) == {"type": "pong", "data": "open?"}


def test_stream_leases_refuse_a_second_stream_with_429_and_free_on_disconnect(
    http: httpx.Client, start_server: StartServer
) -> None:
    server = start_server(max_streams_per_client=1, models=[ECHO, SLOW_TOKENS], graceful_shutdown_s=2)
    leases = server.state.admission.leases
    assert leases is not None
    url, long = server.url + "/v1/stream", {"prompt": PROMPT, "max_tokens": 4096}
    with http.stream("POST", url, json=long) as first:
        assert first.status_code == 200
        refused = http.post(url, json={"prompt": PROMPT, "max_tokens": 1})
        assert refused.status_code == 429
        assert refused.json()["error"] == "too_many_streams"
        assert refused.headers["retry-after"] == "1"
        openai = http.post(server.url + "/v1/completions", json={"model": "tokens", "prompt": "x", "max_tokens": 1})
        assert openai.status_code == 429  # every generation route takes a lease
        next(sse_blocks(first.iter_raw()))
    wait_until(lambda: leases.total == 0)  # the disconnect released it
    done = http.post(url, json={"prompt": PROMPT, "max_tokens": 1})
    assert done.status_code == 200
    wait_until(lambda: leases.total == 0)  # and so did finishing
    assert server.state.metrics.rejections.child("too_many_streams").value == 2


def test_websocket_streams_take_leases_too_and_a_refusal_keeps_the_socket(start_server: StartServer) -> None:
    server = start_server(max_streams_per_client=1, models=[ECHO, SLOW_TOKENS], graceful_shutdown_s=2)
    with open_socket(server) as ws:
        send(ws, {"type": "generate", "id": "a", "prompt": PROMPT, "max_tokens": 4096})
        assert recv(ws)["type"] == "token"
        send(ws, {"type": "generate", "id": "b", "prompt": PROMPT, "max_tokens": 1})
        while (refused := recv(ws))["id"] != "b":
            pass
        assert (refused["type"], refused["error"]) == ("error", "too_many_streams")
        send(ws, {"type": "cancel", "id": "a"})
        assert collect(ws, {"a"})["a"][-1]["error"] == "cancelled"
        send(ws, {"type": "generate", "id": "c", "prompt": PROMPT, "max_tokens": 2})
        assert [m["type"] for m in collect(ws, {"c"})["c"]] == ["token", "token", "done"]
    assert server.state.metrics.aborts.child("websocket", "cancel").value == 1
