"""``POST /v1/stream`` in queue mode: enqueue a job, stream the chunks workers write, resume by stream id.

The wire format is direct mode's (docs/protocol.md): ``retry``, ``token`` events, then one ``done`` or
``error``. Only the event ids differ: ``<request_id>:<Redis stream id>`` — the position in the job's
results stream, which lives in Redis, so a ``Last-Event-ID`` resumes on any front end, also after the
one that served the stream was restarted. A client that leaves before the end abandons its job: it is
cancelled ``queue_cancel_after_s`` later (default ``resume_ttl_s``) unless a resume re-attaches first,
and a resume after that reads the tokens made until then and a ``cancelled`` end.
"""

from __future__ import annotations

import contextlib
import re
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import replace

import anyio
import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from reference_server.admission import Lease, SharedLease
from reference_server.endpoints.common import ServerState, client_of, read_json, state_of
from reference_server.endpoints.relay import Relay
from reference_server.endpoints.streaming import SseResponse
from reference_server.errors import Conflict, InvalidRequest, Overloaded, RequestError
from reference_server.models.tokens import TokensModel, count_prompt_tokens
from reference_server.queue.front import QueueFront
from reference_server.queue.jobs import Chunk
from reference_server.schemas import REQUEST_ID, GenerateRequest
from reference_server.streams import PING, error_event, sse_event

_STREAM_ID = re.compile(r"\d{1,20}-\d{1,20}")


async def stream(request: Request) -> Response:
    state = state_of(request)
    front = state.queue
    assert front is not None, "the queued route is mounted only in queue mode"
    client = client_of(request)  # a job is resumable by its own client only
    try:
        await state.admission.check_rate_shared(client)
    except Overloaded as exc:
        state.metrics.rejections.child(exc.reason).inc()
        raise
    body = await read_json(request, GenerateRequest, state.settings.max_body_bytes)
    if state.draining:
        state.metrics.rejections.child("draining").inc()
        raise Overloaded("the server is shutting down", reason="draining")
    model = model_ref(state, body.model, client)
    last_event_id = request.headers.get("last-event-id")
    resume = _parse_event_id(last_event_id) if last_event_id is not None else None
    job_id = resume[0] if resume else body.request_id or _header_request_id(request) or secrets.token_hex(8)
    lease: Lease | SharedLease | None = None
    try:
        lease = await state.admission.lease_shared(client)
        if resume is not None:
            if await front.owner_of(job_id) != client:
                await state.admission.release_shared(lease)
                state.metrics.resumes.child("unavailable").inc()
                message = f"no job {job_id!r} of this client is kept (unknown, expired, or another client's)"
                return _single_error(state, "resume_unavailable", message)
            state.metrics.resumes.child("resumed").inc()
        else:
            job = front.job(job_id, model, body.prompt, body.max_tokens, body.seed)
            if not await front.submit(job, client, reader=True):
                raise Conflict(f"request_id {job_id!r} names a job that is running or whose results are kept")
    except RequestError as exc:
        await refused(state, lease, exc)
        raise
    after = resume[1] if resume else "0-0"
    prompt_tokens = count_prompt_tokens(body.prompt)
    events = _events(state, front, job_id, after, model.partition("@")[0], prompt_tokens, resume is None)
    headers = {"X-Request-Id": job_id}
    if resume is None:
        headers["X-Model-Version"] = model.partition("@")[2]
    return QueuedResponse(state, events, lease, headers)


async def refused(state: ServerState, lease: Lease | SharedLease | None, exc: RequestError) -> None:
    """A queued request refused after its admission: give its lease back; count an overload refusal."""
    await state.admission.release_shared(lease)
    if isinstance(exc, Overloaded):
        state.metrics.rejections.child(exc.reason).inc()


def model_ref(state: ServerState, name: str | None, client: str) -> str:
    """The job's model as ``name@version``, routed as a direct stream is (the serving version, a version,
    ``@latest``, or the client's arm of an A/B split). On the in-process queue the version is pinned for
    the worker, so a job runs the version it was routed to even across a hot-swap; workers on Redis run
    the versions of their own settings file (one loaded through /admin on a front end is not theirs).

    Raises:
        UnknownModel, InvalidRequest: no such generation model or version.
        Overloaded: the model is still loading, or the server is draining.
    """
    model = state.registry.scheduler(name, client).model
    assert isinstance(model, TokensModel), "every generation engine of the registry runs a TokensModel"
    ref = f"{model.name}@{model.version}"
    assert state.queue is not None
    if state.queue.models is not None:
        state.queue.models.pin(ref, model)
    return ref


