"""Sweep conclusions from figures whose answer is known: capacity search, frontier, recommendation."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from infer_bench.errors import ScenarioError
from infer_bench.sweep import CellFigures, find_capacity, pareto_frontier, parse_sweep, recommend


def cell(setting: str, load: float, throughput: float, p99: float | None, passed: bool = True) -> CellFigures:
    return CellFigures(setting, load, throughput, None, p99, None, 1.0, passed)


@pytest.mark.parametrize("true_capacity", [75.0, 300.0, 1234.0, 4999.0])
def test_doubling_then_bisection_lands_within_the_resolution(true_capacity: float) -> None:
    tried: list[float] = []

    def passes(rate: float) -> bool:
        tried.append(rate)
        return rate <= true_capacity

    cap = find_capacity("s", passes, start=50, maximum=5000, resolution=0.05, confirm=1)
    assert cap.rate is not None
    assert cap.failed_at is not None
    assert cap.rate <= true_capacity < cap.failed_at <= cap.rate * 1.05
    assert len(tried) <= 20
    assert cap.verdict.startswith(f"passed 2 of 2 runs at {cap.rate:,.4g}/s")


def test_the_maximum_passing_ends_the_search_and_says_so() -> None:
    cap = find_capacity("s", lambda rate: True, start=100, maximum=1000, confirm=0)
    assert cap.rate == 1000
    assert cap.failed_at is None
    assert [r for r, _ in cap.runs] == [100, 200, 400, 800, 1000]
    assert "the maximum 1,000/s passed" in cap.verdict


def test_a_start_rate_that_fails_gives_no_capacity() -> None:
    cap = find_capacity("s", lambda rate: False, start=100, maximum=1000)
    assert cap.rate is None
    assert cap.failed_at == 100
    assert "failed already at the start rate" in cap.verdict


def test_a_rate_that_passed_by_luck_is_not_capacity() -> None:
    # True capacity 400; a single lucky pass at 800 must not stand once confirmation runs it again.
    luck = {800.0: [True, False]}

    def passes(rate: float) -> bool:
        if luck.get(rate):
            return luck[rate].pop(0)
        return rate <= 400

    cap = find_capacity("s", passes, start=100, maximum=1000, resolution=0.5, confirm=1)
    assert cap.rate is not None
    assert cap.rate <= 400
    assert (800.0, True) in cap.runs
    assert (800.0, False) in cap.runs


def test_noisy_slo_near_the_edge_still_gives_a_confirmed_rate_below_it() -> None:
    rng = random.Random(7)

    def passes(rate: float) -> bool:  # a 10 % band of noise around 500
        return rate < 450 or (rate < 550 and rng.random() < 0.5)

    cap = find_capacity("s", passes, start=50, maximum=5000, resolution=0.05, confirm=2)
    assert cap.rate is not None
    assert cap.rate < 550
    assert sum(1 for r, ok in cap.runs if r == cap.rate and ok) == 3  # the pass and its two confirmations


def test_the_frontier_keeps_only_cells_nothing_beats_on_both_axes() -> None:
    a, b, c, d = cell("a", 1, 100, 50), cell("b", 1, 200, 80), cell("c", 1, 150, 90), cell("d", 1, 300, 200)
    assert pareto_frontier([a, b, c, d]) == [a, b, d]  # c: b has more throughput and a lower p99


def test_recommendation_is_the_most_throughput_among_settings_that_keep_the_slo() -> None:
    cells = [
        cell("small", 10, 10, 20), cell("small", 100, 50, 900, passed=False),
        cell("big", 10, 10, 40), cell("big", 100, 100, 60),
        cell("reckless", 10, 10, 300, passed=False), cell("reckless", 100, 140, 80),
    ]  # fmt: skip
    rec = recommend(cells)
    assert rec is not None
    assert rec.setting == "big"


def test_no_setting_within_the_slo_gives_no_recommendation() -> None:
    assert recommend([cell("a", 1, 10, 900, passed=False)]) is None


def test_sweep_file_errors_name_line_and_key(tmp_path: Path) -> None:
    text = "scenario: s.yaml\ngrid:\n  batch_size: [1, 8]\n  bogus_setting: [1]\ncapacity: {start: 100, max: 10}\n"
    with pytest.raises(ScenarioError) as err:
        parse_sweep(text, source="sweep.yaml")
    message = str(err.value)
    assert "sweep.yaml:4 grid.bogus_setting: expected a server setting or <model name>.<parameter>" in message
    assert "sweep.yaml:5 capacity.max: must be at least start (100)" in message


def test_a_server_command_must_take_the_port_and_every_grid_name() -> None:
    text = (
        "scenario: s.yaml\nserver: {command: 'srv --batch {batch_size}'}\ngrid: {batch_size: [1], x: [2]}\nloads: [1]\n"
    )
    with pytest.raises(ScenarioError) as err:
        parse_sweep(text, source="sweep.yaml")
    assert "sweep.yaml:2 server.command: the command must take the port as {port}" in str(err.value)


def test_the_grid_is_every_combination_in_order(tmp_path: Path) -> None:
    sweep = parse_sweep("scenario: s.yaml\ngrid: {batch_size: [1, 8], echo.base_ms: [5, 20]}\nloads: [10]\n",
                        base_dir=tmp_path, stem="mine")  # fmt: skip
    assert [s.label for s in sweep.settings] == [
        "batch_size=1, echo.base_ms=5", "batch_size=1, echo.base_ms=20",
        "batch_size=8, echo.base_ms=5", "batch_size=8, echo.base_ms=20",
    ]  # fmt: skip
    assert sweep.out_dir == tmp_path / "mine-results"
    assert sweep.scenario_path == tmp_path / "s.yaml"


def test_throughputs_within_noise_are_a_tie_that_latency_decides() -> None:
    cells = [
        cell("eager", 10, 10, 22), cell("eager", 120, 120, 42),
        cell("patient", 10, 10, 53), cell("patient", 120, 121, 53),
    ]  # fmt: skip
    rec = recommend(cells)
    assert rec is not None
    assert rec.setting == "eager"
    assert "lowest latency" in rec.reason


def test_the_shipped_sweep_and_its_scenario_are_valid() -> None:
    from infer_bench.scenario import load_scenario
    from infer_bench.sweep import check_scenario, load_sweep
    from infer_bench.sweep.execute import check_settings

    root = Path(__file__).resolve().parent.parent
    sweep = load_sweep(root / "scenarios" / "sweep-batching.yaml")
    scenario = load_scenario(sweep.scenario_path, {})
    check_scenario(scenario, sweep)
    check_settings(scenario, sweep)
    assert len(sweep.settings) == 6
    assert sweep.out_dir.resolve() == (root / "reports" / "sweep-batching").resolve()


def test_server_command_at_the_top_level_as_the_issue_spells_it() -> None:
    text = (
        "scenario: s.yaml\nserver_command: 'my-server --max-batch {batch_size} --port {port}'\n"
        "ready_url: 'http://127.0.0.1:{port}/health'\ngrid: {batch_size: [4, 8]}\nloads: [10]\n"
    )
    sweep = parse_sweep(text, source="sweep.yaml")
    assert sweep.server.command == "my-server --max-batch {batch_size} --port {port}"
    assert sweep.server.ready_url == "http://127.0.0.1:{port}/health"
    with pytest.raises(ScenarioError, match=r"sweep.yaml:2 server_command: the command must take the port"):
        parse_sweep("scenario: s.yaml\nserver_command: 'srv'\nloads: [1]\n", source="sweep.yaml")
