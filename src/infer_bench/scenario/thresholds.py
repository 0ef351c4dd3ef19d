"""Thresholds in k6's syntax: ``"itl{scenario:chat}": ["p(99)<50ms"]`` → a frozen ``Threshold``.

    thresholds:
      ttft: ["p(95)<500ms", "p(99)<1s"]
      "itl{scenario:chat}": ["p(99)<50ms"]
      disconnect_rate: [{threshold: "rate<0.01", abort_on_fail: true, delay_abort_eval: 10s}]
      dropped: ["count<1"]

A metric is of one kind, which decides the aggregations it takes (as in k6):

- **trend** (the histograms: ``ttft``, ``itl``, ``e2e`` …): ``avg``, ``min``, ``max``, ``med``, ``p(N)``,
  ``count``; a limit is a duration (``500ms``, ``1s``; a bare number is milliseconds, as in k6), or a
  plain number for ``output_tokens`` and for ``count``;
- **rate** (``completion_rate``, ``disconnect_rate``, ``error_rate``): ``rate``, a fraction 0…1;
- **counter** (``requests``, ``succeeded``, ``dropped``, ``tokens`` …): ``count``, or ``rate`` per second.

Parsing is pure and raises ``ThresholdSyntaxError`` with a message meant for the scenario's
``file:line path:`` prefix; the loader locates it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from infer_bench.metrics.recorder import COUNT_METRICS, METRICS
from infer_bench.scenario.durations import parse_duration

MetricKind = Literal["trend", "rate", "counter"]

RATE_METRICS: dict[str, str] = {
    "completion_rate": "successes / (requests − cancelled)",
    "disconnect_rate": "disconnected / requests",
    "error_rate": "failures / (requests − cancelled)",
}
COUNTER_METRICS: dict[str, str] = {
    "requests": "requests that ended, whatever their outcome",
    "succeeded": "requests that completed or were truncated",
    "failed": "requests that failed (every outcome but success and cancel)",
    "cancelled": "requests the client cancelled on purpose",
    "dropped": "open-model arrivals that found no free VU",
    "tokens": "tokens received",
    "reconnects": "SSE reconnects (Last-Event-ID resumes)",
}
AGGREGATIONS: dict[MetricKind, tuple[str, ...]] = {
    "trend": ("avg", "min", "max", "med", "p(N)", "count"),
    "rate": ("rate",),
    "counter": ("count", "rate"),
}
TAG_NAMES_BUILT_IN = ("scenario", "class", "protocol")
Operator = Literal["<", "<=", ">", ">=", "==", "!="]


def metric_kind(name: str) -> MetricKind | None:
    if name in METRICS:
        return "trend"
    if name in RATE_METRICS:
        return "rate"
    if name in COUNTER_METRICS:
        return "counter"
    return None


def known_metrics() -> list[str]:
    return [*METRICS, *RATE_METRICS, *COUNTER_METRICS]


class ThresholdSyntaxError(ValueError):
    """A threshold key or expression that cannot be read; the message says what was expected."""


@dataclass(frozen=True)
class Threshold:
    """One condition on one (sub-)metric; ``limit`` is in the metric's unit (ms for durations)."""

    key: str
    """The key as written, e.g. ``itl{scenario:chat}``."""
    metric: str
    tags: tuple[tuple[str, str], ...]
    expression: str
    """The condition as written, e.g. ``p(99)<50ms``."""
    aggregation: str
    """``avg``, ``min``, ``max``, ``med``, ``count``, ``rate``, or ``p`` with ``percentile``."""
    operator: Operator
    limit: float
    percentile: float | None = None
    abort_on_fail: bool = False
    delay_abort_eval_s: float = 0.0
    unit: str = field(default="")

    @property
    def kind(self) -> MetricKind:
        kind = metric_kind(self.metric)
        assert kind is not None  # checked by parse_threshold
        return kind

    @property
    def label(self) -> str:
        """``itl{scenario:chat} p(99)<50ms``: how reports name it."""
        return f"{self.key} {self.expression}"

    def holds(self, value: float) -> bool:
        return bool(_OPERATORS[self.operator](value, self.limit))


