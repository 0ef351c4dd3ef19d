"""Two runs side by side: every figure with its absolute and relative change, and whether runs compare.

The direction of "better" is the figure's own: lower latency, higher throughput and completion, fewer
errors. Changes within ``SAME_WITHIN`` are shown as unchanged: run-to-run noise is larger than that.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from infer_bench.report.figures import ORDER, STAT_COLUMNS

SAME_WITHIN = 0.01
Verdict = Literal["better", "worse", "same", "new", "gone"]
HEADLINE = (
    ("request_rate", "throughput (req/s)", False),
    ("token_rate", "token throughput (tok/s)", False),
    ("completion_rate", "completion rate", False),
    ("error_rate", "error rate", True),
    ("disconnect_rate", "disconnect rate", True),
    ("dropped", "dropped arrivals", True),
)


@dataclass(frozen=True)
class Row:
    figure: str
    """``ttft.p99``, ``request_rate``."""
    label: str
    baseline: float | None
    current: float | None
    unit: str
    higher_is_worse: bool | None
    """None: neither direction is better (output tokens)."""

    @property
    def delta(self) -> float | None:
        if self.baseline is None or self.current is None:
            return None
        return self.current - self.baseline

    @property
    def relative(self) -> float | None:
        if self.delta is None or not self.baseline:
            return None
        return self.delta / self.baseline

    @property
    def verdict(self) -> Verdict:
        if self.baseline is None:
            return "new"
        if self.current is None:
            return "gone"
        rel = self.relative
        if self.higher_is_worse is None or self.delta == 0 or (rel is not None and abs(rel) < SAME_WITHIN):
            return "same"
        assert self.delta is not None
        return "worse" if (self.delta > 0) == self.higher_is_worse else "better"


@dataclass(frozen=True)
class Comparison:
    rows: list[Row]
    warnings: list[str]
    """Why the two runs may not be comparable."""
    notes: list[str]
    """Differences worth knowing that do not make runs incomparable (git revision, …)."""


def compare_results(baseline: dict[str, Any], current: dict[str, Any]) -> Comparison:
    rows = []
    for key, label, higher_is_worse in HEADLINE:
        rows.append(
            Row(key, label, _get(baseline["headline"], key), _get(current["headline"], key), "", higher_is_worse)
        )
    before, after = baseline["total"]["summary"], current["total"]["summary"]
    for metric in ORDER:
        if metric not in before and metric not in after:
            continue
        for stat in STAT_COLUMNS:
            unit = "" if metric == "output_tokens" else "ms"
            worse = None if metric == "output_tokens" else True
            figure = (f"{metric}.{stat}", f"{metric} {stat}")
            values = (_get(before.get(metric), stat), _get(after.get(metric), stat))
            rows.append(Row(*figure, *values, unit, worse))
    warnings, notes = comparability(baseline, current)
    return Comparison(rows, warnings, notes)


def _get(mapping: dict[str, Any] | None, key: str) -> float | None:
    if not mapping or mapping.get(key) is None:
        return None
    return float(mapping[key])


_ENVIRONMENT = (
    ("cpu", "CPU"),
    ("cpu_count", "CPU count"),
    ("machine", "architecture"),
    ("python", "Python"),
    ("implementation", "Python implementation"),
    ("infer_bench", "infer-bench version"),
)


def comparability(baseline: dict[str, Any], current: dict[str, Any]) -> tuple[list[str], list[str]]:
    """Warnings (the runs may not be comparable) and notes (they differ in an expected way)."""
    warnings: list[str] = []
    notes: list[str] = []
    for name, result in (("baseline", baseline), ("current", current)):
        if result.get("status") != "complete":
            warnings.append(f"the {name} run did not complete (status {result.get('status')})")
        for warning in result.get("warnings", []):
            if "CPU" in warning or "late" in warning:
                warnings.append(f"the {name} run's client was overloaded: {warning}")
    env_b, env_c = baseline.get("environment", {}), current.get("environment", {})
    for key, label in _ENVIRONMENT:
        if key in env_b and key in env_c and env_b[key] != env_c[key]:
            warnings.append(f"{label} differs: {env_b[key]} → {env_c[key]}")
    scen_b, scen_c = baseline.get("scenario", {}), current.get("scenario", {})
    if _canonical(scen_b.get("scenarios")) != _canonical(scen_c.get("scenarios")):
        names = sorted(set(scen_b.get("scenarios", {})) | set(scen_c.get("scenarios", {})))
        differ = [
            n
            for n in names
            if _canonical(scen_b.get("scenarios", {}).get(n)) != _canonical(scen_c.get("scenarios", {}).get(n))
        ]
        warnings.append(f"the scenarios differ ({', '.join(differ)}): not the same load")
    if _canonical(scen_b.get("reference")) != _canonical(scen_c.get("reference")):
        notes.append("the reference server's settings differ (expected when comparing server settings)")
    if scen_b.get("target_kind", "url") == "url" and scen_b.get("target") != scen_c.get("target"):
        notes.append(f"targets differ: {scen_b.get('target')} → {scen_c.get('target')}")
    duration_b, duration_c = float(baseline.get("duration_s", 0)), float(current.get("duration_s", 0))
    if duration_b and duration_c and abs(duration_c / duration_b - 1) > 0.2:
        warnings.append(f"durations differ: {duration_b:.1f} s → {duration_c:.1f} s")
    rev_b, rev_c = env_b.get("git_revision"), env_c.get("git_revision")
    if rev_b and rev_c and rev_b != rev_c:
        notes.append(f"git revision {rev_b[:12]} → {rev_c[:12]}")
    for name, result in (("baseline", baseline), ("current", current)):
        if not (result.get("intervals") or {}).get("windows"):
            version = result.get("version")
            notes.append(f"the {name} result has no interval histograms (schema v{version}): no noise estimate")
    return warnings, notes


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)
