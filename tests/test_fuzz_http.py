"""Fuzz every HTTP route of the reference server from its own OpenAPI description (schemathesis): whatever
the body, the answer is never a 5xx. Against a real server on loopback, with zero-cost models and a small
token limit so that no generated request streams for long."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode

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
