"""Shared vocabulary of the reports: metric order and labels, number formatting, run names."""

from __future__ import annotations

from pathlib import Path
from typing import Any

ORDER = ("ttft", "ttft_sent", "itl", "tpot", "e2e", "e2e_sent", "headers", "output_tokens", "schedule_lag")
LABELS = {
    "ttft": "time to first token",
    "ttft_sent": "TTFT from actual send",
    "itl": "inter-token latency",
    "tpot": "time per output token",
    "e2e": "end to end",
    "e2e_sent": "E2E from actual send",
    "headers": "time to headers",
    "output_tokens": "output tokens",
    "schedule_lag": "client schedule lag",
}
STAT_COLUMNS = ("mean", "p50", "p90", "p95", "p99", "p999", "max")


def unit_of(metric: str) -> str:
    return "" if metric == "output_tokens" else "ms"


def format_ms(value: float | None, unit: str = "ms") -> str:
    """``12.35 ms``, ``1.234 s``; plain counts for ``unit=""``."""
    if value is None:
        return "–"
    if unit == "":
        return f"{value:,.0f}"
    if abs(value) >= 10_000:
        return f"{value / 1000:,.2f} s"
    return f"{value:,.2f} ms" if abs(value) < 100 else f"{value:,.1f} ms"


def run_name(result: dict[str, Any], index: int = 0) -> str:
    """A short name for a run in a report: its file name, else its scenario and start time."""
    path = result.get("source_path")
    if path:
        return Path(path).stem
    scenario = Path(str(result.get("scenario", {}).get("source", "run"))).stem
    return f"{scenario}@{result.get('started_at', index)}"
