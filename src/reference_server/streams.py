"""Framing a sequence's tokens for the wire: SSE events with ids, heartbeats, warnings, the final event.

WHATWG HTML §9.2 (server-sent events): an event is ``field: value`` lines ended by a blank line; a line
starting with ``:`` is a comment (our heartbeat, ignored by clients but keeping proxies from timing out);
``retry:`` sets the client's reconnection delay; ``id:`` becomes the ``Last-Event-ID`` a reconnecting
client sends back. Our ids are ``<request_id>:<seq>`` so a resume knows the request and the position.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import anyio
import orjson

from reference_server.channels import EndReason, StreamEnd, Token
from reference_server.metrics import Counter
from reference_server.scheduler import Sequence

PING = b": ping\n\n"


def sse_event(data: bytes, *, event: str | None = None, event_id: str | None = None) -> bytes:
    """One SSE event; ``data`` must hold no newline (orjson output never does)."""
    head = b""
    if event_id is not None:
        head += b"id: " + event_id.encode() + b"\n"
    if event is not None:
        head += b"event: " + event.encode() + b"\n"
    return head + b"data: " + data + b"\n\n"


def usage_of(end: StreamEnd) -> dict[str, int]:
    return {
        "prompt_tokens": end.prompt_tokens,
        "completion_tokens": end.completion_tokens,
        "total_tokens": end.prompt_tokens + end.completion_tokens,
    }


def end_payload(seq: Sequence, end: StreamEnd) -> dict[str, object]:
    """The body of a ``done`` or ``error`` event (SSE) or message (WebSocket)."""
    body: dict[str, object] = {
        "done": True,
        "usage": usage_of(end),
        "model": seq.model_name,
        "model_version": seq.model_version,
    }
    if end.ok:
        body["finish_reason"] = end.finish_reason
    else:
        body["error"] = end.reason.value
        body["message"] = end.message or _DEFAULT_MESSAGES[end.reason]
        if end.detail is not None:
            body["kind"] = end.detail
    return body


_DEFAULT_MESSAGES = {
    EndReason.CANCELLED: "the request was cancelled",
    EndReason.MODEL_ERROR: "the model failed",
    EndReason.SLOW_CONSUMER: "the client read too slowly",
    EndReason.SHUTDOWN: "the server is shutting down",
    EndReason.TIMEOUT: "the stream passed a time limit",
    EndReason.FINISHED: "",
}


def slow_consumer_warning(seq: Sequence) -> dict[str, object]:
    channel = seq.channel
    return {
        "warning": "slow_consumer",
        "buffered": channel.buffered,
        "capacity": channel.capacity,
        "message": "the stream's send buffer is 80 % full; the stream is dropped when it is full",
    }


@dataclass(frozen=True, slots=True)
class StreamCounters:
    """The counters a sender bumps, resolved once per stream rather than per event."""

    pings: Counter
    warnings: Counter


async def receive_or_ping(seq: Sequence, heartbeat_s: float) -> tuple[list[Token], StreamEnd | None] | None:
    """The next tokens of ``seq``, or None when ``heartbeat_s`` passed without any (send a ping)."""
    with anyio.move_on_after(heartbeat_s):
        return await seq.channel.receive()
    return None


async def native_sse(
    seq: Sequence,
    request_id: str,
    *,
    heartbeat_s: float,
    retry_ms: int,
    counters: StreamCounters,
    replay: list[Token] | None = None,
) -> AsyncIterator[bytes]:
    """The ``/v1/stream`` event stream: ``retry``, ``token`` events, then ``done`` or ``error``.

    ``replay``: tokens a resuming client missed, sent first (with their original ids).
    """
    prefix = request_id + ":"
    first = b"retry: %d\n\n" % retry_ms
    if replay:
        first += _token_events(replay, prefix)
    yield first
    while True:
        got = await receive_or_ping(seq, heartbeat_s)
        if got is None:
            counters.pings.inc()
            yield PING
            continue
        tokens, end = got
        out = bytearray()
        if seq.channel.warning_pending:
            seq.channel.warning_pending = False
            counters.warnings.inc()
            out += sse_event(orjson.dumps(slow_consumer_warning(seq)), event="warning")
        out += _token_events(tokens, prefix)
        if end is not None:
            kind = "done" if end.ok else "error"
            out += sse_event(orjson.dumps(end_payload(seq, end)), event=kind)
            yield bytes(out)
            return
        yield bytes(out)


def _token_events(tokens: list[Token], prefix: str) -> bytes:
    out = bytearray()
    for t in tokens:
        data = orjson.dumps({"token": t.text, "seq": t.seq})
        out += sse_event(data, event="token", event_id=prefix + str(t.seq))
    return bytes(out)


def error_event(code: str, message: str) -> bytes:
    """A stream's only event when it cannot start (an unavailable resume)."""
    return sse_event(orjson.dumps({"done": True, "error": code, "message": message}), event="error")
