"""Shards: every shard count splits the same schedule into disjoint parts that add up to the whole."""

from __future__ import annotations

import asyncio
import itertools
import statistics
from collections import Counter

import pytest

from infer_bench.clients import Target
from infer_bench.metrics.recorder import Recorder
from infer_bench.plan import arrivals
from infer_bench.scenario import ConstantArrivalRate, RampingArrivalRate, Stage, parse_scenario
from infer_bench.shard import Shard
from infer_bench.swarm import ScenarioRun, Swarm

SHARD_COUNTS = [1, 2, 4]


def constant_poisson() -> ConstantArrivalRate:
    return ConstantArrivalRate(
        kind="constant-arrival-rate", rate=500, duration=10, pre_allocated_vus=8, max_vus=8, arrival="poisson",
        seed=11,
    )  # fmt: skip


def ramping_poisson() -> RampingArrivalRate:
    return RampingArrivalRate(
        kind="ramping-arrival-rate", start_rate=50, pre_allocated_vus=8, max_vus=8, arrival="poisson", seed=3,
        stages=(Stage(duration=5, target=400), Stage(duration=5, target=400), Stage(duration=5, target=0)),
    )  # fmt: skip


def shard_arrivals(spec: ConstantArrivalRate | RampingArrivalRate, shard: Shard) -> list[float]:
    """What the swarm sends in ``shard``: the global sequence, numbered, keeping the arrivals it owns."""
    return [t for n, t in enumerate(arrivals(spec)) if shard.owns(n)]


@pytest.mark.parametrize("make", [constant_poisson, ramping_poisson], ids=["constant", "ramping"])
@pytest.mark.parametrize("count", SHARD_COUNTS)
def test_the_shards_arrivals_together_are_exactly_the_unsharded_sequence(make: object, count: int) -> None:
    spec = make()  # type: ignore[operator]
    whole = list(arrivals(spec))
    parts = [shard_arrivals(spec, Shard(i, count)) for i in range(count)]
    union = sorted(itertools.chain.from_iterable(parts))
    assert union == whole  # same total, same times: the target sees one load shape whatever N is
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    whole_gaps = [b - a for a, b in itertools.pairwise(whole)]
    union_gaps = [b - a for a, b in itertools.pairwise(union)]
    assert statistics.mean(union_gaps) == statistics.mean(whole_gaps)
    assert statistics.stdev(union_gaps) == statistics.stdev(whole_gaps)


def test_poisson_constant_rate_totals_per_shard_count() -> None:
    """The figures the docs quote: 10 s at 500/s, Poisson, seed 11."""
    spec = constant_poisson()
    totals = {n: [len(shard_arrivals(spec, Shard(i, n))) for i in range(n)] for n in SHARD_COUNTS}
    assert {n: sum(parts) for n, parts in totals.items()} == {n: len(list(arrivals(spec))) for n in SHARD_COUNTS}
    assert totals == {1: [5037], 2: [2519, 2518], 4: [1260, 1259, 1259, 1259]}  # seeded: these, every time


@pytest.mark.parametrize("count", [1, 2, 3, 4, 7])
@pytest.mark.parametrize("total", [0, 1, 2, 5, 8, 13, 100])
def test_shares_of_vus_add_up_and_differ_by_at_most_one(total: int, count: int) -> None:
    shards = [Shard(i, count) for i in range(count)]
    shares = [s.share(total) for s in shards]
    assert sum(shares) == total
    assert max(shares) - min(shares) <= 1
    owned = [list(s.vus(total)) for s in shards]
    assert [len(o) for o in owned] == shares
    assert sorted(itertools.chain.from_iterable(owned)) == list(range(total))  # a partition of the VUs


