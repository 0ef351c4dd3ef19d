"""The sweeper: one background task that ends streams past their time limits, reclaims leases and
expired resume entries, and runs the send watchdog.

Three limits per stream, each optional: the first token (from enqueue, queued time included), the gap
between tokens, and the whole stream. A stream past one ends at once with an in-band ``timeout`` and
its kind, queued or running, so no client is left waiting on a stream that will not come. Checking on a
timer rather than arming a timer per stream keeps the token hot path free of timer work; a limit lands
within ``sweep_interval_s`` of its deadline.
"""

from __future__ import annotations

import collections.abc
from collections.abc import Callable
from dataclasses import dataclass

import anyio

from reference_server.admission import Admission
from reference_server.registry import ModelRegistry
from reference_server.resume import ResumeTable
from reference_server.scheduler import ContinuousScheduler, Sequence

Clock = Callable[[], float]


@dataclass(frozen=True, slots=True)
class StreamLimits:
    first_token_s: float | None = None
    inactivity_s: float | None = None
    total_s: float | None = None

    def exceeded(self, seq: Sequence, now: float) -> str | None:
        """The kind of limit ``seq`` is past at ``now`` (``first_token``, ``inactivity``, ``total``), or None."""
        if self.total_s is not None and now - seq.created_at >= self.total_s:
            return "total"
        if seq.last_token_at is None:
            if self.first_token_s is not None and now - seq.created_at >= self.first_token_s:
                return "first_token"
        elif self.inactivity_s is not None and now - seq.last_token_at >= self.inactivity_s:
            return "inactivity"
        return None


class Sweeper:
    """Args:
    clock: the schedulers' clock (the event loop's), so deadlines and stamps agree.
    """

    def __init__(
        self,
        registry: ModelRegistry,
        admission: Admission,
        resumes: ResumeTable,
        limits: StreamLimits,
        interval_s: float,
        clock: Clock = anyio.current_time,
        also: collections.abc.Sequence[Callable[[float], object]] = (),
    ) -> None:
        self._registry = registry
        self._admission = admission
        self._resumes = resumes
        self.limits = limits
        self.interval_s = interval_s
        self._clock = clock
        self._also = also  # more periodic checks (the send watchdog), called with ``now``

    def sweep(self, now: float) -> int:
        """End every stream past a limit at ``now``; reclaim lapsed leases and resume entries."""
        ended = 0
        for _, engine in self._registry.engines():
            if isinstance(engine, ContinuousScheduler):
                for seq in engine.sequences():
                    kind = self.limits.exceeded(seq, now)
                    if kind is not None:
                        engine.expire(seq, kind)
                        ended += 1
        self._admission.sweep()
        self._resumes.sweep(now)
        for check in self._also:
            check(now)
        return ended

    async def run(self) -> None:
        """Sweep every ``interval_s`` until cancelled."""
        while True:
            await anyio.sleep(self.interval_s)
            self.sweep(self._clock())
