"""Timelines into histograms: definitions of TTFT, ITL, TPOT and E2E, outcomes and merging."""

from __future__ import annotations

import pytest
from hdrh.histogram import HdrHistogram
from hypothesis import given
from hypothesis import strategies as st

from infer_bench.metrics.recorder import HIGHEST_US, MetricSet, Recorder, new_histogram, record_many, tag_key
from infer_bench.metrics.timeline import GapBuffer, Outcome, Timeline
from infer_bench.result import headline, summarize

MS = 1_000_000
BASE = 1_000 * MS  # stamps are monotonic clock readings; 0 means "never happened"


def approx(value: float) -> object:
    """HdrHistogram answers to 3 significant digits (the highest value equivalent to a bucket)."""
    return pytest.approx(value, rel=1e-3)


def streamed(rec: Recorder, key: tuple[tuple[str, str], ...], token_ms: list[int], outcome: Outcome = Outcome.COMPLETED,
             intended_ms: int = 0, sent_ms: int = 0) -> Timeline:  # fmt: skip
    tl = rec.timeline(key, BASE + intended_ms * MS, measured=True)
    tl.sent_ns = BASE + sent_ms * MS
    tl.headers_ns = BASE + (sent_ms + 1) * MS
    for t in token_ms:
        tl.on_tokens(BASE + t * MS)
    tl.finish(outcome, BASE + (token_ms[-1] if token_ms else sent_ms + 1) * MS)
    rec.finished(key, tl, measured=True)
    return tl


def test_ttft_itl_tpot_and_e2e_follow_their_definitions() -> None:
    rec = Recorder(0)
    key = tag_key(scenario="s")
    streamed(rec, key, [10, 30, 50, 70])
    rec.flush()
    stats = summarize(rec.sets[key])
    assert stats["ttft"]["p50"] == approx(10.0)
    assert stats["itl"]["count"] == 3
    assert stats["itl"]["min"] == approx(20.0)
    assert stats["itl"]["max"] == approx(20.0)
    assert stats["tpot"]["p50"] == approx(20.0)
    assert stats["e2e"]["max"] == approx(70.0)
    assert stats["headers"]["p50"] == approx(1.0)
    assert stats["output_tokens"]["p50"] == 4


def test_open_loop_latency_counts_from_the_intended_start_and_keeps_the_sent_variant() -> None:
    rec = Recorder(0)
    key = tag_key(scenario="s")
    streamed(rec, key, [110, 120], intended_ms=0, sent_ms=100)  # sent 100 ms late
    rec.flush()
    stats = summarize(rec.sets[key])
    assert stats["ttft"]["p50"] == approx(110.0)
    assert stats["ttft_sent"]["p50"] == approx(10.0)
    assert stats["schedule_lag"]["p50"] == approx(100.0)


def test_an_event_with_k_tokens_adds_one_gap_and_k_minus_one_zero_gaps() -> None:
    tl = Timeline(0, gaps := GapBuffer())
    tl.on_tokens(10 * MS, 1)
    tl.on_tokens(30 * MS, 3)
    assert (gaps.values, gaps.zeros) == ([20_000], 2)  # µs; the zero gaps as a count
    assert tl.tokens == 4


def test_the_first_outcome_wins() -> None:
    tl = Timeline(0, GapBuffer())
    tl.finish(Outcome.CANCELLED, 5)
    tl.finish(Outcome.DISCONNECTED, 9, "late error")
    assert (tl.outcome, tl.end_ns, tl.error) == (Outcome.CANCELLED, 5, None)


def test_failed_requests_count_as_outcomes_but_not_as_latencies() -> None:
    rec = Recorder(0)
    key = tag_key(scenario="s")
    streamed(rec, key, [10, 20])
    streamed(rec, key, [15], outcome=Outcome.DISCONNECTED)
    streamed(rec, key, [12], outcome=Outcome.CANCELLED)
    rec.flush()
    ms = rec.sets[key]
    assert ms.outcomes == {"completed": 1, "disconnected": 1, "cancelled": 1}
    assert ms.histograms["e2e"].get_total_count() == 1
    assert ms.histograms["ttft"].get_total_count() == 3
    head = headline(ms, duration_s=1.0)
    assert head["completion_rate"] == 0.5  # cancelled on purpose are left out
    assert head["disconnect_rate"] == round(1 / 3, 6)
    assert len(rec.error_sample) == 1


