"""OpenAI-compatible routes: ``/v1/completions``, ``/v1/chat/completions`` and ``/v1/models``.

Streaming follows OpenAI's wire format: ``data: <chunk JSON>`` events, a chat stream opens with a
role-only delta, the last content chunk carries ``finish_reason``, an optional usage chunk with empty
``choices`` follows when ``stream_options.include_usage`` is set, and ``data: [DONE]`` closes the stream.
A failure mid-stream is sent in-band as ``data: {"error": {...}}`` before ``[DONE]``, as OpenAI does.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
import orjson
from starlette.requests import Request
from starlette.responses import Response

from reference_server.channels import EndReason, StreamEnd, Token
from reference_server.endpoints.common import JSONResponse, admit, read_json, state_of
from reference_server.endpoints.streaming import SseResponse, open_stream
from reference_server.errors import RequestError
from reference_server.scheduler import GenerationRequest, Sequence
from reference_server.schemas import ChatCompletionRequest, CompletionRequest
from reference_server.streams import PING, StreamCounters, receive_or_ping, usage_of

DONE = b"data: [DONE]\n\n"
CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that left before the answer
SLOW_CONSUMER_COMMENT = b": warning slow_consumer: the send buffer is 80 % full\n\n"


def openai_error(exc: RequestError) -> dict[str, object]:
    """OpenAI's error shape, so official clients raise their usual typed exceptions."""
    kind = "server_error" if exc.status >= 500 else "invalid_request_error"
    code = "model_not_found" if exc.code == "unknown_model" else exc.code
    return {"error": {"message": exc.message, "type": kind, "param": exc.field, "code": code}}


async def completions(request: Request) -> Response:
    state = state_of(request)
    body = await read_json(request, CompletionRequest, state.settings.max_body_bytes)
    prompt = body.prompt if isinstance(body.prompt, str) else "\n".join(body.prompt)
    usage = body.stream_options is not None and body.stream_options.include_usage
    return await _generate(request, body.model, prompt, body.max_tokens, body.seed, body.stream, usage, chat=False)


async def chat_completions(request: Request) -> Response:
    state = state_of(request)
    body = await read_json(request, ChatCompletionRequest, state.settings.max_body_bytes)
    prompt = "\n".join(m.text() for m in body.messages)
    max_tokens = body.max_completion_tokens or body.max_tokens
    usage = body.stream_options is not None and body.stream_options.include_usage
    return await _generate(request, body.model, prompt, max_tokens, body.seed, body.stream, usage, chat=True)


async def models(request: Request) -> Response:
    state = state_of(request)
    data = [
        {"id": name, "object": "model", "created": 0, "owned_by": "infer-bench", "version": version}
        for name, version, kind in state.registry.names()
        if kind == "generation"
    ]
    return JSONResponse({"object": "list", "data": data})


