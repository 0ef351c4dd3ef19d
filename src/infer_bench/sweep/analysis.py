"""What a sweep concludes: capacity per setting, the throughput/latency frontier, and a recommendation.

Pure functions over measured figures, so each conclusion can be tested with figures whose answer is known.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class CellFigures:
    """What one run of one setting at one load measured."""

    setting: str
    load: float
    throughput: float  # completed requests/s in the steady part of the run
    ttft_p50_ms: float | None
    ttft_p99_ms: float | None
    itl_p99_ms: float | None
    completion_rate: float
    slo_passed: bool  # every threshold of the scenario passed (no thresholds: True)

    def to_json(self) -> dict[str, Any]:
        return {
            "setting": self.setting, "load": self.load, "throughput": round(self.throughput, 3),
            "ttft_p50_ms": self.ttft_p50_ms, "ttft_p99_ms": self.ttft_p99_ms, "itl_p99_ms": self.itl_p99_ms,
            "completion_rate": self.completion_rate, "slo_passed": self.slo_passed,
        }  # fmt: skip


def pareto_frontier(cells: Sequence[CellFigures]) -> list[CellFigures]:
    """The cells no other cell beats on both throughput (higher) and TTFT p99 (lower), by throughput.

    A cell with no latency figure (nothing completed after its warmup) has no place on it.
    """

    def latency(c: CellFigures) -> float:
        return c.ttft_p99_ms if c.ttft_p99_ms is not None else 0.0

    measured = [c for c in cells if c.ttft_p99_ms is not None]
    frontier = [
        c for c in measured
        if not any(
            o is not c and o.throughput >= c.throughput and latency(o) <= latency(c)
            and (o.throughput > c.throughput or latency(o) < latency(c))
            for o in measured
        )
    ]  # fmt: skip
    return sorted(frontier, key=lambda c: (c.throughput, -latency(c)))


THROUGHPUT_TIE = 0.05
"""Throughputs this close count as equal: a steady rate over a few seconds varies about this much run to run."""


@dataclass(frozen=True)
class Recommendation:
    setting: str
    reason: str


def recommend(cells: Sequence[CellFigures], capacities: Sequence[Capacity] = ()) -> Recommendation | None:
    """The setting to use under the SLO.

    With capacity searches, the setting with the highest confirmed capacity. Otherwise, among settings that
    pass the SLO at every load where any setting does (one that fails where others pass is not
    recommended), those whose best passing throughput is within ``THROUGHPUT_TIE`` of the best; of these,
    the one with the lowest TTFT p50 averaged over its passing loads (then p99). The median decides, not the
    tail: a cell of a few seconds at a low rate has a p99 that is nearly its maximum, one sample's luck.
    """
    confirmed = [c for c in capacities if c.rate is not None]
    if confirmed:
        best = max(confirmed, key=lambda c: c.rate or 0.0)
        return Recommendation(best.setting, f"highest capacity within the SLO: {best.rate:,.4g}/s ({best.verdict})")
    by_setting: dict[str, list[CellFigures]] = {}
    for cell in cells:
        by_setting.setdefault(cell.setting, []).append(cell)
    loads_passed_somewhere = {c.load for c in cells if c.slo_passed}
    eligible = {
        setting: [c for c in runs if c.slo_passed] for setting, runs in by_setting.items()
        if all(c.slo_passed for c in runs if c.load in loads_passed_somewhere) and any(c.slo_passed for c in runs)
    }  # fmt: skip
    if not eligible:
        return None
    top = {setting: max(c.throughput for c in runs) for setting, runs in eligible.items()}
    best_throughput = max(top.values())
    contenders = [s for s in eligible if top[s] >= best_throughput * (1 - THROUGHPUT_TIE)]

    def mean(setting: str, percentile: str) -> float:
        values = [getattr(c, percentile) for c in eligible[setting] if getattr(c, percentile) is not None]
        return sum(values) / len(values) if values else 0.0

    setting = min(contenders, key=lambda s: (mean(s, "ttft_p50_ms"), mean(s, "ttft_p99_ms"), -top[s]))
    p50, p99 = mean(setting, "ttft_p50_ms"), mean(setting, "ttft_p99_ms")
    latency = f", mean TTFT p50 {p50:,.1f} ms, p99 {p99:,.1f} ms" if p50 else ""
    tie = f" (within {THROUGHPUT_TIE:.0%} of the best, the lowest latency)" if len(contenders) > 1 else ""
    return Recommendation(
        setting, f"highest throughput within the SLO at every load: {top[setting]:,.1f}/s{tie}{latency}"
    )


# --- capacity search ---------------------------------------------------------------------------------------


@dataclass
class Capacity:
    """The highest rate found within the SLO for one setting, and how sure that is."""

    setting: str
    rate: float | None  # None: even the start rate failed
    failed_at: float | None  # the lowest rate seen failing (None: max passed)
    runs: list[tuple[float, bool]] = field(default_factory=list)  # every (rate, passed) tried, in order
    verdict: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "setting": self.setting, "rate": self.rate, "failed_at": self.failed_at, "verdict": self.verdict,
            "runs": [{"rate": r, "passed": p} for r, p in self.runs],
        }  # fmt: skip


def find_capacity(
    setting: str,
    passes: Callable[[float], bool],
    *,
    start: float,
    maximum: float,
    resolution: float = 0.1,
    confirm: int = 1,
    max_runs: int = 30,
) -> Capacity:
    """Doubling from ``start`` until a rate fails (or ``maximum`` passes), then bisection between the last
    pass and the first fail until they are within ``resolution``; then ``confirm`` more runs at the rate
    found. A rate that passes once by luck and then fails is not capacity: on a failed confirmation the
    search steps down to the highest rate that passed, re-confirming it, and the verdict says what happened.
    """
    cap = Capacity(setting, None, None)
    budget = [max_runs]

    def run(rate: float) -> bool:
        budget[0] -= 1
        ok = passes(rate)
        cap.runs.append((rate, ok))
        return ok

    low: float | None = None
    high: float | None = None
    rate = min(start, maximum)
    while budget[0] > 0:  # doubling
        if run(rate):
            low = rate
            if rate >= maximum:
                break
            rate = min(rate * 2, maximum)
        else:
            high = rate
            break
    if low is None:
        cap.failed_at = high
        cap.verdict = f"the SLO failed already at the start rate {start:,.4g}/s"
        return cap
    while high is not None and high > low * (1 + resolution) and budget[0] > 0:  # bisection
        middle = (low + high) / 2
        if run(middle):
            low = middle
        else:
            high = middle
    passed_rates = sorted({r for r, ok in cap.runs if ok}, reverse=True)
    for candidate in passed_rates:  # confirmation, stepping down past rates that passed by chance
        results = [run(candidate) for _ in range(confirm) if budget[0] > 0]
        if all(results):
            cap.rate = candidate
            break
        high = candidate if high is None else min(high, candidate)
    cap.failed_at = high
    if cap.rate is None:
        cap.verdict = "no rate passed its confirmation runs: the SLO sits inside the run-to-run noise"
        return cap
    tries = [ok for r, ok in cap.runs if r == cap.rate]
    above = f", failed at {high:,.4g}/s" if high is not None else f" (the maximum {maximum:,.4g}/s passed)"
    cap.verdict = f"passed {sum(tries)} of {len(tries)} runs at {cap.rate:,.4g}/s{above}"
    return cap
