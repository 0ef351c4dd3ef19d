"""Server metrics: recorded cheaply on the event loop, exposed as Prometheus text and as JSON.

prometheus-client's own ``Histogram.observe`` takes a lock and walks the buckets, which adds up at tens
of thousands of tokens a second. Everything here runs on one event loop thread, so the metrics are plain
counters behind ``bisect``, with a count-weighted ``observe`` (one call per batch step, not per token
where the value is shared). A custom collector hands them to prometheus-client for exposition.

Names are prefixed ``inferbench_``; no label ever carries a client identity (unbounded cardinality).
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

LATENCY_BOUNDS_S: tuple[float, ...] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip
SIZE_BOUNDS: tuple[float, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)

PREFIX = "inferbench_"


class Histogram:
    """Cumulative-bucket histogram with Prometheus ``le`` semantics; not thread-safe by design."""

    __slots__ = ("bounds", "count", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last slot is +Inf
        self.count = 0
        self.sum = 0.0

    def observe(self, value: float, n: int = 1) -> None:
        self.counts[bisect_left(self.bounds, value)] += n
        self.count += n
        self.sum += value * n

    def quantile(self, q: float) -> float | None:
        """Upper bound of the bucket holding quantile ``q``: coarse, for /stats at a glance."""
        if self.count == 0:
            return None
        rank = q * self.count
        seen = 0
        for bound, c in zip(self.bounds, self.counts, strict=False):
            seen += c
            if seen >= rank:
                return bound
        return float("inf")

    def summary(self) -> dict[str, float | int | None]:
        mean = self.sum / self.count if self.count else None
        return {"count": self.count, "sum": self.sum, "mean": mean,
                "p50_le": self.quantile(0.5), "p90_le": self.quantile(0.9), "p99_le": self.quantile(0.99)}  # fmt: skip


class Family:
    """A metric with a fixed label set; children are created on first use."""

    def __init__(self, kind: str, name: str, doc: str, labels: tuple[str, ...], factory: Callable[[], Any]) -> None:
        self.kind, self.name, self.doc, self.labels = kind, PREFIX + name, doc, labels
        self._factory = factory
        self.children: dict[tuple[str, ...], Any] = {}

    def child(self, *values: str) -> Any:
        try:
            return self.children[values]
        except KeyError:
            made = self.children[values] = self._factory()
            return made


class Counter:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, n: float = 1) -> None:
        self.value += n


class ServerMetrics:
    """Every metric the reference server keeps. One instance per app (tests get fresh ones)."""

    def __init__(self) -> None:
        def hist(
            name: str, doc: str, labels: tuple[str, ...] = (), bounds: tuple[float, ...] = LATENCY_BOUNDS_S
        ) -> Family:
            return self._add(Family("histogram", name, doc, labels, lambda: Histogram(bounds)))

        def counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> Family:
            return self._add(Family("counter", name, doc, labels, Counter))

        self._families: list[Family] = []
        self._gauges: list[tuple[str, str, tuple[str, ...], Callable[[], dict[tuple[str, ...], float]]]] = []
        self._counter_reads: list[tuple[str, str, tuple[str, ...], Callable[[], dict[tuple[str, ...], float]]]] = []
        self.request_duration = hist(
            "request_duration_seconds", "HTTP request handling time, headers in to body out", ("endpoint",)
        )
        self.requests = counter("requests_total", "Requests answered, by endpoint and status", ("endpoint", "status"))
        self.queue_wait = hist("queue_wait_seconds", "Time from enqueue to joining a batch", ("kind",))
        self.batch_execution = hist("batch_execution_seconds", "Model time of one batch or decode step", ("kind",))
        self.e2e = hist("e2e_duration_seconds", "Enqueue to last result, per request", ("kind",))
        self.ttft = hist("ttft_seconds", "Enqueue to first generated token")
        self.itl = hist("inter_token_seconds", "Gap between consecutive tokens of one sequence")
        self.batch_size = hist("batch_size", "Requests or sequences per batch or decode step", ("kind",), SIZE_BOUNDS)
        self.batches = counter(
            "batches_total", "Batches by flush reason (size, timeout, drain) or step", ("kind", "reason")
        )
        self.batch_failures = counter("batch_failures_total", "Batches or steps in which the model raised", ("kind",))
        self.rejections = counter("rejections_total", "Requests refused before running, by reason", ("reason",))
        self.tokens = counter("tokens_generated_total", "Tokens produced by generative models")
        self.sequences = counter("sequences_total", "Generation requests ended, by outcome", ("outcome",))  # fmt: skip
        self.lease_expiries = counter("lease_expiries_total", "Stream leases reclaimed by their TTL, not released")
        self.timeouts = counter(
            "stream_timeouts_total", "Streams ended by a time limit", ("kind",)
        )  # kind: first_token, inactivity, total
        self.aborts = counter(
            "stream_aborts_total", "Streams abandoned by their reader: generation stopped", ("transport", "cause")
        )  # cause: disconnect, cancel
        self.slow_warnings = counter(
            "slow_consumer_warnings_total", "Streams warned that their send buffer is 80 % full", ("transport",)
        )
        self.slow_drops = counter(
            "slow_consumer_drops_total", "Streams dropped for reading too slowly", ("transport", "cause")
        )  # cause: buffer_full, send_timeout
        self.resumes = counter("resumes_total", "Stream resume attempts by result", ("result",))
        self.heartbeats = counter("heartbeats_total", "Heartbeats sent on idle streams", ("transport",))
        self.model_loads = counter("model_loads_total", "Model version loads by result", ("model", "result"))
        self.model_swaps = counter("model_swaps_total", "Serving version changes", ("model",))
        self.active_connections = self.gauge_family(
            "active_connections", "Open client streams and requests by transport", ("transport",)
        )

    def _add(self, family: Family) -> Family:
        self._families.append(family)
        return family

    def gauge_family(self, name: str, doc: str, labels: tuple[str, ...]) -> dict[tuple[str, ...], float]:
        """A gauge kept as a plain dict the caller mutates; read at scrape time."""
        values: dict[tuple[str, ...], float] = {}
        self._gauges.append((PREFIX + name, doc, labels, lambda: values))
        return values

    def gauge_callback(
        self, name: str, doc: str, labels: tuple[str, ...], read: Callable[[], dict[tuple[str, ...], float]]
    ) -> None:
        """A gauge computed when scraped (queue depth, running sequences): free on the hot path."""
        self._gauges.append((PREFIX + name, doc, labels, read))

    def counter_callback(
        self, name: str, doc: str, labels: tuple[str, ...], read: Callable[[], dict[tuple[str, ...], float]]
    ) -> None:
        """A counter kept elsewhere (another process, Redis) and read when scraped; ``name`` ends ``_total``."""
        self._counter_reads.append((PREFIX + name, doc, labels, read))

    def connection_opened(self, transport: str) -> None:
        self.active_connections[(transport,)] = self.active_connections.get((transport,), 0) + 1

    def connection_closed(self, transport: str) -> None:
        self.active_connections[(transport,)] -= 1

    def collect(self) -> Iterator[Any]:
        for fam in self._families:
            if fam.kind == "histogram":
                h = HistogramMetricFamily(fam.name, fam.doc, labels=list(fam.labels))
                for values, hist in fam.children.items():
                    running, buckets = 0, []
                    for bound, c in zip((*hist.bounds, float("inf")), hist.counts, strict=True):
                        running += c
                        buckets.append((_le(bound), running))
                    h.add_metric(list(values), buckets, hist.sum)
                yield h
            else:
                c = CounterMetricFamily(fam.name.removesuffix("_total"), fam.doc, labels=list(fam.labels))
                for values, counter in fam.children.items():
                    c.add_metric(list(values), counter.value)
                yield c
        for name, doc, labels, read in self._gauges:
            g = GaugeMetricFamily(name, doc, labels=list(labels))
            for values, value in read().items():
                g.add_metric(list(values), value)
            yield g
        for name, doc, labels, read in self._counter_reads:
            c = CounterMetricFamily(name.removesuffix("_total"), doc, labels=list(labels))
            for values, value in read().items():
                c.add_metric(list(values), value)
            yield c

    def snapshot(self) -> dict[str, Any]:
        """The same figures as JSON for ``/stats``: counters, gauges and histogram summaries."""
        out: dict[str, Any] = {}
        for fam in self._families:
            entries = []
            for values, child in sorted(fam.children.items()):
                named = dict(zip(fam.labels, values, strict=True))
                stat = child.summary() if isinstance(child, Histogram) else {"value": child.value}
                entries.append({"labels": named, **stat})
            out[fam.name] = entries
        for name, _doc, labels, read in [*self._gauges, *self._counter_reads]:
            out[name] = [{"labels": dict(zip(labels, k, strict=True)), "value": v} for k, v in sorted(read().items())]
        return out


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(float(bound))


class _Exposition(Collector):
    def __init__(self, metrics: ServerMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Any]:
        return self._metrics.collect()


def exposition(metrics: ServerMetrics) -> Callable[[], bytes]:
    """A function rendering ``metrics`` in the Prometheus text format, on a private registry."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Exposition(metrics))
    return lambda: generate_latest(registry)
