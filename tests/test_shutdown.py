"""Shutdown: readiness red, new work refused, streams given the grace period, then ended with a reason."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

import httpx
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection

from polling import wait_until
from reference_server.serve import EmbeddedServer
from serverkit import Message, open_socket, recv, send, sse_blocks

pytestmark = pytest.mark.slow

StartServer = Callable[..., EmbeddedServer]

ECHO = {"kind": "echo"}
SLOW_TOKENS = {"kind": "tokens", "base_ms": 20}
PROMPT = "tell me about graceful shutdown"


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=httpx.Timeout(10.0), trust_env=False) as client:
        yield client


def stop_in_background(server: EmbeddedServer) -> threading.Thread:
    stopper = threading.Thread(target=server.stop)
    stopper.start()
    wait_until(lambda: server.state.draining)
    return stopper


def messages_until_closed(ws: ClientConnection) -> tuple[list[Message], ConnectionClosed]:
    """Every message until the server closes the socket, and how it closed it."""
    messages: list[Message] = []
    for _ in range(100_000):  # bounded: a stream here has at most 4096 tokens
        try:
            messages.append(recv(ws))
        except ConnectionClosed as closed:
            return messages, closed
    raise AssertionError("the socket was never closed")


def test_websocket_streams_finish_in_the_grace_period_then_the_socket_closes_1001(start_server: StartServer) -> None:
    server = start_server(models=[ECHO, SLOW_TOKENS], graceful_shutdown_s=2)
    with open_socket(server) as ws:
        send(ws, {"type": "generate", "id": "short", "prompt": PROMPT, "max_tokens": 10})
        assert recv(ws)["type"] == "token"
        stopper = stop_in_background(server)
        send(ws, {"type": "generate", "id": "late", "prompt": PROMPT, "max_tokens": 1})
        messages, closed = messages_until_closed(ws)
    stopper.join(10)
    short = [m for m in messages if m.get("id") == "short"]
    assert short[-1]["type"] == "done"  # finished within the grace period, not cut off
    (late,) = [m for m in messages if m.get("id") == "late"]
    assert (late["error"], late["reason"]) == ("overloaded", "draining")
    assert closed.rcvd is not None
    assert (closed.rcvd.code, closed.rcvd.reason) == (1001, "server shutting down")


def test_streams_still_running_at_the_end_of_the_grace_period_end_with_a_reason(
    http: httpx.Client, start_server: StartServer
) -> None:
    server = start_server(models=[ECHO, SLOW_TOKENS], graceful_shutdown_s=0.5)
    with (
        open_socket(server) as ws,
        http.stream("POST", server.url + "/v1/stream", json={"prompt": PROMPT, "max_tokens": 4096}) as sse,
    ):
        send(ws, {"type": "generate", "id": "long", "prompt": PROMPT, "max_tokens": 4096})
        assert recv(ws)["type"] == "token"
        blocks = sse_blocks(sse.iter_raw())
        assert next(b for b in blocks if b.event == "token")
        stopper = stop_in_background(server)
        last_sse = [b for b in blocks if b.event][-1]
        messages, closed = messages_until_closed(ws)
    stopper.join(10)
    assert last_sse.event == "error"
    assert last_sse.json()["error"] == "shutdown"
    assert messages[-1]["type"] == "error"
    assert messages[-1]["error"] == "shutdown"
    assert closed.rcvd is not None
    assert closed.rcvd.code == 1001
    assert server.state.metrics.sequences.child("shutdown").value == 2


def test_readiness_turns_red_and_new_work_is_refused_while_draining(start_server: StartServer) -> None:
    server = start_server(models=[ECHO, SLOW_TOKENS], graceful_shutdown_s=1)
    with open_socket(server) as ws:
        send(ws, {"type": "generate", "id": "hold", "prompt": PROMPT, "max_tokens": 4096})  # keeps the server up
        assert recv(ws)["type"] == "token"
        stopper = stop_in_background(server)
        assert server.state.ready is False
        send(ws, {"type": "predict", "id": "p", "input": 1})
        while (message := recv(ws)).get("id") != "p":
            pass
        assert (message["error"], message["reason"]) == ("overloaded", "draining")
        assert message["retry_after_ms"] > 0
    stopper.join(10)
    assert server.state.metrics.rejections.child("draining").value >= 1
