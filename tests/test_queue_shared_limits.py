"""Queue mode on Redis: rate limits and stream leases are shared by every front end of the queue.

Two front ends (two servers in this process) on one Redis prefix: a client at its stream limit on one is
refused on the other, a lease given back on one admits on the other, one token bucket serves both, and a
lease whose front end died lapses. No worker runs: a job nobody takes keeps its stream (and lease) open.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from websockets.sync.client import ClientConnection, connect

from polling import wait_until
from reference_server.admission import Admission
from reference_server.errors import TooManyStreams
from reference_server.metrics import ServerMetrics
from reference_server.queue.shared_limits import RedisLimits
from reference_server.serve import EmbeddedServer
from reference_server.settings import ServerSettings
from serverkit import recv, send, sse_blocks

pytestmark = pytest.mark.slow

CLIENT = {"X-Client-Id": "alice"}
BODY = {"prompt": "shared limits", "max_tokens": 5}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def front_end(redis_url: str, prefix: str, **limits: Any) -> EmbeddedServer:
    settings = {"queue_url": redis_url, "queue_prefix": prefix, "graceful_shutdown_s": 1, **limits}
    return EmbeddedServer(ServerSettings.model_validate(settings))


def front_ends(redis_url: str, prefix: str, **limits: Any) -> tuple[EmbeddedServer, EmbeddedServer]:
    return front_end(redis_url, prefix, **limits), front_end(redis_url, prefix, **limits)


def test_a_client_at_its_stream_limit_on_one_front_end_is_refused_on_the_other(redis_url: str, prefix: str) -> None:
    a, b = front_ends(redis_url, prefix, max_streams_per_client=1)
    with a, b, httpx.Client(timeout=10, trust_env=False) as http:
        with http.stream("POST", a.url + "/v1/stream", json=BODY, headers=CLIENT) as held:
            assert held.status_code == 200
            blocks = sse_blocks(held.iter_raw())  # kept: a discarded reader would close the connection
            assert next(blocks).retry is not None  # the stream is open
            refused = http.post(b.url + "/v1/stream", json=BODY, headers=CLIENT)
            assert refused.status_code == 429
            assert refused.json()["error"] == "too_many_streams"
            assert "all front ends" in refused.json()["message"]
            with http.stream("POST", b.url + "/v1/stream", json=BODY, headers={"X-Client-Id": "bob"}) as other:
                assert other.status_code == 200  # another client's count is its own
            with open_socket_as(b, "alice") as ws:  # WebSocket generations share the count too
                send(ws, {"type": "generate", "id": "g", "prompt": "x", "max_tokens": 3})
                message = recv(ws)
                assert (message["type"], message["error"]) == ("error", "too_many_streams")
        # A's stream ended (the client hung up): its lease is given back, and B admits.

        def admitted_on_b() -> bool:
            with http.stream("POST", b.url + "/v1/stream", json=BODY, headers=CLIENT) as r:
                return r.status_code == 200

        wait_until(admitted_on_b, timeout_s=5, interval_s=0.05)


def open_socket_as(server: EmbeddedServer, client_id: str) -> ClientConnection:
    url = server.url.replace("http://", "ws://") + "/ws"
    return connect(url, open_timeout=5, close_timeout=2, proxy=None, additional_headers={"X-Client-Id": client_id})


def test_one_token_bucket_serves_a_client_on_every_front_end(redis_url: str, prefix: str) -> None:
    a, b = front_ends(redis_url, prefix, rate_limit_per_s=0.01, rate_limit_burst=2)
    with a, b, httpx.Client(timeout=10, trust_env=False) as http:
        bad = {"prompt": 5}  # refused after admission: takes a token, starts no job
        assert http.post(a.url + "/v1/stream", json=bad, headers=CLIENT).status_code == 400
        assert http.post(b.url + "/v1/stream", json=bad, headers=CLIENT).status_code == 400
        refused = http.post(a.url + "/v1/stream", json=bad, headers=CLIENT)
        assert refused.status_code == 429
        assert refused.json()["error"] == "rate_limited"
        assert int(refused.headers["Retry-After"]) >= 1
        assert http.post(b.url + "/v1/stream", json=bad, headers=CLIENT).status_code == 429
        assert http.post(b.url + "/v1/stream", json=bad, headers={"X-Client-Id": "bob"}).status_code == 400
        for server in (a, b):  # each front end counts its own refusals
            assert 'reason="rate_limited"} 1.0' in http.get(server.url + "/metrics").text


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def test_limits_with_redis_unreachable_are_a_clear_503(prefix: str) -> None:
    url = f"redis://127.0.0.1:{_closed_port()}/0"
    a = front_end(url, prefix, max_streams_per_client=2, rate_limit_per_s=5)
    with a, httpx.Client(timeout=10, trust_env=False) as http:
        down = http.post(a.url + "/v1/stream", json=BODY, headers=CLIENT)
        assert down.status_code == 503
        assert down.json()["reason"] == "queue_unavailable"
        assert down.headers["Retry-After"] == "1"
        with open_socket_as(a, "alice") as ws:
            send(ws, {"type": "generate", "id": "g", "prompt": "x", "max_tokens": 3})
            message = recv(ws)
            assert (message["type"], message["error"], message["reason"]) == (
                "error",
                "overloaded",
                "queue_unavailable",
            )


class ManualClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def limits(redis_url: str, prefix: str) -> AsyncIterator[RedisLimits]:
    client = aioredis.Redis.from_url(redis_url)
    try:
        yield RedisLimits(client, redis_url, prefix)
    finally:
        await client.aclose()


def _admission(limits: RedisLimits, clock: ManualClock) -> Admission:
    return Admission(
        rate_per_s=None, burst=1, max_streams=1, lease_ttl_s=3600, max_clients=16, metrics=ServerMetrics(),
        clock=clock, shared=limits, shared_lease_ttl_s=30, wall_clock=clock,
    )  # fmt: skip


@pytest.mark.anyio
async def test_a_lease_its_front_end_stopped_renewing_lapses_and_a_renewed_one_does_not(limits: RedisLimits) -> None:
    clock = ManualClock(1_000_000.0)
    crashed, alive = _admission(limits, clock), _admission(limits, clock)
    await crashed.lease_shared("carol")
    with pytest.raises(TooManyStreams):
        await alive.lease_shared("carol")
    clock.now += 31  # the holder never renewed: its lease lapsed
    held = await alive.lease_shared("carol")
    assert held is not None
    for _ in range(3):  # renewed every 20 s, it outlives many lease TTLs
        clock.now += 20
        await alive.renew_shared()
    with pytest.raises(TooManyStreams):
        await crashed.lease_shared("carol")
    await alive.release_shared(held)
    await alive.release_shared(held)  # twice does nothing
    assert await crashed.lease_shared("carol") is not None
