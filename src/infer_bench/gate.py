"""Regression gates: does CURRENT regress beyond its budget against BASELINE, by more than noise?

A rule fails only when both hold:

1. the change is beyond the budget (``ttft.p99=10%``: p99 TTFT more than 10 % above the baseline);
2. the change is more than run-to-run noise: the bootstrap interval of the change (``noise.py``: whole
   time windows of each run resampled) lies entirely on the worse side of zero.

A result without interval histograms (schema v1) or a run shorter than ``noise.MIN_WINDOWS`` windows
has no noise estimate: its rules are judged on the budget alone, and the decision says so.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from infer_bench.errors import UsageError
from infer_bench.intervals import Window, recorded, windows_of
from infer_bench.noise import Change, Windowed, bootstrap_change, bootstrap_rate_change
from infer_bench.scenario.gates import GateRule, GateSyntaxError, parse_gate

_SERIES_FIELD = {"request_rate": "succeeded", "token_rate": "tokens"}


@dataclass(frozen=True)
class Decision:
    rule: GateRule
    change: Change | None
    """None when a run has no data for the figure."""
    regressed: bool
    reason: str

    @property
    def worse_by(self) -> float | None:
        """The change towards worse (positive = worse), in the rule's unit (fraction or ms)."""
        if self.change is None:
            return None
        return self.change.change if self.rule.higher_is_worse else -self.change.change


def rules_of(result: dict[str, Any]) -> tuple[list[GateRule], float]:
    """The ``gates:`` block of the scenario a result was run from, and its confidence.

    Raises:
        UsageError: a rule in the file cannot be read (the file was edited by hand).
    """
    gates = result.get("scenario", {}).get("gates") or {}
    try:
        rules = [parse_gate(figure, budget) for figure, budget in (gates.get("max_regression") or {}).items()]
    except GateSyntaxError as exc:
        raise UsageError(f"the result's gates: {exc}") from None
    return rules, float(gates.get("confidence", 0.95))


def decide(
    baseline: dict[str, Any],
    current: dict[str, Any],
    rules: Sequence[GateRule],
    *,
    confidence: float = 0.95,
    resamples: int = 1000,
) -> list[Decision]:
    """One decision per rule; the bootstrap is seeded per rule, so the same files decide the same way."""
    decisions = []
    windows = (windows_of(baseline), windows_of(current))  # decoded once for all rules
    for index, rule in enumerate(rules):
        try:
            change = _change(baseline, current, windows, rule, confidence, resamples, seed=index)
        except ValueError as exc:
            decisions.append(Decision(rule, None, False, f"not compared: {exc}"))
            continue
        decisions.append(_judge(rule, change, confidence))
    return decisions


def _judge(rule: GateRule, change: Change, confidence: float) -> Decision:
    worse = change.change if rule.higher_is_worse else -change.change
    beyond = worse > rule.budget
    word = "worse" if worse > 0 else "better" if worse < 0 else "unchanged"
    shown = f"{word}: {_show(change.change, rule.relative)}"
    if change.interval is None:
        return Decision(rule, change, beyond, f"{shown} (no noise estimate: too few windows)")
    low, high = change.interval
    significant = (low > 0) if rule.higher_is_worse else (high < 0)
    interval = f"{confidence:.0%} interval {_show(low, rule.relative)} … {_show(high, rule.relative)}"
    if beyond and significant:
        return Decision(rule, change, True, f"{shown}, beyond {rule.budget_text}; {interval}")
    if beyond:
        return Decision(rule, change, False, f"{shown}, within noise; {interval}")
    return Decision(rule, change, False, f"{shown}; {interval}")


def _show(value: float, relative: bool) -> str:
    return f"{value * 100:+.1f}%" if relative else f"{value:+.2f} ms"


def _change(
    baseline: dict[str, Any],
    current: dict[str, Any],
    windows: tuple[list[Window], list[Window]],
    rule: GateRule,
    confidence: float,
    resamples: int,
    seed: int,
) -> Change:
    if rule.stat is None:
        field = _SERIES_FIELD[rule.metric]
        return bootstrap_rate_change(
            _per_second(baseline, field), _per_second(current, field),
            confidence=confidence, resamples=resamples, seed=seed,
        )  # fmt: skip
    base, cur = _windowed(windows[0], rule.metric), _windowed(windows[1], rule.metric)
    scale = 1.0 if rule.relative else 1000.0  # windows hold µs; absolute budgets are ms
    if base is None or cur is None:
        return _summary_change(baseline, current, rule)
    change = bootstrap_change(
        base, cur, rule.percentile, relative=rule.relative, confidence=confidence, resamples=resamples, seed=seed
    )
    if rule.relative:
        return Change(change.baseline / 1000, change.current / 1000, change.change, change.interval)
    interval = (change.interval[0] / scale, change.interval[1] / scale) if change.interval else None
    return Change(change.baseline / scale, change.current / scale, change.change / scale, interval)


def _windowed(windows: list[Window], metric: str) -> Windowed | None:
    if not windows:
        return None
    empty: list[tuple[int, int]] = []
    return Windowed.from_counts(recorded(w.histograms[metric]) if metric in w.histograms else empty for w in windows)


def _summary_change(baseline: dict[str, Any], current: dict[str, Any], rule: GateRule) -> Change:
    """A v1 result: the summary figures alone, with no interval."""
    key = rule.stat if rule.stat != "mean" else "mean"
    try:
        before = float(baseline["total"]["summary"][rule.metric][key])
        after = float(current["total"]["summary"][rule.metric][key])
    except KeyError:
        raise ValueError(f"no {rule.metric} figures in one of the runs") from None
    change = after / before - 1 if rule.relative else after - before
    return Change(before, after, change, None)


def _per_second(result: dict[str, Any], field: str) -> list[float]:
    """Whole seconds while the load ran: past every warmup, before any load ended (and not the last,
    partial second), so ramp-down and graceful stop do not pass for noise."""
    series = (result.get("series") or [])[:-1]
    start, end = load_span(result)
    inside = [s for s in series if s["t"] >= start and s["t"] + 1 <= end]
    return [float(s.get(field, 0)) for s in (inside if len(inside) >= 2 else series)]


def load_span(result: dict[str, Any]) -> tuple[float, float]:
    """From the end of the latest warmup to the end of the earliest-ending load, in seconds of the run."""
    start, end = 0.0, float("inf")
    for spec in (result.get("scenario", {}).get("scenarios") or {}).values():
        begin = float(spec.get("start_time", 0.0))
        start = max(start, begin + float(spec.get("warmup", 0.0)))
        executor = spec.get("executor") or {}
        if "duration" in executor:
            end = min(end, begin + float(executor["duration"]))
        elif executor.get("stages"):
            end = min(end, begin + sum(float(stage.get("duration", 0.0)) for stage in executor["stages"]))
    return start, end
