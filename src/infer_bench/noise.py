"""The gate's noise model: a block bootstrap over time windows of the two runs.

Why windows, not requests: on a shared or small machine latency noise comes in bursts — a GC pause, a
noisy neighbour, a CPU-frequency step slows every request of a second or two together. Resampling
single requests treats them as independent and yields intervals far too narrow (a gate that flaps);
resampling whole windows (1 s, as the run recorded them, merged into at most ``MAX_BLOCKS`` blocks)
keeps that correlation inside each draw. For each of ``resamples`` draws, each run's windows are drawn
with replacement, the statistic (a percentile, or the mean) is computed on the merged draw, and the
change current − baseline (relative, or absolute in ms) is recorded. The central ``confidence`` part
of those changes is the interval. What the bootstrap cannot see is drift between runs (a machine that
is 3 % slower today than yesterday); the budget is there for that, and docs/ci.md says how to size it.

Histogram values are binned on a log grid of ``RESOLUTION`` (0.5 %) before resampling, which bounds
the work per draw (a binary search over the grid, each step a dot product over the windows) and costs
at most 0.25 % of accuracy, far below any budget worth setting.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from operator import mul

RESOLUTION = 0.005
MAX_BLOCKS = 100
MIN_WINDOWS = 5
"""With fewer windows holding data, a run has no noise estimate; the gate says so."""
_LOG_STEP = math.log1p(RESOLUTION)


def _bin(value: float) -> int:
    return math.floor(math.log(max(value, 1e-9)) / _LOG_STEP)


def _value(index: int) -> float:
    return math.exp((index + 0.5) * _LOG_STEP)


@dataclass(frozen=True)
class Windowed:
    """One run's samples of one metric, per time window: binned counts, and exact sums for the mean."""

    counts: tuple[dict[int, int], ...]
    sums: tuple[float, ...]

    @classmethod
    def from_counts(cls, windows: Iterable[Iterable[tuple[float, int]]]) -> Windowed:
        """From (value, count) pairs per window, e.g. an HDR histogram's recorded values."""
        counts: list[dict[int, int]] = []
        sums: list[float] = []
        for pairs in windows:
            binned: dict[int, int] = {}
            total = 0.0
            for value, count in pairs:
                key = _bin(value)
                binned[key] = binned.get(key, 0) + count
                total += value * count
            counts.append(binned)
            sums.append(total)
        return cls(tuple(counts), tuple(sums))

    @classmethod
    def from_samples(cls, windows: Iterable[Iterable[float]]) -> Windowed:
        return cls.from_counts(((v, 1) for v in samples) for samples in windows)

    def blocks(self, max_blocks: int = MAX_BLOCKS) -> Windowed:
        """Consecutive windows merged so that there are at most ``max_blocks``."""
        n = len(self.counts)
        if n <= max_blocks:
            return self
        size = math.ceil(n / max_blocks)
        counts, sums = [], []
        for start in range(0, n, size):
            merged: dict[int, int] = {}
            for window in self.counts[start : start + size]:
                for key, count in window.items():
                    merged[key] = merged.get(key, 0) + count
            counts.append(merged)
            sums.append(sum(self.sums[start : start + size]))
        return Windowed(tuple(counts), tuple(sums))

    @property
    def filled(self) -> int:
        """Windows that hold at least one sample."""
        return sum(1 for c in self.counts if c)


class _Resampler:
    """Fast statistics of a weighted union of windows: cumulative counts per grid point, per window."""

    def __init__(self, data: Windowed, grid: Sequence[int]) -> None:
        windows = [c for c in data.counts if c]
        self.sums = [s for c, s in zip(data.counts, data.sums, strict=True) if c]
        self.totals = [sum(c.values()) for c in windows]
        cumulative = []
        for window in windows:
            running, column = 0, []
            for key in grid:
                running += window.get(key, 0)
                column.append(running)
            cumulative.append(column)
        self.columns = list(zip(*cumulative, strict=True)) if cumulative else []  # [grid][window]
        self.grid = grid
        self.size = len(windows)

    def statistic(self, weights: Sequence[int], percentile: float | None) -> float:
        total = sum(map(mul, weights, self.totals))
        if percentile is None:
            return float(sum(map(mul, weights, self.sums)) / total)
        rank = max(1, int(percentile / 100 * total + 0.5))  # HdrHistogram's count at percentile
        low, high = 0, len(self.grid) - 1
        while low < high:
            middle = (low + high) // 2
            if sum(map(mul, weights, self.columns[middle])) >= rank:
                high = middle
            else:
                low = middle + 1
        return _value(self.grid[low])


