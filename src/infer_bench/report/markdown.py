"""A Markdown report: fits a CI step summary (``$GITHUB_STEP_SUMMARY``) or a pull-request comment."""

from __future__ import annotations

from typing import Any

from infer_bench.report.figures import LABELS, ORDER, STAT_COLUMNS, format_ms, run_name, unit_of
from infer_bench.thresholds import format_value, stored_results

_STATUS = {"complete": "✅ complete", "interrupted": "⚠️ interrupted", "aborted": "❌ aborted"}


def render_markdown(results: list[dict[str, Any]]) -> str:
    """One section per run: thresholds, headline figures, latency table, outcomes, warnings."""
    return "\n".join(_section(result, index) for index, result in enumerate(results))


def _section(result: dict[str, Any], index: int) -> str:
    head = result["headline"]
    scenario = result.get("scenario", {})
    lines = [
        f"## infer-bench · {run_name(result, index)}",
        "",
        f"`{scenario.get('source', '')}` → `{scenario.get('target', '')}` · {result['duration_s']:.1f} s · "
        f"{_STATUS.get(result['status'], result['status'])}"
        + (f" ({_escape(result['stop_reason'])})" if result.get("stop_reason") else ""),
        "",
    ]
    thresholds = stored_results(result)
    if thresholds is not None:
        failed = sum(not t.ok for t in thresholds)
        lines += [
            f"**Thresholds: {len(thresholds) - failed} passed, {failed} failed**",
            "",
            "| | metric | condition | value |",
            "|---|---|---|---:|",
        ]
        for t in thresholds:
            note = " (aborted the run)" if t.aborted else ""
            mark = "✅" if t.ok else "❌"
            value = format_value(t.value, t.unit)
            lines.append(f"| {mark} | `{_escape(t.metric)}` | `{_escape(t.expression)}` | {value}{note} |")
        lines.append("")
    lines += [
        "| requests | succeeded | req/s | tokens/s | completion | disconnects | errors | dropped |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {head['requests']:,} | {head['succeeded']:,} | {head['request_rate']:,.1f} | {head['token_rate']:,.0f} "
        f"| {head['completion_rate']:.2%} | {head['disconnect_rate']:.2%} | {head['error_rate']:.2%} "
        f"| {head['dropped']:,} |",
        "",
        "| metric | " + " | ".join(STAT_COLUMNS) + " | count |",
        "|---|" + "---:|" * (len(STAT_COLUMNS) + 1),
    ]
    summary = result["total"]["summary"]
    for metric in ORDER:
        stat = summary.get(metric)
        if stat is None:
            continue
        unit = unit_of(metric)
        cells = " | ".join(format_ms(stat.get(c), unit) for c in STAT_COLUMNS)
        lines.append(f"| {LABELS[metric]} | {cells} | {stat['count']:,} |")
    outcomes = result["total"].get("outcomes") or {}
    if outcomes:
        lines += ["", "Outcomes: " + " · ".join(f"{k} {v:,}" for k, v in sorted(outcomes.items()))]
    for warning in result.get("warnings", []):
        lines += ["", f"> ⚠️ {_escape(warning)}"]
    lines.append("")
    return "\n".join(lines)


def _escape(text: str) -> str:
    return text.replace("|", "\\|")
