"""Rendering ``compare`` and ``gate``: rich tables for the terminal, Markdown for CI summaries."""

from __future__ import annotations

from rich.console import Group
from rich.table import Table
from rich.text import Text

from infer_bench.compare import Comparison, Row
from infer_bench.gate import Decision
from infer_bench.report.figures import format_ms

_ARROWS = {
    "better": ("▼", "green"),
    "worse": ("▲", "bold red"),
    "same": ("=", "dim"),
    "new": ("+", ""),
    "gone": ("−", ""),
}


def _value(row: Row, value: float | None) -> str:
    if value is None:
        return "–"
    if row.unit == "ms":
        return format_ms(value)
    if row.figure.endswith("_rate") and row.figure not in ("request_rate", "token_rate"):
        return f"{value:.2%}"
    return f"{value:,.2f}" if not float(value).is_integer() else f"{value:,.0f}"


def _delta(row: Row) -> str:
    delta = row.delta
    if delta is None:
        return "–"
    if row.unit == "ms":
        return ("+" if delta >= 0 else "−") + format_ms(abs(delta))
    if row.figure.endswith("_rate") and row.figure not in ("request_rate", "token_rate"):
        return f"{delta * 100:+.2f} pp"
    return f"{delta:+,.2f}"


def _relative(row: Row) -> str:
    rel = row.relative
    return "–" if rel is None else f"{rel * 100:+.1f}%"


def _arrow(row: Row) -> tuple[str, str]:
    symbol, style = _ARROWS[row.verdict]
    # ▲/▼ point the way the number moved; the colour says whether that is good.
    if row.verdict in ("better", "worse") and row.delta is not None:
        symbol = "▲" if row.delta > 0 else "▼"
    return symbol, style


def render_comparison(comparison: Comparison, names: tuple[str, str]) -> Group:
    table = Table(box=None, pad_edge=False, header_style="bold")
    for column in ("figure", names[0], names[1], "change", "relative", ""):
        table.add_column(column, justify="left" if column == "figure" else "right")
    for row in comparison.rows:
        symbol, style = _arrow(row)
        table.add_row(
            row.label, _value(row, row.baseline), _value(row, row.current), _delta(row), _relative(row),
            Text(f"{symbol} {row.verdict}", style=style),
        )  # fmt: skip
    parts: list[Text | Table] = [Text.assemble(("compare ", "bold"), names[0], " → ", names[1]), table]
    parts += [Text(f"⚠ {w}", style="bold yellow") for w in comparison.warnings]
    parts += [Text(f"note: {n}", style="dim") for n in comparison.notes]
    return Group(*parts)


def comparison_markdown(comparison: Comparison, names: tuple[str, str]) -> str:
    lines = [
        f"## infer-bench compare · {names[0]} → {names[1]}",
        "",
        f"| figure | {names[0]} | {names[1]} | change | relative | |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for row in comparison.rows:
        symbol = {"better": "🟢", "worse": "🔴"}.get(row.verdict, "")
        lines.append(
            f"| {row.label} | {_value(row, row.baseline)} | {_value(row, row.current)} | {_delta(row)} "
            f"| {_relative(row)} | {symbol} {row.verdict} |"
        )
    lines += ["", *(f"> ⚠️ {w}" for w in comparison.warnings), *(f"- note: {n}" for n in comparison.notes), ""]
    return "\n".join(lines)


def _figures(decision: Decision) -> tuple[str, str]:
    change = decision.change
    if change is None:
        return "–", "–"
    if decision.rule.stat is None:
        return f"{change.baseline:,.2f}/s", f"{change.current:,.2f}/s"
    return format_ms(change.baseline), format_ms(change.current)


def render_gate(decisions: list[Decision], names: tuple[str, str]) -> Group:
    table = Table(box=None, pad_edge=False, header_style="bold")
    for column in ("", "rule", names[0], names[1], "verdict"):
        table.add_column(column, justify="right" if column in names else "left")
    for d in decisions:
        mark = Text("✗", style="bold red") if d.regressed else Text("✓", style="green")
        table.add_row(mark, d.rule.label, *_figures(d), d.reason)
    failed = sum(d.regressed for d in decisions)
    head = Text.assemble(
        ("gate ", "bold"), names[0], " → ", names[1], ": ",
        (f"{failed} regression(s)", "bold red") if failed else ("no regression", "green"),
    )  # fmt: skip
    return Group(head, table)


def gate_markdown(decisions: list[Decision], names: tuple[str, str]) -> str:
    failed = sum(d.regressed for d in decisions)
    lines = [
        f"## infer-bench gate · {names[0]} → {names[1]}: " + (f"❌ {failed} regression(s)" if failed else "✅ pass"),
        "",
        f"| | rule | {names[0]} | {names[1]} | verdict |",
        "|---|---|---:|---:|---|",
    ]
    for d in decisions:
        lines.append(f"| {'❌' if d.regressed else '✅'} | `{d.rule.label}` | {' | '.join(_figures(d))} | {d.reason} |")
    return "\n".join([*lines, ""])
