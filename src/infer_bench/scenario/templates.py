"""Request templates, one per protocol: what a user class sends, with the prompt filled in per request.

The keys a client builds itself (the prompt, a WebSocket message's ``type`` and ``id``, an OpenAI body's
``messages`` and ``stream``) cannot be set in a template, so a template can never contradict the prompt
source or the protocol. Routes follow docs/protocol.md of the reference server.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, get_args

from pydantic import BeforeValidator, Field, JsonValue, model_validator

from infer_bench.scenario.base import Count, Flag, SpecModel, UrlPath, invalid

ProtocolName = Literal["http", "sse", "websocket", "openai"]
PROTOCOLS: tuple[str, ...] = get_args(ProtocolName)


def _upper(value: Any) -> Any:
    return value.upper() if isinstance(value, str) else value


def _refuse_keys(where: str, given: dict[str, Any], reserved: dict[str, str]) -> None:
    for key, reason in reserved.items():
        if key in given:
            raise invalid(f"{where} cannot set {key!r}: {reason}", at=(where, key))


def _default_body() -> JsonValue:
    return {"input": [1.0, 2.0, 3.0]}


class HttpRequest(SpecModel):
    """A plain request/response call, e.g. ``POST /predict``; no tokens are streamed."""

    method: Annotated[Literal["GET", "POST", "PUT", "PATCH", "DELETE"], BeforeValidator(_upper)] = "POST"
    path: UrlPath = "/predict"
    headers: dict[str, str] = Field(default_factory=dict)
    body: JsonValue = Field(default_factory=_default_body)
    """Sent as JSON as it is; prompts are not used by this protocol."""


class SSERequest(SpecModel):
    """``POST /v1/stream`` answered with Server-Sent Events; the prompt goes into ``body["prompt"]``."""

    path: UrlPath = "/v1/stream"
    headers: dict[str, str] = Field(default_factory=dict)
    body: dict[str, JsonValue] = Field(default_factory=dict)
    """Extra body fields, e.g. model or seed."""
    max_tokens: Count | None = None
    """Put into ``body["max_tokens"]`` when set."""

    @model_validator(mode="after")
    def _check_body(self) -> SSERequest:
        reserved = {"prompt": "it comes from prompts"}
        if self.max_tokens is not None:
            reserved["max_tokens"] = "it is set by max_tokens"
        _refuse_keys("body", self.body, reserved)
        return self


class WebSocketRequest(SpecModel):
    """``generate`` messages on one WebSocket per VU, ``in_flight`` of them at once."""

    path: UrlPath = "/ws"
    headers: dict[str, str] = Field(default_factory=dict)
    max_tokens: Count | None = None
    in_flight: Count = 1
    """Requests a VU keeps in flight at once on its socket."""
    message: dict[str, JsonValue] = Field(default_factory=dict)
    """Extra fields merged into each ``generate`` message, e.g. model or seed."""

    @model_validator(mode="after")
    def _check_message(self) -> WebSocketRequest:
        _refuse_keys(
            "message",
            self.message,
            {
                "type": "the client sends 'generate'",
                "id": "the client numbers requests",
                "prompt": "it comes from prompts",
            },
        )
        return self


class OpenAIRequest(SpecModel):
    """The OpenAI-compatible chat or completions route, streamed by default."""

    api: Literal["chat", "completions"] = "chat"
    model: str = Field("tokens", min_length=1)
    max_tokens: Count = 64
    stream: Flag = True
    include_usage: Flag = True
    """Ask for the final usage chunk (``stream_options.include_usage``)."""
    path_prefix: UrlPath = "/v1"
    headers: dict[str, str] = Field(default_factory=dict)
    api_key: str | None = Field(None, repr=False)
    """Sent as ``Authorization: Bearer …``; write ``${OPENAI_API_KEY}`` rather than the key itself."""
    extra: dict[str, JsonValue] = Field(default_factory=dict)
    """Extra body fields, e.g. temperature or seed."""

    @model_validator(mode="after")
    def _check_extra(self) -> OpenAIRequest:
        _refuse_keys(
            "extra",
            self.extra,
            {
                "messages": "they come from prompts",
                "prompt": "it comes from prompts",
                "model": "use model",
                "max_tokens": "use max_tokens",
                "stream": "use stream",
                "stream_options": "use include_usage",
            },
        )
        return self

    @property
    def endpoint(self) -> str:
        """The route path, e.g. ``/v1/chat/completions``."""
        return self.path_prefix.rstrip("/") + ("/chat/completions" if self.api == "chat" else "/completions")


Request = HttpRequest | SSERequest | WebSocketRequest | OpenAIRequest

REQUEST_TYPES: dict[str, type[HttpRequest] | type[SSERequest] | type[WebSocketRequest] | type[OpenAIRequest]] = {
    "http": HttpRequest,
    "sse": SSERequest,
    "websocket": WebSocketRequest,
    "openai": OpenAIRequest,
}
