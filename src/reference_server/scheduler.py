"""Continuous (per-step) batching for token generation, as vLLM and TGI schedule decode.

Each engine step advances every running sequence by one token. Sequences join and leave only at step
boundaries: a joining sequence pays its prefill inside the step it joins, and a finished or cancelled
one leaves before the next step is costed. At most ``max_num_seqs`` run at once; the rest wait in a
bounded queue, and beyond ``max_queue`` new requests are refused.
"""

from __future__ import annotations

import enum
import itertools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import anyio

from reference_server.channels import EndReason, StreamEnd, Token, TokenChannel
from reference_server.errors import Overloaded
from reference_server.metrics import ServerMetrics
from reference_server.models.base import GenerationPlan, GenerativeModel
from reference_server.waiters import WaiterFactory, waiter_factory

Clock = Callable[[], float]


class SeqState(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    ENDED = "ended"


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    prompt: str
    max_tokens: int | None = None
    seed: int | None = None


class Sequence:
    """One generation in flight; its tokens arrive on ``channel``."""

    __slots__ = (
        "cancel_reason", "channel", "created_at", "enqueued_at", "first_token_at", "id", "last_token_at", "model",
        "model_name", "model_version", "plan", "produced", "stall_until", "started_at", "state",
    )  # fmt: skip

    def __init__(self, seq_id: int, plan: GenerationPlan, channel: TokenChannel, now: float, model: GenerativeModel):
        self.id = seq_id
        self.plan = plan
        self.channel = channel
        self.model = model  # a sequence finishes on the version it started on, even across a hot-swap
        self.model_name = model.name
        self.model_version = model.version
        self.created_at = now  # the total time limit counts from here, across resumes
        self.enqueued_at = now
        self.started_at: float | None = None
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None
        self.stall_until: float | None = None
        self.produced = 0
        self.state = SeqState.WAITING
        self.cancel_reason: EndReason | None = None


class ContinuousScheduler:
    """Runs ``model`` one decode step at a time over the running sequences.

    Args:
        clock: seconds, monotonic; defaults to the event loop's clock so virtual time works in tests.
    """

    def __init__(
        self,
        model: GenerativeModel,
        *,
        max_num_seqs: int,
        max_queue: int,
        stream_buffer: int,
        metrics: ServerMetrics,
        history: int = 0,
        clock: Clock = anyio.current_time,
    ) -> None:
        self.model = model
        self.max_num_seqs = max_num_seqs
        self.max_queue = max_queue
        self._stream_buffer = stream_buffer
        self._history = history
        self._metrics = metrics
        self._clock = clock
        self._waiting: deque[Sequence] = deque()
        self._running: list[Sequence] = []
        self._ids = itertools.count()
        self._wakeup = anyio.Event()
        self._accepting = True
        self._new_waiter: WaiterFactory | None = None  # chosen on first use, inside the event loop
        self.steps = 0

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def idle(self) -> bool:
        return not self._waiting and not self._running

    def sequences(self) -> list[Sequence]:
        """Every sequence not yet ended, waiting ones first (for the sweeper)."""
        return [seq for seq in (*self._waiting, *self._running) if seq.state is not SeqState.ENDED]

    def submit(self, request: GenerationRequest) -> Sequence:
        """Queue a generation; its tokens and end arrive on the returned sequence's channel.

        Raises:
            Overloaded: ``max_queue`` sequences are already waiting, or the scheduler is draining.
        """
        self._check_capacity()
        if self._new_waiter is None:
            self._new_waiter = waiter_factory()
        plan = self.model.plan(request.prompt, request.max_tokens, request.seed)
        channel = TokenChannel(self._stream_buffer, self._new_waiter, self._history)
        seq = Sequence(next(self._ids), plan, channel, self._clock(), self.model)
        self._waiting.append(seq)
        self._wakeup.set()
        return seq

    def _check_capacity(self) -> None:
        if not self._accepting:
            self._metrics.rejections.child("draining").inc()
            raise Overloaded("the server is shutting down", reason="draining")
        if len(self._waiting) >= self.max_queue:
            self._metrics.rejections.child("queue_full").inc()
            raise Overloaded(f"the {self.model.name} queue is full ({self.max_queue})", reason="queue_full")

    def cancel(self, seq: Sequence, reason: EndReason = EndReason.CANCELLED) -> None:
        """Stop a sequence: at once if it still waits, at the next step boundary if it runs."""
        if seq.state is SeqState.WAITING:
            self._waiting.remove(seq)
            self._end(seq, reason)
        elif seq.state is SeqState.RUNNING and seq.cancel_reason is None:
            seq.cancel_reason = reason

    def expire(self, seq: Sequence, kind: str) -> None:
        """End ``seq`` now for a time limit: its reader gets the end at once, and a running sequence
        leaves the batch at the next step boundary."""
        if seq.state is SeqState.ENDED:
            return
        if seq.state is SeqState.WAITING:
            self._waiting.remove(seq)
        self._end(seq, EndReason.TIMEOUT, f"no {kind.replace('_', ' ')} within the time limit", detail=kind)
        self._metrics.timeouts.child(kind).inc()

    def resume(self, seq: Sequence) -> None:
        """Continue a sequence whose reader went away and came back.

        A cancel not yet applied is withdrawn; a sequence already cancelled rejoins the queue where it
        stopped (it pays its prefill again, over prompt and output so far: the KV cache was dropped).
        Sequences that ended otherwise stay ended; their reader gets the recorded end.

        Raises:
            Overloaded: the queue is full, or the scheduler is draining.
        """
        if seq.state is SeqState.RUNNING:
            seq.cancel_reason = None
            return
        end = seq.channel.end
        if seq.state is not SeqState.ENDED or end is None or end.reason is not EndReason.CANCELLED:
            return
        self._check_capacity()
        seq.channel.reopen()
        seq.state = SeqState.WAITING
        seq.enqueued_at = self._clock()
        self._waiting.append(seq)
        self._wakeup.set()

    def stop_accepting(self) -> None:
        self._accepting = False

    def abort_all(self, reason: EndReason = EndReason.SHUTDOWN) -> None:
        """End every sequence now (server stopping): readers get a ``StreamEnd``, never a hang."""
        for seq in self.sequences():
            self._end(seq, reason, "the server stopped before this request finished")
        self._waiting.clear()
        self._running.clear()

    async def run(self) -> None:
        """Step forever; cancel the enclosing task group to stop."""
        while True:
            if not self._waiting and not self._running:
                self._wakeup = anyio.Event()
                await self._wakeup.wait()
                continue
            await self.step()

    async def step(self) -> None:
        """Admit waiting sequences, spend one step's cost, and emit one token per running sequence."""
        now = self._clock()
        prefill_s = self._admit(now)
        if not self._running:
            return
        metrics = self._metrics
        metrics.batch_size.child("generate").observe(len(self._running))
        metrics.batches.child("generate", "step").inc()
        cost = self.model.step_cost_s(len(self._running)) + prefill_s
        if cost > 0:
            await anyio.sleep(cost)
        else:
            await anyio.lowlevel.checkpoint()  # a zero-cost model must still let readers run
        done = self._clock()
        metrics.batch_execution.child("generate").observe(done - now)
        self.steps += 1
        self._running = [seq for seq in self._running if self._advance(seq, done)]

    def _admit(self, now: float) -> float:
        prefill_s = 0.0
        queue_wait = self._metrics.queue_wait.child("generate")
        while self._waiting and len(self._running) < self.max_num_seqs:
            seq = self._waiting.popleft()
            seq.state = SeqState.RUNNING
            seq.started_at = now
            queue_wait.observe(now - seq.enqueued_at)
            prefill_s += seq.model.prefill_cost_s(seq.plan.prompt_tokens + seq.produced)
            self._running.append(seq)
        return prefill_s

    def _advance(self, seq: Sequence, now: float) -> bool:
        """Emit this step's token for ``seq``; False when the sequence leaves the batch."""
        if seq.state is SeqState.ENDED:  # expired during this step
            return False
        if seq.cancel_reason is not None:
            self._end(seq, seq.cancel_reason)
            return False
        plan = seq.plan
        if plan.fail_at is not None and seq.produced >= plan.fail_at:
            self._end(seq, EndReason.MODEL_ERROR, "the model failed while generating (injected fault)")
            return False
        if plan.stall_at is not None and seq.produced >= plan.stall_at:
            plan.stall_at = None
            seq.stall_until = now + plan.stall_s
        if seq.stall_until is not None:
            if now < seq.stall_until:
                return True
            seq.stall_until = None
        if not seq.channel.put_nowait(Token(seq.produced, seq.model.next_token(plan))):
            self._end(seq, EndReason.SLOW_CONSUMER, "the client read too slowly; its stream buffer overflowed")
            return False
        metrics = self._metrics
        metrics.tokens.child().inc()
        if seq.last_token_at is None:
            seq.first_token_at = now
            metrics.ttft.child().observe(now - seq.enqueued_at)
        else:
            metrics.itl.child().observe(now - seq.last_token_at)
        seq.last_token_at = now
        seq.produced += 1
        if seq.produced >= plan.output_tokens:
            self._end(seq, EndReason.FINISHED)
            metrics.e2e.child("generate").observe(now - seq.enqueued_at)
            return False
        return True

    def _end(self, seq: Sequence, reason: EndReason, message: str = "", detail: str | None = None) -> None:
        seq.state = SeqState.ENDED
        seq.cancel_reason = None
        finish = seq.plan.finish_reason if reason is EndReason.FINISHED else None
        seq.channel.close(StreamEnd(reason, finish, seq.plan.prompt_tokens, seq.produced, message, detail))
        self._metrics.sequences.child(reason.value).inc()
