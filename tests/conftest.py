"""Shared fixtures: real reference servers on loopback, and virtual time for scheduling logic."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
from trio.testing import MockClock

from reference_server.serve import EmbeddedServer
from reference_server.settings import ServerSettings


@pytest.fixture
def virtual_time() -> tuple[str, dict[str, Any]]:
    """An anyio backend on trio's MockClock: sleeps and timeouts jump, so a 10 ms deadline is exact."""
    return ("trio", {"clock": MockClock(autojump_threshold=0)})


@pytest.fixture
def start_server(request: pytest.FixtureRequest) -> Iterator[Callable[..., EmbeddedServer]]:
    """Start real uvicorn reference servers on free loopback ports; all are stopped after the test.

    A test marked ``direct`` gets direct-mode servers (no queue) unless it says otherwise: it tests the
    engines' own behaviour (their event ids, resume buffer, slow-consumer policy, internals)."""
    started: list[EmbeddedServer] = []
    defaults: dict[str, Any] = {"queue_url": None} if request.node.get_closest_marker("direct") else {}

    def start(**settings: Any) -> EmbeddedServer:
        server = EmbeddedServer(ServerSettings.model_validate({**defaults, **settings})).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def server(start_server: Callable[..., EmbeddedServer]) -> EmbeddedServer:
    """A reference server with default settings."""
    return start_server()


# --- Redis, for queue mode ------------------------------------------------------------------------


def _ping(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1).ping())
    except redis.RedisError:
        return False


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    default = "redis://127.0.0.1:6379/0"
    if _ping(default):
        yield default
        return
    binary = shutil.which("redis-server")
    if binary is None:
        reason = "no Redis on 127.0.0.1:6379 and no redis-server binary to start one"
        if os.environ.get("INFERBENCH_REQUIRE_REDIS") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    workdir = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(workdir)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"redis://127.0.0.1:{port}/0"
    try:
        for _ in range(100):
            if _ping(url):
                break
            time.sleep(0.05)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
def prefix(redis_url: str) -> Iterator[str]:
    """A key prefix of the test's own, its keys deleted afterwards."""
    name = f"inferbench-test-{uuid.uuid4().hex[:12]}"
    yield name
    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(match=f"{name}:*"))
    if keys:
        client.delete(*keys)
