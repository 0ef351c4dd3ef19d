"""Executors: how a scenario schedules its load, in k6's vocabulary (k6.io/docs/using-k6/scenarios/executors).

Each executor's options live in a ``…Fields`` model that the file format reuses for a scenario entry
(where they sit beside ``executor:``), so options and their checks are written once. Every executor is
bounded: its scheduled load lasts a finite, positive time (``total_duration``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import Field, TypeAdapter, model_validator

from infer_bench.scenario.base import (
    Count,
    NonNegativeNumber,
    PositiveNumber,
    Seed,
    SpecModel,
    WholeNumber,
    invalid,
)
from infer_bench.scenario.durations import Duration, PositiveDuration, format_duration


class Stage(SpecModel):
    """Move linearly from the previous level to ``target`` over ``duration`` (0 = jump at once)."""

    duration: Duration
    target: NonNegativeNumber
    """VUs for ramping-vus (a whole number); iterations per ``time_unit`` for ramping-arrival-rate."""


def _stages_last(stages: tuple[Stage, ...]) -> float:
    total = sum(stage.duration for stage in stages)
    if total <= 0:
        raise invalid("impossible stages: they last 0s in total; give at least one stage a duration > 0", at="stages")
    return total


class ConstantVUsFields(SpecModel):
    vus: Count = 1
    duration: PositiveDuration

    def total_duration(self) -> float:
        return self.duration


class RampingVUsFields(SpecModel):
    start_vus: WholeNumber = 1  # k6's default
    stages: tuple[Stage, ...] = Field(min_length=1)

    @model_validator(mode="after")
    def _check_stages(self) -> RampingVUsFields:
        for index, stage in enumerate(self.stages):
            if stage.target != int(stage.target):
                raise invalid(f"expected a whole number of VUs, got {stage.target!r}", at=("stages", index, "target"))
        _stages_last(self.stages)
        if self.start_vus == 0 and all(stage.target == 0 for stage in self.stages):
            raise invalid("no load: start_vus and every stage target are 0", at="stages")
        return self

    def total_duration(self) -> float:
        return sum(stage.duration for stage in self.stages)


class PerVUIterationsFields(SpecModel):
    vus: Count = 1
    iterations: Count = 1
    """Iterations each VU runs."""
    max_duration: PositiveDuration = 600.0
    """The scenario stops here even if iterations remain."""

    def total_duration(self) -> float:
        return self.max_duration


class SharedIterationsFields(SpecModel):
    vus: Count = 1
    iterations: Count = 1
    """Iterations shared by all VUs: a VU that finishes early takes more."""
    max_duration: PositiveDuration = 600.0

    @model_validator(mode="after")
    def _check_vus(self) -> SharedIterationsFields:
        if self.vus > self.iterations:
            # As k6 does: a VU with no iteration to run is a misconfiguration, not a silent reduction.
            raise invalid(
                f"vus ({self.vus}) > iterations ({self.iterations}): every VU needs at least one iteration",
                at="vus",
            )
        return self

    def total_duration(self) -> float:
        return self.max_duration


class _ArrivalFields(SpecModel):
    time_unit: PositiveDuration = 1.0
    """The period that ``rate`` (or a stage target) counts iterations in."""
    pre_allocated_vus: Count
    """VUs started before the load begins; an arrival takes a free one."""
    max_vus: Count = Field(default_factory=lambda fields: fields.get("pre_allocated_vus", 1))
    """Most VUs allowed (defaults to pre_allocated_vus); an arrival with none free is dropped and counted."""
    arrival: Literal["uniform", "poisson"] = "uniform"
    """Spacing of arrivals: evenly, or as a Poisson process (exponential gaps) seeded by ``seed``."""
    seed: Seed = 0

    @model_validator(mode="after")
    def _check_max_vus(self) -> _ArrivalFields:
        if self.max_vus < self.pre_allocated_vus:
            raise invalid(
                f"max_vus ({self.max_vus}) < pre_allocated_vus ({self.pre_allocated_vus}): "
                "max_vus must be at least pre_allocated_vus",
                at="max_vus",
            )
        return self


class ConstantArrivalRateFields(_ArrivalFields):
    rate: PositiveNumber
    """Iterations started per ``time_unit``."""
    duration: PositiveDuration

    def total_duration(self) -> float:
        return self.duration


class RampingArrivalRateFields(_ArrivalFields):
    start_rate: NonNegativeNumber = 0.0
    stages: tuple[Stage, ...] = Field(min_length=1)

    @model_validator(mode="after")
    def _check_stages(self) -> RampingArrivalRateFields:
        _stages_last(self.stages)
        if self.start_rate == 0 and all(stage.target == 0 for stage in self.stages):
            raise invalid("no load: start_rate and every stage target are 0", at="stages")
        return self

    def total_duration(self) -> float:
        return sum(stage.duration for stage in self.stages)


class ConstantVUs(ConstantVUsFields):
    """``vus`` VUs loop over requests for ``duration``."""

    kind: Literal["constant-vus"] = "constant-vus"


class RampingVUs(RampingVUsFields):
    """VUs ramp from ``start_vus`` through ``stages``."""

    kind: Literal["ramping-vus"] = "ramping-vus"


class PerVUIterations(PerVUIterationsFields):
    """Each of ``vus`` VUs runs ``iterations`` requests, within ``max_duration``."""

    kind: Literal["per-vu-iterations"] = "per-vu-iterations"


class SharedIterations(SharedIterationsFields):
    """``vus`` VUs share ``iterations`` requests, within ``max_duration``."""

    kind: Literal["shared-iterations"] = "shared-iterations"


class ConstantArrivalRate(ConstantArrivalRateFields):
    """Open model: ``rate`` iterations start per ``time_unit`` whatever the responses do."""

    kind: Literal["constant-arrival-rate"] = "constant-arrival-rate"


class RampingArrivalRate(RampingArrivalRateFields):
    """Open model: the arrival rate ramps from ``start_rate`` through ``stages``."""

    kind: Literal["ramping-arrival-rate"] = "ramping-arrival-rate"


ExecutorSpec = Annotated[
    ConstantVUs | RampingVUs | PerVUIterations | SharedIterations | ConstantArrivalRate | RampingArrivalRate,
    Field(discriminator="kind"),
]

EXECUTOR_FIELDS: dict[str, frozenset[str]] = {
    "constant-vus": frozenset(ConstantVUsFields.model_fields),
    "ramping-vus": frozenset(RampingVUsFields.model_fields),
    "per-vu-iterations": frozenset(PerVUIterationsFields.model_fields),
    "shared-iterations": frozenset(SharedIterationsFields.model_fields),
    "constant-arrival-rate": frozenset(ConstantArrivalRateFields.model_fields),
    "ramping-arrival-rate": frozenset(RampingArrivalRateFields.model_fields),
}
"""Each executor's options, by the name a scenario file gives it in ``executor:``."""

_ADAPTER: TypeAdapter[ExecutorSpec] = TypeAdapter(ExecutorSpec)


def executor_spec(kind: str, options: Mapping[str, Any]) -> ExecutorSpec:
    """The executor ``kind`` with ``options`` (its fields, by name).

    Raises:
        pydantic.ValidationError: an option is missing or invalid.
    """
    return _ADAPTER.validate_python({**options, "kind": kind})


def describe(executor: ExecutorSpec) -> str:
    """One line for logs and reports, e.g. ``constant-vus · 10 VUs · 30s``."""
    span = format_duration(executor.total_duration())
    match executor:
        case ConstantVUs():
            load = f"{executor.vus} VUs"
        case RampingVUs() | RampingArrivalRate():
            load = f"{len(executor.stages)} stages"
        case PerVUIterations():
            load = f"{executor.vus} VUs × {executor.iterations} iterations"
        case SharedIterations():
            load = f"{executor.vus} VUs · {executor.iterations} iterations"
        case ConstantArrivalRate():
            load = f"{executor.rate:g} per {format_duration(executor.time_unit)}"
    return f"{executor.kind} · {load} · {span}"
