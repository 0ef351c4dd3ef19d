"""Merging the results of a run's shards into the result of the whole run, losslessly where it can be.

What adds up exactly: the HDR histograms of every metric and tag set (decoded, added, encoded again),
outcome, status and token counters, drops and reconnects, and the per-second series' counts, aligned on
whole seconds from the earliest shard's start (each result records its ``start_epoch_ns``). Interval
windows are added window by window, matched by the whole second they end at. The headline is computed
again from the merged totals, and thresholds are checked again on the merged figures.

What cannot add up: a second's TTFT percentiles in the series (each shard kept only its own p50 and
p99). The merged p50 is the shards' p50 weighted by their successes and the merged p99 the worst shard's:
figures for a plot; the exact ones are in the histograms. Client CPU stays per shard (``client.shards``).

The status is the worst of the parts: interrupted, then aborted, then complete.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from hdrh.histogram import HdrHistogram

from infer_bench.intervals import Window
from infer_bench.measures import Measures
from infer_bench.metrics.recorder import MetricSet, Recorder, TagKey, new_histogram, tag_key
from infer_bench.result import build_result
from infer_bench.scenario.thresholds import Threshold, parse_threshold
from infer_bench.thresholds import evaluate

STATUS_RANK = {"complete": 0, "aborted": 1, "interrupted": 2}
SERIES_COUNTS = ("started", "succeeded", "failed", "tokens", "dropped", "connect_errors")
MAX_ERRORS = 100
NS = 1_000_000_000


def merge_results(parts: Sequence[Mapping[str, Any]], thresholds: Sequence[Threshold] | None = None) -> dict[str, Any]:
    """One result from the results of a run's shards (or of any runs of one scenario).

    Args:
        parts: results as ``build_result`` writes them, each with its ``start_epoch_ns``.
        thresholds: checked again on the merged figures; None reads them back from the parts' scenario
            (and checks them only if the parts did).

    Raises:
        ValueError: no parts.
    """
    if not parts:
        raise ValueError("nothing to merge: no results")
    offsets = start_offsets(parts)
    first = parts[offsets.index(0)]
    duration_s = max(o + float(p.get("duration_s", 0.0)) for o, p in zip(offsets, parts, strict=True))
    status = max((p.get("status", "complete") for p in parts), key=lambda s: STATUS_RANK.get(s, 2))
    recorder = Recorder(0)
    recorder.sets = merged_sets(parts)
    merged = build_result(
        recorder,
        scenario=dict(first.get("scenario", {})),
        started_at=str(first.get("started_at", "")),
        duration_s=duration_s,
        status=status,
        stop_reason=_stop_reason(parts, status),
        rates=_rates(parts),
    )
    merged["start_epoch_ns"] = first.get("start_epoch_ns", 0)
    merged["headline"]["interrupted"] = sum(int(p.get("headline", {}).get("interrupted", 0)) for p in parts)
    merged["series"] = merged_series(parts, offsets)
    merged["errors"] = _errors(parts, offsets)
    merged["intervals"] = merged_intervals(parts, offsets)
    merged["warnings"] = _warnings(parts)
    merged["client"] = {
        "shards": [
            {"shard": _label(p, i), "pid": (p.get("client") or {}).get("pid"),
             "cpu_by_second": (p.get("client") or {}).get("cpu_by_second", []),
             "loop_lag_ms_by_second": (p.get("client") or {}).get("loop_lag_ms_by_second", [])}
            for i, p in enumerate(parts)
        ]
    }  # fmt: skip
    if (note := _calibration(parts)) is not None:
        merged["calibration"] = note
    merged["shards"] = {
        "count": len(parts),
        "parts": [
            {"shard": _label(p, i), "status": p.get("status"), "stop_reason": p.get("stop_reason"),
             "duration_s": p.get("duration_s"), "start_offset_s": offsets[i],
             "requests": p.get("headline", {}).get("requests", 0)}
            for i, p in enumerate(parts)
        ],
    }  # fmt: skip
    checked = thresholds if thresholds is not None else _stored_thresholds(parts)
    if checked:
        aborted = {
            t["metric"] + " " + t["expression"] for p in parts for t in p.get("thresholds") or () if t["aborted"]
        }
        aborted_by = next((t for t in checked if t.label in aborted), None)
        measures = Measures.from_result(merged)
        merged["thresholds"] = [r.to_json() for r in evaluate(checked, measures, aborted_by)]
    return merged


def start_offsets(parts: Sequence[Mapping[str, Any]]) -> list[int]:
    """Each part's start in whole seconds after the earliest (0 for a part that does not say)."""
    starts = [int(p.get("start_epoch_ns") or 0) for p in parts]
    earliest = min(starts)
    return [round((s - earliest) / NS) for s in starts]


