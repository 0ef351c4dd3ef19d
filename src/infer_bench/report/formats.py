"""``infer-bench report --format …``: one function per format, chosen by name."""

from __future__ import annotations

import io
from typing import Any

from infer_bench.errors import UsageError

FORMATS = ("text", "markdown", "json", "junit", "html", "hlog")


def render_report(fmt: str, results: list[dict[str, Any]], *, width: int = 140) -> str:
    """``results`` (loaded result files) as one document in ``fmt``.

    Raises:
        UsageError: an unknown format.
    """
    if fmt == "text":
        from rich.console import Console

        from infer_bench.report.summary import render_summary

        out = io.StringIO()
        console = Console(file=out, width=width, color_system=None, highlight=False)
        for result in results:
            console.print(render_summary(result))
        return out.getvalue()
    if fmt == "markdown":
        from infer_bench.report.markdown import render_markdown

        return render_markdown(results)
    if fmt == "json":
        import json

        documents = [summary_json(r) for r in results]
        return json.dumps(documents[0] if len(documents) == 1 else documents, indent=1) + "\n"
    if fmt == "junit":
        from infer_bench.report.junit import render_junit

        return render_junit(results)
    if fmt == "html":
        from infer_bench.report.html import render_html

        return render_html(results)
    if fmt == "hlog":
        from infer_bench.report.hlog import render_hlog

        return render_hlog(results)
    raise UsageError(f"unknown report format {fmt!r}; expected one of: {', '.join(FORMATS)}")


def summary_json(result: dict[str, Any]) -> dict[str, Any]:
    """The figures of a run without its histograms: what a dashboard or a script wants."""
    return {
        "source": result.get("source_path"),
        "scenario": result.get("scenario", {}).get("source"),
        "target": result.get("scenario", {}).get("target"),
        "started_at": result.get("started_at"),
        "duration_s": result.get("duration_s"),
        "status": result.get("status"),
        "stop_reason": result.get("stop_reason"),
        "headline": result.get("headline"),
        "summary": result.get("total", {}).get("summary"),
        "outcomes": result.get("total", {}).get("outcomes"),
        "thresholds": result.get("thresholds"),
        "groups": [
            {"tags": g["tags"], "requests": g["requests"], "outcomes": g["outcomes"], "summary": g["summary"]}
            for g in result.get("groups", [])
        ],
        "warnings": result.get("warnings", []),
        "environment": result.get("environment"),
    }
