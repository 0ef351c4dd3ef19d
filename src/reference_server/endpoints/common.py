"""What every route shares: the server state, bounded JSON body reading, and JSON responses."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, TypeVar

import orjson
from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import Response

from reference_server.errors import InvalidRequest, PayloadTooLarge, UnsupportedMediaType
from reference_server.metrics import ServerMetrics
from reference_server.registry import ModelRegistry
from reference_server.settings import ServerSettings

M = TypeVar("M", bound=BaseModel)


@dataclass
class ServerState:
    settings: ServerSettings
    registry: ModelRegistry
    metrics: ServerMetrics
    ready: bool = False
    draining: bool = False
    render_metrics: Any = field(default=None, repr=False)


def state_of(request: Request) -> ServerState:
    state: ServerState = request.app.state.server
    return state


class JSONResponse(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


async def read_json(request: Request, schema: type[M], limit: int) -> M:
    """Read a body of at most ``limit`` bytes and validate it against ``schema``.

    Raises:
        PayloadTooLarge, UnsupportedMediaType, InvalidRequest (naming the first bad field).
    """
    content_type = request.headers.get("content-type", "application/json")
    if "json" not in content_type.split(";", 1)[0]:
        raise UnsupportedMediaType(f"expected a JSON body (Content-Type: application/json), got {content_type!r}")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"the body has {declared} bytes; the limit is {limit}")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"the body exceeds the limit of {limit} bytes")
        chunks.append(chunk)
    return parse_json(b"".join(chunks), schema)


def parse_json(body: bytes | str, schema: type[M]) -> M:
    if not body:
        raise InvalidRequest("expected a JSON body, got an empty one")
    try:
        return schema.model_validate_json(body)
    except ValidationError as exc:
        raise invalid_from(exc) from None


def invalid_from(exc: ValidationError) -> InvalidRequest:
    """The first validation error as a located, readable ``InvalidRequest``."""
    err = exc.errors(include_url=False)[0]
    where = ".".join(str(p) for p in err["loc"])
    if err["type"] == "json_invalid":
        return InvalidRequest(f"not valid JSON: {err['msg'].removeprefix('Invalid JSON: ')}")
    if err["type"] == "extra_forbidden":
        return InvalidRequest(f"{where}: unknown field", field=where)
    if err["type"] == "model_attributes_type":
        return InvalidRequest("expected a JSON object")
    got = err.get("input")
    shown = repr(got) if isinstance(got, str | int | float | bool) or got is None else type(got).__name__
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    return InvalidRequest(f"{where or 'body'}: {err['msg']}, got {shown}", field=where or None)