def merged_sets(parts: Sequence[Mapping[str, Any]]) -> dict[TagKey, MetricSet]:
    """Every tag set's histograms and counters, added over the parts."""
    sets: dict[TagKey, MetricSet] = {}
    for part in parts:
        for group in part.get("groups", []):
            key = tag_key(**group["tags"])
            ms = sets.get(key)
            if ms is None:
                ms = sets[key] = MetricSet()
            for name, text in group.get("histograms", {}).items():
                hist = ms.histograms.get(name)
                if hist is None:
                    hist = ms.histograms[name] = new_histogram()
                hist.add(HdrHistogram.decode(text))
            ms.outcomes.update(group.get("outcomes", {}))
            ms.statuses.update({int(code): n for code, n in group.get("statuses", {}).items()})
            ms.tokens += int(group.get("tokens", 0))
            ms.dropped += int(group.get("dropped", 0))
            ms.reconnects += int(group.get("reconnects", 0))
    return sets


def merged_series(parts: Sequence[Mapping[str, Any]], offsets: Sequence[int]) -> list[dict[str, Any]]:
    """The per-second series, each part shifted by its start offset and added second by second."""
    seconds: dict[int, list[Mapping[str, Any]]] = {}
    for offset, part in zip(offsets, parts, strict=True):
        for entry in part.get("series", []):
            seconds.setdefault(int(entry["t"]) + offset, []).append(entry)
    if not seconds:
        return []
    out = []
    for t in range(max(seconds) + 1):
        entries = seconds.get(t, [])
        row: dict[str, Any] = {"t": t}
        for name in SERIES_COUNTS:
            row[name] = sum(int(e.get(name, 0)) for e in entries)
        row["lag_max_ms"] = max((float(e.get("lag_max_ms", 0.0)) for e in entries), default=0.0)
        row["ttft_p50_ms"] = _weighted_p50(entries)
        row["ttft_p99_ms"] = max((e["ttft_p99_ms"] for e in entries if e.get("ttft_p99_ms") is not None), default=None)
        out.append(row)
    return out


def _weighted_p50(entries: Sequence[Mapping[str, Any]]) -> float | None:
    known = [(float(e["ttft_p50_ms"]), max(int(e.get("succeeded", 0)), 1)) for e in entries if e.get("ttft_p50_ms")]
    if not known:
        return None
    return round(sum(v * w for v, w in known) / sum(w for _, w in known), 3)


def merged_intervals(parts: Sequence[Mapping[str, Any]], offsets: Sequence[int]) -> dict[str, Any]:
    """Interval windows added window by window, matched by the whole second each ends at."""
    metrics: list[str] = []
    by_end: dict[int, list[Window]] = {}
    for offset, part in zip(offsets, parts, strict=True):
        intervals = part.get("intervals") or {}
        metrics = metrics or list(intervals.get("metrics", []))
        for data in intervals.get("windows", []):
            window = Window.from_json(data)
            by_end.setdefault(round(window.end_s + offset), []).append(
                Window(window.start_s + offset, window.end_s + offset, window.histograms)
            )
    windows = []
    for end in sorted(by_end):
        group = by_end[end]
        histograms: dict[str, HdrHistogram] = {}
        for window in group:
            for name, hist in window.histograms.items():
                histograms.setdefault(name, new_histogram()).add(hist)
        windows.append(Window(min(w.start_s for w in group), max(w.end_s for w in group), histograms).to_json())
    return {"metrics": metrics, "windows": windows}


def _label(part: Mapping[str, Any], position: int) -> str:
    shard = part.get("shard")
    return f"{shard['index']}/{shard['count']}" if shard else str(position)


