"""How VUs and arrivals are shared among weighted classes, and what a result file must never hold."""

from __future__ import annotations

from collections import Counter

import pytest

from infer_bench.clients import Target
from infer_bench.metrics.recorder import Recorder
from infer_bench.result import redact_argv
from infer_bench.scenario import parse_scenario
from infer_bench.swarm import ScenarioRun, Swarm


def scenario_run(classes: str, tags: str = "{}") -> ScenarioRun:
    scenario = parse_scenario(f"""
target: http://127.0.0.1:9
scenarios:
  s:
    executor: constant-vus
    vus: 1
    duration: 1s
    tags: {tags}
    classes: {classes}
""", source="t.yaml")  # fmt: skip
    swarm = Swarm(Target("127.0.0.1", 9, "127.0.0.1:9"), Recorder(0))
    return ScenarioRun(swarm, scenario.scenarios["s"], 0, seed=0)


@pytest.mark.parametrize(
    ("vus", "expected"),
    [
        pytest.param(1, {"a": 1}, id="one-vu-goes-to-the-heaviest"),
        pytest.param(4, {"a": 3, "b": 1}, id="four-vus-split-3-to-1"),
        pytest.param(20, {"a": 15, "b": 5}, id="twenty-vus-split-15-to-5"),
    ],
)
def test_closed_model_vus_follow_the_weights_at_every_count(vus: int, expected: dict[str, int]) -> None:
    run = scenario_run("[{name: a, weight: 3, protocol: sse}, {name: b, weight: 1, protocol: sse}]")
    assert Counter(run.class_for_vu(i).spec.name for i in range(vus)) == expected


def test_every_class_gets_a_vu_once_there_are_as_many_vus_as_classes() -> None:
    run = scenario_run("[{name: a, weight: 10, protocol: sse}, {name: b, weight: 1, protocol: sse}, "
                       "{name: c, weight: 1, protocol: http}]")  # fmt: skip
    assert {run.class_for_vu(i).spec.name for i in range(12)} == {"a", "b", "c"}


def test_open_model_arrivals_pick_classes_by_weight() -> None:
    run = scenario_run("[{name: a, weight: 3, protocol: sse}, {name: b, weight: 1, protocol: sse}]")
    picks = Counter(run.class_at_random().spec.name for _ in range(4000))
    assert 2800 < picks["a"] < 3200  # seeded: 3/4 of 4000 give or take a few standard deviations


def test_scenario_tags_cannot_override_the_built_in_ones() -> None:
    run = scenario_run("[{name: a, protocol: sse}]", tags="{scenario: mine, team: search}")
    assert dict(run.classes[0].key) == {"scenario": "s", "class": "a", "protocol": "sse", "team": "search"}


def test_secrets_given_with_dash_e_never_reach_the_result_file() -> None:
    argv = ["infer-bench", "run", "x.yaml", "-e", "OPENAI_API_KEY=sk-1", "-e", "MODEL=m", "--env=HF_TOKEN=t"]
    assert redact_argv(argv) == [
        "infer-bench", "run", "x.yaml", "-e", "OPENAI_API_KEY=<redacted>", "-e", "MODEL=m", "--env=HF_TOKEN=<redacted>",
    ]  # fmt: skip
