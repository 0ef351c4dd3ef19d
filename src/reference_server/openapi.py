"""The OpenAPI 3.1 description of the HTTP routes, served at ``GET /openapi.json``.

Request bodies come from the same pydantic models the routes validate with, so the description cannot
drift from what the server accepts; it is what client generators read and what the fuzz test
(tests/test_fuzz_http.py, schemathesis) feeds the server with. WebSocket messages are described in
docs/protocol.md (OpenAPI has no WebSocket operations).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from reference_server import schemas

_REF = "#/components/schemas/{model}"

_ERRORS: dict[str, Any] = {
    "400": {"description": "malformed JSON, a wrong type or an unknown field; `error` names the field"},
    "404": {"description": "an unknown model or version"},
    "413": {"description": "the body is larger than max_body_bytes"},
    "415": {"description": "not application/json"},
    "429": {"description": "rate_limited or too_many_streams; Retry-After in whole seconds"},
    "503": {"description": "queue full, draining, model loading or queue unavailable; Retry-After"},
}


def _json_body(model: type[BaseModel]) -> dict[str, Any]:
    return {
        "required": True,
        "content": {"application/json": {"schema": {"$ref": _REF.format(model=model.__name__)}}},
    }


def _operation(summary: str, body: type[BaseModel] | None, ok: dict[str, Any]) -> dict[str, Any]:
    operation: dict[str, Any] = {"summary": summary, "responses": {"200": ok, **_ERRORS}}
    if body is not None:
        operation["requestBody"] = _json_body(body)
    return operation


_JSON_OK = {"description": "the result", "content": {"application/json": {}}}
_STREAM_OK = {
    "description": "JSON, or an event stream when `stream` is true",
    "content": {"application/json": {}, "text/event-stream": {}},
}


def openapi_document() -> dict[str, Any]:
    """The description of every HTTP route (admin routes included: they answer 404 without a token set)."""
    bodies: list[type[BaseModel]] = [
        schemas.PredictRequest, schemas.PredictBatchRequest, schemas.GenerateRequest,
        schemas.CompletionRequest, schemas.ChatCompletionRequest, schemas.UnloadRequest,
    ]  # fmt: skip
    components: dict[str, Any] = {}
    for model in bodies:
        schema = model.model_json_schema(ref_template=_REF)
        components.update(schema.pop("$defs", {}))
        components[model.__name__] = schema
    get_ok = {"description": "OK", "content": {"application/json": {}}}
    name = [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}]
    paths: dict[str, Any] = {
        "/predict": {"post": _operation("one prediction, batched with others", schemas.PredictRequest, _JSON_OK)},
        "/predict/batch": {
            "post": _operation("several predictions in one call", schemas.PredictBatchRequest, _JSON_OK)
        },
        "/v1/stream": {
            "post": _operation(
                "a generation as server-sent events",
                schemas.GenerateRequest,
                {"description": "token events, then done or error", "content": {"text/event-stream": {}}},
            )
        },
        "/v1/completions": {"post": _operation("OpenAI completions", schemas.CompletionRequest, _STREAM_OK)},
        "/v1/chat/completions": {
            "post": _operation("OpenAI chat completions", schemas.ChatCompletionRequest, _STREAM_OK)
        },
        "/v1/models": {"get": {"summary": "the models served", "responses": {"200": get_ok}}},
        "/healthz": {"get": {"summary": "liveness", "responses": {"200": {"description": "alive"}}}},
        "/readyz": {
            "get": {
                "summary": "readiness: models loaded and warm, not draining",
                "responses": {"200": {"description": "ready"}, "503": {"description": "not ready"}},
            }
        },
        "/stats": {"get": {"summary": "counters and histograms as JSON", "responses": {"200": get_ok}}},
        "/admin/models": {
            "get": {"summary": "models, versions and swaps (bearer token)", "responses": {"200": get_ok}}
        },
        "/admin/models/{name}/load": {
            "post": {"summary": "load and warm a version, then swap", "parameters": name, "responses": {"200": get_ok}}
        },
        "/admin/models/{name}/unload": {
            "post": {**_operation("unload a version", schemas.UnloadRequest, get_ok), "parameters": name}
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "infer-bench reference server", "version": "1"},
        "paths": paths,
        "components": {"schemas": components},
    }
