"""The native routes: ``POST /predict``, ``POST /predict/batch`` and the SSE ``POST /v1/stream``."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from reference_server.batcher import ModelFailed
from reference_server.endpoints.common import JSONResponse, ServerState, read_json, state_of
from reference_server.errors import InvalidRequest
from reference_server.scheduler import ContinuousScheduler, GenerationRequest, Sequence
from reference_server.schemas import REQUEST_ID, GenerateRequest, PredictBatchRequest, PredictRequest
from reference_server.streams import native_sse

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


async def predict(request: Request) -> Response:
    state = state_of(request)
    body = await read_json(request, PredictRequest, state.settings.max_body_bytes)
    batcher = state.registry.batcher(body.model)
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
        }
    )


async def predict_batch(request: Request) -> Response:
    """Each input joins the batcher on its own; results keep the order of the inputs."""
    state = state_of(request)
    body = await read_json(request, PredictBatchRequest, state.settings.max_body_bytes)
    batcher = state.registry.batcher(body.model)
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
        }
    )


async def stream(request: Request) -> Response:
    state = state_of(request)
    body = await read_json(request, GenerateRequest, state.settings.max_body_bytes)
    scheduler = state.registry.scheduler(body.model)
    request_id = body.request_id or _header_request_id(request) or secrets.token_hex(8)
    seq = scheduler.submit(GenerationRequest(body.prompt, body.max_tokens, body.seed))
    events = native_sse(seq, request_id, heartbeat_s=state.settings.heartbeat_s, retry_ms=state.settings.sse_retry_ms)
    headers = {**SSE_HEADERS, "X-Request-Id": request_id, "X-Model-Version": seq.model_version}
    return StreamingResponse(
        guarded(events, state, scheduler, seq, "sse"), media_type="text/event-stream", headers=headers
    )


def _header_request_id(request: Request) -> str | None:
    value = request.headers.get("x-request-id")
    if value is not None and not REQUEST_ID.fullmatch(value):
        raise InvalidRequest("X-Request-Id: expected 1-128 of A-Z a-z 0-9 _ . -", field="X-Request-Id")
    return value


async def guarded(
    body: AsyncIterator[bytes],
    state: ServerState,
    scheduler: ContinuousScheduler,
    seq: Sequence,
    transport: str,
) -> AsyncIterator[bytes]:
    """Count the stream as a connection, and cancel its sequence when the client goes away early.

    Starlette cancels the response task on ``http.disconnect``; the ``finally`` below then frees the
    sequence's slot in the running batch, so generation nobody reads stops at the next step.
    """
    state.metrics.connection_opened(transport)
    try:
        async for chunk in body:
            yield chunk
    finally:
        state.metrics.connection_closed(transport)
        if not seq.channel.closed:
            scheduler.cancel(seq)
