"""The figures of a run, by tag set, read the same way from a live recorder or from a result file.

Thresholds are checked every second during a run (``abort_on_fail``) and once on the result; both go
through ``Measures`` so the two can never disagree about what ``p(95)`` or ``rate`` means.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from hdrh.histogram import HdrHistogram

from infer_bench.metrics.recorder import COUNT_METRICS, Recorder, new_histogram
from infer_bench.metrics.timeline import SUCCESSES, Outcome

TagPairs = tuple[tuple[str, str], ...]


@dataclass
class Group:
    """The measurements of one tag set (scenario, class, protocol, custom tags)."""

    tags: Mapping[str, str]
    histograms: Mapping[str, HdrHistogram]
    """Microseconds (``output_tokens``: counts)."""
    outcomes: Mapping[str, int]
    tokens: int = 0
    dropped: int = 0
    reconnects: int = 0

    def matches(self, tags: TagPairs) -> bool:
        return all(self.tags.get(name) == value for name, value in tags)


@dataclass
class Measures:
    """Groups and the time they were measured over; ``select`` merges the groups a filter matches."""

    groups: list[Group]
    duration_s: float
    _merged: dict[TagPairs, Selection] = field(default_factory=dict, repr=False)

    @classmethod
    def from_result(cls, result: Mapping[str, Any]) -> Measures:
        groups = [
            Group(
                tags=g["tags"],
                histograms={name: HdrHistogram.decode(text) for name, text in g.get("histograms", {}).items()},
                outcomes=g.get("outcomes", {}),
                tokens=g.get("tokens", 0),
                dropped=g.get("dropped", 0),
                reconnects=g.get("reconnects", 0),
            )
            for g in result.get("groups", [])
        ]
        return cls(groups, float(result.get("duration_s", 0.0)))

    @classmethod
    def from_recorder(cls, recorder: Recorder, duration_s: float) -> Measures:
        """The recorder's figures so far; the caller has flushed it."""
        groups = [
            Group(dict(key), ms.histograms, ms.outcomes, ms.tokens, ms.dropped, ms.reconnects)
            for key, ms in recorder.sets.items()
        ]
        return cls(groups, duration_s)

    def select(self, tags: TagPairs = ()) -> Selection:
        found = self._merged.get(tags)
        if found is None:
            found = self._merged[tags] = Selection.merge((g for g in self.groups if g.matches(tags)), self.duration_s)
        return found


@dataclass
class Selection:
    """Groups merged: histograms added, counters summed."""

    histograms: dict[str, HdrHistogram]
    outcomes: Counter[str]
    tokens: int
    dropped: int
    reconnects: int
    duration_s: float

    @classmethod
    def merge(cls, groups: Iterable[Group], duration_s: float) -> Selection:
        merged = cls({}, Counter(), 0, 0, 0, duration_s)
        for g in groups:
            for name, hist in g.histograms.items():
                if hist.get_total_count():
                    target = merged.histograms.get(name)
                    if target is None:
                        target = merged.histograms[name] = new_histogram()
                    target.add(hist)
            merged.outcomes.update(g.outcomes)
            merged.tokens += g.tokens
            merged.dropped += g.dropped
            merged.reconnects += g.reconnects
        return merged

    @property
    def requests(self) -> int:
        return sum(self.outcomes.values())

    def count(self, counter: str) -> int:
        """A counter metric (``requests``, ``succeeded``, ``dropped``, …)."""
        succeeded = sum(self.outcomes.get(o.value, 0) for o in SUCCESSES)
        cancelled = self.outcomes.get(Outcome.CANCELLED.value, 0)
        counts = {
            "requests": self.requests,
            "succeeded": succeeded,
            "cancelled": cancelled,
            "failed": self.requests - succeeded - cancelled,
            "dropped": self.dropped,
            "tokens": self.tokens,
            "reconnects": self.reconnects,
        }
        return counts[counter]

    def rate(self, metric: str) -> float | None:
        """A rate metric (a fraction), or None when there was no request to count."""
        considered = self.requests - self.count("cancelled")
        if metric == "disconnect_rate":
            return self.outcomes.get(Outcome.DISCONNECTED.value, 0) / self.requests if self.requests else None
        if considered <= 0:
            return None
        if metric == "completion_rate":
            return self.count("succeeded") / considered
        return self.count("failed") / considered  # error_rate

    def trend(self, metric: str, aggregation: str, percentile: float | None = None) -> float | None:
        """A histogram figure in ms (``output_tokens``: tokens), or None without samples."""
        hist = self.histograms.get(metric)
        if hist is None or hist.get_total_count() == 0:
            return None
        scale = 1.0 if metric in COUNT_METRICS else 1000.0
        if aggregation == "count":
            return float(hist.get_total_count())
        if aggregation == "p":
            return float(hist.get_value_at_percentile(percentile if percentile is not None else 50.0)) / scale
        if aggregation == "avg":
            return float(hist.get_mean_value()) / scale
        if aggregation == "min":
            return float(hist.get_min_value()) / scale
        if aggregation == "max":
            return float(hist.get_max_value()) / scale
        raise ValueError(f"unknown aggregation {aggregation!r}")
