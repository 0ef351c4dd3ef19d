"""What every generation stream shares, whatever its transport: its lease, its cleanup, its sender.

A stream holds a lease (when streams per client are limited), a sequence in a scheduler, maybe a resume
entry, and counts as an open connection. ``StreamGuard.close`` releases all of it exactly once, on every
path: done, error, cancel, disconnect, send timeout, shutdown. ``SseResponse`` is Starlette's streaming
response with two additions: each write is watched by the send watchdog (``send_timeout_s``), so one
client that stopped reading is dropped instead of holding a sender forever, and the guard is closed
even when the response never started to stream.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator

import anyio
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from reference_server.admission import Lease
from reference_server.channels import EndReason
from reference_server.endpoints.common import ServerState
from reference_server.errors import Conflict, RequestError
from reference_server.resume import Resumable
from reference_server.scheduler import ContinuousScheduler, GenerationRequest, Sequence
from reference_server.streams import StreamCounters
from reference_server.watchdog import SendWatchdog

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}

log = logging.getLogger("reference_server")


class StreamGuard:
    """Everything one stream holds, released once by ``close``."""

    __slots__ = ("_closed", "_dropped", "complete", "lease", "resumable", "scheduler", "seq", "state", "transport")

    def __init__(
        self,
        state: ServerState,
        transport: str,
        scheduler: ContinuousScheduler,
        seq: Sequence,
        lease: Lease | None,
        resumable: Resumable | None = None,
    ) -> None:
        self.state = state
        self.transport = transport
        self.scheduler = scheduler
        self.seq = seq
        self.lease = lease
        self.resumable = resumable
        self.complete = False  # the final event was written
        self._closed = False
        self._dropped = False
        state.metrics.connection_opened(transport)

    @property
    def counters(self) -> StreamCounters:
        metrics = self.state.metrics
        return StreamCounters(metrics.heartbeats.child(self.transport), metrics.slow_warnings.child(self.transport))

    def drop_slow(self, *, count: bool = True) -> None:
        """One write took longer than ``send_timeout_s``: end the stream as a slow consumer.

        ``count=False`` when the caller counts the drop itself (one per WebSocket, not per stream on it).
        """
        self._dropped = True
        end = self.seq.channel.end
        if count:
            # The buffer may have overflowed while the write was stuck: then that is the cause.
            cause = "buffer_full" if end is not None and end.reason is EndReason.SLOW_CONSUMER else "send_timeout"
            self.state.metrics.slow_drops.child(self.transport, cause).inc()
        if end is None:
            self.scheduler.cancel(self.seq, EndReason.SLOW_CONSUMER)
        log.info(
            "dropped a slow %s stream: one write took over %g s", self.transport, self.state.settings.send_timeout_s
        )

    def close(self, cause: str = "disconnect") -> None:
        """Release the stream; if its generation is still going, nobody reads it: cancel it (``cause``)."""
        if self._closed:
            return
        self._closed = True
        state, seq = self.state, self.seq
        state.metrics.connection_closed(self.transport)
        state.admission.release(self.lease)
        end = seq.channel.end
        if end is None:
            if seq.cancel_reason is None:
                state.metrics.aborts.child(self.transport, cause).inc()
            self.scheduler.cancel(seq)
        elif end.reason is EndReason.SLOW_CONSUMER and not self._dropped:
            state.metrics.slow_drops.child(self.transport, "buffer_full").inc()
        if self.resumable is not None:
            state.resumes.detach(self.resumable, complete=self.complete)


def open_stream(
    state: ServerState, transport: str, client: str, scheduler: ContinuousScheduler, request: GenerationRequest,
    resume_key: str | None = None, *, strict_key: bool = True,
) -> StreamGuard:  # fmt: skip
    """Lease, submit and (with ``resume_key``) register a stream; undone in full if a step is refused.

    Raises:
        TooManyStreams: the client holds its limit of streams.
        Overloaded: the queue is full or the server is draining.
        Conflict: ``resume_key`` is streaming already (only with ``strict_key``; else not resumable).
    """
    lease = state.admission.lease(client)
    try:
        seq = scheduler.submit(request)
    except RequestError:
        state.admission.release(lease)
        raise
    resumable = None
    if resume_key is not None and state.settings.resume_buffer > 0:
        try:
            resumable = state.resumes.register(resume_key, client, scheduler, seq)
        except Conflict:
            if strict_key:
                state.admission.release(lease)
                scheduler.cancel(seq)
                raise
    return StreamGuard(state, transport, scheduler, seq, lease, resumable)


def rejoin_stream(state: ServerState, transport: str, client: str, entry: Resumable) -> StreamGuard:
    """Lease again and put a resumed stream's generation back in the queue where it stopped; on a refusal
    the lease is returned and the entry let go, so the stream stays resumable no more.

    Raises:
        TooManyStreams, Overloaded: as ``open_stream``.
    """
    lease = None
    try:
        lease = state.admission.lease(client)
        entry.scheduler.resume(entry.seq)
    except RequestError:
        state.admission.release(lease)
        state.resumes.detach(entry, complete=False)
        raise
    state.metrics.resumes.child("resumed").inc()
    return StreamGuard(state, transport, entry.scheduler, entry.seq, lease, entry)


class SseResponse(StreamingResponse):
    """A streaming response whose writes are watched for a deadline, and whose guard is always closed."""

    def __init__(
        self, events: AsyncIterator[bytes], guard: StreamGuard | None, headers: dict[str, str], watchdog: SendWatchdog
    ) -> None:
        super().__init__(events, media_type="text/event-stream", headers={**SSE_HEADERS, **headers})
        self.guard = guard
        self.watchdog = watchdog
        self.send_started: float | None = None
        self._scope: anyio.CancelScope | None = None

    def send_stuck(self) -> None:
        """The client stopped reading: drop the stream. The response stays incomplete, so uvicorn closes
        the connection; the generation ends at the next step."""
        if self.guard is not None:
            self.guard.drop_slow()
        if self._scope is not None:
            self._scope.cancel()

    async def stream_response(self, send: Send) -> None:
        clock = time.monotonic
        with anyio.CancelScope() as self._scope:
            self.watchdog.watch(self)
            try:
                await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
                async for chunk in self.body_iterator:
                    assert isinstance(chunk, bytes)
                    self.send_started = clock()
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                    self.send_started = None
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                if self.guard is not None:
                    self.guard.complete = True
            finally:
                self.watchdog.unwatch(self)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            if isinstance(self.body_iterator, AsyncGenerator):  # run its cleanup now, not at GC
                with anyio.CancelScope(shield=True):
                    await self.body_iterator.aclose()
            if self.guard is not None:
                self.guard.close()
