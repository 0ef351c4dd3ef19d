"""Regression budgets: ``ttft.p99=10%``, ``throughput=-5%``, ``itl.p50=+2ms`` → a frozen ``GateRule``.

A rule names a figure of a run and how much worse it may get against a baseline: a relative budget
(``10%``) or, for latencies, an absolute one (``5ms``). Which way is worse is the figure's own: latency
up, throughput down. A sign may be written and must then point the worse way (``throughput=-5%``);
``ttft.p99=-10%`` is an error rather than a silent guess.

Figures: ``METRIC.STAT`` for the latency histograms (STAT: mean, p50, p90, p95, p99, p999), and
``throughput`` (successful requests per second) and ``token_throughput`` (tokens per second).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from infer_bench.metrics.recorder import COUNT_METRICS, METRICS
from infer_bench.scenario.durations import parse_duration

STATS: dict[str, float | None] = {"mean": None, "p50": 50.0, "p90": 90.0, "p95": 95.0, "p99": 99.0, "p999": 99.9}
RATE_FIGURES = {"throughput": "request_rate", "token_throughput": "token_rate"}
"""Rules on these figures compare the result's headline rates (higher is better)."""
LATENCY_METRICS = tuple(m for m in METRICS if m not in COUNT_METRICS)


class GateSyntaxError(ValueError):
    """A rule that cannot be read; the message says what was expected."""


@dataclass(frozen=True)
class GateRule:
    """How much worse one figure may get. ``budget`` is a fraction (relative) or milliseconds (absolute)."""

    figure: str
    """As written: ``ttft.p99``, ``throughput``."""
    metric: str
    """A histogram metric (``ttft``), or ``request_rate`` / ``token_rate``."""
    stat: str | None
    budget: float
    relative: bool
    higher_is_worse: bool

    @property
    def percentile(self) -> float | None:
        return STATS.get(self.stat) if self.stat else None

    @property
    def budget_text(self) -> str:
        sign = "+" if self.higher_is_worse else "-"
        return f"{sign}{self.budget * 100:g}%" if self.relative else f"{sign}{self.budget:g}ms"

    @property
    def label(self) -> str:
        return f"{self.figure} {self.budget_text}"


_BUDGET = re.compile(r"\s*([+-]?)\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*(%|[a-zµ]+)\s*")


def parse_gate(figure: str, budget: str | float) -> GateRule:
    """One rule: ``parse_gate("ttft.p99", "10%")``.

    Raises:
        GateSyntaxError: an unknown figure, or a budget that is not a signed percentage or duration.
    """
    figure = figure.strip()
    if figure in RATE_FIGURES:
        metric, stat, higher_is_worse = RATE_FIGURES[figure], None, False
    else:
        metric, dot, stat_text = figure.partition(".")
        if metric not in LATENCY_METRICS or not dot or stat_text not in STATS:
            figures = [*(f"{m}.STAT" for m in LATENCY_METRICS), *RATE_FIGURES]
            raise GateSyntaxError(
                f"unknown figure {figure!r}; expected one of {', '.join(figures)} (STAT: {', '.join(STATS)})"
            )
        stat, higher_is_worse = stat_text, True
    if isinstance(budget, bool) or not isinstance(budget, str):
        raise GateSyntaxError(f"{figure}: write the budget with its unit, as 10% or 5ms, got {budget!r}")
    match = _BUDGET.fullmatch(budget)
    if match is None:
        raise GateSyntaxError(f"{figure}: expected a budget such as 10%, -5% or 5ms, got {budget!r}")
    sign, number, unit = match.groups()
    if sign and (sign == "-") == higher_is_worse:
        worse = "rises" if higher_is_worse else "falls"
        good = f"{'+' if higher_is_worse else '-'}{number}{unit}"
        raise GateSyntaxError(
            f"{figure} gets worse as it {worse}: its budget is {good} (or {number}{unit}), not {budget}"
        )
    if unit == "%":
        return GateRule(figure, metric, stat, float(number) / 100, True, higher_is_worse)
    if stat is None:
        raise GateSyntaxError(f"{figure}: a rate takes a relative budget such as -5%, got {budget!r}")
    try:
        seconds = parse_duration(f"{number}{unit}")
    except ValueError:
        raise GateSyntaxError(f"{figure}: expected % or a duration unit (ms, s, us), got {budget!r}") from None
    return GateRule(figure, metric, stat, seconds * 1000, False, higher_is_worse)


def parse_gate_option(text: str) -> GateRule:
    """``--max-regression ttft.p99=10%``.

    Raises:
        GateSyntaxError: no ``=``, or as ``parse_gate``.
    """
    figure, sep, budget = text.partition("=")
    if not sep:
        raise GateSyntaxError(f"expected FIGURE=BUDGET such as ttft.p99=10%, got {text!r}")
    return parse_gate(figure, budget)
