"""Synthetic runs with known distributions, as result files: for gate, compare and report tests."""

from __future__ import annotations

import random
from typing import Any

from infer_bench.intervals import Window
from infer_bench.metrics.recorder import MetricSet, new_histogram
from infer_bench.result import SCHEMA, headline, summarize


def noisy_run(rng: random.Random, scale: float = 1.0, seconds: int = 60, per_second: int = 100) -> list[list[float]]:
    """TTFT samples (ms) per second: lognormal (median 100 ms, σ 0.4), times a per-second factor
    (lognormal σ 0.08), and one second in twenty a 1.5× hiccup: a noisy 2-core machine."""
    run = []
    for _ in range(seconds):
        factor = scale * rng.lognormvariate(0, 0.08) * (1.5 if rng.random() < 0.05 else 1.0)
        run.append([factor * rng.lognormvariate(4.6, 0.4) for _ in range(per_second)])
    return run


def make_result(seconds: list[list[float]], *, cpu: str = "test-cpu", tokens_per_request: int = 10) -> dict[str, Any]:
    """A schema-v2 result whose TTFT windows hold ``seconds`` (ms per request)."""
    total = MetricSet()
    log_windows = []
    for t, samples in enumerate(seconds):
        hist = new_histogram()
        for value in samples:
            hist.record_value(int(value * 1000))
        total.histograms["ttft"].add(hist)
        log_windows.append(Window(float(t), float(t + 1), {"ttft": hist}).to_json())
    requests = sum(len(s) for s in seconds)
    total.outcomes["completed"] = requests
    total.tokens = requests * tokens_per_request
    return {
        "schema": SCHEMA, "version": 2, "started_at": "2025-01-01T00:00:00+00:00", "duration_s": float(len(seconds)),
        "status": "complete", "stop_reason": None,
        "scenario": {"source": "s.yaml", "target": "http://127.0.0.1:1", "target_kind": "reference",
                     "reference": {}, "scenarios": {"chat": {"vus": 4}}, "thresholds": {}},
        "environment": {"cpu": cpu, "cpu_count": 2, "python": "3.11", "infer_bench": "0.1.0", "git_revision": "a" * 40},
        "headline": headline(total, float(len(seconds))), "total": {"summary": summarize(total), "outcomes": {}},
        "groups": [{"tags": {"scenario": "chat", "class": "default", "protocol": "sse"}, "requests": requests,
                    "outcomes": {"completed": requests}, "tokens": total.tokens, "dropped": 0,
                    "summary": summarize(total), "histograms": {"ttft": total.histograms["ttft"].encode().decode()}}],
        "series": [{"t": t, "succeeded": len(s), "tokens": len(s) * tokens_per_request} for t, s in enumerate(seconds)],
        "intervals": {"metrics": ["ttft"], "windows": log_windows},
    }  # fmt: skip