async def _generate(
    request: Request, model: str, prompt: str, max_tokens: int | None, seed: int | None,
    stream: bool, include_usage: bool, *, chat: bool,
) -> Response:  # fmt: skip
    state = state_of(request)
    if state.queue is not None:  # queue mode: the completion is a job for the workers
        from reference_server.endpoints.openai_queued import generate_queued  # it imports this module

        return await generate_queued(request, model, prompt, max_tokens, seed, stream, include_usage, chat=chat)
    client = admit(request, state)
    scheduler = state.registry.scheduler(model, client)
    guard = open_stream(
        state, "openai" if stream else "http", client, scheduler, GenerationRequest(prompt, max_tokens, seed)
    )
    seq = guard.seq
    shape = _ChunkShape(("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12), model, int(time.time()), chat)
    headers = {"X-Model-Version": seq.model_version}
    if stream:
        events = _stream(seq, shape, include_usage, state.settings.heartbeat_s, guard.counters)
        return SseResponse(events, guard, headers, state.watchdog)
    try:
        texts, end = await _collect_unless_disconnected(request, seq)
        guard.complete = True
    except ClientGone:
        return Response(status_code=CLIENT_CLOSED_REQUEST)  # nobody reads it; counted under this status
    finally:
        guard.close()
    if not end.ok:
        status = 504 if end.reason is EndReason.TIMEOUT else 502
        return JSONResponse(_in_band_error(end), status_code=status, headers=headers)
    return JSONResponse(shape.whole("".join(texts), end), headers=headers)


async def _collect_unless_disconnected(request: Request, seq: Sequence) -> tuple[list[str], StreamEnd]:
    """All of a sequence's tokens; returns early (the caller's guard cancels) if the client goes away.

    Starlette cancels streaming responses on disconnect but not plain handlers, so a non-streaming
    generation nobody waits for would run to the end. Once the body is read, the next ASGI message
    can only be ``http.disconnect``.
    """
    texts: list[str] = []

    async def cancel_on_disconnect() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        tg.cancel_scope.cancel()

    async with anyio.create_task_group() as tg:
        tg.start_soon(cancel_on_disconnect)
        while True:
            tokens, end = await seq.channel.receive()
            texts.extend(t.text for t in tokens)
            if end is not None:
                tg.cancel_scope.cancel()
                return texts, end
    raise ClientGone


class ClientGone(Exception):
    """The client of a non-streaming generation went away; there is nobody to answer."""


class _ChunkShape:
    """Builds the JSON objects of one response, chat or legacy completion."""

    def __init__(self, response_id: str, model: str, created: int, chat: bool) -> None:
        self.id, self.model, self.created, self.chat = response_id, model, created, chat
        self.object = "chat.completion.chunk" if chat else "text_completion"

    def chunk(self, text: str | None, finish_reason: str | None = None, role: bool = False) -> dict[str, Any]:
        choice: dict[str, Any]
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
            if text is not None:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        return {
            "id": self.id,
            "object": self.object,
            "created": self.created,
            "model": self.model,
            "choices": [choice],
        }

    def usage_chunk(self, end: StreamEnd) -> dict[str, Any]:
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                "choices": [], "usage": usage_of(end)}  # fmt: skip

    def whole(self, text: str, end: StreamEnd) -> dict[str, Any]:
        if self.chat:
            choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text},
                                      "logprobs": None, "finish_reason": end.finish_reason}  # fmt: skip
            kind = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": end.finish_reason}
            kind = "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model,
                "choices": [choice], "usage": usage_of(end)}  # fmt: skip


def _data(obj: Any) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def _in_band_error(end: StreamEnd) -> dict[str, Any]:
    return {"error": {"message": end.message or end.reason.value, "type": "server_error",
                      "param": None, "code": end.reason.value}}  # fmt: skip


async def _stream(
    seq: Sequence, shape: _ChunkShape, include_usage: bool, heartbeat_s: float, counters: StreamCounters
) -> AsyncIterator[bytes]:
    if shape.chat:
        yield _data(shape.chunk(None, role=True))
    while True:
        got = await receive_or_ping(seq, heartbeat_s)
        if got is None:
            counters.pings.inc()
            yield PING
            continue
        tokens, end = got
        if seq.channel.warning_pending:  # as a comment: OpenAI clients know no warning chunk
            seq.channel.warning_pending = False
            counters.warnings.inc()
            yield SLOW_CONSUMER_COMMENT
        yield b"".join(_content_chunks(shape, tokens, end))
        if end is not None:
            tail = b""
            if end.ok and include_usage:
                tail += _data(shape.usage_chunk(end))
            yield tail + DONE
            return


def _content_chunks(shape: _ChunkShape, tokens: list[Token], end: StreamEnd | None) -> list[bytes]:
    out = [_data(shape.chunk(t.text)) for t in tokens]
    if end is not None:
        # The finish_reason rides on its own empty chunk, as OpenAI's servers send it.
        out.append(
            _data(shape.chunk("" if not shape.chat else None, end.finish_reason))
            if end.ok
            else _data(_in_band_error(end))
        )
    return out
