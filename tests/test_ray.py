"""``run --ray``: shards as Ray actors on a local Ray started here; skipped where the ``ray`` extra is absent."""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from infer_bench.plan import arrivals
from infer_bench.scenario import ConstantArrivalRate, parse_scenario

ray = pytest.importorskip("ray", reason="Ray is an optional extra (pip install 'infer-bench[ray]'); not installed")

from infer_bench.ray_shards import run_ray  # noqa: E402 - needs ray

pytestmark = pytest.mark.slow

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
    protocol: sse
    request: {{max_tokens: 8}}
"""
SHARD_PID = re.compile(r"(\d+)/2 pid (\d+)")


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


def test_two_actors_send_exactly_the_unsharded_arrivals_into_one_result(local_ray: None, tmp_path: Path) -> None:
    scenario = parse_scenario(OPEN_LOOP.format(rate=100, duration="2s"), source="open.yaml")
    executor = scenario.scenarios["chat"].executor
    assert isinstance(executor, ConstantArrivalRate)
    lines: list[str] = []
    result, code = run_ray(scenario, "auto", None, out=tmp_path / "r.json", progress=lines.append)
    assert code == 0
    assert result["status"] == "complete"
    head = result["headline"]
    assert head["requests"] + head["dropped"] == len(list(arrivals(executor)))  # every arrival, once
    assert [p["shard"] for p in result["shards"]["parts"]] == ["0/2", "1/2"]  # one actor per CPU of the cluster
    assert all(p["requests"] > 0 for p in result["shards"]["parts"])
    assert lines[0].startswith("2 shards on Ray actors (0/2 pid ")
    assert any("shards running" in line for line in lines[1:])


def test_a_dead_actor_fails_the_run_and_keeps_the_others_partial_result(local_ray: None, tmp_path: Path) -> None:
    scenario = parse_scenario(OPEN_LOOP.format(rate=50, duration="8s"), source="open.yaml")
    pids: dict[str, int] = {}
    killed: list[int] = []

    def progress(line: str) -> None:
        if not pids:
            pids.update((f"{i}/2", int(pid)) for i, pid in SHARD_PID.findall(line))
        elif not killed and re.search(r"started [1-9]", line):
            killed.append(pids["1/2"])
            os.kill(pids["1/2"], signal.SIGKILL)  # the actor's worker process, started for this test

    result, code = run_ray(scenario, "auto", 2, out=tmp_path / "r.json", progress=progress)
    assert killed, "the run ended before the actor could be killed"
    assert code == 3
    assert result["status"] == "interrupted"
    reason: Any = result["stop_reason"]
    assert f"shard 1/2 (actor pid {killed[0]} on " in reason
    assert "died" in reason
    assert "the result holds 1 of 2 shards" in reason
    (part,) = result["shards"]["parts"]
    assert part["shard"] == "0/2"
    assert part["status"] == "interrupted"  # stopped early through the board, not after its 8 s
    assert part["duration_s"] < 8
    assert result["headline"]["requests"] > 0
