"""Interval histograms: what each second of a run measured, for the gate's noise model and HDR logs.

The recorder keeps cumulative histograms. Once a second the runner merges them over tag sets and keeps
an encoded snapshot (about 1 ms of the event loop for four metrics, measured: encoding is C); after the
run, consecutive snapshots are subtracted into interval histograms. Snapshots are thinned when a run is
long (every other one dropped), so a window grows to 2 s, 4 s, … and memory stays bounded.

Result file form (schema v2)::

    intervals: {metrics: [ttft, itl, e2e, tpot],
                windows: [{start_s, end_s, histograms: {metric: <HdrHistogram V2 base64>}}]}
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from hdrh.histogram import HdrHistogram

from infer_bench.metrics.recorder import Recorder, new_histogram

INTERVAL_METRICS = ("ttft", "itl", "e2e", "tpot")
MAX_SNAPSHOTS = 600
"""Past this many, every other snapshot is dropped: an hour-long run keeps windows of 8 s."""


@dataclass(frozen=True)
class Window:
    """What finished between ``start_s`` and ``end_s`` after the start of the run (all tag sets)."""

    start_s: float
    end_s: float
    histograms: Mapping[str, HdrHistogram]

    def to_json(self) -> dict[str, Any]:
        return {
            "start_s": round(self.start_s, 3),
            "end_s": round(self.end_s, 3),
            "histograms": {name: h.encode().decode("ascii") for name, h in self.histograms.items()},
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Window:
        histograms = {name: HdrHistogram.decode(text) for name, text in data.get("histograms", {}).items()}
        return cls(float(data["start_s"]), float(data["end_s"]), histograms)


class IntervalLog:
    """Cumulative snapshots taken during a run, turned into windows afterwards."""

    def __init__(self, metrics: tuple[str, ...] = INTERVAL_METRICS) -> None:
        self.metrics = metrics
        self._snapshots: list[tuple[float, dict[str, bytes]]] = [(0.0, {})]

    def take(self, elapsed_s: float, recorder: Recorder) -> None:
        """Snapshot the recorder's histograms (the caller has flushed it)."""
        totals = {name: new_histogram() for name in self.metrics}
        for metric_set in recorder.sets.values():
            for name, total in totals.items():
                hist = metric_set.histograms.get(name)
                if hist is not None and hist.get_total_count():
                    total.add(hist)
        encoded = {name: h.encode() for name, h in totals.items() if h.get_total_count()}
        self._snapshots.append((elapsed_s, encoded))
        if len(self._snapshots) > MAX_SNAPSHOTS:
            last = self._snapshots[-1]
            self._snapshots = [*self._snapshots[:-1:2], last]

    def windows(self) -> list[Window]:
        """Interval histograms between consecutive snapshots; windows where nothing finished are kept."""
        return list(self._windows())

    def _windows(self) -> Iterator[Window]:
        # One window at a time: a decoded histogram is a 188 KB counts array, and a long run has up to
        # MAX_SNAPSHOTS windows of four metrics (hundreds of MB if they were all alive at once).
        previous: dict[str, HdrHistogram] = {}
        for (start, _), (end, encoded) in zip(self._snapshots, self._snapshots[1:], strict=False):
            if end <= start:
                continue
            current = {name: HdrHistogram.decode(text) for name, text in encoded.items()}
            interval = {}
            for name, hist in current.items():
                diff = difference(hist, previous.get(name))
                if diff.get_total_count():
                    interval[name] = diff
            yield Window(start, end, interval)
            previous = current

    def to_json(self) -> dict[str, Any]:
        return {"metrics": list(self.metrics), "windows": [w.to_json() for w in self._windows()]}


def recorded(hist: HdrHistogram) -> list[tuple[int, int]]:
    """(value, count) of every non-empty bucket, lowest first; a bucket's value is its highest, as HDR reports.

    hdrh's own recorded-values iterator walks all 23,552 buckets in Python (about 30 ms a histogram);
    slicing the ctypes counts array between the min and max buckets is done in C.
    """
    if hist.get_total_count() == 0:
        return []
    low = hist.get_counts_array_index(hist.get_min_value())
    high = hist.get_counts_array_index(hist.get_max_value())
    counts = hist.counts[low : high + 1]
    top = hist.get_highest_equivalent_value
    return [(top(hist.get_value_from_index(low + i)), c) for i, c in enumerate(counts) if c]


def difference(later: HdrHistogram, earlier: HdrHistogram | None) -> HdrHistogram:
    """``later − earlier`` for cumulative snapshots of one histogram (hdrh has no subtraction).

    Works on the counts arrays between the later histogram's min and max buckets (sliced in C); a
    per-value walk cost ~5 µs a bucket, seconds for a minute of wide ITL histograms.
    """
    out = new_histogram()
    if later.get_total_count() == 0:
        return out
    low = later.get_counts_array_index(later.get_min_value())
    high = later.get_counts_array_index(later.get_max_value())
    after = later.counts[low : high + 1]
    before = earlier.counts[low : high + 1] if earlier is not None else [0] * len(after)
    first = last = -1
    total = 0
    counts = out.counts
    for offset, (a, b) in enumerate(zip(after, before, strict=True)):
        if a > b:
            counts[low + offset] = a - b
            total += a - b
            if first < 0:
                first = low + offset
            last = low + offset
    out.set_internal_tacking_values(first, last, total)
    return out


def windows_of(result: Mapping[str, Any]) -> list[Window]:
    """The interval windows of a result file; empty for a v1 file, which has none."""
    intervals = result.get("intervals") or {}
    return [Window.from_json(w) for w in intervals.get("windows", [])]
