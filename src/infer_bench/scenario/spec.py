"""The validated scenario: what a run is told to do, after loading, defaults and normalisation.

A ``Scenario`` holds everything a run needs, prompt files included, so running needs no file I/O.
Every duration is a float of seconds. Objects are frozen and check their own invariants, so one built
in code (a test, a sweep) is as valid as one loaded from a file, and one survives a JSON round trip.

    Scenario ─ scenarios: name ─▶ ScenarioSpec ─ executor: ExecutorSpec (constant-vus, …)
             │                                 └ classes: UserClass ─ request (per protocol),
             │                                                       prompts, think_time, behavior
             ├ thresholds: Threshold (k6 conditions on the run's own figures)
             └ gates: GateRule (regression budgets against a baseline run)
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from infer_bench.scenario.base import (
    Count,
    Flag,
    Name,
    PositiveNumber,
    Probability,
    Seed,
    SpecModel,
    invalid,
    show,
)
from infer_bench.scenario.durations import Duration, PositiveDuration, format_duration
from infer_bench.scenario.executors import ExecutorSpec
from infer_bench.scenario.gates import GateRule
from infer_bench.scenario.targets import REFERENCE, Target
from infer_bench.scenario.templates import REQUEST_TYPES, HttpRequest, OpenAIRequest, ProtocolName, Request
from infer_bench.scenario.thresholds import Threshold

SYNTHETIC_WORDS = (8, 32)
"""Default length of a synthetic prompt, in words (there is no tokenizer: a word stands for a token)."""


class PromptSource(SpecModel):
    """Where prompts come from: a list (``inline``, or read from a ``file``) or ``synthetic`` words."""

    kind: Literal["inline", "file", "synthetic"] = "synthetic"
    prompts: tuple[str, ...] = ()
    """The prompts of an inline or file source; empty for synthetic."""
    order: Literal["sequence", "random"] = "sequence"
    words_min: Count = SYNTHETIC_WORDS[0]
    words_max: Count = SYNTHETIC_WORDS[1]
    seed: Seed = 0
    """Seeds synthetic words and random order."""

    @model_validator(mode="after")
    def _check(self) -> PromptSource:
        if self.kind == "synthetic" and self.prompts:
            raise invalid("synthetic prompts take no prompt list", at="prompts")
        if self.kind != "synthetic" and not self.prompts:
            raise invalid(f"an {self.kind} prompt source needs at least one prompt", at="prompts")
        if self.words_min > self.words_max:
            raise invalid(f"words_min ({self.words_min}) > words_max ({self.words_max})", at="words_max")
        return self


class ThinkTime(SpecModel):
    """Pause of a VU between its requests: uniform in [min, max]; a single duration means min == max."""

    min: Duration = 0.0
    max: Duration = 0.0

    @model_validator(mode="before")
    @classmethod
    def _fixed(cls, data: Any) -> Any:
        if isinstance(data, str | int | float) and not isinstance(data, bool):
            return {"min": data, "max": data}
        return data

    @model_validator(mode="after")
    def _check(self) -> ThinkTime:
        if self.min > self.max:
            raise invalid(f"min ({format_duration(self.min)}) > max ({format_duration(self.max)})", at="max")
        return self


class Behavior(SpecModel):
    """How a user class misbehaves on purpose: cancels, slow reading, reconnects and bursts."""

    cancel_after_tokens: Count | None = None
    """Cancel a stream after this many tokens (with probability ``cancel_probability``)."""
    cancel_probability: Probability = 1.0
    read_delay: Duration = 0.0
    """Pause after reading each event: a slow reader."""
    reconnect: Flag = False
    """After a dropped SSE stream, resume with ``Last-Event-ID``."""
    burst_size: Count = 1
    """Requests sent back to back every ``burst_every`` (1 = no bursts)."""
    burst_every: Duration = 0.0

    @model_validator(mode="after")
    def _check(self) -> Behavior:
        if self.burst_size > 1 and self.burst_every <= 0:
            raise invalid(f"a burst of {self.burst_size} needs burst_every > 0", at="burst_every")
        return self


_STREAMING_ONLY = ("cancel_after_tokens", "read_delay")


class UserClass(SpecModel):
    """One kind of user in a scenario; a VU is of one class, chosen by ``weight``."""

    name: Name
    weight: PositiveNumber = 1.0
    protocol: ProtocolName = "sse"
    request: Request
    """The template of the ``protocol``; defaults to that protocol's template with its defaults."""
    prompts: PromptSource = Field(default_factory=PromptSource)
    think_time: ThinkTime = Field(default_factory=ThinkTime)
    behavior: Behavior = Field(default_factory=Behavior)
    timeout: PositiveDuration = 30.0
    """Longest a request may take, end to end."""

    @model_validator(mode="before")
    @classmethod
    def _request_of_protocol(cls, data: Any) -> Any:
        # The request union has no tag of its own: the protocol says which template a mapping is.
        if isinstance(data, dict):
            template = REQUEST_TYPES.get(data.get("protocol", "sse"))
            request = data.get("request")
            if template is not None and (request is None or isinstance(request, dict)):
                return {**data, "request": template.model_validate(request or {})}
        return data

    @model_validator(mode="after")
    def _check(self) -> UserClass:
        template = REQUEST_TYPES[self.protocol]
        if not isinstance(self.request, template):
            raise invalid(f"a {self.protocol} class needs a {template.__name__}, got {type(self.request).__name__}")
        unstreamed = isinstance(self.request, HttpRequest) or (
            isinstance(self.request, OpenAIRequest) and not self.request.stream
        )
        for option in _STREAMING_ONLY:
            if unstreamed and getattr(self.behavior, option):
                raise invalid(
                    f"{option} needs a streamed response; this {self.protocol} request streams no tokens",
                    at=("behavior", option),
                )
        if self.behavior.reconnect and self.protocol != "sse":
            raise invalid(
                f"reconnect (Last-Event-ID) applies to protocol sse, not {self.protocol}", at=("behavior", "reconnect")
            )
        return self