@pytest.mark.parametrize("count", [1, 2, 4])
@pytest.mark.parametrize(("vus", "iterations"), [(1, 1), (1, 10), (3, 10), (4, 4), (5, 17), (8, 1000)])
def test_shared_iterations_split_exactly_and_only_to_shards_with_vus(vus: int, iterations: int, count: int) -> None:
    shards = [Shard(i, count) for i in range(count)]
    budgets = [s.shared_iterations(vus, iterations) for s in shards]
    assert sum(budgets) == iterations
    for shard, budget in zip(shards, budgets, strict=True):
        assert budget >= len(shard.vus(vus))  # every VU has at least one iteration (vus <= iterations)
        assert (budget == 0) == (len(shard.vus(vus)) == 0)


@pytest.mark.parametrize("count", [1, 2, 4])
def test_ramping_vus_shards_run_the_vus_below_the_target_they_own(count: int) -> None:
    for target in range(30):
        running = [{s.nth_vu(k) for k in range(s.share(target))} for s in (Shard(i, count) for i in range(count))]
        assert set().union(*running) == set(range(target))
        assert sum(map(len, running)) == target


def test_shard_text_is_i_of_n() -> None:
    assert Shard.parse("1/4") == Shard(1, 4)
    assert str(Shard(2, 3)) == "2/3"
    for bad in ("4/4", "1", "-1/2", "a/b", "0/0"):
        with pytest.raises(ValueError, match="i/N"):
            Shard.parse(bad)


CLOSED = """
target: http://127.0.0.1:9
scenarios:
  s:
    executor: {executor}
    vus: 10
    {extra}
    classes: [{{name: a, weight: 3, protocol: sse}}, {{name: b, weight: 1, protocol: sse}},
              {{name: c, weight: 1, protocol: http}}]
"""


def spawned_vus(executor: str, extra: str, shard: Shard) -> list[tuple[int, str, int | None]]:
    """(global VU index, class, budget) of every VU a shard's closed executor starts."""
    scenario = parse_scenario(CLOSED.format(executor=executor, extra=extra), source="t.yaml")
    swarm = Swarm(Target("127.0.0.1", 9, "127.0.0.1:9"), Recorder(0), shard=shard)
    run = ScenarioRun(swarm, scenario.scenarios["s"], 0, seed=0)
    started: list[tuple[int, str, int | None]] = []

    async def fake_vu(
        index: int, deadline: int, budget: int | None, shared: list[int] | None, retire: object = None
    ) -> None:
        started.append((index, run.class_for_vu(index).spec.name, budget if shared is None else shared[0]))

    run._vu_loop = fake_vu  # type: ignore[method-assign]
    run.progress.ends_ns = swarm.clock() + 1_000_000_000
    asyncio.run(run._closed(scenario.scenarios["s"].executor))  # type: ignore[arg-type]
    return started


@pytest.mark.parametrize(
    ("executor", "extra"),
    [
        pytest.param("constant-vus", "duration: 1s", id="constant-vus"),
        pytest.param("per-vu-iterations", "iterations: 3", id="per-vu-iterations"),
        pytest.param("shared-iterations", "iterations: 25", id="shared-iterations"),
    ],
)
@pytest.mark.parametrize("count", [2, 4])
def test_closed_shards_start_their_own_vus_with_the_unsharded_classes(executor: str, extra: str, count: int) -> None:
    whole = spawned_vus(executor, extra, Shard())
    parts = [spawned_vus(executor, extra, Shard(i, count)) for i in range(count)]
    for i, part in enumerate(parts):
        assert all(index % count == i for index, _, _ in part)
    union = sorted(itertools.chain.from_iterable(parts))
    assert [(index, cls) for index, cls, _ in union] == [(index, cls) for index, cls, _ in whole]
    assert Counter(cls for _, cls, _ in union) == {"a": 6, "b": 2, "c": 2}
    if executor == "shared-iterations":  # one shared budget per shard; the shards' budgets add up to 25
        assert sum({i: part[0][2] for i, part in enumerate(parts) if part}.values()) == 25
    if executor == "per-vu-iterations":
        assert {budget for _, _, budget in union} == {3}