def test_warmup_requests_feed_the_series_but_not_the_statistics() -> None:
    rec = Recorder(0)
    key = tag_key(scenario="s")
    tl = rec.timeline(key, 1, measured=False)
    tl.sent_ns = 1
    tl.on_tokens(5 * MS)
    tl.on_tokens(9 * MS)
    tl.finish(Outcome.COMPLETED, 9 * MS)
    rec.finished(key, tl, measured=False)
    assert key not in rec.sets
    assert rec.series[0].succeeded == 1


def test_metric_sets_merge_losslessly() -> None:
    a, b = Recorder(0), Recorder(0)
    key = tag_key(scenario="s")
    streamed(a, key, [10, 20])
    streamed(b, key, [30, 50])
    merged = MetricSet()
    merged.merge(a.sets[key])
    merged.merge(b.sets[key])
    stats = summarize(merged)
    assert stats["ttft"]["count"] == 2
    assert (stats["ttft"]["min"], stats["ttft"]["max"]) == (approx(10.0), approx(30.0))
    assert merged.outcomes == {"completed": 2}


def test_zero_gaps_are_folded_as_a_count_and_every_gap_is_kept() -> None:
    rec = Recorder(0)
    key = tag_key(scenario="s")
    tl = rec.timeline(key, 0, measured=True)
    tl.sent_ns = 1
    tl.on_tokens(10 * MS, 1)
    tl.on_tokens(30 * MS, 63)  # one read carrying 63 tokens: one 20 ms gap and 62 zero gaps
    tl.finish(Outcome.COMPLETED, 31 * MS)
    rec.finished(key, tl, measured=True)
    rec.flush()
    itl = rec.sets[key].histograms["itl"]
    assert itl.get_total_count() == 63  # tokens - 1
    assert itl.get_count_at_value(1) == 62
    assert itl.get_count_at_value(20_000) == 1


@given(st.lists(st.integers(-5, HIGHEST_US + 10) | st.sampled_from([0, 1, 2047, 2048, 4095, 4096, HIGHEST_US])))
def test_bulk_recording_equals_hdrh_record_value(values: list[int]) -> None:
    one_by_one, bulk = new_histogram(), new_histogram()
    for value in values:
        one_by_one.record_value(min(max(value, 1), HIGHEST_US))
    record_many(bulk, values)
    assert bulk.encode() == one_by_one.encode()
    assert (bulk.get_total_count(), bulk.get_min_value(), bulk.get_max_value()) == (
        one_by_one.get_total_count(),
        one_by_one.get_min_value(),
        one_by_one.get_max_value(),
    )


def test_old_seconds_keep_their_ttft_percentiles_and_drop_their_samples() -> None:
    """Memory stays flat in long runs: only the live view's recent seconds hold samples."""
    from infer_bench.metrics.recorder import SAMPLED_SECONDS

    rec = Recorder(BASE)
    key = tag_key(scenario="s")
    for second in range(30):
        for i in range(100):  # TTFTs of 1..100 ms, intended at the start of each second
            streamed(rec, key, [second * 1000 + i + 1], intended_ms=second * 1000, sent_ms=second * 1000)
    assert [len(s.ttft_us) > 0 for s in rec.series] == [False] * (30 - SAMPLED_SECONDS - 1) + [True] * (
        SAMPLED_SECONDS + 1
    )
    for sec in rec.series:
        row = sec.to_json()
        assert (row["ttft_p50_ms"], row["ttft_p99_ms"]) == (51.0, 100.0)  # sealed or not, the same figures
        assert row["succeeded"] == 100


def test_a_dropped_histogram_is_freed_at_once_not_by_the_cyclic_collector() -> None:
    """hdrh's histogram and encoder refer to each other; runs collect cycles rarely, so a cycle per
    second's snapshot grew memory by ~0.7 MB a second."""
    import gc
    import weakref

    gc.disable()
    try:
        hist = new_histogram()
        hist.record_value(1234)
        assert HdrHistogram.decode(hist.encode()).get_total_count() == 1  # encoding works through the weak reference
        ref = weakref.ref(hist)
        del hist
        assert ref() is None
    finally:
        gc.enable()
