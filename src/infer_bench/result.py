"""The result file: a versioned JSON document with lossless histograms.

Shape (``schema: infer-bench.result``, ``version: 2``)::

    {schema, version, started_at, duration_s, status: complete|interrupted|aborted, stop_reason,
     scenario: {source, target, reference, scenarios: {...}, thresholds: {...}, gates?: {...}},
     environment: {infer_bench, python, platform, machine, cpu, cpu_count, argv, git_revision},
     headline: {requests, succeeded, completion_rate, disconnect_rate, error_rate, dropped,
                request_rate, token_rate, requested_rate?, achieved_rate?},
     groups: [{tags, requests, outcomes, statuses, tokens, dropped,
               summary: {metric: {count, min, mean, p50, p90, p95, p99, p999, max}},
               histograms: {metric: <HdrHistogram V2 compressed base64>}}],
     series: [{t, started, succeeded, failed, tokens, dropped, ttft_p50_ms, ttft_p99_ms}],
     intervals: {metrics, windows: [{start_s, end_s, histograms: {metric: <base64>}}]},
     thresholds: [{metric, expression, ok, value, unit, abort_on_fail, aborted}] (absent: none checked),
     errors: [ ... up to 100 samples ... ], start_epoch_ns, client: {cpu_by_second, loop_lag_ms_by_second, pid},
     calibration?: {protocol, ceiling_rate, limited_by, measured_at, seconds_over, peak_rate, within}
                                                  (this machine has an ``infer-bench calibrate`` record)
     shard?: {index, count}                       (one shard of a --processes run)
     shards?: {count, parts: [...]}, client: {shards: [{shard, pid, cpu_by_second, loop_lag_ms_by_second}]}
                                                  (merged; calibration is the worst shard's, ``within`` all's)}

Durations in ``summary`` are milliseconds; histograms hold microseconds (``output_tokens``: counts).

Version 2 added ``intervals``, ``thresholds``, status ``aborted`` and the scenario's thresholds and
gates; ``load_result`` reads version 1 files too (they lack what version 2 added, and reports say so).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from infer_bench import __version__
from infer_bench.errors import UsageError
from infer_bench.metrics.recorder import COUNT_METRICS, METRICS, MetricSet, Recorder
from infer_bench.metrics.timeline import SUCCESSES, Outcome

SCHEMA = "infer-bench.result"
VERSION = 2
READABLE_VERSIONS = (1, 2)
PERCENTILES = {"p50": 50.0, "p90": 90.0, "p95": 95.0, "p99": 99.0, "p999": 99.9}


def summarize(ms: MetricSet) -> dict[str, dict[str, float | int]]:
    out: dict[str, dict[str, float | int]] = {}
    for name, hist in ms.histograms.items():
        count = hist.get_total_count()
        if count == 0:
            continue
        scale = 1 if name in COUNT_METRICS else 1000  # µs → ms
        values = hist.get_percentile_to_value_dict(list(PERCENTILES.values()))
        stat: dict[str, float | int] = {
            "count": count, "min": hist.get_min_value() / scale, "mean": round(hist.get_mean_value() / scale, 3),
            "max": hist.get_max_value() / scale,
        }  # fmt: skip
        for label, p in PERCENTILES.items():
            stat[label] = values[p] / scale
        out[name] = stat
    return out


def headline(total: MetricSet, duration_s: float) -> dict[str, float | int]:
    """The figures a reader looks at first. Completion rate leaves out requests cancelled on purpose."""
    requests = total.requests
    outcomes = total.outcomes
    succeeded = sum(outcomes[o.value] for o in SUCCESSES)
    cancelled = outcomes[Outcome.CANCELLED.value]
    failed = requests - succeeded - cancelled
    considered = max(requests - cancelled, 1)
    return {
        "requests": requests,
        "succeeded": succeeded,
        "cancelled": cancelled,
        "failed": failed,
        "dropped": total.dropped,
        "completion_rate": round(succeeded / considered, 6),
        "disconnect_rate": round(outcomes[Outcome.DISCONNECTED.value] / max(requests, 1), 6),
        "error_rate": round(failed / considered, 6),
        "request_rate": round(succeeded / duration_s, 3) if duration_s > 0 else 0.0,
        "token_rate": round(total.tokens / duration_s, 3) if duration_s > 0 else 0.0,
        "tokens": total.tokens,
    }


def environment(argv: list[str] | None = None) -> dict[str, Any]:
    return {
        "infer_bench": __version__,
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "argv": redact_argv(argv if argv is not None else sys.argv),
        "git_revision": _git_revision(),
    }


_SECRET_WORDS = ("KEY", "TOKEN", "SECRET", "PASSWORD", "PASS", "AUTH", "CREDENTIAL")


def redact_argv(argv: list[str]) -> list[str]:
    """The command line with the values of secret-looking ``-e NAME=VALUE`` pairs replaced."""
    out = []
    for arg in argv:
        flag = next((f for f in ("--env=", "-e=") if arg.startswith(f)), "")
        name, sep, _ = arg[len(flag) :].partition("=")
        if sep and not name.startswith("-") and any(word in name.upper() for word in _SECRET_WORDS):
            out.append(f"{flag}{name}=<redacted>")
        else:
            out.append(arg)
    return out


def cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), for results and calibrations."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git_revision() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=2, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def build_result(
    recorder: Recorder,
    *,
    scenario: dict[str, Any],
    started_at: str,
    duration_s: float,
    status: str,
    stop_reason: str | None,
    rates: dict[str, float] | None = None,
) -> dict[str, Any]:
    recorder.flush()
    total = recorder.total()
    groups = []
    for key, ms in sorted(recorder.sets.items()):
        groups.append({
            "tags": dict(key),
            "requests": ms.requests,
            "outcomes": dict(ms.outcomes),
            "statuses": {str(k): v for k, v in sorted(ms.statuses.items())},
            "tokens": ms.tokens,
            "dropped": ms.dropped,
            "reconnects": ms.reconnects,
            "summary": summarize(ms),
            "histograms": {n: h.encode().decode("ascii") for n, h in ms.histograms.items() if h.get_total_count()},
        })  # fmt: skip
    head = headline(total, duration_s)
    if rates:
        head.update(rates)
    return {
        "schema": SCHEMA,
        "version": VERSION,
        "started_at": started_at,
        "duration_s": round(duration_s, 3),
        "status": status,
        "stop_reason": stop_reason,
        "scenario": scenario,
        "environment": environment(),
        "metrics": METRICS,
        "headline": head,
        "total": {"summary": summarize(total), "outcomes": dict(total.outcomes)},
        "groups": groups,
        "series": [s.to_json() for s in recorder.series],
        "errors": recorder.error_sample,
    }


MIN_FREE_BYTES = 16 << 20  # a long run's result, per-second histograms included, takes a few MB


def check_writable(path: Path) -> None:
    """Fail before the run, not after it, when the result cannot be written.

    Raises:
        UsageError: the directory is missing or not writable, or its filesystem is (nearly) full.
    """
    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir():
        raise UsageError(f"--out {path}: the directory {directory} does not exist")
    try:
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".infer-bench-", delete=True):
            pass
        free = shutil.disk_usage(directory).free
    except OSError as exc:
        raise UsageError(f"--out {path}: cannot write in {directory} ({exc.strerror})") from None
    if free < MIN_FREE_BYTES:
        raise UsageError(
            f"--out {path}: only {free >> 10} KB free where it goes; a result needs up to "
            f"{MIN_FREE_BYTES >> 20} MB: free some space or write elsewhere"
        )


def write_result(path: Path, result: dict[str, Any]) -> None:
    """Write atomically: a crash mid-write never leaves a truncated result behind.

    Raises:
        UsageError: ``path`` could not be written (the disk filled up during the run, say); the result
            was then written to the temporary directory instead, and the message says where.
    """
    text = json.dumps(result, indent=1)
    try:
        _write_atomically(path, text)
    except OSError as exc:
        kept = Path(tempfile.gettempdir()) / f"infer-bench-{os.getpid()}-{path.name}"
        try:
            _write_atomically(kept, text)
        except OSError:
            raise UsageError(f"cannot write the result to {path} ({exc.strerror}), nor to {kept}") from None
        raise UsageError(f"cannot write the result to {path} ({exc.strerror}); it was kept in {kept}") from None


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)  # a half-written temporary, when the write failed


def load_result(path: Path) -> dict[str, Any]:
    """A result file written by ``infer-bench run`` (schema version 1 or 2).

    Raises:
        UsageError: the file is missing, not JSON, not a result, or from a newer infer-bench.
    """
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"{path}: no such result file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path}: cannot read the result file ({exc})") from None
    except json.JSONDecodeError as exc:
        raise UsageError(f"{path}: not a result file (not JSON: {exc.msg} at line {exc.lineno})") from None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise UsageError(f"{path}: not an infer-bench result file (no schema: {SCHEMA})")
    version = data.get("version")
    if version not in READABLE_VERSIONS:
        raise UsageError(
            f"{path}: result schema version {version!r}; this infer-bench {__version__} reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))} (upgrade infer-bench to read it)"
        )
    data.setdefault("source_path", str(path))
    return data
