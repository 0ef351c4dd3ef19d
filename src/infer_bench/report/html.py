"""The HTML report (being written)."""

from __future__ import annotations

from typing import Any

from infer_bench.errors import UsageError


def render_html(results: list[dict[str, Any]]) -> str:
    raise UsageError("the html report is not available yet")
