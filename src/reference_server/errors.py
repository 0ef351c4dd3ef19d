"""Errors of the reference server.

    ServerError
    ├── ConfigError            settings file or flags are wrong (the server does not start)
    └── RequestError           a request is refused; carries its HTTP status and a machine code
        ├── InvalidRequest       400  malformed JSON, wrong types, out-of-range values
        ├── Unauthorized         401  an admin route without the right bearer token
        ├── UnknownModel         404  the request names a model (or version) the server does not have
        ├── Conflict             409  a request id already streaming; unloading the only serving version
        ├── PayloadTooLarge      413  body over ``max_body_bytes``
        ├── UnsupportedMediaType 415  a body that is declared as something other than JSON
        └── RetryLater                carries Retry-After: the same request may succeed later
            ├── RateLimited      429  the client's token bucket is empty
            ├── TooManyStreams   429  the client holds ``max_streams_per_client`` stream leases
            └── Overloaded       503  queue full, server draining, or model loading

Every ``RequestError`` turns into a JSON body ``{"error": code, "message": ..., "field": ...}``
(OpenAI routes use OpenAI's error shape), never a 500.
"""

from __future__ import annotations

import math


class ServerError(Exception):
    """Base of every error the reference server raises on purpose."""


class ConfigError(ServerError):
    """The server's settings are invalid; the message names the file, field and expectation."""


class RequestError(ServerError):
    status: int = 400
    code: str = "invalid_request"

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    def to_json(self) -> dict[str, object]:
        body: dict[str, object] = {"error": self.code, "message": self.message}
        if self.field is not None:
            body["field"] = self.field
        return body


class InvalidRequest(RequestError):
    status = 400
    code = "invalid_request"


class Unauthorized(RequestError):
    status = 401
    code = "unauthorized"


class Forbidden(RequestError):
    status = 403
    code = "forbidden"


class Conflict(RequestError):
    status = 409
    code = "conflict"


class UnknownModel(RequestError):
    status = 404
    code = "unknown_model"


class PayloadTooLarge(RequestError):
    status = 413
    code = "payload_too_large"


class UnsupportedMediaType(RequestError):
    status = 415
    code = "unsupported_media_type"


class RetryLater(RequestError):
    """A refusal that may clear by itself; HTTP answers carry ``Retry-After`` in whole seconds."""

    def __init__(self, message: str, *, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    @property
    def retry_after_ms(self) -> int:
        return max(1, math.ceil(self.retry_after_s * 1000))

    def to_json(self) -> dict[str, object]:
        body = super().to_json()
        body["retry_after_ms"] = self.retry_after_ms
        return body


class RateLimited(RetryLater):
    status = 429
    code = "rate_limited"


class TooManyStreams(RetryLater):
    status = 429
    code = "too_many_streams"


class Overloaded(RetryLater):
    status = 503
    code = "overloaded"

    def __init__(self, message: str, *, reason: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message, retry_after_s=retry_after_s)
        self.reason = reason

    def to_json(self) -> dict[str, object]:
        body = super().to_json()
        body["reason"] = self.reason
        return body
