"""Shared fixtures: real reference servers on loopback, and virtual time for scheduling logic."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from trio.testing import MockClock

from reference_server.serve import EmbeddedServer
from reference_server.settings import ServerSettings


@pytest.fixture
def virtual_time() -> tuple[str, dict[str, Any]]:
    """An anyio backend on trio's MockClock: sleeps and timeouts jump, so a 10 ms deadline is exact."""
    return ("trio", {"clock": MockClock(autojump_threshold=0)})


@pytest.fixture
def start_server() -> Iterator[Callable[..., EmbeddedServer]]:
    """Start real uvicorn reference servers on free loopback ports; all are stopped after the test."""
    started: list[EmbeddedServer] = []

    def start(**settings: Any) -> EmbeddedServer:
        server = EmbeddedServer(ServerSettings.model_validate(settings)).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def server(start_server: Callable[..., EmbeddedServer]) -> EmbeddedServer:
    """A reference server with default settings."""
    return start_server()