def _default_classes() -> tuple[UserClass, ...]:
    return (UserClass(name="default", request=REQUEST_TYPES["sse"]()),)


class ScenarioSpec(SpecModel):
    """A named load shape (its executor) and the user classes that make its requests."""

    name: Name
    executor: ExecutorSpec
    start_time: Duration = 0.0
    """Offset from the start of the run."""
    graceful_stop: Duration = 30.0
    """Time requests in flight get to finish once the load ends (k6's default: 30s)."""
    warmup: Duration = 0.0
    """Requests started during the first ``warmup`` of this scenario are left out of statistics."""
    tags: dict[str, str] = Field(default_factory=dict)
    classes: tuple[UserClass, ...] = Field(default_factory=_default_classes, min_length=1)

    @model_validator(mode="after")
    def _check(self) -> ScenarioSpec:
        total = self.executor.total_duration()
        if self.warmup > total:  # equal is allowed: a smoke run may shorten the load down to the warmup
            raise invalid(
                f"warmup ({format_duration(self.warmup)}) is longer than the load it trims ({format_duration(total)})",
                at="warmup",
            )
        seen: set[str] = set()
        for index, user_class in enumerate(self.classes):
            if user_class.name in seen:
                raise invalid(f"duplicate class name {user_class.name!r}", at=("classes", index, "name"))
            seen.add(user_class.name)
        return self

    def end_time(self) -> float:
        """Seconds from the start of the run until this scenario is over, graceful stop included."""
        return self.start_time + self.executor.total_duration() + self.graceful_stop


class Scenario(SpecModel):
    """A whole scenario file: the target and its named scenarios."""

    target: Target
    """``reference`` (start the bundled server) or a loopback base URL."""
    reference: dict[str, Any] = Field(default_factory=dict)
    """Settings of the bundled server (checked by the server's own settings model when it starts)."""
    scenarios: dict[str, ScenarioSpec] = Field(min_length=1)
    source: str = "<scenario>"
    """The file the scenario came from, for messages and reports."""
    thresholds: tuple[Threshold, ...] = ()
    """Pass/fail conditions checked at the end of the run (and every second for ``abort_on_fail``)."""
    gates: tuple[GateRule, ...] = ()
    """Regression budgets against a baseline, for ``infer-bench gate``."""
    gate_confidence: float = 0.95

    @model_validator(mode="after")
    def _check(self) -> Scenario:
        if self.reference and self.target != REFERENCE:
            raise invalid("server settings apply only with target: reference", at="reference")
        for key, spec in self.scenarios.items():
            if key != spec.name:
                raise invalid(f"scenario filed under {show(key)} is named {show(spec.name)}", at=("scenarios", key))
        return self

    def duration(self) -> float:
        """Seconds from the start of the run until the last scenario is over."""
        return max(spec.end_time() for spec in self.scenarios.values())
