"""What every route shares: the server state, bounded JSON body reading, and JSON responses."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, TypeVar

import orjson
from pydantic import BaseModel, ValidationError
from starlette.requests import HTTPConnection, Request
from starlette.responses import Response

from reference_server.admission import Admission, client_identity
from reference_server.errors import InvalidRequest, PayloadTooLarge, UnsupportedMediaType
from reference_server.metrics import ServerMetrics
from reference_server.queue.front import QueueFront
from reference_server.registry import ModelRegistry
from reference_server.resume import ResumeTable
from reference_server.settings import ServerSettings
from reference_server.watchdog import SendWatchdog

M = TypeVar("M", bound=BaseModel)


@dataclass
class ServerState:
    settings: ServerSettings
    registry: ModelRegistry
    metrics: ServerMetrics
    admission: Admission
    resumes: ResumeTable
    watchdog: SendWatchdog
    ready: bool = False
    draining: bool = False
    render_metrics: Any = field(default=None, repr=False)
    closers: set[Any] = field(default_factory=set, repr=False)  # open WebSocket sessions, closed on shutdown
    # Whether anything depends on who the client is (limits, A/B splits); if not, identity is not computed.
    needs_client: bool = False
    queue: QueueFront | None = None  # queue mode: /v1/stream enqueues jobs for workers


def state_of(request: HTTPConnection) -> ServerState:
    state: ServerState = request.app.state.server
    return state


def client_of(conn: HTTPConnection) -> str:
    """The client's identity (see ``admission.client_identity``)."""
    scope = conn.scope
    peer = scope.get("client")
    return client_identity(scope["headers"], peer[0] if peer else None)


def admit(request: HTTPConnection, state: ServerState) -> str:
    """Rate-limit one request; returns the client's identity, or "" when nothing needs it.

    Raises:
        RateLimited: the client's token bucket is empty.
    """
    if not state.needs_client:
        return ""
    client = client_of(request)
    state.admission.check_rate(client)
    return client


class JSONResponse(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        try:
            return orjson.dumps(content)
        except TypeError:  # an integer beyond 64 bits, echoed from a request: JSON allows it, orjson does not
            return json.dumps(content, separators=(",", ":"), ensure_ascii=False).encode()


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


def invalid_from(exc: ValidationError, *, tagged: bool = False) -> InvalidRequest:
    """The first validation error as a located, readable ``InvalidRequest``.

    Pydantic reports a value that fits no member of a union once per member, with the member's name
    appended to the location (``input.str``, ``input.float``); those fold into one error at ``input``
    listing what was accepted. With ``tagged``, the location's first part is a discriminated union's tag
    (the WebSocket message ``type``), which is not a field, and is dropped.
    """
    errors = exc.errors(include_url=False)
    err = errors[0]
    loc = [str(p) for p in err["loc"]][1 if tagged else 0 :]
    if err["type"] == "json_invalid":
        return InvalidRequest(f"not valid JSON: {err['msg'].removeprefix('Invalid JSON: ')}")
    if err["type"] in ("model_attributes_type", "model_type") and not loc:
        return InvalidRequest("expected a JSON object")
    shown = _shown(err.get("input"))
    siblings = [e for e in errors if len(e["loc"]) == len(err["loc"]) and e["loc"][:-1] == err["loc"][:-1]]
    if len(siblings) > 1 and err["loc"] and not isinstance(err["loc"][-1], int):
        where = ".".join(loc[:-1])
        accepted = ", ".join(str(e["loc"][-1]) for e in siblings)
        return InvalidRequest(f"{where or 'body'}: expected one of {accepted}, got {shown}", field=where or None)
    where = ".".join(loc)
    if err["type"] in ("union_tag_invalid", "union_tag_not_found"):
        ctx = err.get("ctx") or {}
        tag = str(ctx.get("discriminator", "'type'")).strip("'")
        if "tag" not in ctx:
            return InvalidRequest(f"{tag}: required field is missing", field=tag)
        return InvalidRequest(f"{tag}: expected one of {ctx.get('expected_tags')}, got {_shown(ctx['tag'])}", field=tag)
    if err["type"] == "missing":
        return InvalidRequest(f"{where}: required field is missing", field=where)
    if err["type"] == "extra_forbidden":
        return InvalidRequest(f"{where}: unknown field", field=where)
    return InvalidRequest(f"{where or 'body'}: {err['msg']}, got {shown}", field=where or None)


def _shown(value: Any) -> str:
    shown = repr(value) if isinstance(value, str | int | float | bool) or value is None else type(value).__name__
    return shown if len(shown) <= 80 else shown[:77] + "..."
