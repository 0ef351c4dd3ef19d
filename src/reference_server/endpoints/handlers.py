"""Wrapping route handlers: refusals become JSON errors, and every answer is counted."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from reference_server.endpoints.common import JSONResponse
from reference_server.errors import RequestError, RetryLater
from reference_server.metrics import Counter, ServerMetrics

Handler = Callable[[Request], Awaitable[Response]]
ErrorBody = Callable[[RequestError], dict[str, object]]

log = logging.getLogger("reference_server")


def native_error(exc: RequestError) -> dict[str, object]:
    return exc.to_json()


def error_response(exc: RequestError, body: ErrorBody = native_error) -> Response:
    headers = {}
    if isinstance(exc, RetryLater):
        headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after_s)))  # RFC 9110: whole seconds
    return JSONResponse(body(exc), status_code=exc.status, headers=headers)


def counted(endpoint: str, handler: Handler, metrics: ServerMetrics, error_body: ErrorBody = native_error) -> Handler:
    """``handler`` with RequestErrors turned into responses, and duration and status recorded."""
    duration = metrics.request_duration.child(endpoint)
    by_status: dict[int, Counter] = {}  # resolved once per status, not per request
    clock = time.perf_counter

    async def wrapped(request: Request) -> Response:
        started = clock()
        try:
            response = await handler(request)
        except RequestError as exc:
            response = error_response(exc, error_body)
        except Exception:  # never a traceback on the wire; the log has it
            log.exception("unexpected error in %s", endpoint)
            response = JSONResponse({"error": "internal", "message": "internal server error"}, status_code=500)
        status = response.status_code
        counter = by_status.get(status)
        if counter is None:
            counter = by_status[status] = metrics.requests.child(endpoint, str(status))
        counter.inc()
        if not isinstance(response, StreamingResponse):
            duration.observe(clock() - started)
        return response

    wrapped.__name__ = handler.__name__
    return wrapped
