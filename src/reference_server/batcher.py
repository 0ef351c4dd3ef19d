"""The request batcher behind ``/predict``: size-or-timeout flushing over a bounded queue.

A batch is flushed when ``batch_size`` requests are queued, or when the OLDEST queued request has
waited ``batch_timeout``, whichever comes first (Triton's dynamic batcher works the same way). A timeout
of zero is opportunistic: the batcher takes whatever queued while the previous batch ran, which costs no
added latency at low load and still forms large batches at high load.

``BatchPolicy`` decides from numbers alone; ``RequestBatcher`` is the only code here that waits, and it
waits with anyio, so tests drive it on trio's virtual clock.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import anyio

from reference_server.errors import Overloaded
from reference_server.metrics import ServerMetrics
from reference_server.models.base import PredictiveModel
from reference_server.waiters import Waiter, WaiterFactory, waiter_factory

Clock = Callable[[], float]


class FlushReason(enum.StrEnum):
    SIZE = "size"  # batch_size reached
    TIMEOUT = "timeout"  # the oldest request waited batch_timeout
    DRAIN = "drain"  # timeout 0: took whatever was queued without waiting


@dataclass(frozen=True)
class BatchPolicy:
    batch_size: int
    timeout_s: float

    def decide(self, queued: int, oldest_enqueued_at: float, now: float) -> FlushReason | float:
        """Flush now (with the reason), or the time until which to wait for more requests."""
        if queued >= self.batch_size:
            return FlushReason.SIZE
        if self.timeout_s <= 0:
            return FlushReason.DRAIN
        deadline = oldest_enqueued_at + self.timeout_s
        if now >= deadline:
            return FlushReason.TIMEOUT
        return deadline


@dataclass(frozen=True, slots=True)
class Prediction:
    output: Any
    model: str
    model_version: str
    batch_size: int
    queue_s: float


class _Pending:
    __slots__ = ("batch_size", "done", "enqueued_at", "error", "input", "output", "queue_s")

    def __init__(self, value: Any, now: float, done: Waiter) -> None:
        self.input = value
        self.enqueued_at = now
        self.done = done
        self.output: Any = None
        self.error: BaseException | None = None
        self.batch_size = 0
        self.queue_s = 0.0


class ModelFailed(Exception):
    """The model raised while running a batch; only that batch's requests fail."""


class RequestBatcher:
    """Queues single predictions and runs them through ``model`` in batches.

    Args:
        clock: seconds, monotonic; defaults to the event loop's clock so virtual time works in tests.
    """

    def __init__(
        self,
        model: PredictiveModel,
        policy: BatchPolicy,
        *,
        max_queue: int,
        metrics: ServerMetrics,
        clock: Clock = anyio.current_time,
    ) -> None:
        self.model = model
        self.policy = policy
        self.max_queue = max_queue
        self._metrics = metrics
        self._clock = clock
        self._queue: deque[_Pending] = deque()
        self._wakeup = anyio.Event()
        self._accepting = True
        self._new_waiter: WaiterFactory | None = None  # chosen on first use, inside the event loop
        self._flushing = False

    @property
    def depth(self) -> int:
        return len(self._queue)

    @property
    def idle(self) -> bool:
        """Nothing queued and no batch running: safe to stop."""
        return not self._queue and not self._flushing

    async def predict(self, value: Any) -> Prediction:
        """Queue one input and wait for its batch to run.

        Raises:
            Overloaded: the queue holds ``max_queue`` requests, or the batcher is draining.
            ModelFailed: the model raised while running this request's batch.
        """
        pending = self.submit(value)
        await pending.done.wait()
        if pending.error is not None:
            raise ModelFailed(str(pending.error))
        return Prediction(pending.output, self.model.name, self.model.version, pending.batch_size, pending.queue_s)

    def submit(self, value: Any) -> _Pending:
        if not self._accepting:
            self._metrics.rejections.child("draining").inc()
            raise Overloaded("the server is shutting down", reason="draining")
        if len(self._queue) >= self.max_queue:
            self._metrics.rejections.child("queue_full").inc()
            raise Overloaded(f"the {self.model.name} queue is full ({self.max_queue})", reason="queue_full")
        if self._new_waiter is None:
            self._new_waiter = waiter_factory()
        pending = _Pending(value, self._clock(), self._new_waiter())
        self._queue.append(pending)
        if len(self._queue) == 1 or len(self._queue) >= self.policy.batch_size:
            self._wakeup.set()
        return pending

    def stop_accepting(self) -> None:
        self._accepting = False

    async def run(self) -> None:
        """Flush batches forever; cancel the enclosing task group to stop."""
        while True:
            if not self._queue:
                self._wakeup = anyio.Event()
                await self._wakeup.wait()
                continue
            now = self._clock()
            decision = self.policy.decide(len(self._queue), self._queue[0].enqueued_at, now)
            if isinstance(decision, FlushReason):
                self._flushing = True
                try:
                    await self._flush(decision)
                finally:
                    self._flushing = False
            else:
                self._wakeup = anyio.Event()
                with anyio.move_on_after(decision - now):
                    await self._wakeup.wait()

    async def _flush(self, reason: FlushReason) -> None:
        size = min(len(self._queue), self.policy.batch_size)
        batch = [self._queue.popleft() for _ in range(size)]
        started = self._clock()
        metrics = self._metrics
        queue_wait = metrics.queue_wait.child("predict")
        for p in batch:
            p.queue_s = started - p.enqueued_at
            p.batch_size = size
            queue_wait.observe(p.queue_s)
        metrics.batch_size.child("predict").observe(size)
        metrics.batches.child("predict", reason.value).inc()
        cost = self.model.batch_cost_s(size)
        if cost > 0:
            await anyio.sleep(cost)
        try:
            outputs = self.model.predict_batch([p.input for p in batch])
            if len(outputs) != size:
                raise ValueError(f"model returned {len(outputs)} outputs for {size} inputs")
        except Exception as exc:  # a model fault fails this batch only; the server keeps serving
            for p in batch:
                p.error = exc
                p.done.set()
            metrics.batch_failures.child("predict").inc()
            return
        finished = self._clock()
        metrics.batch_execution.child("predict").observe(finished - started)
        e2e = metrics.e2e.child("predict")
        for p, out in zip(batch, outputs, strict=True):
            p.output = out
            e2e.observe(finished - p.enqueued_at)
            p.done.set()
