"""Runs know their accurate range: a synthetic calibration, and what a run, a merge and the summary say of it."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from fakes import broken_server
from infer_bench.calibration import machine_key, range_note, range_warnings, run_protocols, save_calibration
from infer_bench.merge import _calibration
from infer_bench.report.summary import render_summary
from infer_bench.runner import run_scenario
from infer_bench.scenario import parse_scenario

CALIBRATED = {
    "sse": {"ceiling_rate": 3900.0, "limited_by": "client", "measured_at": "2026-11-24T00:30:00+00:00"},
    "http": {"ceiling_rate": 9000.0, "limited_by": "target", "measured_at": "2026-11-24T00:31:00+00:00"},
}


def series(*started: int) -> list[dict[str, Any]]:
    return [{"t": t, "started": n} for t, n in enumerate(started)]


def test_a_run_above_the_client_ceiling_is_told_plainly_to_use_processes() -> None:
    note = range_note(series(3000, 4200, 4500, 3800), ["sse"], CALIBRATED)
    assert note is not None
    assert (note["within"], note["seconds_over"], note["peak_rate"]) == (False, 2, 4500.0)
    (warning,) = range_warnings(note)
    assert warning.startswith("calibration: this process sent more than 3,900 req/s in 2 s of the run (peak 4,500/s;")
    assert warning.endswith(
        "measurements above 3,900 req/s per process on this machine are not trustworthy: use --processes"
    )


def test_one_second_above_the_ceiling_is_not_a_pattern() -> None:
    note = range_note(series(3000, 4200, 3800), ["sse"], CALIBRATED)
    assert note is not None
    assert note["within"]
    assert range_warnings(note) == []


def test_a_ceiling_where_the_calibrations_server_gave_out_says_accuracy_is_unknown_beyond_it() -> None:
    (warning,) = range_warnings(range_note(series(9500, 9600), ["http"], CALIBRATED))
    assert "beyond the range calibrated on this machine (up to 9,000 req/s per process" in warning
    assert "not trustworthy" not in warning


def test_a_mix_of_protocols_is_held_to_the_lowest_calibrated_ceiling() -> None:
    note = range_note(series(5000, 5000), ["http", "sse", "websocket"], CALIBRATED)
    assert note is not None
    assert (note["protocol"], note["ceiling_rate"], note["within"]) == ("sse", 3900.0, False)


def test_no_calibration_for_the_runs_protocols_means_no_note() -> None:
    assert range_note(series(10**6, 10**6), ["websocket"], CALIBRATED) is None
    assert range_warnings(None) == []


def test_the_protocols_of_a_run_come_from_its_classes() -> None:
    result = {"scenario": {"scenarios": {"a": {"classes": [{"protocol": "sse"}, {"protocol": "http"}]},
                                         "b": {"classes": [{"protocol": "sse"}]}}}}  # fmt: skip
    assert run_protocols(result) == ["sse", "http"]


def test_a_merged_run_stands_as_its_worst_shard() -> None:
    ok = {"shard": {"index": 0, "count": 2}, "calibration": range_note(series(100), ["sse"], CALIBRATED)}
    over = {"shard": {"index": 1, "count": 2}, "calibration": range_note(series(4000, 4000), ["sse"], CALIBRATED)}
    note = _calibration([ok, over])
    assert note is not None
    assert (note["within"], note["seconds_over"], note["shard"]) == (False, 2, "1/2")
    assert _calibration([{"shard": {"index": 0, "count": 1}}]) is None


@pytest.mark.slow
def test_a_run_beyond_this_machines_calibration_warns_and_records_its_loop_lag(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A synthetic calibration of 10 req/s for SSE; a 3 s run at 40/s goes beyond it in every second."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    save_calibration({"ceiling_rate": 10.0, "limited_by": "client", "measured_at": "test"}, "sse",
                     tmp_path / "cache" / "infer-bench" / "calibration.json", machine_key())  # fmt: skip
    with broken_server() as url:
        result, code = run_scenario(parse_scenario(f"""
target: {url}
scenarios:
  over:
    executor: constant-arrival-rate
    rate: 40
    duration: 3s
    pre_allocated_vus: 4
    max_vus: 16
    protocol: sse
    request: {{path: /ok}}
"""), out=None)  # fmt: skip
    assert code == 0
    assert result["calibration"]["within"] is False
    assert result["calibration"]["ceiling_rate"] == 10.0
    assert any("measurements above 10 req/s per process on this machine are not trustworthy" in w
               for w in result["warnings"])  # fmt: skip
    lags = result["client"]["loop_lag_ms_by_second"]
    assert len(lags) == len(result["client"]["cpu_by_second"]) >= 2
    assert all(lag >= 0 for lag in lags)
    text = io.StringIO()
    Console(file=text, width=200, color_system=None).print(render_summary(result))
    assert "not trustworthy: use --processes" in " ".join(text.getvalue().split())


def test_the_summary_says_when_a_run_stayed_within_the_calibrated_range() -> None:
    result = {
        "headline": {"requests": 1, "succeeded": 1, "request_rate": 1.0, "completion_rate": 1.0, "disconnect_rate": 0,
                     "error_rate": 0, "dropped": 0, "tokens": 2, "token_rate": 2.0},
        "scenario": {"source": "s.yaml", "target": "http://127.0.0.1:1"}, "status": "complete", "duration_s": 1.0,
        "total": {"summary": {}, "outcomes": {}}, "groups": [], "warnings": [],
        "calibration": range_note(series(100), ["sse"], CALIBRATED),
    }  # fmt: skip
    text = io.StringIO()
    Console(file=text, width=200, color_system=None).print(render_summary(result))
    assert "within this machine's calibrated range (sse: up to 3,900 req/s per process; peak 100/s)" in text.getvalue()


def test_a_ceiling_set_by_a_busy_machine_says_so() -> None:
    calibrated = {"sse": {"ceiling_rate": 175.0, "limited_by": "machine", "measured_at": "t"}}
    (warning,) = range_warnings(range_note(series(400, 400), ["sse"], calibrated))
    assert "(up to 175 req/s per process, where other work on the machine made the client late)" in warning
