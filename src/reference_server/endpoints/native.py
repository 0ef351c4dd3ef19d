"""The native routes: ``POST /predict``, ``POST /predict/batch`` and the SSE ``POST /v1/stream``."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator

import anyio
from starlette.requests import Request
from starlette.responses import Response

from reference_server.batcher import ModelFailed
from reference_server.channels import Token
from reference_server.endpoints.common import JSONResponse, ServerState, admit, client_of, read_json, state_of
from reference_server.endpoints.streaming import SseResponse, StreamGuard, open_stream, rejoin_stream
from reference_server.errors import Conflict, InvalidRequest
from reference_server.resume import Resumable, ResumeUnavailable, parse_event_id
from reference_server.scheduler import GenerationRequest
from reference_server.schemas import REQUEST_ID, GenerateRequest, PredictBatchRequest, PredictRequest
from reference_server.streams import error_event, native_sse


async def predict(request: Request) -> Response:
    state = state_of(request)
    client = admit(request, state)
    body = await read_json(request, PredictRequest, state.settings.max_body_bytes)
    batcher = state.registry.batcher(body.model, client)
    try:
        result = await batcher.predict(body.input)
    except ModelFailed as exc:
        return JSONResponse({"error": "model_error", "message": f"the model failed: {exc}"}, status_code=502)
    return JSONResponse(
        {
            "output": result.output,
            "model": result.model,
            "model_version": result.model_version,
            "batch_size": result.batch_size,
            "queue_ms": round(result.queue_s * 1000, 3),
        },
        headers={"X-Model-Version": result.model_version},
    )


async def predict_batch(request: Request) -> Response:
    """Each input joins the batcher on its own; results keep the order of the inputs."""
    state = state_of(request)
    client = admit(request, state)
    body = await read_json(request, PredictBatchRequest, state.settings.max_body_bytes)
    batcher = state.registry.batcher(body.model, client)
    if len(body.inputs) > batcher.max_queue - batcher.depth:
        raise InvalidRequest(
            f"inputs: {len(body.inputs)} inputs do not fit the queue ({batcher.max_queue - batcher.depth} free)",
            field="inputs",
        )
    pending = [batcher.submit(value) for value in body.inputs]
    for p in pending:
        await p.done.wait()
    if any(p.error is not None for p in pending):
        return JSONResponse({"error": "model_error", "message": "the model failed on this batch"}, status_code=502)
    return JSONResponse(
        {
            "model": batcher.model.name,
            "model_version": batcher.model.version,
            "outputs": [p.output for p in pending],
            "batch_sizes": [p.batch_size for p in pending],
            "queue_ms": [round(p.queue_s * 1000, 3) for p in pending],
        },
        headers={"X-Model-Version": batcher.model.version},
    )


async def stream(request: Request) -> Response:
    state = state_of(request)
    client = admit(request, state) or client_of(request)  # a stream is resumable by its own client only
    body = await read_json(request, GenerateRequest, state.settings.max_body_bytes)
    last_event_id = request.headers.get("last-event-id")
    if last_event_id is not None:
        return await _resume(state, client, last_event_id)
    scheduler = state.registry.scheduler(body.model, client)
    request_id = body.request_id or _header_request_id(request) or secrets.token_hex(8)
    request_ = GenerationRequest(body.prompt, body.max_tokens, body.seed)
    guard = open_stream(state, "sse", client, scheduler, request_, resume_key=request_id)
    return _sse(state, guard, request_id)


def _sse(state: ServerState, guard: StreamGuard, request_id: str, replay: list[Token] | None = None) -> Response:
    settings = state.settings
    events = native_sse(
        guard.seq, request_id, heartbeat_s=settings.heartbeat_s, retry_ms=settings.sse_retry_ms,
        counters=guard.counters, replay=replay,
    )  # fmt: skip
    headers = {"X-Request-Id": request_id, "X-Model-Version": guard.seq.model_version}
    return SseResponse(events, guard, headers, state.watchdog)


async def _resume(state: ServerState, client: str, last_event_id: str) -> Response:
    """Reattach to a stream after ``Last-Event-ID: <request_id>:<seq>``: what was missed, then live.

    An unknown or expired stream, or one whose missed events are no longer buffered, gets a 200 stream
    holding a single ``error`` event (``resume_unavailable``), where an SSE client reads stream ends.
    """
    parsed = parse_event_id(last_event_id)
    if parsed is None:
        raise InvalidRequest("Last-Event-ID: expected <request_id>:<seq>", field="Last-Event-ID")
    key, last_seq = parsed
    metrics = state.metrics
    try:
        entry = await _attach(state, key, client)
    except ResumeUnavailable as exc:
        metrics.resumes.child("unavailable").inc()
        return _sse_error(state, exc.code, exc.message)
    replay = entry.seq.channel.replay_after(last_seq)
    if replay is None:
        state.resumes.detach(entry, complete=False)
        metrics.resumes.child("gap").inc()
        oldest = entry.seq.channel.history[0].seq if entry.seq.channel.history else 0
        message = f"events after {key}:{last_seq} are no longer buffered (the oldest kept is {key}:{oldest})"
        return _sse_error(state, "resume_unavailable", message)
    return _sse(state, rejoin_stream(state, "sse", client, entry), key, replay)


async def _attach(state: ServerState, key: str, client: str) -> Resumable:
    # A client that reconnects at once may beat the server to noticing the old connection is gone;
    # give the old reader a moment to detach (bounded) before answering 409.
    for _ in range(_ATTACH_TRIES - 1):
        try:
            return state.resumes.attach(key, client)
        except Conflict:
            await anyio.sleep(_ATTACH_WAIT_S)
    return state.resumes.attach(key, client)


_ATTACH_TRIES = 50
_ATTACH_WAIT_S = 0.02


def _sse_error(state: ServerState, code: str, message: str) -> Response:
    async def events() -> AsyncIterator[bytes]:
        yield b"retry: %d\n\n" % state.settings.sse_retry_ms + error_event(code, message)

    return SseResponse(events(), None, {}, state.watchdog)


def _header_request_id(request: Request) -> str | None:
    value = request.headers.get("x-request-id")
    if value is not None and not REQUEST_ID.fullmatch(value):
        raise InvalidRequest("X-Request-Id: expected 1-128 of A-Z a-z 0-9 _ . -", field="X-Request-Id")
    return value
