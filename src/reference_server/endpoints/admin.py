"""``/admin``: list, load and unload model versions. Off unless ``admin_token`` is set.

Every admin route needs ``Authorization: Bearer <admin_token>``, compared in constant time: 401 without
credentials, 403 with the wrong ones. Without a configured token the routes answer 404, as if absent: an
unauthenticated admin API is never on.
"""

from __future__ import annotations

import hmac

from pydantic import TypeAdapter, ValidationError
from starlette.requests import Request
from starlette.responses import Response

from reference_server.endpoints.common import JSONResponse, invalid_from, read_json, state_of
from reference_server.errors import Forbidden, InvalidRequest, RequestError, Unauthorized
from reference_server.schemas import AnyObject, UnloadRequest
from reference_server.settings import EchoModelSpec, ModelSpec, TokensModelSpec

_SPEC: TypeAdapter[EchoModelSpec | TokensModelSpec] = TypeAdapter(ModelSpec)


class AdminDisabled(RequestError):
    status = 404
    code = "not_found"


def _authorize(request: Request) -> None:
    token = state_of(request).settings.admin_token
    if token is None:
        raise AdminDisabled(f"{request.method} {request.url.path}: admin routes are off (no admin_token set)")
    given = request.headers.get("authorization", "")
    scheme, _, value = given.partition(" ")
    expected = token.get_secret_value().encode()
    if scheme.lower() != "bearer" or not value.strip():
        raise Unauthorized("admin routes need Authorization: Bearer <admin_token>")
    if not hmac.compare_digest(value.strip().encode(), expected):
        raise Forbidden("the admin token is not the one configured")


async def list_models(request: Request) -> Response:
    _authorize(request)
    return JSONResponse({"models": state_of(request).registry.describe()})


async def load_model(request: Request) -> Response:
    """Load a version in the background: ``202``, then watch ``GET /admin/models``."""
    _authorize(request)
    state = state_of(request)
    name = request.path_params["name"]
    body = await read_json(request, AnyObject, state.settings.max_body_bytes)
    raw: dict[str, object] = dict(body.model_extra or {})
    raw.setdefault("name", name)
    if raw["name"] != name:
        raise InvalidRequest(f"name: the body names {raw['name']!r}, the path {name!r}", field="name")
    existing = next((e for e in state.registry.entries.values() if e.name == name), None)
    if existing is not None and "kind" not in raw:
        raw["kind"] = "echo" if existing.kind == "prediction" else "tokens"
    spec = _validate_spec(raw)
    deployment = state.registry.load(spec)
    return JSONResponse({"name": name, **deployment.describe()}, status_code=202)


async def unload_model(request: Request) -> Response:
    _authorize(request)
    state = state_of(request)
    body = await read_json(request, UnloadRequest, state.settings.max_body_bytes)
    deployment = state.registry.unload(request.path_params["name"], body.version)
    return JSONResponse({"name": request.path_params["name"], **deployment.describe()}, status_code=202)


def _validate_spec(raw: dict[str, object]) -> EchoModelSpec | TokensModelSpec:
    try:
        return _SPEC.validate_python(raw)
    except ValidationError as exc:
        raise invalid_from(exc, tagged=True) from None
