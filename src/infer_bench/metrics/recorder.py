"""Timelines → HDR histograms per tag set, outcome counters and a per-second series.

Recording stays off the hot path: a finished request appends a few integers to plain lists (~80 ns
each); ``flush`` folds those lists into HdrHistograms in bulk (``record_many``: ~0.3 µs a value, where
hdrh's pure-Python ``record_value`` takes ~0.9 µs), so the 100 ms fold stays near a millisecond at 4,000
requests/s. Histograms hold microseconds at 3 significant digits, from 1 µs to one hour, and are mergeable
(they add) across tag sets and processes.
"""

from __future__ import annotations

import weakref
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from hdrh.histogram import HdrHistogram

from infer_bench.metrics.timeline import SUCCESSES, GapBuffer, Outcome, Timeline

HIGHEST_US = 3_600_000_000
FOLD_EVERY = 32
"""Requests a tag set buffers before it folds them: ~0.15 ms of work each time, spread evenly over the run,
where one fold per 100 ms tick at 4,000 requests/s took ~2 ms at once (an event-loop stall every tick)."""
SIGNIFICANT_DIGITS = 3
SAMPLED_SECONDS = 10
"""Recent seconds that keep their TTFT samples (the live view's 5 s window, and margin); older ones keep p50/p99."""

METRICS: dict[str, str] = {
    "ttft": "time to first token, from the intended start (µs)",
    "ttft_sent": "time to first token, from the actual send (µs)",
    "itl": "gap between consecutive tokens (µs)",
    "tpot": "time per output token after the first: (e2e - ttft) / (tokens - 1) (µs)",
    "e2e": "request start to last byte, from the intended start (µs)",
    "e2e_sent": "request start to last byte, from the actual send (µs)",
    "headers": "time to response headers, from the actual send (µs)",
    "output_tokens": "tokens received per successful request (count)",
    "schedule_lag": "how late the client sent each request against its schedule (µs)",
}

COUNT_METRICS = {"output_tokens": 1}  # counts, not durations
_DIVISORS = {"output_tokens": 1, "itl": 1}  # already in their unit; every other buffer holds ns

TagKey = tuple[tuple[str, str], ...]  # sorted (name, value) pairs, e.g. scenario, class, protocol


def tag_key(**tags: str) -> TagKey:
    return tuple(sorted(tags.items()))


def new_histogram() -> HdrHistogram:
    hist = HdrHistogram(1, HIGHEST_US, SIGNIFICANT_DIGITS)
    # hdrh's histogram and its encoder (which owns the 188 KB counts array) refer to each other: a cycle
    # that only the cyclic collector frees, which a run keeps rare (runner.py). The per-second interval
    # snapshots then grew a run by ~0.7 MB a second (measured). A weak back-reference frees it at once.
    hist.encoder.histogram = weakref.proxy(hist)
    return hist


# The layout of ``new_histogram()`` that ``record_many`` computes indices for: buckets of 2048 sub-buckets
# (3 significant digits), the lower half of each above the first shared with the bucket below, unit 1.
_LAYOUT = (0, 10)  # (unit_magnitude, sub_bucket_half_count_magnitude)


def record_many(hist: HdrHistogram, values: list[int]) -> None:
    """Record ``values`` (µs, clamped to the histogram's range) as ``record_value`` would, in bulk.

    HdrHistogram's index arithmetic (bucket = bit length of ``v | 2047`` − 11; sub-bucket = ``v >> bucket``)
    runs inline in one comprehension, equal indices are counted once, and the counts are added directly.
    """
    if not values:
        return
    if (hist.unit_magnitude, hist.sub_bucket_half_count_magnitude) != _LAYOUT:  # not ours: the slow way
        for value in values:
            hist.record_value(min(max(value, 1), HIGHEST_US))
        return
    _add_counts(hist, *_bucket_counts(values))


BucketCounts = tuple["Counter[int]", int, int, int]  # counts by index, how many, lowest and highest value


