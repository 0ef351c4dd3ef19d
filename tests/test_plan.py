"""Load shapes as pure functions: VU targets and open-loop arrival times."""

from __future__ import annotations

import itertools
import statistics

import pytest

from infer_bench.plan import arrivals, expected_arrivals, rate_at, stage_at, vus_at
from infer_bench.scenario import ConstantArrivalRate, RampingArrivalRate, Stage


def constant(
    rate: float, duration: float, arrival: str = "uniform", seed: int = 0, time_unit: float = 1.0
) -> ConstantArrivalRate:
    return ConstantArrivalRate(
        kind="constant-arrival-rate", rate=rate, time_unit=time_unit, duration=duration,
        pre_allocated_vus=1, max_vus=1, arrival=arrival, seed=seed,
    )  # fmt: skip


def ramping(start: float, stages: list[tuple[float, float]], arrival: str = "uniform") -> RampingArrivalRate:
    return RampingArrivalRate(
        kind="ramping-arrival-rate", start_rate=start, time_unit=1.0,
        stages=tuple(Stage(duration=d, target=t) for d, t in stages),
        pre_allocated_vus=1, max_vus=1, arrival=arrival, seed=0,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("t", "expected"),
    [
        pytest.param(0.0, 0, id="start"),
        pytest.param(5.0, 5, id="half-way-up"),
        pytest.param(10.0, 10, id="top"),
        pytest.param(15.0, 10, id="plateau"),
        pytest.param(22.5, 5, id="half-way-down"),
        pytest.param(99.0, 0, id="after-the-end"),
    ],
)
def test_ramping_vus_interpolate_linearly_within_stages(t: float, expected: int) -> None:
    stages = (Stage(duration=10, target=10), Stage(duration=10, target=10), Stage(duration=5, target=0))
    assert vus_at(0, stages, t) == expected


def test_uniform_arrivals_are_evenly_spaced_and_exactly_rate_times_duration() -> None:
    times = list(arrivals(constant(rate=100, duration=2)))
    assert len(times) == 200
    assert times[0] == 0.0
    assert all(b - a == pytest.approx(0.01) for a, b in itertools.pairwise(times))


def test_time_unit_scales_the_rate() -> None:
    assert len(list(arrivals(constant(rate=30, duration=10, time_unit=60)))) == 5  # 30 per minute


def test_poisson_arrivals_are_seeded_and_have_exponential_gaps() -> None:
    a = list(arrivals(constant(rate=1000, duration=10, arrival="poisson", seed=7)))
    b = list(arrivals(constant(rate=1000, duration=10, arrival="poisson", seed=7)))
    c = list(arrivals(constant(rate=1000, duration=10, arrival="poisson", seed=8)))
    assert a == b
    assert a != c
    assert 9_700 < len(a) < 10_300  # Poisson(10,000): sd 100
    gaps = [y - x for x, y in itertools.pairwise(a)]
    assert statistics.mean(gaps) == pytest.approx(0.001, rel=0.05)
    assert statistics.stdev(gaps) == pytest.approx(0.001, rel=0.05)  # exponential: sd equals the mean


def test_ramping_arrivals_follow_the_integral_of_the_rate() -> None:
    spec = ramping(0, [(10, 100), (10, 100), (10, 0)])  # triangle up, flat, triangle down
    times = list(arrivals(spec))
    assert expected_arrivals(spec) == pytest.approx(500 + 1000 + 500)
    assert len(times) == 2000
    assert sum(t < 10 for t in times) == 500
    assert sum(10 <= t < 20 for t in times) == 1000
    assert times == sorted(times)
    assert rate_at(spec, 5.0) == pytest.approx(50.0)


def test_a_zero_rate_stage_has_no_arrivals() -> None:
    times = list(arrivals(ramping(0, [(5, 0), (1, 10)])))
    assert times
    assert min(times) >= 5.0


def test_stage_at_names_the_running_stage() -> None:
    stages = (Stage(duration=10, target=5), Stage(duration=5, target=0))
    assert [stage_at(stages, t) for t in (0, 9.9, 10, 14.9, 99)] == ["1/2", "1/2", "2/2", "2/2", "2/2"]
