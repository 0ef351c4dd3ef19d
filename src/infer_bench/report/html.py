"""The HTML report: one self-contained file (inline SVG and CSS, no script, no CDN) that opens offline.

Sections: headline figures and thresholds; the latency percentile spectrum (HDR style) of TTFT, ITL
and E2E; TTFT and throughput over time with stage boundaries; outcomes; settings and environment.
Several result files overlay each other, one colour per run.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from html import escape
from typing import Any

from hdrh.histogram import HdrHistogram

from infer_bench.intervals import recorded, windows_of
from infer_bench.measures import Measures
from infer_bench.report.figures import LABELS, ORDER, STAT_COLUMNS, format_ms, run_name, unit_of
from infer_bench.report.svg import (
    PALETTE,
    Series,
    line_chart,
    linear_axis,
    nines,
    percentile_axis,
    stacked_bars,
)
from infer_bench.thresholds import format_value, stored_results

SPECTRUM_METRICS = ("ttft", "itl", "e2e")
OUTCOME_COLORS = {
    "completed": "#2f9e44", "truncated": "#8ccf7e", "cancelled": "#adb5bd", "disconnected": "#e6891c",
    "connect_error": "#c92a2a", "http_error": "#a61e4d", "rate_limited": "#8e5ac8", "stream_error": "#d44a9a",
    "timed_out": "#7d5a45", "protocol_error": "#343a40",
}  # fmt: skip
CSS = """
body{font:14px/1.45 system-ui,sans-serif;color:#222;margin:24px auto;max-width:1340px;padding:0 16px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #ddd;padding-bottom:4px}
table{border-collapse:collapse;margin:6px 0 12px}td,th{padding:3px 10px;border-bottom:1px solid #eee;text-align:right}
td.l,th.l{text-align:left}
th:first-child,td:first-child{text-align:left}th{background:#f6f7f8}.ok{color:#2f9e44}.bad{color:#c92a2a;font-weight:600}
.grid{display:flex;flex-wrap:wrap;gap:12px}.swatch{display:inline-block;width:12px;height:12px;border-radius:2px;
margin-right:6px;vertical-align:-1px}.dim{color:#666}pre{background:#f6f7f8;padding:8px;overflow:auto;font-size:12px}
details{margin:6px 0}summary{cursor:pointer;font-weight:600}
"""


def render_html(results: list[dict[str, Any]]) -> str:
    names = [run_name(r, i) for i, r in enumerate(results)]
    colors = [PALETTE[i % len(PALETTE)] for i in range(len(results))]
    measures = [Measures.from_result(r).select() for r in results]
    body = [
        f"<h1>infer-bench report</h1><p class='dim'>{len(results)} run(s): "
        + " · ".join(
            f"<span class='swatch' style='background:{c}'></span>{escape(n)}"
            for n, c in zip(names, colors, strict=True)
        )
        + "</p>",
        "<h2>Summary</h2>",
        _headline_table(results, names, colors),
        _thresholds(results, names),
        "<h2>Latency percentile spectrum</h2>",
        "<p class='dim'>Latency at each percentile; the horizontal axis is log(1/(1−p)), as HdrHistogram plots it, "
        "so the tail (99 %, 99.9 %) gets as much room as the median.</p>",
        "<div class='grid'>",
        *(
            _spectrum(metric, [m.histograms.get(metric) for m in measures], names, colors)
            for metric in SPECTRUM_METRICS
        ),
        "</div>",
        "<h2>Over time</h2><div class='grid'>",
        _ttft_over_time(results, names, colors),
        _throughput_over_time(results, names, colors),
        "</div>",
        "<h2>Outcomes</h2>",
        _outcomes(results, names),
        "<h2>Latency figures</h2>",
        *(_latency_table(r, n) for r, n in zip(results, names, strict=True)),
        "<h2>Settings and environment</h2>",
        *(_settings(r, n) for r, n in zip(results, names, strict=True)),
    ]
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        # Nothing may load from anywhere: a report must open offline, and a browser logs any attempt.
        "<meta http-equiv='Content-Security-Policy' content=\"default-src 'none'; style-src 'unsafe-inline'\">"
        f"<title>infer-bench · {escape(', '.join(names))}</title><style>{CSS}</style></head><body>"
        + "\n".join(body)
        + "</body></html>\n"
    )


def _headline_table(results: list[dict[str, Any]], names: list[str], colors: list[str]) -> str:
    rows: list[tuple[str, Callable[[dict[str, Any]], str]]] = [
        ("status", _status),
        ("duration", lambda r: f"{r['duration_s']:.1f} s"),
        ("requests", lambda r: f"{r['headline']['requests']:,}"),
        ("throughput", lambda r: f"{r['headline']['request_rate']:,.1f} req/s"),
        ("tokens", lambda r: f"{r['headline']['token_rate']:,.0f} tok/s"),
        ("completion", lambda r: f"{r['headline']['completion_rate']:.2%}"),
        ("errors", lambda r: f"{r['headline']['error_rate']:.2%}"),
        ("dropped", lambda r: f"{r['headline']['dropped']:,}"),
        ("TTFT p50 / p99", lambda r: _pair(r, "ttft")),
        ("ITL p50 / p99", lambda r: _pair(r, "itl")),
        ("E2E p50 / p99", lambda r: _pair(r, "e2e")),
    ]  # fmt: skip
    head = "".join(
        f"<th><span class='swatch' style='background:{c}'></span>{escape(n)}</th>"
        for n, c in zip(names, colors, strict=True)
    )
    lines = [f"<table><tr><th></th>{head}</tr>"]
    for label, cell in rows:
        lines.append(f"<tr><td>{label}</td>" + "".join(f"<td>{cell(r)}</td>" for r in results) + "</tr>")
    lines.append("</table>")
    return "".join(lines)


def _status(result: dict[str, Any]) -> str:
    reason = result.get("stop_reason")
    return escape(result["status"]) + (f" <span class='dim'>({escape(reason)})</span>" if reason else "")


def _pair(result: dict[str, Any], metric: str) -> str:
    stat = result["total"]["summary"].get(metric)
    return "–" if not stat else f"{format_ms(stat['p50'])} / {format_ms(stat['p99'])}"


def _thresholds(results: list[dict[str, Any]], names: list[str]) -> str:
    parts = []
    for result, name in zip(results, names, strict=True):
        stored = stored_results(result)
        if stored is None:
            continue
        failed = sum(not t.ok for t in stored)
        rows = "".join(
            f"<tr><td class='{'ok' if t.ok else 'bad'}'>{'✓' if t.ok else '✗'}</td>"
            f"<td class='l'>{escape(t.metric)}</td><td class='l'>{escape(t.expression)}</td>"
            f"<td>{escape(format_value(t.value, t.unit))}"
            f"{' (aborted the run)' if t.aborted else ''}</td></tr>"
            for t in stored
        )
        parts.append(
            f"<h3>Thresholds · {escape(name)}: {len(stored) - failed} passed, "
            f"<span class='{'bad' if failed else 'ok'}'>{failed} failed</span></h3>"
            "<table><tr><th></th><th class='l'>metric</th><th class='l'>condition</th><th>value</th></tr>"
            f"{rows}</table>"
        )
    return "".join(parts)


def _spectrum(metric: str, histograms: list[HdrHistogram | None], names: list[str], colors: list[str]) -> str:
    series, top, deepest = [], 0.0, 1.0
    for hist, name, color in zip(histograms, names, colors, strict=True):
        if hist is None or hist.get_total_count() == 0:
            continue
        points = spectrum_points(hist)
        deepest = max(deepest, points[-1][0])
        top = max(top, points[-1][1])
        series.append(Series(name, points, color))
    if not series:
        return ""
    x = percentile_axis(deepest)
    return line_chart(series, x, linear_axis(top * 1.05, "ms"), title=f"{LABELS[metric]} ({metric})", width=440)


def spectrum_points(hist: HdrHistogram) -> list[tuple[float, float]]:
    """(percentile axis position, value in ms) steps: each bucket from the percentile below it to its own."""
    total = hist.get_total_count()
    deepest = nines(100 * (1 - 1 / total)) if total > 1 else 1.0
    points: list[tuple[float, float]] = []
    below = 0
    for value, count in recorded(hist):
        ms = value / 1000
        points.append((min(nines(100 * below / total), deepest), ms))
        below += count
        points.append((min(nines(100 * below / total), deepest), ms))
    return points


def _stage_marks(result: dict[str, Any]) -> list[tuple[float, str]]:
    """Where the load changed: scenario starts, warmup ends, stage boundaries, ends of load."""
    marks: dict[float, str] = {}
    for name, spec in (result.get("scenario", {}).get("scenarios") or {}).items():
        start = float(spec.get("start_time", 0.0))
        executor = spec.get("executor", {})
        if start > 0:
            marks.setdefault(start, f"{name} starts")
        warmup = float(spec.get("warmup", 0.0))
        if warmup > 0:
            marks.setdefault(start + warmup, "warmup ends")
        t = start
        stages = executor.get("stages") or []
        for index, stage in enumerate(stages):
            t += float(stage.get("duration", 0.0))
            if index < len(stages) - 1:
                marks.setdefault(t, f"stage {index + 2}")
        if "duration" in executor:
            t = start + float(executor["duration"])
        if t > start:
            marks.setdefault(t, "load ends")
    return sorted(marks.items())


def _ttft_over_time(results: list[dict[str, Any]], names: list[str], colors: list[str]) -> str:
    series, end, top = [], 1.0, 0.0
    for result, name, color in zip(results, names, colors, strict=True):
        p50, p99 = [], []
        for window in windows_of(result):
            hist = window.histograms.get("ttft")
            end = max(end, window.end_s)
            if hist is None or hist.get_total_count() == 0:
                continue
            middle = (window.start_s + window.end_s) / 2
            p50.append((middle, hist.get_value_at_percentile(50) / 1000))
            p99.append((middle, hist.get_value_at_percentile(99) / 1000))
        top = max([top, *(v for _, v in p99)])
        series += [Series(f"{name} p50", p50, color), Series(f"{name} p99", p99, color, dashed=True)]
    if not any(s.points for s in series):
        return "<p class='dim'>No per-second TTFT in these results (schema v1, or no streamed tokens).</p>"
    return line_chart(
        series, linear_axis(end, "seconds since the start", " s"), linear_axis(top * 1.1, "TTFT (ms)"),
        title="TTFT per second (p50 solid, p99 dashed)", marks=_stage_marks(results[0]),
    )  # fmt: skip


def _throughput_over_time(results: list[dict[str, Any]], names: list[str], colors: list[str]) -> str:
    series, end, top = [], 1.0, 0.0
    for result, name, color in zip(results, names, colors, strict=True):
        points = [(s["t"] + 0.5, float(s.get("succeeded", 0))) for s in result.get("series", [])[:-1]]
        if points:
            end = max(end, points[-1][0] + 0.5)
            top = max(top, max(v for _, v in points))
        series.append(Series(name, points, color))
    axis = linear_axis(end, "seconds since the start", " s")
    return line_chart(
        series, axis, linear_axis(max(top, 1.0) * 1.1, "requests / s"),
        title="Throughput (successful requests per second)", marks=_stage_marks(results[0]),
    )  # fmt: skip


def _outcomes(results: list[dict[str, Any]], names: list[str]) -> str:
    rows = []
    for result, name in zip(results, names, strict=True):
        outcomes = result["total"].get("outcomes") or {}
        rows.append((name, [(o, int(outcomes.get(o, 0))) for o in OUTCOME_COLORS]))
    chart = stacked_bars(rows, OUTCOME_COLORS, title="Outcomes of measured requests")
    head = "".join(f"<th>{escape(o)}</th>" for o in OUTCOME_COLORS)
    body = "".join(
        f"<tr><td>{escape(name)}</td>" + "".join(f"<td>{count:,}</td>" for _, count in parts) + "</tr>"
        for name, parts in rows
    )
    return chart + f"<table><tr><th>run</th>{head}</tr>{body}</table>"


def _latency_table(result: dict[str, Any], name: str) -> str:
    summary = result["total"]["summary"]
    head = "".join(f"<th>{c}</th>" for c in STAT_COLUMNS)
    rows = []
    for metric in ORDER:
        stat = summary.get(metric)
        if stat:
            cells = "".join(f"<td>{format_ms(stat.get(c), unit_of(metric))}</td>" for c in STAT_COLUMNS)
            rows.append(f"<tr><td>{LABELS[metric]}</td>{cells}<td>{stat['count']:,}</td></tr>")
    return f"<h3>{escape(name)}</h3><table><tr><th>metric</th>{head}<th>count</th></tr>{''.join(rows)}</table>"


def _settings(result: dict[str, Any], name: str) -> str:
    scenario = result.get("scenario", {})
    env = result.get("environment", {})
    env_rows = "".join(
        f"<tr><td>{escape(str(k))}</td><td style='text-align:left'>{escape(_text(v))}</td></tr>" for k, v in env.items()
    )
    warnings = "".join(f"<p class='bad'>⚠ {escape(w)}</p>" for w in result.get("warnings", []))
    described = {
        k: scenario.get(k) for k in ("source", "target", "reference", "thresholds", "gates") if scenario.get(k)
    }
    return (
        f"<details open><summary>{escape(name)} · started {escape(str(result.get('started_at')))} · "
        f"schema v{result.get('version')}</summary>{warnings}<table>{env_rows}</table>"
        f"<pre>{escape(json.dumps(described, indent=1))}</pre>"
        "<details><summary>scenarios as run</summary>"
        f"<pre>{escape(json.dumps(scenario.get('scenarios'), indent=1))}</pre></details></details>"
    )


def _text(value: Any) -> str:
    return " ".join(map(str, value)) if isinstance(value, list) else str(value)
