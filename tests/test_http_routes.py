"""HTTP routes through Starlette's TestClient: JSON in/out, located 4xx errors, metrics and stats.

Streaming timing is tested over real sockets elsewhere (TestClient buffers whole responses).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.testclient import TestClient

from reference_server import ServerSettings, create_app


@pytest.fixture
def client() -> Iterator[TestClient]:
    with TestClient(create_app(ServerSettings(max_body_bytes=4096))) as c:
        yield c


def test_predict_echoes_its_input_with_batch_facts(client: TestClient) -> None:
    body = client.post("/predict", json={"input": [1.5, 2.5]}).json()
    assert body["output"] == [1.5, 2.5]
    assert (body["model"], body["model_version"], body["batch_size"]) == ("echo", "1", 1)
    assert body["queue_ms"] >= 0


def test_predict_batch_keeps_input_order(client: TestClient) -> None:
    body = client.post("/predict/batch", json={"inputs": ["a", "b", "c"]}).json()
    assert body["outputs"] == ["a", "b", "c"]
    assert len(body["batch_sizes"]) == 3


@pytest.mark.parametrize(
    ("path", "payload", "status", "field", "message"),
    [
        pytest.param("/predict", {"input": None}, 400, "input", "input:", id="null-input"),
        pytest.param("/predict", {}, 400, "input", "required field is missing", id="missing-input"),
        pytest.param("/predict", {"input": 1, "modle": "echo"}, 400, "modle", "unknown field", id="typo-field"),
        pytest.param("/predict", {"input": 1, "model": "gpt"}, 404, "model", "no prediction model", id="unknown-model"),
        pytest.param(
            "/predict", {"input": 1, "model": "tokens"}, 400, "model", "generates tokens", id="wrong-kind-model"
        ),
        pytest.param("/predict/batch", {"inputs": []}, 400, "inputs", "at least 1", id="empty-batch"),
        pytest.param(
            "/v1/stream",
            {"prompt": "x", "max_tokens": 0},
            400,
            "max_tokens",
            "greater than or equal",
            id="zero-max-tokens",
        ),
        pytest.param("/v1/stream", {"prompt": 5}, 400, "prompt", "valid string", id="prompt-not-string"),
        pytest.param(
            "/v1/stream", {"prompt": "x", "request_id": "a b"}, 400, "request_id", "pattern", id="bad-request-id"
        ),
        pytest.param(
            "/v1/stream", {"prompt": "x", "model": "echo"}, 400, "model", "prediction model", id="stream-from-echo"
        ),
    ],
)
def test_bad_bodies_get_a_4xx_naming_the_field(
    client: TestClient, path: str, payload: dict[str, Any], status: int, field: str, message: str
) -> None:
    response = client.post(path, json=payload)
    assert response.status_code == status
    body = response.json()
    assert body["field"] == field
    assert message in body["message"]


@pytest.mark.parametrize(
    ("content", "headers", "status", "error"),
    [
        pytest.param(b"{not json", {}, 400, "invalid_request", id="malformed-json"),
        pytest.param(b"", {}, 400, "invalid_request", id="empty-body"),
        pytest.param(b"[1, 2]", {}, 400, "invalid_request", id="array-not-object"),
        pytest.param(
            b"input=1",
            {"content-type": "application/x-www-form-urlencoded"},
            415,
            "unsupported_media_type",
            id="form-body",
        ),
        pytest.param(b'{"input": "' + b"x" * 5000 + b'"}', {}, 413, "payload_too_large", id="oversize-body"),
    ],
)
def test_malformed_requests_get_a_4xx_with_a_reason_never_a_500(
    client: TestClient, content: bytes, headers: dict[str, str], status: int, error: str
) -> None:
    response = client.post("/predict", content=content, headers=headers)
    assert response.status_code == status
    assert response.json()["error"] == error
    assert response.json()["message"]


def test_unknown_routes_and_methods_answer_json(client: TestClient) -> None:
    assert client.get("/nope").json()["error"] == "not_found"
    response = client.get("/predict")
    assert response.status_code == 405
    assert response.json()["error"] == "method_not_allowed"


def test_health_and_readiness(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ready"}


def test_readiness_is_red_before_startup() -> None:
    client = TestClient(create_app())  # lifespan not entered: models not scheduling yet
    assert client.get("/readyz").status_code == 503


@pytest.mark.parametrize(
    ("path", "body"),
    [
        pytest.param("/predict", {"input": 1}, id="predict"),
        pytest.param("/v1/stream", {"prompt": "x"}, id="stream"),
        pytest.param("/v1/completions", {"model": "tokens", "prompt": "x"}, id="openai"),
    ],
)
def test_requests_before_the_models_are_loaded_get_503_model_loading(path: str, body: dict[str, Any]) -> None:
    client = TestClient(create_app())  # lifespan not entered: nothing loaded yet
    response = client.post(path, json=body)
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    assert "loading" in response.text  # native: reason model_loading; OpenAI: the message says so


def test_metrics_expose_the_documented_families(client: TestClient) -> None:
    client.post("/predict", json={"input": 1})
    client.post("/v1/stream", json={"prompt": "a b", "max_tokens": 3})
    client.post("/predict", json={"input": None})
    text = client.get("/metrics").text
    for name in [
        "inferbench_request_duration_seconds_bucket", "inferbench_queue_wait_seconds_bucket",
        "inferbench_batch_execution_seconds_bucket", "inferbench_e2e_duration_seconds_bucket",
        "inferbench_ttft_seconds_bucket", "inferbench_inter_token_seconds_bucket", "inferbench_batch_size_bucket",
        'inferbench_batches_total{kind="predict",reason="drain"}', "inferbench_queue_depth",
        "inferbench_running_sequences", "inferbench_active_connections", "inferbench_tokens_generated_total 3.0",
        'inferbench_requests_total{endpoint="predict",status="400"} 1.0',
        'inferbench_sequences_total{outcome="finished"} 1.0',
    ]:  # fmt: skip
        assert name in text, name
    assert "client" not in text.lower().replace("client streams", "")  # no per-client labels


def test_stats_gives_the_same_figures_as_json() -> None:
    with TestClient(create_app(ServerSettings(max_body_bytes=4096, queue_url=None))) as client:  # the engines' steps
        client.post("/v1/stream", json={"prompt": "a b", "max_tokens": 5})
        stats = client.get("/stats").json()
    assert {m["name"] for m in stats["models"]} == {"echo", "tokens"}
    assert stats["queues"]["tokens"]["steps"] >= 5
    ttft = stats["metrics"]["inferbench_ttft_seconds"][0]
    assert ttft["count"] == 1
    assert stats["settings"]["max_body_bytes"] == 4096


def test_metrics_route_is_absent_when_disabled() -> None:
    with TestClient(create_app(ServerSettings(metrics=False))) as c:
        assert c.get("/metrics").status_code == 404


def test_an_integer_beyond_64_bits_is_echoed_not_a_server_error(client: TestClient) -> None:
    # Found by the fuzz test: JSON allows any integer, orjson renders only 64-bit ones.
    response = client.post("/predict", content=b'{"input": {"big": 123456789012345678901234567890}}',
                           headers={"content-type": "application/json"})  # fmt: skip
    assert response.status_code == 200
    assert b"123456789012345678901234567890" in response.content


def test_an_unexpected_error_answers_500_without_its_text_or_a_traceback(caplog: pytest.LogCaptureFixture) -> None:
    """A bug in a route must not tell the client about the server's insides; the log keeps the detail."""

    async def broken(request: Request) -> Response:
        raise RuntimeError("secret detail of /srv/model/weights.bin")

    app = create_app(ServerSettings())
    app.router.routes.append(Route("/broken", broken))
    with TestClient(app, raise_server_exceptions=False) as client:
        answer = client.get("/broken")
        assert client.get("/healthz").status_code == 200  # and the server goes on
    assert answer.status_code == 500
    assert answer.json() == {"error": "internal", "message": "internal server error"}
    assert "secret" not in answer.text
    assert "Traceback" not in answer.text
    assert "secret detail" in caplog.text  # logged for the operator
