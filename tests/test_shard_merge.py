"""Merging shard results: histograms, counters and series add up exactly; thresholds are checked again."""

from __future__ import annotations

import random
from typing import Any

import pytest
from hdrh.histogram import HdrHistogram

from infer_bench.merge import merge_results
from infer_bench.metrics.recorder import new_histogram
from infer_bench.scenario.thresholds import parse_threshold
from synthetic import make_result, noisy_run

NS = 1_000_000_000


def shard_result(seed: int, seconds: int, start_s: int, index: int, **extra: Any) -> dict[str, Any]:
    result = make_result(noisy_run(random.Random(seed), seconds=seconds, per_second=50))
    result["start_epoch_ns"] = 1_700_000_000 * NS + start_s * NS + 123_456  # sub-second jitter is ignored
    result["shard"] = {"index": index, "count": 2}
    result["headline"]["interrupted"] = index
    result["groups"][0]["statuses"] = {"200": result["groups"][0]["requests"]}
    result["client"] = {"cpu_by_second": [0.5] * seconds, "pid": 1000 + index}
    result.update(extra)
    return result


def ttft(result: dict[str, Any]) -> HdrHistogram:
    hist = new_histogram()
    for group in result["groups"]:
        hist.add(HdrHistogram.decode(group["histograms"]["ttft"]))
    return hist


def test_two_shards_merge_into_exactly_their_sums() -> None:
    a = shard_result(1, seconds=5, start_s=0, index=0)
    b = shard_result(2, seconds=4, start_s=1, index=1)  # started a second later
    merged = merge_results([a, b])

    expected = new_histogram()
    expected.add(ttft(a))
    expected.add(ttft(b))
    got = ttft(merged)
    assert got.get_total_count() == 5 * 50 + 4 * 50
    assert list(got.counts) == list(expected.counts)  # bucket for bucket: lossless
    (group,) = merged["groups"]
    assert group["outcomes"] == {"completed": 450}
    assert group["statuses"] == {"200": 450}
    assert group["tokens"] == a["groups"][0]["tokens"] + b["groups"][0]["tokens"]
    assert merged["headline"]["requests"] == merged["headline"]["succeeded"] == 450
    assert merged["headline"]["interrupted"] == 1
    assert merged["total"]["summary"]["ttft"]["p99"] == expected.get_value_at_percentile(99) / 1000
    # b's second t is the run's second t + 1: the series align on the earliest start.
    succeeded = [s["succeeded"] for s in merged["series"]]
    assert succeeded == [50, 100, 100, 100, 100]
    assert sum(s["tokens"] for s in merged["series"]) == group["tokens"]
    assert merged["duration_s"] == 5.0
    windows = merged["intervals"]["windows"]
    assert [(w["start_s"], w["end_s"]) for w in windows] == [(t, t + 1) for t in range(5)]
    window_counts = [HdrHistogram.decode(w["histograms"]["ttft"]).get_total_count() for w in windows]
    assert window_counts == succeeded
    assert [s["shard"] for s in merged["client"]["shards"]] == ["0/2", "1/2"]
    assert merged["status"] == "complete"


def test_different_tag_sets_stay_apart_and_the_total_adds_them() -> None:
    a = shard_result(1, seconds=2, start_s=0, index=0)
    b = shard_result(2, seconds=2, start_s=0, index=1)
    b["groups"][0]["tags"] = {**b["groups"][0]["tags"], "class": "other"}
    merged = merge_results([a, b])
    assert [g["tags"]["class"] for g in merged["groups"]] == ["default", "other"]
    assert merged["total"]["outcomes"] == {"completed": 200}


def test_the_worst_status_wins_and_names_its_shard() -> None:
    a = shard_result(1, seconds=2, start_s=0, index=0, status="aborted", stop_reason="threshold x failed")
    b = shard_result(2, seconds=2, start_s=0, index=1, status="interrupted", stop_reason="interrupted (SIGTERM)")
    merged = merge_results([a, b])
    assert merged["status"] == "interrupted"
    assert merged["stop_reason"] == "interrupted (SIGTERM) (shard 1/2)"
    assert merge_results([a, shard_result(3, 2, 0, 1)])["status"] == "aborted"


def test_thresholds_are_checked_again_on_the_merged_figures() -> None:
    a = shard_result(1, seconds=3, start_s=0, index=0)
    b = shard_result(2, seconds=3, start_s=0, index=1)
    slow = parse_threshold("ttft", "p(95)<10ms")
    fine = parse_threshold("ttft", "p(50)<10s")
    merged = merge_results([a, b], thresholds=[slow, fine])
    expected = new_histogram()
    expected.add(ttft(a))
    expected.add(ttft(b))
    results = {t["expression"]: t for t in merged["thresholds"]}
    assert results["p(95)<10ms"]["ok"] is False
    assert results["p(95)<10ms"]["value"] == pytest.approx(expected.get_value_at_percentile(95) / 1000)
    assert results["p(50)<10s"]["ok"] is True
    assert "thresholds" not in merge_results([a, b])  # the parts checked none: none checked now


def test_nothing_to_merge_is_an_error() -> None:
    with pytest.raises(ValueError, match="nothing to merge"):
        merge_results([])
