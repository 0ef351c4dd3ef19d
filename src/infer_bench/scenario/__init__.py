"""Scenarios: the YAML file format (k6's vocabulary), its loading with file:line errors, and the spec.

    from infer_bench.scenario import load_scenario
    scenario = load_scenario(Path("scenario.yaml"), env=os.environ)

``load_scenario`` and ``parse_scenario`` return a frozen ``Scenario``; ``scenario_json_schema`` gives
the file format's JSON Schema for editors. Every duration in a spec is a float of seconds.
"""

from __future__ import annotations

from infer_bench.scenario.durations import format_duration, parse_duration
from infer_bench.scenario.executors import (
    ConstantArrivalRate,
    ConstantVUs,
    ExecutorSpec,
    PerVUIterations,
    RampingArrivalRate,
    RampingVUs,
    SharedIterations,
    Stage,
)
from infer_bench.scenario.loader import load_scenario, parse_scenario
from infer_bench.scenario.schema import scenario_json_schema
from infer_bench.scenario.spec import Behavior, PromptSource, Scenario, ScenarioSpec, ThinkTime, UserClass
from infer_bench.scenario.templates import (
    HttpRequest,
    OpenAIRequest,
    ProtocolName,
    Request,
    SSERequest,
    WebSocketRequest,
)

__all__ = [
    "Behavior",
    "ConstantArrivalRate",
    "ConstantVUs",
    "ExecutorSpec",
    "HttpRequest",
    "OpenAIRequest",
    "PerVUIterations",
    "PromptSource",
    "ProtocolName",
    "RampingArrivalRate",
    "RampingVUs",
    "Request",
    "SSERequest",
    "Scenario",
    "ScenarioSpec",
    "SharedIterations",
    "Stage",
    "ThinkTime",
    "UserClass",
    "WebSocketRequest",
    "format_duration",
    "load_scenario",
    "parse_duration",
    "parse_scenario",
    "scenario_json_schema",
]
