"""HdrHistogram interval logs (format 1.3), so HistogramLogAnalyzer and other HDR tools read our data.

    #[Histogram log format version 1.3]
    #[StartTime: 1700000000.000 (seconds since epoch), 2023-11-14T22:13:20+00:00]
    #[BaseTime: 1700000000.000 (seconds since epoch)]
    "StartTimestamp","Interval_Length","Interval_Max","Interval_Compressed_Histogram"
    Tag=ttft,0.000,1.004,15.807,HISTFAAAA…

One line per metric per interval window of the result, tagged with the metric (``Tag=ttft``; with
several result files, ``Tag=<run>.ttft``). Timestamps are seconds since the start of the run
(``BaseTime`` is the start, as jHiccup writes them). Histogram values are microseconds; the
``Interval_Max`` column is in milliseconds (a max-value unit ratio of 1000).
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

from infer_bench.errors import UsageError
from infer_bench.intervals import windows_of
from infer_bench.report.figures import run_name

MAX_VALUE_UNIT_RATIO = 1000.0
HEADER = '"StartTimestamp","Interval_Length","Interval_Max","Interval_Compressed_Histogram"'


def render_hlog(results: list[dict[str, Any]]) -> str:
    """The interval histograms of ``results`` as one log.

    Raises:
        UsageError: a result has no interval histograms (written by infer-bench before schema v2).
    """
    start = _epoch(results[0]) if results else 0.0
    lines = [
        "#[Histogram log format version 1.3]",
        f"#[StartTime: {start:.3f} (seconds since epoch), {datetime.fromtimestamp(start, UTC).isoformat()}]",
        f"#[BaseTime: {start:.3f} (seconds since epoch)]",
        "#[infer-bench: histogram values in microseconds; Interval_Max in milliseconds]",
        HEADER,
    ]
    for index, result in enumerate(results):
        windows = windows_of(result)
        if not windows:
            raise UsageError(
                f"{run_name(result, index)}: no interval histograms in this result (schema version "
                f"{result.get('version')}); run it again with this infer-bench to get an HDR log"
            )
        offset = _epoch(result) - start
        prefix = "" if len(results) == 1 else _tag(run_name(result, index)) + "."
        for window in windows:
            for metric, hist in window.histograms.items():
                lines.append(
                    f"Tag={prefix}{metric},{window.start_s + offset:.3f},{window.end_s - window.start_s:.3f},"
                    f"{hist.get_max_value() / MAX_VALUE_UNIT_RATIO:.3f},{hist.encode().decode('ascii')}"
                )
    return "\n".join(lines) + "\n"


def _epoch(result: dict[str, Any]) -> float:
    try:
        return datetime.fromisoformat(str(result.get("started_at"))).timestamp()
    except ValueError:
        return 0.0


def _tag(name: str) -> str:
    # A tag ends at the first comma and may not hold whitespace (HdrHistogram log format 1.3).
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)
