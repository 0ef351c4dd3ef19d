"""``/v1/completions`` and ``/v1/chat/completions`` in queue mode: a job per request, OpenAI's wire format.

The answer is what the direct routes send (``endpoints.openai``): streamed ``data:`` chunks (a chat
stream opens with a role-only delta; ``finish_reason`` on its own last chunk; the usage chunk with
``stream_options.include_usage``; ``data: [DONE]``) or one completion object. A job's failure streams as
an in-band ``{"error": {...}}`` before ``[DONE]`` (a ``502``, or ``504`` for a timeout, when not
streaming). Progress and log events of a job are not sent: OpenAI's clients know no such chunk. A
streaming client that hangs up before the end cancels its job at once (cause ``abandoned``): these
routes have no resume, so no grace period could be used. A client waiting for a whole (non-streamed)
answer is not watched; its job runs to the end. Admission (shared rate limits and stream leases) is the
queue routes' own.
"""

from __future__ import annotations

import contextlib
import secrets
import time
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import anyio
from starlette.requests import Request
from starlette.responses import Response

from reference_server.admission import Lease, SharedLease
from reference_server.endpoints.common import JSONResponse, ServerState, client_of, state_of
from reference_server.endpoints.openai import DONE, _ChunkShape, _data
from reference_server.endpoints.queued import QueuedResponse, model_ref, refused
from reference_server.endpoints.relay import Relay
from reference_server.errors import Conflict, Overloaded, RequestError
from reference_server.models.tokens import count_prompt_tokens
from reference_server.queue.front import QueueFront
from reference_server.queue.jobs import Chunk
from reference_server.streams import PING


async def generate_queued(
    request: Request, model: str, prompt: str, max_tokens: int | None, seed: int | None,
    stream: bool, include_usage: bool, *, chat: bool,
) -> Response:  # fmt: skip
    """Enqueue the completion as a job and answer from its results (see the module docstring).

    Raises:
        RateLimited, TooManyStreams: the client's shared limits.
        Overloaded: Redis unreachable (``queue_unavailable``) or the server draining.
        UnknownModel, InvalidRequest: ``model`` is not a generation model of the server.
    """
    state = state_of(request)
    front = state.queue
    assert front is not None, "only in queue mode"
    client = client_of(request)
    lease: Lease | SharedLease | None = None
    try:
        await state.admission.check_rate_shared(client)
        if state.draining:
            raise Overloaded("the server is shutting down", reason="draining")
        ref = model_ref(state, model, client)
        lease = await state.admission.lease_shared(client)
        job_id = secrets.token_hex(12)
        if not await front.submit(front.job(job_id, ref, prompt, max_tokens, seed), client, reader=stream):
            raise Conflict(f"job id {job_id!r} is taken; try again")
    except RequestError as exc:
        await refused(state, lease, exc)
        raise
    shape = _ChunkShape(("chatcmpl-" if chat else "cmpl-") + job_id, model, int(time.time()), chat)
    answer = _Answer(state, front, job_id, shape, count_prompt_tokens(prompt))
    headers = {"X-Request-Id": job_id, "X-Model-Version": ref.partition("@")[2]}
    if stream:
        return QueuedResponse(state, answer.events(include_usage), lease, headers)
    try:
        text, end = await answer.collect()
    finally:
        with anyio.CancelScope(shield=True):
            await state.admission.release_shared(lease)
    if end.kind != "done":
        return JSONResponse(answer.error(end), status_code=504 if end.data == "timeout" else 502, headers=headers)
    return JSONResponse(answer.whole(text, end), headers=headers)


class _Answer:
    """One job's results in OpenAI's shapes."""

    def __init__(self, state: ServerState, front: QueueFront, job_id: str, shape: _ChunkShape, prompt_tokens: int):
        self.state, self.front, self.job_id, self.shape, self.prompt_tokens = state, front, job_id, shape, prompt_tokens
        self.enqueued_at = time.monotonic()  # made right after the job was enqueued

    def usage(self, end: Chunk) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": end.seq,
                "total_tokens": self.prompt_tokens + end.seq}  # fmt: skip

    @staticmethod
    def error(end: Chunk) -> dict[str, Any]:
        return {"error": {"message": end.message or end.data, "type": "server_error", "param": None, "code": end.data}}

    def whole(self, text: str, end: Chunk) -> dict[str, Any]:
        s = self.shape
        if s.chat:
            choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text},
                                      "logprobs": None, "finish_reason": end.data}  # fmt: skip
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": end.data}
        kind = "chat.completion" if s.chat else "text_completion"
        return {"id": s.id, "object": kind, "created": s.created, "model": s.model, "choices": [choice],
                "usage": self.usage(end)}  # fmt: skip

    async def chunks(self, grace_s: float | None = None) -> AsyncGenerator[list[Chunk], None]:
        """The job's chunks as they come ([] on each heartbeat tick), to the final one (see ``Relay``)."""
        state = self.state
        relay = Relay(self.front, self.job_id, "sse", state.settings, state.metrics, self.enqueued_at, grace_s=grace_s)
        async with contextlib.aclosing(relay.batches()) as batches:
            async for got in batches:
                yield [chunk for _, chunk in got]

    async def collect(self) -> tuple[str, Chunk]:
        texts: list[str] = []
        async with contextlib.aclosing(self.chunks()) as batches:
            async for got in batches:
                for chunk in got:
                    if chunk.kind == "token":
                        texts.append(chunk.data)
                    elif chunk.final:
                        return "".join(texts), chunk
        raise AssertionError("chunks() always ends with a final chunk")

    async def events(self, include_usage: bool) -> AsyncIterator[bytes]:
        s = self.shape
        if s.chat:
            yield _data(s.chunk(None, role=True))
        async with contextlib.aclosing(self.chunks(grace_s=0)) as batches:
            async for got in batches:
                if not got:
                    self.state.metrics.heartbeats.child("sse").inc()
                    yield PING
                    continue
                out = bytearray()
                for chunk in got:
                    if chunk.kind == "token":
                        out += _data(s.chunk(chunk.data))
                    elif chunk.kind == "done":
                        out += _data(s.chunk(None if s.chat else "", chunk.data))
                        if include_usage:
                            out += _data({"id": s.id, "object": s.object, "created": s.created, "model": s.model,
                                          "choices": [], "usage": self.usage(chunk)})  # fmt: skip
                        yield bytes(out + DONE)
                        return
                    elif chunk.kind == "error":
                        yield bytes(out + _data(self.error(chunk)) + DONE)
                        return
                if out:
                    yield bytes(out)
