"""Connection-level protection: the per-address limit (counted once per transport, WebSocket upgrades too,
answered with 429) and the read deadline of a request (408 for a request that never arrives whole)."""

from __future__ import annotations

import contextlib
import json
import socket
from collections.abc import Iterator

import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from polling import wait_until
from reference_server import connections
from reference_server.connections import ConnectionCounter, counter_for
from reference_server.serve import EmbeddedServer
from reference_server.settings import ServerSettings

LIMIT = 3
HEALTH = b"GET /healthz HTTP/1.1\r\nhost: test\r\n\r\n"


@pytest.fixture(scope="module")
def server() -> Iterator[EmbeddedServer]:
    with EmbeddedServer(ServerSettings(max_connections_per_client=LIMIT)) as running:
        yield running


def _address(server: EmbeddedServer) -> tuple[str, int]:
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


def _counter(server: EmbeddedServer) -> ConnectionCounter:
    uvicorn_server = server._server
    counter = counter_for(uvicorn_server.config, uvicorn_server.server_state)
    assert counter is not None
    return counter


def _held(server: EmbeddedServer) -> int:
    return _counter(server).held("127.0.0.1")


def _ask(sock: socket.socket) -> bytes:
    """Send one keep-alive request and read its whole response (or until the server closes)."""
    sock.sendall(HEALTH)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next(line for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:"))[15:])
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


def _read_to_end(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def _open(server: EmbeddedServer, count: int) -> list[socket.socket]:
    socks = [socket.create_connection(_address(server), timeout=10) for _ in range(count)]
    for sock in socks:  # each served, so each is counted by the time we go on
        assert _ask(sock).startswith(b"HTTP/1.1 200")
    return socks


def test_a_connection_over_the_limit_gets_429_with_a_reason_then_eof(server: EmbeddedServer) -> None:
    held = _open(server, LIMIT)
    try:
        assert _held(server) == LIMIT
        with socket.create_connection(_address(server), timeout=10) as extra:
            extra.sendall(HEALTH)
            answer = _read_to_end(extra)  # the server closes its side after the answer
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 429 ")
        assert b"connection: close" in head.lower()
        refusal = json.loads(body)
        assert refusal["error"] == "too_many_connections"
        assert str(LIMIT) in refusal["detail"]
        assert _counter(server).refused >= 1
        for sock in held:  # the connections within the limit are untouched
            assert _ask(sock).startswith(b"HTTP/1.1 200")
    finally:
        for sock in held:
            sock.close()
    wait_until(lambda: _held(server) == 0)


def test_closing_a_connection_makes_room_for_a_new_one(server: EmbeddedServer) -> None:
    held = _open(server, LIMIT)
    held.pop().close()
    wait_until(lambda: _held(server) == LIMIT - 1)
    held += _open(server, 1)
    assert _held(server) == LIMIT
    for sock in held:
        sock.close()
    wait_until(lambda: _held(server) == 0)


def test_a_websocket_counts_once_across_its_upgrade_and_is_refused_over_the_limit(server: EmbeddedServer) -> None:
    ws_url = server.url.replace("http://", "ws://") + "/ws"
    with contextlib.ExitStack() as stack:
        first = stack.enter_context(connect(ws_url, open_timeout=10))
        stack.enter_context(connect(ws_url, open_timeout=10))
        for sock in _open(server, 1):
            stack.callback(sock.close)
        assert _held(server) == LIMIT  # two upgraded sockets and one HTTP connection, each counted once
        with pytest.raises(InvalidStatus) as refused, connect(ws_url, open_timeout=10):
            pass
        assert refused.value.response.status_code == 429
        assert b"too_many_connections" in refused.value.response.body
        first.close()
        wait_until(lambda: _held(server) == LIMIT - 1)  # the WebSocket's close counted it out
        with connect(ws_url, open_timeout=10) as third:
            third.send('{"type": "ping"}')
            assert "pong" in str(third.recv(timeout=10))
    wait_until(lambda: _held(server) == 0)


def test_a_refused_client_that_never_sends_a_request_is_closed_after_a_wait(
    server: EmbeddedServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(connections, "_REFUSED_HEAD_WAIT_S", 0.2)
    held = _open(server, LIMIT)
    try:
        with socket.create_connection(_address(server), timeout=10) as silent:
            assert _read_to_end(silent) == b""  # closed by the server after its head wait, not kept open
    finally:
        for sock in held:
            sock.close()


def test_without_the_setting_nothing_is_counted_or_refused() -> None:
    with EmbeddedServer(ServerSettings()) as unlimited:
        uvicorn_server = unlimited._server
        assert counter_for(uvicorn_server.config, uvicorn_server.server_state) is None
        socks = _open(unlimited, 3 * LIMIT)  # each answered 200
        for sock in socks:
            sock.close()


READ_TIMEOUT_S = 1.0


@pytest.fixture(scope="module")
def deadline_server() -> Iterator[EmbeddedServer]:
    with EmbeddedServer(ServerSettings(request_read_timeout_s=READ_TIMEOUT_S)) as running:
        yield running


@pytest.mark.parametrize(
    "sent",
    [
        pytest.param(b"", id="nothing"),
        pytest.param(b"POST /v1/stream HTTP/1.1\r\nhost: t\r\n", id="half-a-head"),
        pytest.param(
            b"POST /v1/stream HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n"
            b'{"prompt":',
            id="head-and-half-a-body",
        ),
    ],
)
def test_a_request_that_never_arrives_whole_gets_408_and_the_connection_closes(
    deadline_server: EmbeddedServer, sent: bytes
) -> None:
    with socket.create_connection(_address(deadline_server), timeout=10 * READ_TIMEOUT_S) as sock:
        sock.sendall(sent)
        answer = _read_to_end(sock)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 "), answer
    assert json.loads(body)["error"] == "request_timeout"
    with socket.create_connection(_address(deadline_server), timeout=10) as other:  # and the server goes on
        assert _ask(other).startswith(b"HTTP/1.1 200")


def test_the_read_deadline_spares_requests_that_arrive_whole_and_idle_keep_alive(
    deadline_server: EmbeddedServer,
) -> None:
    with socket.create_connection(_address(deadline_server), timeout=10) as sock:
        assert _ask(sock).startswith(b"HTTP/1.1 200")
        # Idle for longer than the deadline between requests: uvicorn's keep-alive timeout (5 s) governs.
        sock.settimeout(1.5 * READ_TIMEOUT_S)
        with pytest.raises(TimeoutError):
            sock.recv(1)  # no 408, nothing at all
        sock.settimeout(10)
        assert _ask(sock).startswith(b"HTTP/1.1 200")
