"""``infer-bench calibrate``: the ceiling search on a fake client whose limits are known, and the stored record."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from infer_bench.calibrate import (
    DEFAULT,
    PROTOCOLS,
    QUICK,
    Bounds,
    Measure,
    Probe,
    judge,
    probe_scenario,
    search_ceiling,
)
from infer_bench.calibration import cache_path, load_calibrations, machine_key, save_calibration
from infer_bench.scenario import ConstantArrivalRate, parse_scenario

BOUNDS = Bounds()


def fake_client(client_limit: float = 1e12, target_limit: float = 1e12) -> tuple[list[float], Measure]:
    """A measuring function whose lag explodes above ``client_limit`` and which loses requests above
    ``target_limit``; CPU grows with the rate. It also keeps the rates it was asked for."""
    asked: list[float] = []

    def measure(rate: float) -> Probe:
        asked.append(rate)
        lag = 0.5 if rate <= client_limit else 40.0
        lost = 0 if rate <= target_limit else int(rate)
        return Probe(rate, sent=int(rate * 2), dropped=lost, failed=0, cpu=min(rate / client_limit, 1.0) * 0.6,
                     lag_p99_ms=lag)  # fmt: skip

    return asked, measure


def test_the_search_finds_a_client_ceiling_within_its_resolution() -> None:
    asked, measure = fake_client(client_limit=3_900)
    ceiling = search_ceiling(measure, DEFAULT, BOUNDS)
    assert ceiling.limited_by == "client"
    assert ceiling.rate is not None
    assert 3_900 / (1 + DEFAULT.resolution) <= ceiling.rate <= 3_900
    assert asked[:7] == [100, 200, 400, 800, 1_600, 3_200, 6_400]  # doubling until the first failure
    assert "schedule lag p99 40.0 ms > 10 ms" in ceiling.reason
    assert len(asked) <= DEFAULT.max_runs
    assert [why is None for _, why in ceiling.probes] == [r <= 3_900 for r in asked]


def test_a_target_that_gives_out_first_is_named_as_the_limit() -> None:
    _, measure = fake_client(client_limit=10_000, target_limit=1_500)
    ceiling = search_ceiling(measure, QUICK, BOUNDS)
    assert ceiling.limited_by == "target"
    assert ceiling.rate is not None
    assert 1_500 / (1 + QUICK.resolution) <= ceiling.rate <= 1_500
    assert "the target fell behind" in ceiling.reason


def test_a_client_that_never_gives_out_is_bounded_by_the_searchs_budget() -> None:
    asked, measure = fake_client()
    ceiling = search_ceiling(measure, QUICK, BOUNDS)
    assert ceiling.limited_by == "none"
    assert ceiling.rate == max(asked) == 12_800  # eight runs, doubling from 100, within the maximum
    assert ceiling.reason == "nothing gave out up to 12,800/s: the ceiling is higher"


def test_no_ceiling_when_even_the_start_rate_is_beyond_the_bounds() -> None:
    _, measure = fake_client(client_limit=50)
    ceiling = search_ceiling(measure, QUICK, BOUNDS)
    assert ceiling.rate is None
    assert ceiling.limited_by == "client"


@pytest.mark.parametrize(
    ("probe", "verdict"),
    [
        pytest.param(Probe(1000, 2000, 0, 0, cpu=0.5, lag_p99_ms=1.0), None, id="within"),
        pytest.param(Probe(1000, 2000, 0, 0, cpu=0.5, lag_p99_ms=11.0), "client", id="late"),
        pytest.param(Probe(1000, 2000, 0, 0, cpu=0.5, lag_p99_ms=6.0), None, id="late-within-the-runners-own-bound"),
        pytest.param(Probe(1000, 2000, 0, 0, cpu=0.9, lag_p99_ms=1.0), "client", id="busy"),
        pytest.param(Probe(1000, 2000, 5, 0, cpu=0.5, lag_p99_ms=1.0), "target", id="dropped"),
        pytest.param(Probe(1000, 2000, 1, 0, cpu=0.5, lag_p99_ms=1.0), None, id="one-drop-in-a-thousand-is-noise"),
        pytest.param(Probe(1000, 2000, 0, 9, cpu=0.5, lag_p99_ms=1.0), "target", id="failed"),
    ],
)
def test_judge_names_what_gave_out(probe: Probe, verdict: str | None) -> None:
    found = judge(probe, BOUNDS)
    assert (found[0] if found else None) == verdict


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_probe_scenarios_are_valid_open_loop_runs(protocol: str) -> None:
    scenario = parse_scenario(probe_scenario("http://127.0.0.1:9", protocol, 1234.5, 2.0, 0.5))
    spec = scenario.scenarios["calibrate"]
    assert isinstance(spec.executor, ConstantArrivalRate)
    assert spec.executor.rate == pytest.approx(1234.5)
    assert spec.classes[0].protocol == protocol


def test_calibrations_are_kept_per_machine_and_protocol(tmp_path: Path) -> None:
    path = tmp_path / "cache" / "calibration.json"
    assert load_calibrations(path, "m1") == {}
    save_calibration({"ceiling_rate": 3900.0}, "sse", path, "m1")
    save_calibration({"ceiling_rate": 9000.0}, "http", path, "m1")
    save_calibration({"ceiling_rate": 100.0}, "sse", path, "m2")
    assert load_calibrations(path, "m1") == {"sse": {"ceiling_rate": 3900.0}, "http": {"ceiling_rate": 9000.0}}
    assert load_calibrations(path, "m3") == {}
    path.write_text("{not json")
    assert load_calibrations(path, "m1") == {}  # a damaged cache loses the range check, never a run
    save_calibration({"ceiling_rate": 1.0}, "sse", path, "m1")
    assert json.loads(path.read_text())["machines"] == {"m1": {"sse": {"ceiling_rate": 1.0}}}


def test_the_cache_lives_under_xdg_cache_home_and_the_key_names_the_version() -> None:
    assert cache_path({"XDG_CACHE_HOME": "/x"}) == Path("/x/infer-bench/calibration.json")
    assert cache_path({}).parts[-3:] == (".cache", "infer-bench", "calibration.json")
    assert "infer-bench " in machine_key()
    assert "Python" in machine_key()


def test_calibrate_refuses_an_unknown_protocol_before_starting_anything() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "infer_bench.cli", "calibrate", "--protocol", "grpc", "--quick"],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert done.returncode == 2
    assert "--protocol grpc: expected one of http, sse, websocket, openai" in done.stderr


def test_late_sends_with_lost_requests_and_cpu_to_spare_are_the_targets_limit() -> None:
    found = judge(Probe(8000, 16000, 1493, 0, cpu=0.44, lag_p99_ms=1172.5), BOUNDS)
    assert found == ("target", "the target fell behind (1,493 dropped, 0 failed; schedule lag p99 1,172.5 ms > 10 ms)")


def test_the_table_shows_the_ceiling_every_run_and_overhead_rows_beyond_the_bounds() -> None:
    import io

    from rich.console import Console

    from infer_bench.calibrate import render_calibration

    probe = {
        "rate": 800.0,
        "sent": 1600,
        "dropped": 0,
        "failed": 0,
        "cpu": 0.3,
        "lag_p99_ms": 40.0,
        "latency_p50_ms": None,
        "latency_p99_ms": None,
        "failed_because": "schedule lag p99 40.0 ms > 10 ms",
    }
    row = {
        "fraction": 0.5,
        "rate": 200.0,
        "cpu": 0.07,
        "lag_p99_ms": 1833.0,
        "metric": "ttft",
        "p50_ms": 1479.7,
        "p99_ms": 1913.9,
        "added_mean_ms": 98.6,
        "itl_p50_ms": 16.2,
        "itl_p99_ms": 129.1,
        "itl_added_mean_ms": -1.8,
        "beyond": "schedule lag p99 1,833.0 ms > 10 ms",
    }
    record = {"protocol": "websocket", "mode": "quick", "took_s": 27.6, "ceiling_rate": 400.0, "limited_by": "client",
              "reason": "at 500/s: schedule lag p99 10.7 ms > 10 ms", "probes": [probe], "overhead": [row],
              "step_ms": 2.0}  # fmt: skip
    text = io.StringIO()
    Console(file=text, width=220, color_system=None).print(render_calibration(record))
    out = text.getvalue()
    assert "ceiling 400 req/s per process · limited by client (at 500/s: schedule lag p99 10.7 ms > 10 ms)" in out
    assert "schedule lag p99 40.0 ms > 10 ms" in out
    assert "✗ schedule lag p99 1,833.0 ms > 10 ms" in out


def test_late_sends_with_the_client_mostly_idle_are_the_machines_doing() -> None:
    found = judge(Probe(200, 400, 0, 0, cpu=0.10, lag_p99_ms=17.4), BOUNDS)
    assert found is not None
    assert found[0] == "machine"
    assert found[1].startswith("schedule lag p99 17.4 ms > 10 ms at 10% client CPU")


def test_a_run_failed_by_the_machine_is_run_again_within_a_budget() -> None:
    """A busy moment at 400/s is retried and passes; a machine busy at every rate above 1,000/s uses up the
    retries and then counts as a failure."""
    asked: list[float] = []

    def measure(rate: float) -> Probe:
        asked.append(rate)
        busy = (rate == 400 and asked.count(400) == 1) or rate > 1_000
        return Probe(rate, int(rate), 0, 0, cpu=0.1, lag_p99_ms=30.0 if busy else 1.0)

    ceiling = search_ceiling(measure, DEFAULT, BOUNDS)
    assert asked.count(400) == 2  # retried once, then passed
    assert ceiling.limited_by == "machine"
    assert ceiling.rate is not None
    assert 1_000 / (1 + DEFAULT.resolution) <= ceiling.rate <= 1_000
    retried = len(asked) - len(set(asked))
    assert retried <= DEFAULT.retries + DEFAULT.confirm  # every retry is within the budget
