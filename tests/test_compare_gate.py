"""compare and gate: side-by-side figures, comparability warnings, and a gate calibrated on known distributions.

The gate's two promises are tested on synthetic runs whose distributions are known exactly: TTFT is
lognormal (median 100 ms, σ 0.4), 100 requests a second for 60 s, on a "noisy machine" where every
second is slowed by its own factor (lognormal σ 0.08) and one second in twenty is a 1.5× hiccup. Pairs
of runs drawn from the same distribution must almost never fail a 10 % budget (no flapping), and pairs
whose current run is 20 % slower must almost always fail it. All draws are seeded: the figures below
are the same on every machine, fast or slow.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import synthetic
from infer_bench.compare import compare_results
from infer_bench.errors import UsageError
from infer_bench.gate import decide, rules_of
from infer_bench.intervals import IntervalLog
from infer_bench.noise import Change, Windowed, bootstrap_change, bootstrap_rate_change
from infer_bench.result import load_result
from infer_bench.scenario.gates import GateSyntaxError, parse_gate, parse_gate_option

# --- synthetic runs ---------------------------------------------------------------------------------

SECONDS = 60
PER_SECOND = 100


def noisy_run(rng: random.Random, scale: float = 1.0, seconds: int = SECONDS) -> list[list[float]]:
    return synthetic.noisy_run(rng, scale, seconds, PER_SECOND)


def pairs(seed: int, scale: float, count: int) -> list[tuple[Windowed, Windowed]]:
    rng = random.Random(seed)
    return [(Windowed.from_samples(noisy_run(rng)), Windowed.from_samples(noisy_run(rng, scale))) for _ in range(count)]


PAIRS = 60
RESAMPLES = 200  # the CLI uses 1000; 200 keeps these tests fast and the decisions are the same here


def bootstrap_all(seed: int, scale: float, percentiles: tuple[float, ...]) -> dict[float, list[Change]]:
    runs = pairs(seed, scale, PAIRS)
    return {
        p: [bootstrap_change(b, c, p, resamples=RESAMPLES, seed=i) for i, (b, c) in enumerate(runs)]
        for p in percentiles
    }


@pytest.fixture(scope="module")
def same() -> dict[float, list[Change]]:
    """Changes between pairs of runs of one distribution, per percentile."""
    return bootstrap_all(seed=11, scale=1.0, percentiles=(95.0, 99.0))


@pytest.fixture(scope="module")
def slower() -> dict[float, list[Change]]:
    """Changes from a run to one 20 % slower (every sample × 1.2), per percentile."""
    return bootstrap_all(seed=12, scale=1.2, percentiles=(50.0, 95.0, 99.0))


def failures(changes: list[Change], budget: float) -> tuple[int, int]:
    """(gate failures, naive failures): the gate wants the interval above 0, the naive rule only the point."""
    gate = naive = 0
    for change in changes:
        assert change.interval is not None
        naive += change.change > budget
        gate += change.change > budget and change.interval[0] > 0
    return gate, naive


@pytest.mark.parametrize("percentile", [95.0, 99.0])
def test_the_gate_does_not_flap_between_runs_of_one_distribution(
    same: dict[float, list[Change]], percentile: float
) -> None:
    gate, _ = failures(same[percentile], budget=0.10)
    assert gate / PAIRS <= 0.05


def test_the_noise_check_saves_a_tight_budget_from_flapping(same: dict[float, list[Change]]) -> None:
    """At a 5 % budget on p99 the point estimate alone fails 8 pairs of 60; with the interval, 1 does."""
    gate, naive = failures(same[99.0], budget=0.05)
    assert naive / PAIRS >= 0.10
    assert gate / PAIRS <= 0.05
    assert gate < naive


@pytest.mark.parametrize(("percentile", "detected"), [(50.0, 1.0), (95.0, 0.95), (99.0, 0.85)])
def test_the_gate_catches_a_real_20_percent_regression(
    slower: dict[float, list[Change]], percentile: float, detected: float
) -> None:
    gate, _ = failures(slower[percentile], budget=0.10)
    assert gate / PAIRS >= detected


def test_identical_runs_have_no_change_and_an_interval_around_zero() -> None:
    run = Windowed.from_samples(noisy_run(random.Random(3), seconds=20))
    change = bootstrap_change(run, run, 99.0, resamples=200)
    assert change.change == 0
    assert change.interval is not None
    assert change.interval[0] <= 0 <= change.interval[1]


def test_a_short_run_has_no_noise_estimate() -> None:
    run = Windowed.from_samples(noisy_run(random.Random(3), seconds=4))
    assert bootstrap_change(run, run, 50.0).interval is None


def test_the_mean_is_exact_and_rates_compare_per_second() -> None:
    base = Windowed.from_samples([[10.0, 20.0]] * 6)
    cur = Windowed.from_samples([[11.0, 22.0]] * 6)
    assert bootstrap_change(base, cur, None).change == pytest.approx(0.10)
    rate = bootstrap_rate_change([100.0] * 10, [90.0] * 10, resamples=200)
    assert rate.change == pytest.approx(-0.10)
    assert rate.interval == (pytest.approx(-0.10), pytest.approx(-0.10))


# --- rules ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "metric", "stat", "budget", "relative", "higher_is_worse"),
    [
        pytest.param("ttft.p99=10%", "ttft", "p99", 0.10, True, True, id="relative"),
        pytest.param("itl.p50=+2ms", "itl", "p50", 2.0, False, True, id="absolute"),
        pytest.param("e2e.mean=0.5s", "e2e", "mean", 500.0, False, True, id="seconds"),
        pytest.param("throughput=-5%", "request_rate", None, 0.05, True, False, id="throughput-signed"),
        pytest.param("token_throughput=5%", "token_rate", None, 0.05, True, False, id="throughput-unsigned"),
    ],
)
def test_gate_rules(
    text: str, metric: str, stat: str | None, budget: float, relative: bool, higher_is_worse: bool
) -> None:
    rule = parse_gate_option(text)
    assert (rule.metric, rule.stat, rule.relative, rule.higher_is_worse) == (metric, stat, relative, higher_is_worse)
    assert rule.budget == pytest.approx(budget)


@pytest.mark.parametrize(
    ("figure", "budget", "message"),
    [
        pytest.param("ttft.p99", "-10%", "gets worse as it rises", id="wrong-sign-latency"),
        pytest.param("throughput", "+5%", "gets worse as it falls", id="wrong-sign-throughput"),
        pytest.param("throughput", "5ms", "a rate takes a relative budget", id="absolute-throughput"),
        pytest.param("ttft.p97", "10%", "unknown figure", id="unknown-stat"),
        pytest.param("ttft.p99", "10", "expected a budget such as", id="no-unit"),
        pytest.param("output_tokens.p50", "10%", "unknown figure", id="no-direction"),
    ],
)
def test_unreadable_gate_rules(figure: str, budget: str, message: str) -> None:
    with pytest.raises(GateSyntaxError, match=message):
        parse_gate(figure, budget)


# --- result files -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs() -> dict[str, dict[str, Any]]:
    rng = random.Random(5)
    return {
        "baseline": synthetic.make_result(noisy_run(rng, seconds=30)),
        "same": synthetic.make_result(noisy_run(rng, seconds=30)),
        "slower": synthetic.make_result(noisy_run(rng, 1.3, seconds=30)),
    }


def test_decide_on_result_files(runs: dict[str, dict[str, Any]]) -> None:
    rules = [parse_gate_option("ttft.p95=10%"), parse_gate_option("ttft.p50=+5ms"), parse_gate_option("throughput=-5%")]
    same = decide(runs["baseline"], runs["same"], rules, resamples=300)
    assert [d.regressed for d in same] == [False, False, False]
    slower = decide(runs["baseline"], runs["slower"], rules, resamples=300)
    assert [d.regressed for d in slower] == [True, True, False]
    assert slower[0].reason.startswith("worse: +")
    assert "beyond +10%" in slower[0].reason
    assert slower[0].change is not None
    assert slower[0].change.baseline == pytest.approx(runs["baseline"]["total"]["summary"]["ttft"]["p95"], rel=0.01)


def test_a_result_without_windows_is_judged_on_its_summary(runs: dict[str, dict[str, Any]]) -> None:
    old = {**runs["slower"], "version": 1}
    del old["intervals"]
    (decision,) = decide(runs["baseline"], old, [parse_gate_option("ttft.p95=10%")])
    assert decision.regressed
    assert "no noise estimate" in decision.reason


def test_gates_come_from_the_scenario_when_no_rule_is_given(runs: dict[str, dict[str, Any]]) -> None:
    result = {**runs["slower"], "scenario": {**runs["slower"]["scenario"],
              "gates": {"max_regression": {"ttft.p99": "+10%", "throughput": "-5%"}, "confidence": 0.9}}}  # fmt: skip
    rules, confidence = rules_of(result)
    assert [r.label for r in rules] == ["ttft.p99 +10%", "throughput -5%"]
    assert confidence == 0.9


def test_compare_rows_and_arrows(runs: dict[str, dict[str, Any]]) -> None:
    comparison = compare_results(runs["baseline"], runs["slower"])
    rows = {row.figure: row for row in comparison.rows}
    assert rows["ttft.p50"].verdict == "worse"
    assert rows["ttft.p50"].relative == pytest.approx(0.3, abs=0.08)
    assert rows["error_rate"].verdict == "same"
    assert comparison.warnings == []


def test_compare_warns_when_runs_are_not_comparable(runs: dict[str, dict[str, Any]]) -> None:
    environment = {**runs["same"]["environment"], "cpu": "other-cpu", "git_revision": "b" * 40}
    scenario = {**runs["same"]["scenario"], "scenarios": {"chat": {"vus": 8}}}
    other = {**runs["same"], "environment": environment, "scenario": scenario, "status": "interrupted"}
    comparison = compare_results(runs["baseline"], other)
    assert "CPU differs: test-cpu → other-cpu" in comparison.warnings
    assert "the scenarios differ (chat): not the same load" in comparison.warnings
    assert "the current run did not complete (status interrupted)" in comparison.warnings
    assert f"git revision {'a' * 12} → {'b' * 12}" in comparison.notes


def test_interval_log_windows_subtract_cumulative_snapshots() -> None:
    from infer_bench.metrics.recorder import Recorder, tag_key

    recorder = Recorder(0)
    log = IntervalLog(("ttft",))
    hist = recorder.metric_set(tag_key(scenario="a")).histograms["ttft"]
    hist.record_value(1000, 3)
    log.take(1.0, recorder)
    hist.record_value(2000, 2)
    recorder.metric_set(tag_key(scenario="b")).histograms["ttft"].record_value(1000, 1)
    log.take(2.0, recorder)
    log.take(3.0, recorder)
    first, second, third = log.windows()
    assert (first.start_s, first.end_s, second.start_s, second.end_s) == (0.0, 1.0, 1.0, 2.0)
    assert first.histograms["ttft"].get_total_count() == 3
    assert second.histograms["ttft"].get_count_at_value(1000) == 1
    assert second.histograms["ttft"].get_count_at_value(2000) == 2
    assert third.histograms == {}


# --- loading and the command line ---------------------------------------------------------------------


def test_load_result_reads_v1_and_names_what_it_cannot(tmp_path: Path, runs: dict[str, dict[str, Any]]) -> None:
    v1 = tmp_path / "v1.json"
    v1.write_text(json.dumps({**runs["same"], "version": 1}))
    assert load_result(v1)["version"] == 1
    future = tmp_path / "v9.json"
    future.write_text(json.dumps({**runs["same"], "version": 9}))
    with pytest.raises(UsageError, match=r"result schema version 9; this infer-bench .* reads versions 1, 2"):
        load_result(future)
    junk = tmp_path / "junk.json"
    junk.write_text("{not json")
    with pytest.raises(UsageError, match="not a result file"):
        load_result(junk)
    with pytest.raises(UsageError, match="no such result file"):
        load_result(tmp_path / "missing.json")


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {"COLUMNS": "200", "NO_COLOR": "1", "PATH": "/usr/bin:/bin"}
    command = [sys.executable, "-m", "infer_bench.cli", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False, env=env)


def test_gate_and_compare_commands(tmp_path: Path, runs: dict[str, dict[str, Any]]) -> None:
    for name, result in runs.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(result))
    base, same, slower = (str(tmp_path / f"{n}.json") for n in ("baseline", "same", "slower"))
    passed = _cli("gate", base, same, "-r", "ttft.p99=10%", "-r", "throughput=-5%")
    assert passed.returncode == 0, passed.stderr
    assert "no regression" in passed.stdout
    failed = _cli("gate", base, slower, "-r", "ttft.p99=10%", "--format", "markdown")
    assert failed.returncode == 1, failed.stderr
    assert failed.stdout.startswith("## infer-bench gate · baseline → slower: ❌ 1 regression(s)")
    assert "regression beyond budget and noise: ttft.p99 +10%" in failed.stderr
    bad = _cli("gate", base, slower, "-r", "ttft.p99=-10%")
    assert bad.returncode == 2
    assert "gets worse as it rises" in bad.stderr
    no_rules = _cli("gate", base, slower)
    assert no_rules.returncode == 2
    assert "no rules" in no_rules.stderr
    compared = _cli("compare", base, slower)
    assert compared.returncode == 0, compared.stderr
    assert "▲ worse" in compared.stdout
