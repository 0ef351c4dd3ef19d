"""Checking thresholds against a run's figures: at the end of the run, and each second for ``abort_on_fail``.

A threshold whose (sub-)metric has no data — no TTFT because every request failed, a tag filter that
matched nothing — fails at the end of the run: a CI check that passes because nothing was measured is
worse than one that fails. During the run, a threshold without data yet is not checked.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from infer_bench.measures import Measures
from infer_bench.scenario.thresholds import Threshold


@dataclass(frozen=True)
class ThresholdResult:
    threshold: Threshold
    value: float | None
    """The figure the condition was checked on, in the threshold's unit; None when there was no data."""
    ok: bool
    aborted: bool = False
    """This threshold stopped the run (``abort_on_fail``)."""

    def to_json(self) -> dict[str, Any]:
        t = self.threshold
        return {
            "metric": t.key, "expression": t.expression, "ok": self.ok,
            "value": None if self.value is None else round(self.value, 6), "unit": t.unit,
            "abort_on_fail": t.abort_on_fail, "aborted": self.aborted,
        }  # fmt: skip


@dataclass(frozen=True)
class StoredResult:
    """A threshold result as read back from a result file (reports need no parsing of expressions)."""

    metric: str
    expression: str
    ok: bool
    value: float | None
    unit: str
    aborted: bool

    @property
    def label(self) -> str:
        return f"{self.metric} {self.expression}"

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StoredResult:
        return cls(
            data["metric"], data["expression"], bool(data["ok"]), data.get("value"), data.get("unit", ""),
            bool(data.get("aborted", False)),
        )  # fmt: skip


def observe(threshold: Threshold, measures: Measures) -> float | None:
    """The figure ``threshold`` is about, or None when there is nothing to measure yet."""
    selection = measures.select(threshold.tags)
    kind = threshold.kind
    if kind == "trend":
        return selection.trend(threshold.metric, threshold.aggregation, threshold.percentile)
    if kind == "rate":
        return selection.rate(threshold.metric)
    count = selection.count(threshold.metric)
    if threshold.aggregation == "count":
        return float(count)
    return count / measures.duration_s if measures.duration_s > 0 else None


def evaluate(
    thresholds: Iterable[Threshold], measures: Measures, aborted_by: Threshold | None = None
) -> list[ThresholdResult]:
    """Every threshold checked on the final figures; ``aborted_by`` is marked as the one that stopped the run."""
    results = []
    for threshold in thresholds:
        value = observe(threshold, measures)
        ok = value is not None and threshold.holds(value)
        results.append(ThresholdResult(threshold, value, ok, aborted=threshold is aborted_by))
    return results


def first_abort(thresholds: Sequence[Threshold], measures: Measures, elapsed_s: float) -> ThresholdResult | None:
    """The first ``abort_on_fail`` threshold that fails now, past its ``delay_abort_eval``; None if none does."""
    for threshold in thresholds:
        if not threshold.abort_on_fail or elapsed_s < threshold.delay_abort_eval_s:
            continue
        value = observe(threshold, measures)
        if value is not None and not threshold.holds(value):
            return ThresholdResult(threshold, value, ok=False, aborted=True)
    return None


def stored_results(result: dict[str, Any]) -> list[StoredResult] | None:
    """The thresholds of a result file; None when the run did not check any (or skipped them)."""
    stored = result.get("thresholds")
    if not stored:
        return None
    return [StoredResult.from_json(item) for item in stored]


def format_value(value: float | None, unit: str) -> str:
    if value is None:
        return "no data"
    if unit == "ms":
        return f"{value:,.2f} ms" if value < 1000 else f"{value / 1000:,.3f} s"
    if unit == "/s":
        return f"{value:,.2f}/s"
    if float(value).is_integer():
        return f"{value:,.0f}"
    return f"{value:.4g}"
