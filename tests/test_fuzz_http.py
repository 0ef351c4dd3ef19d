"""Fuzz every HTTP route of the reference server from its own OpenAPI description (schemathesis): whatever
the body, the answer is never a 5xx. And /ws with arbitrary frames: the answer stays in-band. Against a
real server on loopback, with zero-cost models and a small token limit so that nothing streams for long."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from websockets.sync.client import connect

from reference_server.serve import EmbeddedServer
from reference_server.settings import ServerSettings

pytestmark = pytest.mark.slow

FAST_MODELS = [
    {"kind": "echo", "name": "echo", "base_ms": 0, "per_item_ms": 0},
    {"kind": "tokens", "name": "tokens", "base_ms": 0, "per_seq_ms": 0, "prefill_ms": 0, "per_input_token_ms": 0,
     "max_tokens_limit": 16, "output_tokens": {"min": 1, "max": 8}},
]  # fmt: skip


@pytest.fixture(scope="module")
def fuzz_url() -> Iterator[str]:
    server = EmbeddedServer(ServerSettings.model_validate({"models": FAST_MODELS, "max_body_bytes": 65536})).start()
    try:
        yield server.url
    finally:
        server.stop()


def test_the_openapi_description_names_every_http_route(fuzz_url: str) -> None:
    document = httpx.get(fuzz_url + "/openapi.json", trust_env=False).json()
    assert document["openapi"].startswith("3.1")
    assert {"/predict", "/predict/batch", "/v1/stream", "/v1/completions", "/v1/chat/completions"} <= set(
        document["paths"]
    )


def test_no_generated_request_gets_a_server_error(fuzz_url: str) -> None:
    schema = schemathesis.openapi.from_url(fuzz_url + "/openapi.json")
    failures: list[str] = []
    operations = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        operations += 1

        # Valid bodies and, as much again, bodies that break the schema (wrong types, missing fields...).
        strategy = operation.as_strategy(GenerationMode.POSITIVE) | operation.as_strategy(GenerationMode.NEGATIVE)

        @settings(max_examples=60, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(strategy)
        def check(case: Any) -> None:
            response = case.call(timeout=10)
            if response.status_code >= 500:
                failures.append(f"{case.method} {case.formatted_path} {case.body!r}: {response.status_code}")

        check()
    assert operations >= 10
    assert not failures, "\n".join(failures[:10])


# --- WebSocket messages ----------------------------------------------------------------------------------

_FIELD_VALUES = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=20)
ws_messages = (
    st.binary(max_size=64)
    | st.text(max_size=64)
    | st.fixed_dictionaries(
        {"type": st.sampled_from(["generate", "predict", "cancel", "ping", "resume", "pong", "bogus"])},
        optional={
            "id": st.text(max_size=12) | st.integers(),
            "prompt": _FIELD_VALUES,
            "max_tokens": _FIELD_VALUES,
            "input": _FIELD_VALUES | st.lists(st.floats(allow_nan=False), max_size=3),
            "last_seq": _FIELD_VALUES,
            "extra": _FIELD_VALUES,
        },
    ).map(lambda message: json.dumps(message, allow_nan=True))
)


@settings(max_examples=80, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(message=ws_messages)
def test_no_websocket_message_breaks_the_socket_or_the_server(fuzz_url: str, message: str | bytes) -> None:
    """Whatever a client sends on /ws, the answer is in-band (an error, or the reply a valid message gets),
    the socket stays open, and the server keeps serving."""
    with connect(fuzz_url.replace("http://", "ws://") + "/ws", open_timeout=5, close_timeout=1) as socket:
        socket.send(message)
        socket.send(json.dumps({"type": "ping", "data": "probe"}))  # answered in order after what came before
        for _ in range(100):  # bounded: a valid generate streams at most 16 tokens first
            reply = json.loads(socket.recv(timeout=3))
            if reply.get("type") == "pong" and reply.get("data") == "probe":
                break
            assert reply.get("type") in {"error", "token", "done", "result", "pong", "rate_limited"}, reply
        else:
            pytest.fail("no pong after the fuzzed message")
