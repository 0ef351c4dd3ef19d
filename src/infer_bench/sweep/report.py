"""A sweep's conclusions for people: a terminal table and a self-contained HTML page, both from sweep.json."""

from __future__ import annotations

from html import escape
from typing import Any

from rich.console import Console
from rich.table import Table

from infer_bench.report.html import CSS
from infer_bench.report.svg import PALETTE, Series, line_chart, linear_axis


def _ms(value: float | None) -> str:
    return "–" if value is None else f"{value:,.1f}"


def print_sweep(summary: dict[str, Any], console: Console) -> None:
    table = Table(title="sweep: setting × load", header_style="bold", title_justify="left")
    for col in ("setting", "load", "throughput/s", "TTFT p50 ms", "TTFT p99 ms", "ITL p99 ms", "completion", "SLO"):
        table.add_column(col, justify="left" if col == "setting" else "right")
    frontier = {(c["setting"], c["load"]) for c in summary["frontier"]}
    for c in summary["cells"]:
        mark = " ◆" if (c["setting"], c["load"]) in frontier else ""
        table.add_row(
            c["setting"] + mark, f"{c['load']:g}", f"{c['throughput']:,.1f}", _ms(c["ttft_p50_ms"]),
            _ms(c["ttft_p99_ms"]), _ms(c["itl_p99_ms"]), f"{c['completion_rate']:.1%}",
            "[green]✓[/]" if c["slo_passed"] else "[red]✗[/]",
        )  # fmt: skip
    console.print(table)
    console.print("[dim]◆ on the Pareto frontier of throughput vs TTFT p99 (E2E for plain HTTP)[/]")
    for cap in summary["capacity"]:
        rate = f"{cap['rate']:,.4g}/s" if cap["rate"] is not None else "none"
        console.print(f"capacity of {cap['setting']}: {rate} — {cap['verdict']}", highlight=False)
    for failure in summary["failures"]:
        console.print(f"[red]not run:[/] {failure['setting']} @ {failure['load']:g}: {failure['error']}")
    rec = summary["recommendation"]
    if rec:
        console.print(f"[bold]recommended:[/] {rec['setting']} — {rec['reason']}", highlight=False)
    else:
        console.print("[bold red]no setting kept the SLO[/]")
    if summary["status"] != "complete":
        console.print("[yellow]the sweep was interrupted: run it again to finish (finished cells are kept)[/]")


def render_sweep_html(summary: dict[str, Any]) -> str:
    cells = summary["cells"]
    settings = list(dict.fromkeys(c["setting"] for c in cells))
    colors = {s: PALETTE[i % len(PALETTE)] for i, s in enumerate(settings)}
    loads = [c["load"] for c in cells] or [1.0]
    charts = [
        _by_load(cells, settings, colors, "throughput", "throughput by load", "completed requests/s", max(loads)),
        # Latency of cells that broke the SLO (an overloaded setting: seconds) would flatten every other line.
        _by_load(
            [c for c in cells if c["slo_passed"]],
            settings,
            colors,
            "ttft_p99_ms",
            "TTFT p99 by load (cells within the SLO)",
            "ms",
            max(loads),
        ),
        _frontier(summary, settings, colors),
    ]
    rec = summary["recommendation"]
    verdict = (
        f"<p><b>Recommended:</b> {escape(rec['setting'])} — {escape(rec['reason'])}</p>"
        if rec else "<p><b>No setting kept the SLO.</b></p>"
    )  # fmt: skip
    rows = "".join(
        f"<tr><td>{escape(c['setting'])}</td><td>{c['load']:g}</td><td>{c['throughput']:,.1f}</td>"
        f"<td>{_ms(c['ttft_p50_ms'])}</td><td>{_ms(c['ttft_p99_ms'])}</td><td>{_ms(c['itl_p99_ms'])}</td>"
        f"<td>{c['completion_rate']:.1%}</td><td>{'✓' if c['slo_passed'] else '✗'}</td></tr>"
        for c in cells
    )
    capacity = "".join(
        f"<li>{escape(c['setting'])}: {escape(str(c['rate']))}/s — {escape(c['verdict'])}</li>"
        for c in summary["capacity"]
    )
    body = [
        f"<h1>infer-bench sweep</h1><p class='dim'>{escape(summary['source'])} · scenario "
        f"{escape(summary['scenario'])} · {len(settings)} settings × {len(summary['loads'])} loads · "
        f"{escape(summary['status'])}</p>",
        verdict,
        "<div class='grid'>",
        *charts,
        "</div>",
        f"<h2>Capacity within the SLO</h2><ul>{capacity}</ul>" if capacity else "",
        "<h2>Every cell</h2><table><tr><th>setting</th><th>load</th><th>throughput/s</th><th>TTFT p50 ms</th>"
        f"<th>TTFT p99 ms</th><th>ITL p99 ms</th><th>completion</th><th>SLO</th></tr>{rows}</table>",
    ]
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        "<meta http-equiv='Content-Security-Policy' content=\"default-src 'none'; style-src 'unsafe-inline'\">"
        f"<title>infer-bench sweep</title><style>{CSS}</style></head><body>" + "\n".join(body) + "</body></html>\n"
    )


def _by_load(
    cells: list[dict[str, Any]], settings: list[str], colors: dict[str, str], key: str, title: str, unit: str,
    max_load: float,
) -> str:  # fmt: skip
    series = [
        Series(s, [(c["load"], c[key]) for c in cells if c["setting"] == s and c[key] is not None], colors[s])
        for s in settings
    ]
    high = max((v for s in series for _, v in s.points), default=1.0)
    return line_chart(series, linear_axis(max_load, "load"), linear_axis(high, unit), title=title)


def _frontier(summary: dict[str, Any], settings: list[str], colors: dict[str, str]) -> str:
    cells = [c for c in summary["cells"] if c["ttft_p99_ms"] is not None and c["slo_passed"]]
    series = [
        Series(s, sorted((c["throughput"], c["ttft_p99_ms"]) for c in cells if c["setting"] == s), colors[s])
        for s in settings
    ]
    front = [(c["throughput"], c["ttft_p99_ms"]) for c in summary["frontier"] if c in cells]
    series.append(Series("Pareto frontier", sorted(front), "#000", dashed=True))
    x_high = max((c["throughput"] for c in cells), default=1.0)
    y_high = max((c["ttft_p99_ms"] for c in cells), default=1.0)
    return line_chart(
        series, linear_axis(x_high, "throughput (requests/s)"), linear_axis(y_high, "TTFT p99 (ms)"),
        title="throughput vs TTFT p99 within the SLO: lower right is better",
    )  # fmt: skip
