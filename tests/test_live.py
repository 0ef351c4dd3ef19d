"""The live view's window figures: exact, and computed without re-sorting every refresh."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from infer_bench.metrics.recorder import Recorder, SecondStats
from infer_bench.report.live import RecentWindow, _percentile_ms


@given(
    st.lists(st.lists(st.integers(1, 10**7), max_size=40), min_size=1, max_size=6), st.sampled_from([0.0, 0.5, 0.99])
)
def test_window_percentile_equals_sorting_everything(seconds: list[list[int]], q: float) -> None:
    everything = sorted(v for values in seconds for v in values)
    expected = everything[min(len(everything) - 1, int(len(everything) * q))] / 1000 if everything else None
    assert _percentile_ms([sorted(values) for values in seconds], q) == expected


def test_the_window_covers_the_last_complete_seconds_and_follows_new_ones() -> None:
    recorder = Recorder(0)
    for t in range(8):
        recorder.series.append(SecondStats(t=t, succeeded=10 * t, ttft_us=[1000 * t + 1, 1000 * t + 2]))
    window = RecentWindow()
    figures = window(recorder)
    assert figures["rate"] == sum(10 * t for t in range(2, 7)) / 5  # seconds 2..6; 7 is still running
    assert figures["p50"] == 4.002  # the 6th of the 10 values of seconds 2..6
    recorder.series.append(SecondStats(t=8))
    assert window(recorder)["rate"] == sum(10 * t for t in range(3, 8)) / 5