_OPERATORS = {
    "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b,
    ">": lambda a, b: a > b,
    ">=": lambda a, b: a >= b,
    "==": lambda a, b: a == b,
    "!=": lambda a, b: a != b,
}
_KEY = re.compile(r"\s*([A-Za-z_][A-Za-z0-9_]*)\s*(?:\{(.*)\})?\s*")
_EXPRESSION = re.compile(
    r"\s*(?P<agg>avg|min|max|med|count|rate|p\(\s*(?P<p>[0-9]+(?:\.[0-9]+)?)\s*\))\s*"
    r"(?P<op><=|>=|===|==|!=|<|>)\s*(?P<limit>\S+)\s*"
)
_NUMBER = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


def parse_key(key: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    """``itl{scenario:chat,class:a}`` → ``("itl", (("class", "a"), ("scenario", "chat")))``.

    Raises:
        ThresholdSyntaxError: not ``metric`` or ``metric{tag:value,…}``, or an unknown metric.
    """
    match = _KEY.fullmatch(key)
    if match is None:
        raise ThresholdSyntaxError(f"expected a metric name, or metric{{tag:value}}, got {key!r}")
    metric, filter_text = match[1], match[2]
    if metric_kind(metric) is None:
        import difflib

        close = difflib.get_close_matches(metric, known_metrics(), n=1, cutoff=0.6)
        hint = f"did you mean {close[0]!r}?" if close else f"expected one of: {', '.join(known_metrics())}"
        raise ThresholdSyntaxError(f"unknown metric {metric!r}; {hint}")
    tags: dict[str, str] = {}
    if filter_text is not None:
        for pair in filter_text.split(","):
            name, sep, value = pair.partition(":")
            name, value = name.strip(), value.strip()
            if not sep or not name or not value:
                raise ThresholdSyntaxError(f"expected tag:value pairs between braces, got {{{filter_text}}}")
            if name in tags:
                raise ThresholdSyntaxError(f"the tag {name!r} is filtered twice in {key!r}")
            tags[name] = value
    return metric, tuple(sorted(tags.items()))


def parse_threshold(
    key: str, expression: str, *, abort_on_fail: bool = False, delay_abort_eval_s: float = 0.0
) -> Threshold:
    """One threshold of the scenario's ``thresholds`` mapping.

    Raises:
        ThresholdSyntaxError: the key or expression cannot be read, or the aggregation does not fit the metric.
    """
    metric, tags = parse_key(key)
    kind = metric_kind(metric)
    assert kind is not None
    match = _EXPRESSION.fullmatch(expression)
    if match is None:
        raise ThresholdSyntaxError(
            f"expected AGGREGATION OPERATOR VALUE such as 'p(95)<500ms' or 'rate<0.01', got {expression!r}"
        )
    agg = "p" if match["p"] is not None else match["agg"]
    allowed = AGGREGATIONS[kind]
    if (agg == "p" and "p(N)" not in allowed) or (agg != "p" and agg not in allowed):
        raise ThresholdSyntaxError(
            f"{match['agg']} does not apply to {metric}, a {kind} metric; use one of: {', '.join(allowed)}"
        )
    percentile = float(match["p"]) if match["p"] is not None else None
    if percentile is not None and not 0 <= percentile <= 100:
        raise ThresholdSyntaxError(f"a percentile is between 0 and 100, got p({match['p']})")
    if agg == "med":
        agg, percentile = "p", 50.0
    operator = "==" if match["op"] == "===" else match["op"]
    limit, unit = _limit(metric, kind, agg, match["limit"])
    return Threshold(
        key=key.strip(), metric=metric, tags=tags, expression=expression.strip(), aggregation=agg,
        operator=operator, limit=limit, percentile=percentile, abort_on_fail=abort_on_fail,  # type: ignore[arg-type]
        delay_abort_eval_s=delay_abort_eval_s, unit=unit,
    )  # fmt: skip


def _limit(metric: str, kind: MetricKind, agg: str, text: str) -> tuple[float, str]:
    """The limit in the metric's unit: milliseconds for a duration, else a plain number."""
    is_duration = kind == "trend" and agg != "count" and metric not in COUNT_METRICS
    if _NUMBER.fullmatch(text):
        value = float(text)
        return value, ("ms" if is_duration else "/s" if kind == "counter" and agg == "rate" else "")
    if is_duration:
        try:
            return parse_duration(text) * 1000, "ms"
        except ValueError as exc:
            raise ThresholdSyntaxError(f"expected a duration such as 500ms or 1.5s, got {text!r} ({exc})") from None
    raise ThresholdSyntaxError(f"expected a number, got {text!r}")