@dataclass(frozen=True)
class Change:
    """A statistic in both runs, the change, and its bootstrap interval (None without enough windows)."""

    baseline: float
    current: float
    change: float
    """Relative (0.1 = +10 %) or absolute (current − baseline), as asked."""
    interval: tuple[float, float] | None


def bootstrap_change(
    baseline: Windowed,
    current: Windowed,
    percentile: float | None,
    *,
    relative: bool = True,
    confidence: float = 0.95,
    resamples: int = 1000,
    seed: int = 0,
) -> Change:
    """The change of a percentile (or the mean, ``percentile=None``) from ``baseline`` to ``current``.

    Args:
        percentile: 0–100, or None for the mean.
        relative: the change as a fraction of the baseline; else current − baseline.
        confidence: the central part of the bootstrap distribution given as the interval.
        resamples: bootstrap draws; the interval's own error shrinks as 1/sqrt(resamples).
        seed: the draws are seeded, so a gate decides the same way on the same files.
    """
    base, cur = baseline.blocks(), current.blocks()
    grid = sorted({key for data in (base, cur) for window in data.counts for key in window})
    if not grid:
        raise ValueError("no samples in either run")
    b, c = _Resampler(base, grid), _Resampler(cur, grid)
    if b.size == 0 or c.size == 0:
        raise ValueError("no samples in one of the runs")

    def change(before: float, after: float) -> float:
        return after / before - 1 if relative else after - before

    point_b, point_c = b.statistic([1] * b.size, percentile), c.statistic([1] * c.size, percentile)
    point = change(point_b, point_c)
    if min(b.size, c.size) < MIN_WINDOWS:
        return Change(point_b, point_c, point, None)
    rng = random.Random(seed)
    draws = []
    for _ in range(resamples):
        draws.append(
            change(b.statistic(_weights(rng, b.size), percentile), c.statistic(_weights(rng, c.size), percentile))
        )
    draws.sort()
    tail = (1 - confidence) / 2
    low = draws[int(tail * (resamples - 1))]
    high = draws[math.ceil((1 - tail) * (resamples - 1))]
    return Change(point_b, point_c, point, (low, high))


def bootstrap_rate_change(
    baseline: Sequence[float],
    current: Sequence[float],
    *,
    confidence: float = 0.95,
    resamples: int = 1000,
    seed: int = 0,
) -> Change:
    """The relative change of a per-second rate (throughput), resampling seconds."""
    if not baseline or not current or sum(baseline) == 0:
        raise ValueError("no per-second figures to compare")
    point_b, point_c = sum(baseline) / len(baseline), sum(current) / len(current)
    point = point_c / point_b - 1
    if min(len(baseline), len(current)) < MIN_WINDOWS:
        return Change(point_b, point_c, point, None)
    rng = random.Random(seed)
    draws = []
    for _ in range(resamples):
        mean_b = sum(rng.choices(baseline, k=len(baseline))) / len(baseline)
        mean_c = sum(rng.choices(current, k=len(current))) / len(current)
        draws.append(mean_c / mean_b - 1 if mean_b else math.inf)
    draws.sort()
    tail = (1 - confidence) / 2
    return Change(
        point_b, point_c, point, (draws[int(tail * (resamples - 1))], draws[math.ceil((1 - tail) * (resamples - 1))])
    )


def _weights(rng: random.Random, size: int) -> list[int]:
    """How often each window is drawn in one resample (a multinomial draw of ``size``)."""
    weights = [0] * size
    for index in rng.choices(range(size), k=size):
        weights[index] += 1
    return weights
