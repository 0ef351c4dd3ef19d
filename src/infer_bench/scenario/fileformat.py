"""The scenario file as written: the models a YAML document is validated against, and the JSON Schema source.

They mirror the file, not the spec: prompts are ``inline`` / ``file`` / ``synthetic``, a burst is
``{size, every}``, and a scenario entry holds its executor's options beside ``executor:``. Before
validation, ``layout.arrange`` has renamed k6 spellings, moved an inline class into ``classes`` and
applied ``defaults``, so a class here is always complete and its ``protocol`` picks its request template.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, get_args

from pydantic import Field, WithJsonSchema, model_validator

from infer_bench.scenario.base import (
    Count,
    Flag,
    Name,
    PositiveNumber,
    Probability,
    Seed,
    SpecModel,
    invalid,
)
from infer_bench.scenario.durations import DURATION_JSON_SCHEMA, Duration, PositiveDuration
from infer_bench.scenario.executors import (
    EXECUTOR_FIELDS,
    ConstantArrivalRateFields,
    ConstantVUsFields,
    PerVUIterationsFields,
    RampingArrivalRateFields,
    RampingVUsFields,
    SharedIterationsFields,
)
from infer_bench.scenario.spec import SYNTHETIC_WORDS, ThinkTime
from infer_bench.scenario.targets import Target
from infer_bench.scenario.templates import HttpRequest, OpenAIRequest, ProtocolName, SSERequest, WebSocketRequest

INLINE_KEYS = ("protocol", "request", "prompts", "think_time", "behavior", "timeout")
"""Class keys a scenario may hold itself when it has a single class (which is then named ``default``)."""

_THINK_TIME_SCHEMA: dict[str, Any] = {
    "anyOf": [
        DURATION_JSON_SCHEMA,
        {
            "type": "object",
            "properties": {"min": DURATION_JSON_SCHEMA, "max": DURATION_JSON_SCHEMA},
            "additionalProperties": False,
        },
    ],
    "description": "pause between a VU's requests: a duration, or {min, max} for a uniform pick",
}
ThinkTimeField = Annotated[ThinkTime, WithJsonSchema(_THINK_TIME_SCHEMA)]


class WordRange(SpecModel):
    """Words in a synthetic prompt, picked uniformly in [min, max]."""

    min: Count
    max: Count

    @model_validator(mode="before")
    @classmethod
    def _fixed(cls, data: Any) -> Any:
        if isinstance(data, int) and not isinstance(data, bool):
            return {"min": data, "max": data}
        return data

    @model_validator(mode="after")
    def _check(self) -> WordRange:
        if self.min > self.max:
            raise invalid(f"min ({self.min}) > max ({self.max})", at="max")
        return self


_WORDS_SCHEMA: dict[str, Any] = {
    "anyOf": [
        {"type": "integer", "minimum": 1},
        {
            "type": "object",
            "properties": {"min": {"type": "integer", "minimum": 1}, "max": {"type": "integer", "minimum": 1}},
            "required": ["min", "max"],
            "additionalProperties": False,
        },
    ]
}


class SyntheticPrompts(SpecModel):
    words: Annotated[WordRange, WithJsonSchema(_WORDS_SCHEMA)] = Field(
        default_factory=lambda: WordRange(min=SYNTHETIC_WORDS[0], max=SYNTHETIC_WORDS[1])
    )


class PromptsEntry(SpecModel):
    """Exactly one of ``inline``, ``file`` or ``synthetic``."""

    inline: list[str] | None = Field(None, min_length=1)
    file: str | None = Field(None, min_length=1)
    """A path relative to the scenario file; read when the scenario loads."""
    format: Literal["jsonl", "csv", "txt"] | None = None
    """Defaults from the file's extension."""
    field: str | None = Field(None, min_length=1)
    """The JSON field or CSV column holding the prompt (default: prompt)."""
    synthetic: SyntheticPrompts | None = None
    order: Literal["sequence", "random"] = "sequence"
    seed: Seed = 0

    @model_validator(mode="after")
    def _check(self) -> PromptsEntry:
        sources = [key for key in ("inline", "file", "synthetic") if key in self.model_fields_set]
        if len(sources) != 1:
            given = f"got {' and '.join(sources)}" if sources else "got none"
            raise invalid(f"give exactly one of inline, file or synthetic; {given}", at=tuple(sources[1:2]))
        for key in ("inline", "file"):
            if key in sources and getattr(self, key) is None:
                raise invalid(f"{key} needs a value", at=key)
        for key in ("format", "field"):
            if key in self.model_fields_set and "file" not in sources:
                raise invalid(f"{key} applies only to a prompt file", at=key)
        if self.field is not None and self.format == "txt":
            raise invalid("a txt prompt file has one prompt per line and no fields", at="field")
        return self


