"""Load shapes as pure functions of time: VU targets for closed executors, arrivals for open ones.

Nothing here reads a clock or sleeps; the swarm asks "how many VUs at t?" or "when is the next
arrival?". Open-loop arrivals come from one mechanism: with Λ(t) the expected number of arrivals by time
t (the integral of the rate, piecewise linear over stages), the n-th arrival is at Λ⁻¹(u_n), where u_n
is n for uniform arrivals and a running sum of Exp(1) draws for Poisson arrivals (the time-rescaling
theorem turns a unit-rate Poisson process into one of any rate shape). A seed fixes every arrival.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from dataclasses import dataclass

from infer_bench.scenario import ConstantArrivalRate, RampingArrivalRate, Stage


def vus_at(start_vus: int, stages: tuple[Stage, ...], t: float) -> int:
    """ramping-vus: the VU target at ``t`` seconds, interpolated linearly within each stage (as k6)."""
    level, elapsed = float(start_vus), 0.0
    for stage in stages:
        if t < elapsed + stage.duration:
            frac = (t - elapsed) / stage.duration if stage.duration > 0 else 1.0
            return round(level + (stage.target - level) * frac)
        level, elapsed = stage.target, elapsed + stage.duration
    return round(level)


def stage_at(stages: tuple[Stage, ...], t: float) -> str:
    """``"2/3"``: which stage runs at ``t`` seconds (the last one once all are over)."""
    elapsed = 0.0
    for i, stage in enumerate(stages):
        elapsed += stage.duration
        if t < elapsed:
            return f"{i + 1}/{len(stages)}"
    return f"{len(stages)}/{len(stages)}"


@dataclass(frozen=True)
class _Segment:
    start: float  # seconds
    duration: float
    rate0: float  # arrivals per second at the start
    rate1: float  # ... and at the end
    count0: float  # Λ at the start

    @property
    def count1(self) -> float:
        return self.count0 + (self.rate0 + self.rate1) / 2 * self.duration

    def time_of(self, u: float) -> float:
        """Λ⁻¹(u) within this segment: solve count0 + r0·τ + (r1 − r0)/(2D)·τ² = u for τ."""
        k = u - self.count0
        a = (self.rate1 - self.rate0) / (2 * self.duration)
        if abs(a) < 1e-12:
            tau = k / self.rate0
        else:
            tau = (-self.rate0 + math.sqrt(max(0.0, self.rate0**2 + 4 * a * k))) / (2 * a)
        return self.start + min(max(tau, 0.0), self.duration)


def _segments(spec: ConstantArrivalRate | RampingArrivalRate) -> list[_Segment]:
    if isinstance(spec, ConstantArrivalRate):
        rate = spec.rate / spec.time_unit
        return [_Segment(0.0, spec.duration, rate, rate, 0.0)]
    segments: list[_Segment] = []
    start, rate0, count = 0.0, spec.start_rate / spec.time_unit, 0.0
    for stage in spec.stages:
        rate1 = stage.target / spec.time_unit
        if stage.duration > 0:
            seg = _Segment(start, stage.duration, rate0, rate1, count)
            segments.append(seg)
            count = seg.count1
        start, rate0 = start + stage.duration, rate1
    return segments


def rate_at(spec: ConstantArrivalRate | RampingArrivalRate, t: float) -> float:
    """The requested arrival rate (per second) at ``t``."""
    for seg in _segments(spec):
        if seg.start <= t < seg.start + seg.duration:
            return seg.rate0 + (seg.rate1 - seg.rate0) * (t - seg.start) / seg.duration
    return 0.0


def expected_arrivals(spec: ConstantArrivalRate | RampingArrivalRate) -> float:
    segments = _segments(spec)
    return segments[-1].count1 if segments else 0.0


def arrivals(spec: ConstantArrivalRate | RampingArrivalRate) -> Iterator[float]:
    """Arrival offsets in seconds from the executor's start, increasing, ending with the last stage."""
    rng = random.Random(spec.seed)
    poisson = spec.arrival == "poisson"
    u = rng.expovariate(1.0) if poisson else 0.0
    for seg in _segments(spec):
        end = seg.count1
        while u < end:
            yield seg.time_of(u)
            u += rng.expovariate(1.0) if poisson else 1.0
