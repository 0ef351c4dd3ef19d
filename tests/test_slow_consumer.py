"""Slow consumers: one client that stops reading must not slow anyone else, and is dropped and counted.

The stalled clients are raw sockets with a tiny receive buffer that never read, so the server's writes
really block. Nothing here asserts on milliseconds: the facts are relative — every other stream got
all its tokens while the stalled one sat blocked, and the stalled one was dropped and counted.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator

import httpx
import pytest

from polling import wait_until
from reference_server.scheduler import ContinuousScheduler, Sequence
from reference_server.serve import EmbeddedServer
from reference_server.watchdog import SendWatchdog
from serverkit import stream

pytestmark = pytest.mark.slow

StartServer = Callable[..., EmbeddedServer]

ECHO = {"kind": "echo"}
# Zero-cost steps: the stalled stream must outrun the kernel's socket buffers (megabytes on loopback).
FAST_STEPS = {"kind": "tokens", "base_ms": 0, "prefill_ms": 0, "per_seq_ms": 0, "max_tokens_limit": 1_000_000}
PROMPT = "tell me about backpressure"
STALLED_TOKENS = 1_000_000
BOUND_S = 30.0  # an upper bound for waits on a loaded machine, never an expected duration


def _small_window_socket(server: EmbeddedServer) -> tuple[socket.socket, str]:
    host, port = server.url.removeprefix("http://").split(":")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: a small TCP window
    sock.connect((host, int(port)))
    return sock, host


def stalled_sse_client(server: EmbeddedServer, body: dict[str, object]) -> socket.socket:
    """A client that sends one /v1/stream request and then does not read."""
    sock, host = _small_window_socket(server)
    payload = json.dumps(body).encode()
    head = f"POST /v1/stream HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
    sock.sendall(head.encode() + f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
    return sock


def stalled_ws_client(server: EmbeddedServer, message: dict[str, object]) -> socket.socket:
    """A WebSocket client (RFC 6455, by hand) that sends one message and then does not read."""
    sock, host = _small_window_socket(server)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        f"GET /ws HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
    )
    sock.settimeout(BOUND_S)
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)  # byte by byte: read the handshake answer and nothing after it
    assert head.startswith(b"HTTP/1.1 101"), head
    payload = json.dumps(message).encode()
    assert len(payload) < 126
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    sock.sendall(bytes([0x81, 0x80 | len(payload)]) + mask + masked)  # FIN + text; client frames are masked
    return sock


def read_until_chunked_end(sock: socket.socket) -> bytes:
    """Everything up to the end of a chunked response (the connection itself stays open)."""
    sock.settimeout(BOUND_S)
    data = b""
    while not data.endswith(b"0\r\n\r\n"):
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def stalled_sequence(scheduler: ContinuousScheduler) -> Sequence | None:
    return next((s for s in scheduler.sequences() if s.plan.output_tokens == STALLED_TOKENS), None)


class _Sender:
    def __init__(self, send_started: float | None) -> None:
        self.send_started = send_started
        self.stuck = 0

    def send_stuck(self) -> None:
        self.stuck += 1


def test_the_watchdog_tells_only_senders_stuck_in_one_write_past_the_limit_and_only_once() -> None:
    watchdog = SendWatchdog(timeout_s=5.0)
    now = time.monotonic()
    stuck, writing, idle = _Sender(now - 6.0), _Sender(now - 1.0), _Sender(None)
    for sender in (stuck, writing, idle):
        watchdog.watch(sender)
    watchdog.sweep()
    watchdog.sweep()
    assert (stuck.stuck, writing.stuck, idle.stuck) == (1, 0, 0)
    assert len(watchdog) == 2


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=httpx.Timeout(BOUND_S), trust_env=False) as client:
        yield client


@pytest.mark.direct
def test_a_client_that_never_reads_is_dropped_while_everyone_else_streams_on(
    http: httpx.Client, start_server: StartServer
) -> None:
    server = start_server(models=[ECHO, FAST_STEPS], stream_buffer=200_000, send_timeout_s=3.0, graceful_shutdown_s=1)
    scheduler, metrics = server.state.registry.schedulers["tokens"], server.state.metrics
    sock = stalled_sse_client(server, {"prompt": PROMPT, "max_tokens": STALLED_TOKENS})
    try:
        # The stalled stream's sender is blocked on a full socket: its tokens pile up in its buffer.
        wait_until(lambda: (seq := stalled_sequence(scheduler)) is not None and seq.channel.buffered >= 50, BOUND_S)

        results: list[list[str]] = []
        errors: list[BaseException] = []

        def fast_client(n: int) -> None:
            try:
                with httpx.Client(timeout=httpx.Timeout(BOUND_S), trust_env=False) as own:
                    for i in range(3):
                        got = stream(own, server, {"prompt": f"{PROMPT} {n} {i}", "max_tokens": 20})
                        results.append([b.event or "" for b in got.blocks if b.event])
            except BaseException as exc:  # reported below, in the test's thread
                errors.append(exc)

        threads = [threading.Thread(target=fast_client, args=(n,)) for n in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(BOUND_S)
        assert not errors
        # Every fast stream got every token and its done event, whatever the stalled client did.
        assert results == [["token"] * 20 + ["done"]] * 9

        # The stalled stream was dropped (its buffer overflowed or a write timed out) and counted.
        drops = metrics.slow_drops
        wait_until(lambda: sum(c.value for c in drops.children.values()) == 1, BOUND_S)
        wait_until(lambda: stalled_sequence(scheduler) is None, BOUND_S)
        assert metrics.sequences.child("slow_consumer").value == 1
        assert metrics.sequences.child("finished").value == 9 + 0
        wait_until(lambda: metrics.active_connections.get(("sse",)) == 0, BOUND_S)
    finally:
        sock.close()


@pytest.mark.direct
def test_a_slow_reader_is_warned_once_at_80_percent_before_anything_is_dropped(start_server: StartServer) -> None:
    server = start_server(models=[ECHO, FAST_STEPS], stream_buffer=400, send_timeout_s=BOUND_S, graceful_shutdown_s=1)
    scheduler = server.state.registry.schedulers["tokens"]
    sock = stalled_sse_client(server, {"prompt": PROMPT, "max_tokens": STALLED_TOKENS})
    try:
        wait_until(lambda: stalled_sequence(scheduler) is not None, BOUND_S)
        seq = stalled_sequence(scheduler)
        assert seq is not None
        wait_until(lambda: seq.channel.warned, BOUND_S)  # stays set after the stream ended
        data = read_until_chunked_end(sock)  # now read it all, as fast as possible
    finally:
        sock.close()
    assert data.count(b"event: warning\n") == 1
    warning_at = data.index(b"event: warning\n")
    end_at = max(data.rfind(b"event: done\n"), data.rfind(b"event: error\n"))
    assert 0 < warning_at < end_at
    assert b'"warning":"slow_consumer"' in data
    assert server.state.metrics.slow_warnings.child("sse").value == 1


@pytest.mark.direct
def test_a_websocket_that_stops_reading_is_closed_and_counted(start_server: StartServer) -> None:
    server = start_server(models=[ECHO, FAST_STEPS], stream_buffer=2000, send_timeout_s=1.0, graceful_shutdown_s=1)
    scheduler, metrics = server.state.registry.schedulers["tokens"], server.state.metrics
    sock = stalled_ws_client(server, {"type": "generate", "id": "g", "prompt": PROMPT, "max_tokens": STALLED_TOKENS})
    try:
        wait_until(lambda: sum(c.value for c in metrics.slow_drops.children.values()) == 1, BOUND_S)
        wait_until(lambda: stalled_sequence(scheduler) is None, BOUND_S)
    finally:
        sock.close()
    assert metrics.sequences.child("slow_consumer").value == 1
    wait_until(lambda: metrics.active_connections.get(("websocket",)) == 0, BOUND_S)


def test_send_buffer_bytes_fixes_the_kernel_buffer_of_every_accepted_connection(start_server: StartServer) -> None:
    """Autotuned, one slow reader's kernel send buffer grows to ``tcp_wmem``'s maximum (megabytes) before
    the server's own stream buffer sees it fall behind; fixed, it holds what the setting says."""
    server = start_server(send_buffer_bytes=65536)
    sock, host = _small_window_socket(server)
    try:
        sock.sendall(f"GET /healthz HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        sock.settimeout(BOUND_S)
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        connections = server._server.server_state.connections
        (accepted,) = [c.transport.get_extra_info("socket") for c in connections]
        # Linux doubles what was asked, for its bookkeeping (socket(7)).
        assert accepted.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) == 2 * 65536
    finally:
        sock.close()