def _stop_reason(parts: Sequence[Mapping[str, Any]], status: str) -> str | None:
    """The reasons of the parts that ended with the merged status, each once, with the shards it stopped."""
    if len(parts) == 1:
        return parts[0].get("stop_reason")
    shards_by_reason: dict[str, list[str]] = {}
    for i, part in enumerate(parts):
        if part.get("status") == status and part.get("stop_reason"):
            shards_by_reason.setdefault(str(part["stop_reason"]), []).append(_label(part, i))
    return "; ".join(f"{reason} (shard {', '.join(shards)})" for reason, shards in shards_by_reason.items()) or None


def _rates(parts: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Requested and achieved open-loop rates: each shard's are its share, so they add."""
    rates: dict[str, float] = {}
    for name in ("requested_rate", "achieved_rate"):
        values = [p["headline"][name] for p in parts if name in p.get("headline", {})]
        if values:
            rates[name] = round(sum(values), 3)
    return rates


def _errors(parts: Sequence[Mapping[str, Any]], offsets: Sequence[int]) -> list[dict[str, Any]]:
    errors = [
        {**e, "t_s": round(float(e.get("t_s", 0.0)) + offset, 3), "shard": _label(p, i)}
        for i, (offset, p) in enumerate(zip(offsets, parts, strict=True))
        for e in p.get("errors", [])
    ]
    return sorted(errors, key=lambda e: e["t_s"])[:MAX_ERRORS]


def _calibration(parts: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """The calibrated range is per process: the merged run stood as its worst shard did."""
    notes = [(p["calibration"], _label(p, i)) for i, p in enumerate(parts) if p.get("calibration")]
    if not notes:
        return None
    worst, label = max(notes, key=lambda n: (n[0].get("seconds_over", 0), n[0].get("peak_rate", 0.0)))
    return {**worst, "within": all(n.get("within", True) for n, _ in notes), "shard": label}


def _warnings(parts: Sequence[Mapping[str, Any]]) -> list[str]:
    out: list[str] = []
    for i, part in enumerate(parts):
        prefix = f"shard {_label(part, i)}: " if len(parts) > 1 else ""
        out.extend(prefix + w for w in part.get("warnings", []))
    return out


def _stored_thresholds(parts: Sequence[Mapping[str, Any]]) -> tuple[Threshold, ...]:
    """The scenario's thresholds as the parts' result files wrote them, if the parts checked them."""
    if not any(p.get("thresholds") for p in parts):
        return ()
    written: Mapping[str, list[Any]] = parts[0].get("scenario", {}).get("thresholds", {})
    parsed = []
    for key, entries in written.items():
        for entry in entries:
            if isinstance(entry, Mapping):
                parsed.append(
                    parse_threshold(
                        key,
                        str(entry["threshold"]),
                        abort_on_fail=bool(entry.get("abort_on_fail")),
                        delay_abort_eval_s=float(entry.get("delay_abort_eval", 0.0)),
                    )
                )
            else:
                parsed.append(parse_threshold(key, str(entry)))
    return tuple(parsed)


def explain_stop(
    merged: dict[str, Any], *, dead: Sequence[str], count: int, timed_out: Sequence[str],
    interrupted_by: str | None, aborted: bool, abort_reason: str | None,
) -> None:  # fmt: skip
    """Set the merged status and stop reason from what happened to the run as a whole (dead shards,
    shards stopped at the time limit, the parent's own interruption, a shard's abort)."""
    reasons: list[str] = []
    if dead:
        merged["status"] = "interrupted"
        reasons += dead
        reasons.append(f"the result holds {count - len(dead)} of {count} shards")
    if timed_out:
        merged["status"] = "interrupted"
        reasons.append(f"{', '.join(timed_out)} overran the time limit and was stopped")
    if interrupted_by is not None:
        merged["status"] = "interrupted"
        reasons.insert(0, interrupted_by)
    elif aborted and not reasons:
        # The other shards were stopped by the abort: the run as a whole was aborted, not interrupted.
        merged["status"] = "aborted"
        if abort_reason is not None:
            reasons.append(abort_reason)
    if reasons:
        merged["stop_reason"] = "; ".join(reasons)
