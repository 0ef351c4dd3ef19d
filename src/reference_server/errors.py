"""Errors of the reference server.

    ServerError
    ├── ConfigError            settings file or flags are wrong (the server does not start)
    └── RequestError           a request is refused; carries its HTTP status and a machine code
        ├── InvalidRequest       400  malformed JSON, wrong types, out-of-range values
        ├── UnknownModel         404  the request names a model the server does not have
        ├── PayloadTooLarge      413  body over ``max_body_bytes``
        ├── UnsupportedMediaType 415  a body that is declared as something other than JSON
        └── Overloaded           503  queue full or server draining; carries Retry-After

Every ``RequestError`` turns into a JSON body ``{"error": code, "message": ..., "field": ...}``
(OpenAI routes use OpenAI's error shape), never a 500.
"""

from __future__ import annotations


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


class UnknownModel(RequestError):
    status = 404
    code = "unknown_model"


class PayloadTooLarge(RequestError):
    status = 413
    code = "payload_too_large"


class UnsupportedMediaType(RequestError):
    status = 415
    code = "unsupported_media_type"


class Overloaded(RequestError):
    status = 503
    code = "overloaded"

    def __init__(self, message: str, *, reason: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.reason = reason
        self.retry_after_s = retry_after_s

    def to_json(self) -> dict[str, object]:
        body = super().to_json()
        body["reason"] = self.reason
        body["retry_after_ms"] = round(self.retry_after_s * 1000)
        return body
