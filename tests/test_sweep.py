"""A real sweep on the reference server, with a cost model that makes the answer known in advance.

Every batch of the echo model costs 20 ms whatever its size. At 120 requests/s a batch size of 1 serves
at most 50/s and drowns, while a batch size of 8 keeps up: bigger batches must win at high load. At
10 requests/s batches hardly fill, so waiting 30 ms for them only adds latency: a zero timeout must win
at low load (for batches that can wait). The recommendation must therefore be batch_size=8 with batch_timeout_ms=0.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from infer_bench.scenario import load_scenario
from infer_bench.sweep import SweepRunner, check_scenario, load_sweep

pytestmark = pytest.mark.slow  # real servers on loopback; still run in CI

SCENARIO = """\
target: reference
reference:
  models: [{kind: echo, name: echo, base_ms: 20, per_item_ms: 0}, {kind: tokens}]
scenarios:
  predict:
    executor: constant-arrival-rate
    rate: 10
    duration: 2s
    warmup: 0.5s
    graceful_stop: 0.5s
    pre_allocated_vus: 20
    max_vus: 400
    timeout: 3s
    protocol: http
    request: {method: POST, path: /predict, body: {input: [1.0]}}
thresholds:
  e2e: ["p(99)<250ms"]
"""

SWEEP = """\
scenario: scenario.yaml
grid:
  batch_size: [1, 8]
  batch_timeout_ms: [0, 30]
loads: [10, 120]
"""


def test_a_batching_sweep_recommends_what_the_cost_model_implies(tmp_path: Path) -> None:
    # 1 s cells: at 120/s a batch size of 1 falls behind by 70 requests a second, plain in any run length.
    (tmp_path / "scenario.yaml").write_text(SCENARIO.replace("duration: 2s", "duration: 1s"))
    (tmp_path / "sweep.yaml").write_text(SWEEP)
    sweep = load_sweep(tmp_path / "sweep.yaml")
    scenario = load_scenario(sweep.scenario_path)
    check_scenario(scenario, sweep)
    lines: list[str] = []
    result = SweepRunner(sweep, scenario, progress=lines.append).run()

    assert not result.failures
    assert not result.interrupted
    cells = {(c.setting, c.load): c for c in result.cells}
    assert len(cells) == 8
    for timeout in (0, 30):
        small, big = (
            cells[(f"batch_size=1, batch_timeout_ms={timeout}", 120)],
            cells[(f"batch_size=8, batch_timeout_ms={timeout}", 120)],
        )
        assert big.slo_passed
        assert not small.slo_passed
        assert big.throughput > small.throughput * 1.5  # batch size 1 tops out near 50/s
    # (With a batch size of 1 every batch is full at once, so only batches of 8 ever wait.)
    eager, patient = cells[("batch_size=8, batch_timeout_ms=0", 10)], cells[("batch_size=8, batch_timeout_ms=30", 10)]
    assert eager.ttft_p50_ms is not None
    assert patient.ttft_p50_ms is not None
    assert eager.ttft_p50_ms + 15 < patient.ttft_p50_ms  # waiting for a batch that does not fill only costs
    assert result.recommendation is not None
    assert result.recommendation.setting == "batch_size=8, batch_timeout_ms=0"

    summary = json.loads((sweep.out_dir / "sweep.json").read_text())
    assert summary["status"] == "complete"
    assert summary["recommendation"]["setting"] == "batch_size=8, batch_timeout_ms=0"
    assert len(list((sweep.out_dir / "cells").glob("*.json"))) == 8
    assert any("[8/8]" in line for line in lines)

    # Resumable: a second run keeps every finished cell and starts no server.
    again: list[str] = []
    rerun = SweepRunner(sweep, scenario, progress=again.append).run()
    assert all("done before: kept" in line for line in again)
    assert rerun.recommendation == result.recommendation


def test_any_server_by_command_and_its_capacity_within_the_slo(tmp_path: Path) -> None:
    """The generic path (a command with {port} and a readiness URL), and a capacity search whose answer is
    known: batch size 1 at 20 ms a batch serves at most 50 requests/s, so capacity is no more than that."""
    import sys

    (tmp_path / "server.yaml").write_text(
        "models: [{kind: echo, name: echo, base_ms: 20, per_item_ms: 0}, {kind: tokens}]\n"
    )
    (tmp_path / "scenario.yaml").write_text(SCENARIO)
    command = f"{sys.executable} -m infer_bench.cli serve --config {tmp_path / 'server.yaml'} --port {{port}}"
    (tmp_path / "sweep.yaml").write_text(
        "scenario: scenario.yaml\n"
        f"server: {{command: '{command} --batch-size {{batch_size}}', ready_url: 'http://127.0.0.1:{{port}}/readyz'}}\n"
        "grid: {batch_size: [1]}\n"
        "capacity: {start: 20, max: 160, resolution: 0.25, confirm: 1}\n"
    )
    sweep = load_sweep(tmp_path / "sweep.yaml")
    scenario = load_scenario(sweep.scenario_path)
    check_scenario(scenario, sweep)
    lines: list[str] = []
    result = SweepRunner(sweep, scenario, progress=lines.append).run()

    assert not result.failures
    (capacity,) = result.capacities
    assert capacity.rate is not None
    assert 20 <= capacity.rate <= 50  # at 50/s a 2 s run can still pass: the queue grows only slowly
    assert capacity.failed_at is not None
    assert capacity.failed_at <= 80
    assert capacity.verdict.startswith(f"passed 2 of 2 runs at {capacity.rate:,.4g}/s")
    assert result.recommendation is not None
    assert "highest capacity within the SLO" in result.recommendation.reason
    assert len(list((sweep.out_dir / "capacity").glob("*.json"))) == len(capacity.runs)
