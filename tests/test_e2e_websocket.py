"""``WS /ws`` end to end: many requests on one socket, cancellation, and refusals that keep it open.

Clients are the ``websockets`` library's synchronous client talking to a real uvicorn on loopback.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator

import httpx
import pytest
from websockets.sync.client import ClientConnection

from polling import wait_until
from reference_server.serve import EmbeddedServer
from serverkit import Message, collect, open_socket, recv, send

pytestmark = pytest.mark.slow  # real servers on loopback; still run in CI

StartServer = Callable[..., EmbeddedServer]

ECHO = {"kind": "echo"}
SLOW_TOKENS = {"kind": "tokens", "base_ms": 20}
PROMPT = "tell me about continuous batching"


def assert_socket_still_serves(ws: ClientConnection) -> None:
    """A ping and a short generation both work: the socket survived whatever came before."""
    send(ws, {"type": "ping", "data": "still there?"})
    assert recv(ws) == {"type": "pong", "data": "still there?"}
    send(ws, {"type": "generate", "id": "after", "prompt": PROMPT, "max_tokens": 2})
    after = collect(ws, {"after"})["after"]
    assert [m["type"] for m in after] == ["token", "token", "done"]


@pytest.fixture
def ws(server: EmbeddedServer) -> Iterator[ClientConnection]:
    with open_socket(server) as socket:
        yield socket


# --- several requests on one socket ---------------------------------------------------------------


def test_ws_requests_in_flight_together_each_get_their_tokens_in_order_then_done(ws: ClientConnection) -> None:
    lengths = {"a": 3, "b": 7, "c": 5}
    for request_id, n in lengths.items():
        send(ws, {"type": "generate", "id": request_id, "prompt": f"{PROMPT} {request_id}", "max_tokens": n})
    got = collect(ws, set(lengths))
    for request_id, n in lengths.items():
        messages = got[request_id]
        tokens, end = messages[:-1], messages[-1]
        assert [m["type"] for m in tokens] == ["token"] * n
        assert [m["seq"] for m in tokens] == list(range(n))
        assert all(m["token"] for m in tokens)
        assert end["type"] == "done"
        assert end["finish_reason"] == "length"
        assert end["usage"] == {"prompt_tokens": 6, "completion_tokens": n, "total_tokens": 6 + n}
        assert (end["model"], end["model_version"]) == ("tokens", "1")


def test_ws_tokens_equal_sse_tokens_for_the_same_prompt_and_seed(server: EmbeddedServer, ws: ClientConnection) -> None:
    send(ws, {"type": "generate", "id": "w", "prompt": PROMPT, "max_tokens": 8, "seed": 3})
    over_ws = [m["token"] for m in collect(ws, {"w"})["w"] if m["type"] == "token"]
    with httpx.Client(timeout=10.0, trust_env=False) as http:
        body = {"prompt": PROMPT, "max_tokens": 8, "seed": 3}
        lines = http.post(server.url + "/v1/stream", json=body).text.splitlines()
    over_sse = [json.loads(line[6:])["token"] for line in lines if line.startswith("data: ") and '"seq"' in line]
    assert over_ws == over_sse


# --- cancellation ---------------------------------------------------------------------------------


def test_ws_cancel_ends_the_request_with_a_cancelled_error_and_spares_the_others(
    start_server: StartServer,
) -> None:
    server = start_server(models=[ECHO, SLOW_TOKENS], graceful_shutdown_s=2)
    with open_socket(server) as ws:
        send(ws, {"type": "generate", "id": "long", "prompt": PROMPT, "max_tokens": 100_000})
        send(ws, {"type": "generate", "id": "short", "prompt": PROMPT, "max_tokens": 5})
        first = recv(ws)
        assert first["type"] == "token"
        send(ws, {"type": "cancel", "id": "long"})
        got = collect(ws, {"long", "short"})
    got[first["id"]].insert(0, first)
    long_end = got["long"][-1]
    assert long_end["type"] == "error"
    assert long_end["error"] == "cancelled"
    assert long_end["message"]
    assert long_end["usage"]["completion_tokens"] == len(got["long"]) - 1
    assert [m["type"] for m in got["short"]] == ["token"] * 5 + ["done"]
    assert [m["seq"] for m in got["short"][:-1]] == list(range(5))
    scheduler = server.state.registry.schedulers["tokens"]
    wait_until(lambda: scheduler.running == 0)
    assert server.state.metrics.sequences.child("cancelled").value == 1


def test_ws_cancel_of_an_unknown_id_is_ignored(ws: ClientConnection) -> None:
    send(ws, {"type": "cancel", "id": "never-sent"})
    assert_socket_still_serves(ws)  # the pong is the very next message: no error for the cancel


@pytest.mark.direct
def test_ws_closing_the_socket_cancels_its_generations(start_server: StartServer) -> None:
    server = start_server(models=[ECHO, SLOW_TOKENS], graceful_shutdown_s=2)
    metrics, scheduler = server.state.metrics, server.state.registry.schedulers["tokens"]
    with open_socket(server) as ws:
        for request_id in ("one", "two"):
            send(ws, {"type": "generate", "id": request_id, "prompt": PROMPT, "max_tokens": 100_000})
        assert recv(ws)["type"] == "token"
        wait_until(lambda: scheduler.running == 2)
    wait_until(lambda: metrics.sequences.child("cancelled").value == 2)
    wait_until(lambda: scheduler.running == 0 and scheduler.waiting == 0)
    wait_until(lambda: metrics.active_connections.get(("websocket",)) == 0)


# --- refusals keep the socket open ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("frame", "error", "field", "request_id"),
    [
        pytest.param("{not json", "invalid_request", None, None, id="invalid-json"),
        pytest.param("[1, 2]", "invalid_request", None, None, id="json-array"),
        pytest.param(b'{"type": "ping"}', "invalid_request", None, None, id="binary-frame"),
        pytest.param({"type": "shout", "id": "u"}, "invalid_request", "type", "u", id="unknown-type"),
        pytest.param({"id": "t"}, "invalid_request", "type", "t", id="missing-type"),
        pytest.param({"type": "generate", "id": "m"}, "invalid_request", "prompt", "m", id="missing-prompt"),
        pytest.param({"type": "generate", "prompt": "x"}, "invalid_request", "id", None, id="missing-id"),
        pytest.param(
            {"type": "generate", "id": "n", "prompt": "x", "max_tokens": 0},
            "invalid_request",
            "max_tokens",
            "n",
            id="zero-max-tokens",
        ),
        pytest.param(
            {"type": "generate", "id": "x", "prompt": "x", "tempo": 1}, "invalid_request", "tempo", "x", id="extra"
        ),
        pytest.param(
            {"type": "generate", "id": "bad id", "prompt": "x"}, "invalid_request", "id", None, id="bad-id-not-echoed"
        ),
        pytest.param(
            {"type": "generate", "id": "g", "prompt": "x", "model": "gpt-9"}, "unknown_model", "model", "g", id="model"
        ),
        pytest.param(
            {"type": "predict", "id": "p", "input": 1, "model": "tokens"},
            "invalid_request",
            "model",
            "p",
            id="predict-on-generator",
        ),
    ],
)
def test_ws_bad_message_gets_an_error_with_a_reason_and_the_socket_stays_open(
    ws: ClientConnection, frame: str | bytes | Message, error: str, field: str | None, request_id: str | None
) -> None:
    ws.send(json.dumps(frame) if isinstance(frame, dict) else frame)
    refusal = recv(ws)
    assert refusal["type"] == "error"
    assert refusal["error"] == error
    assert refusal["message"]
    assert refusal.get("field") == field
    assert refusal["id"] == request_id
    assert_socket_still_serves(ws)


def test_ws_duplicate_in_flight_id_is_refused_and_the_first_request_goes_on(start_server: StartServer) -> None:
    server = start_server(models=[ECHO, SLOW_TOKENS], graceful_shutdown_s=2)
    with open_socket(server) as ws:
        # Messages are handled in order, so the first "dup" is in flight when the second arrives.
        send(ws, {"type": "generate", "id": "dup", "prompt": PROMPT, "max_tokens": 100_000})
        send(ws, {"type": "generate", "id": "dup", "prompt": PROMPT, "max_tokens": 3})
        got = collect(ws, {"dup"})["dup"]
        refusal = got.pop()
        assert (refusal["type"], refusal["error"], refusal["field"]) == ("error", "invalid_request", "id")
        assert "already in flight" in refusal["message"]
        # The first request is untouched: its tokens keep coming, in order, until it is cancelled.
        while len(got) < 5:
            got.append(recv(ws))
        send(ws, {"type": "cancel", "id": "dup"})
        got += collect(ws, {"dup"})["dup"]
        assert [m["type"] for m in got[:-1]] == ["token"] * (len(got) - 1)
        assert [m["seq"] for m in got[:-1]] == list(range(len(got) - 1))
        assert (got[-1]["type"], got[-1]["error"]) == ("error", "cancelled")
        # Once it has ended, the id may be used again.
        send(ws, {"type": "generate", "id": "dup", "prompt": PROMPT, "max_tokens": 1})
        assert [m["type"] for m in collect(ws, {"dup"})["dup"]] == ["token", "done"]


def test_ws_message_over_max_body_bytes_is_refused_and_the_socket_stays_open(start_server: StartServer) -> None:
    """docs/protocol.md: a message over ``max_body_bytes`` is an ``invalid_request``; it never closes the socket."""
    server = start_server(max_body_bytes=4096)
    with open_socket(server) as ws:
        send(ws, {"type": "generate", "id": "big", "prompt": "x" * 5000})
        refusal = recv(ws)
        assert (refusal["type"], refusal["error"]) == ("error", "invalid_request")
        assert_socket_still_serves(ws)


def test_ws_requests_over_the_in_flight_limit_are_refused_and_the_others_go_on(start_server: StartServer) -> None:
    server = start_server(ws_max_in_flight=1, models=[ECHO, SLOW_TOKENS], graceful_shutdown_s=2)
    with open_socket(server) as ws:
        send(ws, {"type": "generate", "id": "first", "prompt": PROMPT, "max_tokens": 100_000})
        send(ws, {"type": "generate", "id": "second", "prompt": PROMPT, "max_tokens": 3})
        send(ws, {"type": "cancel", "id": "first"})
        got = collect(ws, {"first", "second"})
    assert got["second"] == [
        {
            "type": "error",
            "id": "second",
            "error": "invalid_request",
            "message": "too many requests in flight on this socket (limit 1)",
        },
    ]
    assert (got["first"][-1]["type"], got["first"][-1]["error"]) == ("error", "cancelled")


# --- predict and ping -----------------------------------------------------------------------------


def test_ws_predict_returns_a_result_message(ws: ClientConnection) -> None:
    send(ws, {"type": "predict", "id": "p1", "input": [1.5, 2.5]})
    result = recv(ws)
    assert result["type"] == "result"
    assert result["id"] == "p1"
    assert result["output"] == [1.5, 2.5]
    assert (result["model"], result["model_version"]) == ("echo", "1")
    assert result["batch_size"] >= 1
    assert result["queue_ms"] >= 0


@pytest.mark.parametrize(
    ("ping", "pong"),
    [
        pytest.param({"type": "ping"}, {"type": "pong", "data": None}, id="no-data"),
        pytest.param({"type": "ping", "data": "hello"}, {"type": "pong", "data": "hello"}, id="data-echoed"),
    ],
)
def test_ws_ping_returns_pong(ws: ClientConnection, ping: Message, pong: Message) -> None:
    send(ws, ping)
    assert recv(ws) == pong
