"""The end-of-run summary: thresholds (✓/✗), headline figures, a latency table per metric, the outcomes."""

from __future__ import annotations

from typing import Any

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from infer_bench.thresholds import format_value, stored_results

ORDER = ("ttft", "ttft_sent", "itl", "tpot", "e2e", "e2e_sent", "headers", "output_tokens", "schedule_lag")
LABELS = {
    "ttft": "time to first token",
    "ttft_sent": "  … from actual send",
    "itl": "inter-token latency",
    "tpot": "time per output token",
    "e2e": "end to end",
    "e2e_sent": "  … from actual send",
    "headers": "time to headers",
    "output_tokens": "output tokens",
    "schedule_lag": "client schedule lag",
}


def _fmt(value: float, unit: str) -> str:
    if unit == "":
        return f"{value:,.0f}"
    if value >= 10_000:
        return f"{value / 1000:,.2f} s"
    return f"{value:,.2f} ms" if value < 100 else f"{value:,.1f} ms"


def render_summary(result: dict[str, Any]) -> Group:
    head = result["headline"]
    scenario = result["scenario"]
    status = result["status"]
    title = Text.assemble(
        ("infer-bench ", "bold"), (scenario.get("source", ""), "cyan"), " → ", scenario.get("target", ""),
        f" · {result['duration_s']:.1f} s · ",
        (status, {"complete": "green", "aborted": "bold red"}.get(status, "bold yellow")),
        (f" ({result['stop_reason']})" if result.get("stop_reason") else "", "yellow"),
    )  # fmt: skip
    figures = Text.assemble(
        ("requests ", "dim"), f"{head['requests']:,}", ("  succeeded ", "dim"), f"{head['succeeded']:,} ",
        (f"({head['request_rate']:,.1f}/s)", "dim"),
        ("  completion ", "dim"), _rate(head["completion_rate"], good_when_high=True),
        ("  disconnects ", "dim"), _rate(head["disconnect_rate"]),
        ("  errors ", "dim"), _rate(head["error_rate"]),
        ("  dropped ", "dim"), (f"{head['dropped']:,}", "bold red" if head["dropped"] else ""),
        ("  tokens ", "dim"), f"{head['tokens']:,} ", (f"({head['token_rate']:,.0f}/s)", "dim"),
    )  # fmt: skip
    parts: list[Any] = [*render_thresholds(result), title, figures]
    if "requested_rate" in head:
        parts.append(Text.assemble(
            ("open model: requested ", "dim"), f"{head['requested_rate']:,.1f}/s",
            ("  achieved ", "dim"), f"{head['achieved_rate']:,.1f}/s",
        ))  # fmt: skip
    table = Table(box=None, pad_edge=False, header_style="bold")
    table.add_column("metric")
    for col in ("avg", "p50", "p90", "p99", "max", "count"):
        table.add_column(col, justify="right")
    summary = result["total"]["summary"]
    for name in ORDER:
        stat = summary.get(name)
        if stat is None:
            continue
        unit = "" if name == "output_tokens" else "ms"
        table.add_row(
            LABELS[name], *(_fmt(stat[c], unit) for c in ("mean", "p50", "p90", "p99", "max")), f"{stat['count']:,}"
        )
    parts.append(table)
    if len(result["groups"]) > 1:
        parts.append(_groups_table(result["groups"]))
    outcomes = result["total"]["outcomes"]
    if outcomes:
        parts.append(
            Text.assemble(("outcomes: ", "dim"), " · ".join(f"{k} {v:,}" for k, v in sorted(outcomes.items())))
        )
    for warning in result.get("warnings", []):
        parts.append(Text(f"⚠ {warning}", style="bold yellow"))
    note = result.get("calibration")
    if note and note.get("within"):
        parts.append(Text(
            f"client: within this machine's calibrated range ({note['protocol']}: up to "
            f"{note['ceiling_rate']:,.0f} req/s per process; peak {note['peak_rate']:,.0f}/s)", style="dim",
        ))  # fmt: skip
    return Group(*parts)


def render_thresholds(result: dict[str, Any]) -> list[Text]:
    """One ✓/✗ line per threshold, failures in red; nothing when the run checked none."""
    results = stored_results(result)
    if results is None:
        return []
    failed = sum(not r.ok for r in results)
    head = Text.assemble(
        ("thresholds: ", "bold"),
        (f"{len(results) - failed} passed", "green"),
        ", ",
        (f"{failed} failed", "bold red" if failed else "green"),
    )
    lines = [head]
    for r in results:
        mark = Text("✓ ", style="green") if r.ok else Text("✗ ", style="bold red")
        note = " · aborted the run" if r.aborted else ""
        lines.append(
            Text.assemble(
                "  ", mark, (r.metric, "bold"), f" {r.expression}", (f"  {format_value(r.value, r.unit)}{note}", "dim")
            )
        )
    return lines


def _groups_table(groups: list[dict[str, Any]]) -> Table:
    """One row per tag set (scenario, class, protocol): where a mixed population differs."""
    table = Table(box=None, pad_edge=False, header_style="bold", title_justify="left")
    for col in ("scenario", "class", "protocol", "requests", "ok", "TTFT p50", "TTFT p99", "ITL p99", "E2E p99"):
        table.add_column(col, justify="left" if col in ("scenario", "class", "protocol") else "right")
    for g in groups:
        tags, stats = g["tags"], g["summary"]
        ok = sum(g["outcomes"].get(o, 0) for o in ("completed", "truncated"))

        def ms(metric: str, col: str, stats: dict[str, Any] = stats) -> str:
            return _fmt(stats[metric][col], "ms") if metric in stats else "–"

        table.add_row(
            tags.get("scenario", ""), tags.get("class", ""), tags.get("protocol", ""), f"{g['requests']:,}",
            f"{ok:,}", ms("ttft", "p50"), ms("ttft", "p99"), ms("itl", "p99"), ms("e2e", "p99"),
        )  # fmt: skip
    return table


def _rate(value: float, good_when_high: bool = False) -> Text:
    bad = value < 0.99 if good_when_high else value > 0.0
    return Text(f"{value * 100:.2f}%", style="bold red" if bad else "green")


def print_summary(result: dict[str, Any], console: Console | None = None) -> None:
    (console or Console()).print(render_summary(result))