def _bucket_counts(values: list[int]) -> BucketCounts:
    """``values`` (µs, non-empty) as counts by ``new_histogram()``'s count index: computed once, added to any
    number of histograms of that layout."""
    low, high = min(values), max(values)
    if low < 1 or high > HIGHEST_US:
        values = [min(max(v, 1), HIGHEST_US) for v in values]
        low, high = min(max(low, 1), HIGHEST_US), min(max(high, 1), HIGHEST_US)
    if high < 2048:  # the first bucket: a value's index is the value itself
        return Counter(values), len(values), low, high
    counted = Counter([((b := (v | 2047).bit_length() - 11) + 1 << 10) + (v >> b) - 1024 for v in values])
    return counted, len(values), low, high


def _add_counts(hist: HdrHistogram, counted: Counter[int], n: int, low: int, high: int) -> None:
    counts = hist.counts
    for index, count in counted.items():
        counts[index] += count
    hist.total_count += n
    hist.min_value = min(hist.min_value, low)
    hist.max_value = max(hist.max_value, high)


class MetricSet:
    """Histograms and counters of one tag set."""

    def __init__(self) -> None:
        self.histograms = {name: new_histogram() for name in METRICS}
        self._pending: dict[str, list[int]] = {name: [] for name in METRICS}
        self.gaps = GapBuffer()  # clients add inter-token gaps here directly
        self._pending["itl"] = self.gaps.values
        self.outcomes: Counter[str] = Counter()
        self.statuses: Counter[int] = Counter()
        self.tokens = 0
        self.dropped = 0
        self.reconnects = 0
        self._buffered = 0

    def add(self, tl: Timeline) -> None:
        self._buffered += 1
        if self._buffered >= FOLD_EVERY:
            self.flush()
        pending = self._pending
        outcome = tl.outcome or Outcome.DISCONNECTED
        self.outcomes[outcome.value] += 1
        if tl.status:
            self.statuses[tl.status] += 1
        self.tokens += tl.tokens
        self.reconnects += tl.reconnects
        if tl.sent_ns:
            pending["schedule_lag"].append(tl.sent_ns - tl.intended_ns)
            if tl.headers_ns:
                pending["headers"].append(tl.headers_ns - tl.sent_ns)
        if tl.first_token_ns:
            pending["ttft"].append(tl.first_token_ns - tl.intended_ns)
            pending["ttft_sent"].append(tl.first_token_ns - tl.sent_ns)
        if outcome in SUCCESSES and tl.sent_ns:
            pending["e2e"].append(tl.end_ns - tl.intended_ns)
            pending["e2e_sent"].append(tl.end_ns - tl.sent_ns)
            pending["output_tokens"].append(tl.tokens)
            if tl.tokens > 1:
                pending["tpot"].append((tl.last_token_ns - tl.first_token_ns) // (tl.tokens - 1))

    def flush(self) -> None:
        """Fold buffered samples into the histograms: nanoseconds become µs, counts stay counts."""
        self._buffered = 0
        for name, values in self._pending.items():
            if not values:
                continue
            divisor = _DIVISORS.get(name, 1000)
            record_many(self.histograms[name], values if divisor == 1 else [v // divisor for v in values])
            values.clear()
        if zeros := self.gaps.zeros:
            self.histograms["itl"].record_value(1, zeros)  # as every gap under 1 µs: the histogram's floor
            self.gaps.zeros = 0

    def merge(self, other: MetricSet) -> None:
        other.flush()
        self.flush()
        for name, hist in other.histograms.items():
            self.histograms[name].add(hist)
        self.outcomes.update(other.outcomes)
        self.statuses.update(other.statuses)
        self.tokens += other.tokens
        self.dropped += other.dropped
        self.reconnects += other.reconnects

    @property
    def requests(self) -> int:
        return sum(self.outcomes.values())

    def add_plain(self, sent: list[int], ends: list[int], statuses: list[int]) -> None:
        """Requests of a ``PlainBatch`` (sent when intended, 2xx, headers and end in one read): what ``add``
        would record for each, computed once for all. Their E2E, E2E from the send and time to headers are one
        value, so its histogram counts are computed once and added to the three histograms."""
        n = len(ends)
        self.outcomes[Outcome.COMPLETED.value] += n
        if statuses.count(statuses[0]) == n:  # the usual case: one status for all (a C loop, not a Counter's)
            self.statuses[statuses[0]] += n
        else:
            self.statuses.update(statuses)
        hists = self.histograms
        for name in ("schedule_lag", "output_tokens"):  # zero lag, zero tokens: the histograms' floor, 1
            hists[name].record_value(1, n)
        counts = _bucket_counts([(end - start) // 1000 for start, end in zip(sent, ends, strict=True)])
        for name in ("e2e", "e2e_sent", "headers"):
            _add_counts(hists[name], *counts)


@dataclass
class SecondStats:
    """One second of the run, for the live view and the result's series."""

    t: int  # whole seconds since the run started
    started: int = 0
    succeeded: int = 0
    failed: int = 0
    tokens: int = 0
    dropped: int = 0
    connect_errors: int = 0
    lag_max_us: int = 0  # the latest send against its schedule this second
    ttft_us: list[int] = field(default_factory=list, repr=False)
    """This second's TTFTs while it is recent (the live view's window); ``seal`` keeps only two percentiles."""
    _ttft_ms: tuple[float | None, float | None] | None = field(default=None, init=False, repr=False)

    def seal(self) -> None:
        """Keep this second's TTFT p50 and p99 and drop its samples: memory stays flat however long the run."""
        if self._ttft_ms is None:
            ordered = sorted(self.ttft_us)
            self._ttft_ms = (_pick(ordered, 0.50), _pick(ordered, 0.99))
            self.ttft_us = []

    def to_json(self) -> dict[str, Any]:
        if self._ttft_ms is None:
            ordered = sorted(self.ttft_us)
            p50, p99 = _pick(ordered, 0.50), _pick(ordered, 0.99)
        else:
            p50, p99 = self._ttft_ms
        return {
            "t": self.t, "started": self.started, "succeeded": self.succeeded, "failed": self.failed,
            "tokens": self.tokens, "dropped": self.dropped, "connect_errors": self.connect_errors,
            "lag_max_ms": round(self.lag_max_us / 1000, 3), "ttft_p50_ms": p50, "ttft_p99_ms": p99,
        }  # fmt: skip


def _pick(ordered: list[int], q: float) -> float | None:
    if not ordered:
        return None
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1000, 3)


class PlainBatch:
    """Closed-loop plain HTTP requests of one tag set that ended well, as columns: the lane's hot path appends
    three integers per request and nothing else; ``fold`` (every ``PLAIN_FOLD_EVERY`` requests and on every
    ``Recorder.flush``) turns them into the series and the histograms in bulk.

    Each request here was sent when it was intended (a closed loop with no think time) and its head and end
    arrived in the same read, so one stamp stands for headers and end. Anything else is recorded through a
    ``Timeline``.
    """

    __slots__ = ("ends", "key", "measure_from_ns", "recorder", "sent", "statuses")

    def __init__(self, recorder: Recorder, key: TagKey, measure_from_ns: int) -> None:
        self.recorder = recorder
        self.key = key
        self.measure_from_ns = measure_from_ns  # requests sent earlier are warmup: in the series only
        self.sent: list[int] = []
        self.ends: list[int] = []
        self.statuses: list[int] = []

    def fold(self) -> None:
        sent, ends, statuses = self.sent, self.ends, self.statuses
        if not ends:
            return
        recorder = self.recorder
        for sec, n in recorder.per_second(sent):
            sec.started += n
        for sec, n in recorder.per_second(ends):
            sec.succeeded += n
        first = self.measure_from_ns
        if min(sent) >= first:
            recorder.metric_set(self.key).add_plain(sent, ends, statuses)
        elif max(sent) >= first:
            kept = [i for i, start in enumerate(sent) if start >= first]
            recorder.metric_set(self.key).add_plain(
                [sent[i] for i in kept], [ends[i] for i in kept], [statuses[i] for i in kept]
            )
        sent.clear()
        ends.clear()
        statuses.clear()


PLAIN_FOLD_EVERY = 1024
"""Requests a ``PlainBatch`` buffers before its lane folds it: ~0.3 ms of work, a small stall of the loop."""


class Recorder:
    """All measurements of one run (or one shard of it)."""

    def __init__(self, start_ns: int) -> None:
        self.start_ns = start_ns
        self.sets: dict[TagKey, MetricSet] = {}
        self.series: list[SecondStats] = []
        self.error_sample: list[dict[str, Any]] = []
        self._discard = GapBuffer()
        self._batches: list[PlainBatch] = []

    def plain_batch(self, key: TagKey, measure_from_ns: int) -> PlainBatch:
        """A new bulk buffer for ``key``'s plain requests, folded by every ``flush``."""
        batch = PlainBatch(self, key, measure_from_ns)
        self._batches.append(batch)
        return batch

    def per_second(self, stamps: list[int]) -> Iterator[tuple[SecondStats, int]]:
        """The seconds of ``stamps`` (non-empty), each with how many fell in it (one step when they share one)."""
        low, high = min(stamps), max(stamps)
        if (low - self.start_ns) // 1_000_000_000 == (high - self.start_ns) // 1_000_000_000:
            yield self.second(high), len(stamps)
            return
        for stamp in stamps:
            yield self.second(stamp), 1

    def metric_set(self, key: TagKey) -> MetricSet:
        found = self.sets.get(key)
        if found is None:
            found = self.sets[key] = MetricSet()
        return found

    def timeline(self, key: TagKey, intended_ns: int, measured: bool) -> Timeline:
        """A fresh timeline whose gaps go to ``key``'s buffer, or nowhere during warmup."""
        if not measured:
            self._discard.clear()
            return Timeline(intended_ns, self._discard)
        return Timeline(intended_ns, self.metric_set(key).gaps)

    def second(self, now_ns: int) -> SecondStats:
        t = max(0, (now_ns - self.start_ns) // 1_000_000_000)
        while not self.series or self.series[-1].t < t:
            if len(self.series) > SAMPLED_SECONDS:  # samples arrive only in the current second
                self.series[-SAMPLED_SECONDS - 1].seal()
            self.series.append(SecondStats(t=len(self.series)))
        return self.series[t] if t < len(self.series) else self.series[-1]

    def started(self, now_ns: int, intended_ns: int) -> None:
        sec = self.second(now_ns)
        sec.started += 1
        lag_us = (now_ns - intended_ns) // 1000
        if lag_us > sec.lag_max_us:
            sec.lag_max_us = lag_us

    def finished(self, key: TagKey, tl: Timeline, measured: bool) -> None:
        sec = self.second(tl.end_ns)
        sec.tokens += tl.tokens
        if tl.outcome in SUCCESSES:
            sec.succeeded += 1
        elif tl.outcome is not Outcome.CANCELLED:
            sec.failed += 1
            if tl.outcome is Outcome.CONNECT_ERROR:
                sec.connect_errors += 1
            if len(self.error_sample) < 100:
                self.error_sample.append({
                    "t_s": round((tl.end_ns - self.start_ns) / 1e9, 3), "outcome": str(tl.outcome),
                    "status": tl.status or None, "error": tl.error, "tags": dict(key),
                })  # fmt: skip
        if tl.first_token_ns:
            sec.ttft_us.append((tl.first_token_ns - tl.intended_ns) // 1000)
        if measured:
            self.metric_set(key).add(tl)

    def dropped(self, key: TagKey, now_ns: int, measured: bool) -> None:
        """An arrival that found no free VU (open model, ``max_vus`` reached): counted, never hidden."""
        self.second(now_ns).dropped += 1
        if measured:
            self.metric_set(key).dropped += 1

    def flush(self) -> None:
        for batch in self._batches:
            batch.fold()
        for s in self.sets.values():
            s.flush()

    def total(self) -> MetricSet:
        merged = MetricSet()
        for s in self.sets.values():
            merged.merge(s)
        return merged
