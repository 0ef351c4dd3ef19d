"""``WS /ws`` generations in queue mode: enqueue a job per ``generate``, send its chunks as messages.

The messages are direct mode's (docs/protocol.md): ``token`` with ``seq``, then one ``done`` or
``error``. A request id is the socket's own; the job behind it gets a random id, and the pair (client,
request id) is remembered in the queue for as long as the job's results, so ``{"type": "resume", "id",
"last_seq"}`` finds the job from any socket of the same client on any front end, also after a restart.
``cancel`` stops sending and cancels the job: its worker stops at its next step and ends the job's
results with a ``cancelled`` end, so a later ``resume`` gets the tokens made until then and that end. A
socket that closes mid-generation abandons its jobs: each is cancelled ``queue_cancel_after_s`` later
(default ``resume_ttl_s``) unless a ``resume`` from any socket of the client re-attaches first.
"""

from __future__ import annotations

import contextlib
import hashlib
import secrets
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import anyio
import orjson

from reference_server.endpoints.common import ServerState
from reference_server.endpoints.queued import end_payload_of, event_payload_of, model_ref, refused
from reference_server.endpoints.relay import Relay
from reference_server.errors import Conflict, RequestError
from reference_server.models.tokens import count_prompt_tokens
from reference_server.queue.front import QueueFront
from reference_server.queue.jobs import cancelled_end
from reference_server.resume import ResumeUnavailable
from reference_server.schemas import WsGenerate, WsResume

if TYPE_CHECKING:
    from reference_server.endpoints.ws import _Session


@dataclass
class QueuedReader:
    """A socket's reader of one job: ``cancel`` (the client's message) stops it, counted as cancelled."""

    scope: anyio.CancelScope
    relay: Relay

    def cancel(self) -> None:
        self.relay.stop("cancelled")
        self.scope.cancel()


def _alias(client: str, request_id: str) -> str:
    return "ws." + hashlib.blake2b(client.encode(), digest_size=8).hexdigest() + "." + request_id


async def run_queued(session: _Session, msg: WsGenerate | WsResume) -> None:
    """One generation (or resume) of a socket over the queue; refusals are in-band ``error`` messages."""
    state = session.state
    front = state.queue
    assert front is not None
    request_id = msg.id
    lease = None
    try:
        if state.admission.shared is not None:  # every front end's bucket (the socket skipped its own)
            await state.admission.check_rate_shared(session.client)
        lease = await state.admission.lease_shared(session.client)
        job_id, after_seq, model, prompt_tokens = await _open(front, session.client, msg, state)
    except RequestError as exc:
        await refused(state, lease, exc)
        session.in_flight.pop(request_id, None)
        if isinstance(exc, ResumeUnavailable):
            state.metrics.resumes.child("unavailable").inc()
        await session.refuse(request_id, exc)
        return
    new_job = isinstance(msg, WsGenerate)
    enqueued_at = time.monotonic() if new_job else None
    grace_s = state.settings.queue_cancel_grace_s
    relay = Relay(front, job_id, "websocket", state.settings, state.metrics, enqueued_at, grace_s=grace_s)
    try:
        with anyio.CancelScope() as scope:
            session.queued[request_id] = QueuedReader(scope, relay)
            await _pump(session, relay, request_id, after_seq, model, prompt_tokens)
        if scope.cancelled_caught:  # the client's ``cancel``: the job stops too
            await front.cancel(job_id, "cancel")
            end = end_payload_of(cancelled_end(relay.seq, "cancel"), model, prompt_tokens)
            await session.send({"type": "error", "id": request_id, **end})
    finally:
        session.queued.pop(request_id, None)
        session.in_flight.pop(request_id, None)
        with anyio.CancelScope(shield=True):
            await state.admission.release_shared(lease)


async def _open(
    front: QueueFront, client: str, msg: WsGenerate | WsResume, state: ServerState
) -> tuple[str, int, str, int]:
    """Enqueue (generate) or find (resume) the job: its id, the last seq the client has, model, prompt size."""
    alias = _alias(client, msg.id)
    if isinstance(msg, WsGenerate):
        model = model_ref(state, msg.model, client)
        job_id = secrets.token_hex(8)
        if not await front.submit(front.job(job_id, model, msg.prompt, msg.max_tokens, msg.seed), client, reader=True):
            raise Conflict(f"job id {job_id!r} is taken; try again")
        prompt_tokens = count_prompt_tokens(msg.prompt)
        await front.remember(alias, orjson.dumps([job_id, model, prompt_tokens]).decode(), job_id)
        return job_id, -1, model, prompt_tokens
    remembered = await front.recall(alias)
    if remembered is not None:
        job_id, model, prompt_tokens = orjson.loads(remembered)
        if await front.owner_of(job_id) == client:
            state.metrics.resumes.child("resumed").inc()
            return str(job_id), msg.last_seq, str(model), int(prompt_tokens)
    raise ResumeUnavailable(f"no generation {msg.id!r} of this client is kept (unknown or expired)")


async def _pump(
    session: _Session, relay: Relay, request_id: str, after_seq: int, model: str, prompt_tokens: int
) -> None:
    async with contextlib.aclosing(relay.batches()) as batches:
        async for got in batches:  # [] on heartbeat ticks: the socket has its own pings
            for stream_id, chunk in got:
                if not chunk.final:
                    # After a resume, events numbered just after last_seq are sent again: an event at
                    # seq k follows token k - 1, and whether the client saw it is unknown.
                    if chunk.seq <= after_seq:
                        continue
                    out: dict[str, object] = (
                        {"type": "token", "id": request_id, "seq": chunk.seq, "token": chunk.data}
                        if chunk.kind == "token"
                        else {"type": chunk.kind, "id": request_id, **event_payload_of(chunk)}
                    )
                    if not await session.send(out):
                        return  # the peer is gone
                    continue
                if chunk.data == "shutdown" and not stream_id:  # the relay's end: the job goes on
                    chunk = replace(chunk, message=chunk.message + "; resume on another front end")
                kind = "done" if chunk.kind == "done" else "error"
                await session.send({"type": kind, "id": request_id, **end_payload_of(chunk, model, prompt_tokens)})
                return