class BurstEntry(SpecModel):
    size: Count
    """Requests sent back to back."""
    every: PositiveDuration


class BehaviorEntry(SpecModel):
    cancel_after_tokens: Count | None = None
    cancel_probability: Probability | None = None
    """Default 1.0 when cancel_after_tokens is set."""
    read_delay: Duration = 0.0
    reconnect: Flag = False
    burst: BurstEntry | None = None

    @model_validator(mode="after")
    def _check(self) -> BehaviorEntry:
        if self.cancel_probability is not None and self.cancel_after_tokens is None:
            raise invalid("cancel_probability needs cancel_after_tokens", at="cancel_probability")
        return self


class _ClassEntry(SpecModel):
    name: Name | None = None
    """Default: class<index>."""
    weight: PositiveNumber = 1.0
    """Share of the VUs, relative to the other classes."""
    prompts: PromptsEntry = Field(default_factory=lambda: PromptsEntry(synthetic=SyntheticPrompts()))
    think_time: ThinkTimeField = Field(default_factory=ThinkTime)
    behavior: BehaviorEntry = Field(default_factory=BehaviorEntry)
    timeout: PositiveDuration = 30.0


class HttpClassEntry(_ClassEntry):
    protocol: Literal["http"]
    request: HttpRequest = Field(default_factory=HttpRequest)


class SSEClassEntry(_ClassEntry):
    protocol: Literal["sse"] = "sse"
    request: SSERequest = Field(default_factory=SSERequest)


class WebSocketClassEntry(_ClassEntry):
    protocol: Literal["websocket"]
    request: WebSocketRequest = Field(default_factory=WebSocketRequest)


class OpenAIClassEntry(_ClassEntry):
    protocol: Literal["openai"]
    request: OpenAIRequest = Field(default_factory=OpenAIRequest)


ClassEntry = Annotated[
    HttpClassEntry | SSEClassEntry | WebSocketClassEntry | OpenAIClassEntry, Field(discriminator="protocol")
]


class ClassDefaults(SpecModel):
    """Class keys applied to every class (inline or listed) that does not give them itself."""

    protocol: ProtocolName | None = None
    request: dict[str, Any] | None = None
    """Checked in each class that takes it, against that class's protocol."""
    prompts: PromptsEntry | None = None
    think_time: ThinkTimeField | None = None
    behavior: BehaviorEntry | None = None
    timeout: PositiveDuration | None = None
    weight: PositiveNumber | None = None


_EXECUTORS_OF: dict[str, list[str]] = {
    option: [kind for kind, options in EXECUTOR_FIELDS.items() if option in options]
    for option in set().union(*EXECUTOR_FIELDS.values())
}


class _ScenarioEntry(SpecModel):
    start_time: Duration = 0.0
    """Offset from the start of the run."""
    graceful_stop: Duration = 30.0
    """Time requests in flight get to finish once the load ends."""
    warmup: Duration = 0.0
    """Requests started during the first ``warmup`` are left out of statistics."""
    tags: dict[str, str] = Field(default_factory=dict)
    classes: list[ClassEntry] = Field(min_length=1)
    """Weighted user classes; or give one class's keys (protocol, request, …) on the scenario itself."""

    @classmethod
    def _unknown_key_note(cls, key: str) -> str:
        owners = _EXECUTORS_OF.get(key)
        executor = cls.model_fields["executor"].annotation
        if owners:
            return f"it is an option of {', '.join(owners)}, not of {get_args(executor)[0]}"
        if key in ("name", "weight"):
            return "it belongs to a class, under classes"
        return ""


class ConstantVUsEntry(ConstantVUsFields, _ScenarioEntry):
    executor: Literal["constant-vus"]