def _parse_event_id(value: str) -> tuple[str, str]:
    job_id, sep, stream_id = value.rpartition(":")
    if not sep or not REQUEST_ID.fullmatch(job_id) or not _STREAM_ID.fullmatch(stream_id):
        raise InvalidRequest(
            "Last-Event-ID: expected <request_id>:<stream id> (the id of the last event received)",
            field="Last-Event-ID",
        )
    return job_id, stream_id


def _header_request_id(request: Request) -> str | None:
    value = request.headers.get("x-request-id")
    if value is not None and not REQUEST_ID.fullmatch(value):
        raise InvalidRequest("X-Request-Id: expected 1-128 of A-Z a-z 0-9 _ . -", field="X-Request-Id")
    return value


async def _events(
    state: ServerState, front: QueueFront, job_id: str, after: str, model: str, prompt_tokens: int, new_job: bool
) -> AsyncIterator[bytes]:
    settings = state.settings
    pings = state.metrics.heartbeats.child("sse")
    yield b"retry: %d\n\n" % settings.sse_retry_ms
    prefix = job_id + ":"
    enqueued_at = time.monotonic() if new_job else None
    relay = Relay(front, job_id, "sse", settings, state.metrics, enqueued_at, after, settings.queue_cancel_grace_s)
    async with contextlib.aclosing(relay.batches()) as batches:
        async for got in batches:
            if not got:
                pings.inc()
                yield PING
                continue
            out = bytearray()
            for stream_id, chunk in got:
                if chunk.kind == "token":
                    data = orjson.dumps({"token": chunk.data, "seq": chunk.seq})
                    out += sse_event(data, event="token", event_id=prefix + stream_id)
                elif not chunk.final:  # progress, log, complete: numbered and resumable like tokens
                    out += sse_event(
                        orjson.dumps(event_payload_of(chunk)), event=chunk.kind, event_id=prefix + stream_id
                    )
                else:
                    if not stream_id and chunk.data in ("shutdown", "queue_unavailable"):  # the job goes on
                        chunk = replace(
                            chunk, message=f"{chunk.message}; resume with Last-Event-ID: {prefix}{relay.last}"
                        )
                    end = end_payload_of(chunk, model, prompt_tokens)
                    out += sse_event(orjson.dumps(end), event="done" if chunk.kind == "done" else "error")
            yield bytes(out)


def event_payload_of(chunk: Chunk) -> dict[str, object]:
    """A progress / log / complete event's body: ``percent``, ``step``, ``steps`` and/or ``message``, and
    ``seq`` (the number of the token that comes next)."""
    body: dict[str, object] = orjson.loads(chunk.data) if chunk.kind in ("progress", "complete") else {}
    if chunk.message:
        body["message"] = chunk.message
    body["seq"] = chunk.seq
    return body


def end_payload_of(chunk: Chunk, model: str, prompt_tokens: int) -> dict[str, object]:
    """Direct mode's final event body (``streams.end_payload``) from a final chunk."""
    body: dict[str, object] = {
        "done": True,
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": chunk.seq,
            "total_tokens": prompt_tokens + chunk.seq,
        },
        "model": model.partition("@")[0],
        "model_version": chunk.model_version,
    }
    if chunk.kind == "done":
        body["finish_reason"] = chunk.data
    else:
        body["error"] = chunk.data
        body["message"] = chunk.message or chunk.data
        if chunk.data == "timeout":
            body["kind"] = chunk.detail or "total"
    return body


def _single_error(state: ServerState, code: str, message: str) -> Response:
    async def events() -> AsyncIterator[bytes]:
        yield b"retry: %d\n\n" % state.settings.sse_retry_ms + error_event(code, message)

    return SseResponse(events(), None, {}, state.watchdog)


class QueuedResponse(SseResponse):
    """An SSE response over a job's results; its lease and connection count are released on every path."""

    def __init__(
        self,
        state: ServerState,
        events: AsyncIterator[bytes],
        lease: Lease | SharedLease | None,
        headers: dict[str, str],
    ) -> None:
        super().__init__(events, None, headers, state.watchdog)
        self.state = state
        self.lease = lease
        state.metrics.connection_opened("sse")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.state.metrics.connection_closed("sse")
            with anyio.CancelScope(shield=True):  # a cancelled response still gives its lease back
                await self.state.admission.release_shared(self.lease)
