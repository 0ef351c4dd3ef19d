"""``infer-bench run --processes N``: children started together, one merged result, stops handled."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from hdrh.histogram import HdrHistogram

from infer_bench.errors import UsageError
from infer_bench.plan import arrivals
from infer_bench.processes import check_shardable, process_count
from infer_bench.scenario import ConstantArrivalRate, load_scenario, parse_scenario

OPEN_LOOP = """
target: reference
scenarios:
  chat:
    executor: constant-arrival-rate
    rate: {rate}
    duration: {duration}
    pre_allocated_vus: 8
    max_vus: 64
    arrival: poisson
    seed: 5
    classes: [{{name: a, weight: 3, protocol: sse, request: {{max_tokens: 8}}}},
              {{name: b, weight: 1, protocol: sse, request: {{max_tokens: 4}}}}]
thresholds:
  ttft: ["p(99)<10s"]
"""
STARTED = re.compile(r"started (\d[\d,]*)")
WAIT_S = 60.0


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "infer_bench.cli", "run", *args]


def scenario_file(tmp_path: Path, rate: int, duration: str) -> Path:
    path = tmp_path / "open.yaml"
    path.write_text(OPEN_LOOP.format(rate=rate, duration=duration))
    return path


def wait_for(predicate: Any, what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def running_line(log: Path) -> bool:
    """The parent's progress line says requests have started: every child is past its start."""
    return any(int(m.replace(",", "")) > 0 for m in STARTED.findall(log.read_text()))


@pytest.mark.slow
def test_two_processes_send_exactly_the_unsharded_arrivals_and_write_one_result(tmp_path: Path) -> None:
    path = scenario_file(tmp_path, rate=100, duration="2s")
    expected = len(list(arrivals(load_scenario(path, {}).scenarios["chat"].executor)))  # type: ignore[arg-type]
    out, md = tmp_path / "merged.json", tmp_path / "merged.md"
    done = subprocess.run(
        cli(str(path), "--processes", "2", "-q", "-o", str(out), "-o", f"markdown={md}"),
        capture_output=True, text=True, timeout=WAIT_S, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    head = result["headline"]
    assert result["status"] == "complete"
    assert head["requests"] + head["dropped"] == expected  # 176 for this seed: every arrival, once
    assert head["requested_rate"] == pytest.approx(100.0)
    assert [p["shard"] for p in result["shards"]["parts"]] == ["0/2", "1/2"]
    assert all(p["status"] == "complete" and p["requests"] > 0 for p in result["shards"]["parts"])
    assert sum(s["started"] for s in result["series"]) == head["requests"]
    ttft_count = sum(HdrHistogram.decode(g["histograms"]["ttft"]).get_total_count() for g in result["groups"])
    assert ttft_count == head["succeeded"]
    assert {g["tags"]["class"] for g in result["groups"]} == {"a", "b"}
    assert result["thresholds"][0]["ok"] is True
    assert len(result["client"]["shards"]) == 2
    assert "ttft" in md.read_text()


@pytest.mark.slow
def test_sigterm_to_the_parent_stops_every_shard_and_keeps_the_partial_result(tmp_path: Path) -> None:
    path = scenario_file(tmp_path, rate=50, duration="30s")
    out, log = tmp_path / "partial.json", tmp_path / "parent.log"
    with log.open("w") as err:
        parent = subprocess.Popen(cli(str(path), "--processes", "2", "-o", str(out)), stdout=subprocess.DEVNULL,
                                  stderr=err)  # fmt: skip
    try:
        wait_for(lambda: running_line(log), "the shards to send")
        parent.send_signal(signal.SIGTERM)
        code = parent.wait(timeout=WAIT_S)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
    assert code == 3, log.read_text()
    result = json.loads(out.read_text())
    assert result["status"] == "interrupted"
    assert result["stop_reason"].startswith("interrupted (SIGTERM)")
    assert [p["status"] for p in result["shards"]["parts"]] == ["interrupted", "interrupted"]
    assert 0 < result["headline"]["requests"] < 1500


@pytest.mark.slow
def test_a_dead_shard_fails_the_run_by_name_and_the_others_are_kept(tmp_path: Path) -> None:
    path = scenario_file(tmp_path, rate=50, duration="30s")
    out, log = tmp_path / "partial.json", tmp_path / "parent.log"
    with log.open("w") as err:
        parent = subprocess.Popen(cli(str(path), "--processes", "2", "-o", str(out)), stdout=subprocess.DEVNULL,
                                  stderr=err)  # fmt: skip
    try:
        wait_for(lambda: running_line(log), "the shards to send")
        pids = re.search(r"pids (\d+), (\d+)", log.read_text())
        assert pids is not None
        os.kill(int(pids[2]), signal.SIGKILL)  # shard 1/2, a child of the parent this test started
        code = parent.wait(timeout=WAIT_S)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
    text = log.read_text()
    assert code == 3, text
    assert f"shard 1/2 (pid {pids[2]}) died (killed by signal 9)" in text
    result = json.loads(out.read_text())
    assert result["status"] == "interrupted"
    assert [p["shard"] for p in result["shards"]["parts"]] == ["0/2"]
    assert result["headline"]["requests"] > 0


def test_processes_auto_leaves_a_core_and_numbers_must_be_whole() -> None:
    assert process_count("auto") == max(1, (os.cpu_count() or 1) - 1)
    assert process_count("3") == 3
    for bad in ("0", "-2", "two"):
        with pytest.raises(UsageError, match="--processes"):
            process_count(bad)


def test_every_open_loop_shard_needs_a_vu() -> None:
    scenario = parse_scenario(OPEN_LOOP.format(rate=10, duration="1s"), source="t.yaml")
    check_shardable(scenario, 64)
    with pytest.raises(UsageError, match="max_vus 64"):
        check_shardable(scenario, 65)
    assert isinstance(scenario.scenarios["chat"].executor, ConstantArrivalRate)


def test_a_shard_aborted_by_a_threshold_stops_the_others(tmp_path: Path) -> None:
    """The supervisor alone, over two stand-in children: one ends aborted, the other must be stopped."""
    from infer_bench.processes import Child, _supervise
    from infer_bench.shard import Shard

    aborted_result = tmp_path / "part-0.json"
    aborted_result.write_text(json.dumps({"status": "aborted"}))
    ready = tmp_path / "ready"
    script = (
        "import pathlib, signal, sys, time; signal.signal(signal.SIGTERM, lambda *a: sys.exit(3)); "
        f"pathlib.Path({str(ready)!r}).touch(); time.sleep(30)"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", "import sys; sys.exit(1)"]),
        subprocess.Popen([sys.executable, "-c", script]),
    ]
    children = [
        Child(Shard(i, 2), proc, tmp_path / f"part-{i}.json", tmp_path / f"p-{i}.json", tmp_path / f"log-{i}")
        for i, proc in enumerate(procs)
    ]
    try:
        wait_for(ready.exists, "the stand-in shard to handle SIGTERM")
        outcome = _supervise(children, time.monotonic() + WAIT_S, [], None)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert outcome.aborted_by is children[0]
    assert outcome.interrupted_by is None
    assert outcome.timed_out == []
    assert [p.returncode for p in procs] == [1, 3]