class RampingVUsEntry(RampingVUsFields, _ScenarioEntry):
    executor: Literal["ramping-vus"]


class PerVUIterationsEntry(PerVUIterationsFields, _ScenarioEntry):
    executor: Literal["per-vu-iterations"]


class SharedIterationsEntry(SharedIterationsFields, _ScenarioEntry):
    executor: Literal["shared-iterations"]


class ConstantArrivalRateEntry(ConstantArrivalRateFields, _ScenarioEntry):
    executor: Literal["constant-arrival-rate"]


class RampingArrivalRateEntry(RampingArrivalRateFields, _ScenarioEntry):
    executor: Literal["ramping-arrival-rate"]


ScenarioEntry = Annotated[
    ConstantVUsEntry
    | RampingVUsEntry
    | PerVUIterationsEntry
    | SharedIterationsEntry
    | ConstantArrivalRateEntry
    | RampingArrivalRateEntry,
    Field(discriminator="executor"),
]
SCENARIO_ENTRY_TYPES = (
    ConstantVUsEntry,
    RampingVUsEntry,
    PerVUIterationsEntry,
    SharedIterationsEntry,
    ConstantArrivalRateEntry,
    RampingArrivalRateEntry,
)


_THRESHOLD_ALIASES = {"abortOnFail": "abort_on_fail", "delayAbortEval": "delay_abort_eval"}


class ThresholdEntry(SpecModel):
    """A threshold with options; a plain string is ``{threshold: …}`` with the defaults."""

    threshold: str
    """The condition, e.g. ``rate<0.01`` or ``p(95)<500ms``."""
    abort_on_fail: Flag = False
    """Stop the run as soon as the threshold fails (checked every second)."""
    delay_abort_eval: Duration = 0.0
    """Do not abort before this long after the start of the run: early figures are few and noisy."""

    @model_validator(mode="before")
    @classmethod
    def _k6_spellings(cls, data: Any) -> Any:
        if isinstance(data, str):
            return {"threshold": data}
        if isinstance(data, dict):
            return {_THRESHOLD_ALIASES.get(key, key): value for key, value in data.items()}
        return data


_THRESHOLD_SCHEMA: dict[str, Any] = {
    "anyOf": [
        {"type": "string", "description": "a condition such as p(95)<500ms, rate<0.01, count<1"},
        {
            "type": "object",
            "properties": {
                "threshold": {"type": "string"},
                "abort_on_fail": {"type": "boolean"},
                "abortOnFail": {"type": "boolean"},
                "delay_abort_eval": DURATION_JSON_SCHEMA,
                "delayAbortEval": DURATION_JSON_SCHEMA,
            },
            "required": ["threshold"],
            "additionalProperties": False,
        },
    ]
}
ThresholdItem = Annotated[ThresholdEntry, WithJsonSchema(_THRESHOLD_SCHEMA)]


class GatesEntry(SpecModel):
    """Regression budgets that ``infer-bench gate`` applies when no ``--max-regression`` is given."""

    max_regression: dict[str, str] = Field(min_length=1)
    """Figure → budget, e.g. ``{ttft.p99: 10%, throughput: -5%}``."""
    confidence: Annotated[float, Field(gt=0.5, lt=1)] = 0.95
    """Confidence of the interval a change must leave before it counts as more than noise."""


class ScenarioFile(SpecModel):
    """A scenario file: where load goes, and the named scenarios that make it."""

    target: Target
    """``reference`` to start the bundled server, or a loopback base URL like http://127.0.0.1:8000."""
    reference: dict[str, Any] | None = None
    """Settings of the bundled server (only with target: reference), e.g. batch_size: 16."""
    defaults: ClassDefaults | None = None
    scenarios: dict[Name, ScenarioEntry] = Field(min_length=1)
    """Named scenarios; they run at the same time, each from its start_time."""
    thresholds: dict[str, list[ThresholdItem]] = Field(default_factory=dict)
    """k6 thresholds: metric (or metric{tag:value}) → conditions, e.g. ttft: ["p(95)<500ms"]."""
    gates: GatesEntry | None = None

    @model_validator(mode="after")
    def _check(self) -> ScenarioFile:
        if self.reference is not None and self.target != "reference":
            raise invalid("server settings apply only with target: reference", at="reference")
        return self
