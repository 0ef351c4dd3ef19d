"""Loading a scenario file: text → variables → YAML → layout → file models → ``Scenario``.

Each stage either passes its result on or raises ``InvalidScenario`` with located problems; this is the
one place they become a ``ScenarioError`` (exit code 2), a short paragraph with one line per problem.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from pydantic import ValidationError

from infer_bench.errors import ScenarioError
from infer_bench.scenario.base import KeyPath, show
from infer_bench.scenario.diagnostics import InvalidScenario, Locator, Problem, problems_from
from infer_bench.scenario.document import read_document
from infer_bench.scenario.executors import EXECUTOR_FIELDS, executor_spec
from infer_bench.scenario.fileformat import (
    ClassEntry,
    PromptsEntry,
    ScenarioFile,
    SyntheticPrompts,
)
from infer_bench.scenario.gates import GateRule, GateSyntaxError, parse_gate
from infer_bench.scenario.layout import arrange
from infer_bench.scenario.prompts import PromptFileError, read_prompts
from infer_bench.scenario.spec import Behavior, PromptSource, Scenario, ScenarioSpec, UserClass
from infer_bench.scenario.templates import PROTOCOLS
from infer_bench.scenario.thresholds import (
    TAG_NAMES_BUILT_IN,
    Threshold,
    ThresholdSyntaxError,
    parse_key,
    parse_threshold,
)
from infer_bench.scenario.variables import substitute

_T = TypeVar("_T")
_ARRIVAL_EXECUTORS = ("constant-arrival-rate", "ramping-arrival-rate")
_OPEN_MODEL_NOTE = (
    "{what} paces a VU's own loop (closed executors); an arrival-rate executor starts every request on its "
    "schedule, so {what} would be ignored: remove it, or use constant-vus / ramping-vus"
)
_TAGS = {"executor": tuple(EXECUTOR_FIELDS), "protocol": PROTOCOLS}


def load_scenario(path: Path, env: Mapping[str, str] | None = None) -> Scenario:
    """The scenario in the YAML file ``path``; prompt files are read relative to its directory.

    Args:
        path: the scenario file; messages name it as given.
        env: values for ``${VAR}`` references (the CLI passes the environment updated by ``-e``);
            None means no variables are set.

    Raises:
        ScenarioError: the file is unreadable or invalid; the message locates each problem.
    """
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ScenarioError(f"{source}: no such scenario file") from None
    except UnicodeDecodeError as exc:
        raise ScenarioError(f"{source}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise ScenarioError(f"{source}: cannot read the scenario file ({exc.strerror or exc})") from None
    return parse_scenario(text, source=source, base_dir=path.parent, env=env)


def parse_scenario(
    text: str, *, source: str = "<scenario>", base_dir: Path | None = None, env: Mapping[str, str] | None = None
) -> Scenario:
    """The scenario in ``text``, as ``load_scenario`` reads a file.

    Args:
        text: the YAML text.
        source: the name used in messages and kept in ``Scenario.source``.
        base_dir: the directory prompt files are relative to (default: the current directory).
        env: values for ``${VAR}`` references.

    Raises:
        ScenarioError: the text is not a valid scenario; the message locates each problem.
    """
    locator = Locator(source)
    try:
        document = read_document(substitute(text, env or {}))
        locator = Locator(source, document.lines)
        if document.data is None:
            raise InvalidScenario([Problem((), "the file is empty; expected a mapping with target and scenarios")])
        if not isinstance(document.data, dict):
            got = show(document.data)
            raise InvalidScenario([Problem((), f"expected a mapping with target and scenarios, got {got}", line=1)])
        arranged = arrange(document.data)
        locator = Locator(source, document.lines, arranged.moves)
        if arranged.problems:
            raise InvalidScenario(arranged.problems)
        try:
            file = ScenarioFile.model_validate(arranged.data)
        except ValidationError as exc:
            raise InvalidScenario(problems_from(exc, arranged.data, tags=_TAGS)) from None
        return _Builder(source, base_dir or Path.cwd()).scenario(file)
    except InvalidScenario as exc:
        raise ScenarioError(locator.render(exc.problems)) from None


class _Builder:
    """File models → spec, reading prompt files; collects problems rather than stopping at the first."""

    def __init__(self, source: str, base_dir: Path) -> None:
        self.source = source
        self.base_dir = base_dir
        self.problems: list[Problem] = []
        self._files: dict[tuple[str, str | None, str | None], tuple[str, ...]] = {}

    def scenario(self, file: ScenarioFile) -> Scenario:
        specs: dict[str, ScenarioSpec] = {}
        for name, entry in file.scenarios.items():
            path: KeyPath = ("scenarios", name)
            built = [self._user_class(c, index, (*path, "classes", index)) for index, c in enumerate(entry.classes)]
            classes = [user_class for user_class in built if user_class is not None]
            options = {key: getattr(entry, key) for key in EXECUTOR_FIELDS[entry.executor]}
            if entry.executor in _ARRIVAL_EXECUTORS:
                self._closed_model_only(entry, path)
            executor = self._attempt(path, partial(executor_spec, entry.executor, options))
            if executor is None or len(classes) < len(built):
                continue
            spec = self._attempt(
                path,
                partial(
                    ScenarioSpec,
                    name=name,
                    executor=executor,
                    start_time=entry.start_time,
                    graceful_stop=entry.graceful_stop,
                    warmup=entry.warmup,
                    tags=entry.tags,
                    classes=tuple(classes),
                ),
            )
            if spec is not None:
                specs[name] = spec
        thresholds = self._thresholds(file, specs)
        gates = self._gates(file)
        if not self.problems:
            reference = file.reference or {}
            make = partial(
                Scenario, target=file.target, reference=reference, scenarios=specs, source=self.source,
                thresholds=thresholds, gates=gates, gate_confidence=file.gates.confidence if file.gates else 0.95,
            )  # fmt: skip
            scenario = self._attempt((), make)
            if scenario is not None:
                return scenario
        raise InvalidScenario(self.problems)

    def _thresholds(self, file: ScenarioFile, specs: dict[str, ScenarioSpec]) -> tuple[Threshold, ...]:
        # A threshold on a metric, tag or scenario that cannot exist is found now, not after the run.
        parsed: list[Threshold] = []
        for key, entries in file.thresholds.items():
            try:
                problem = _tag_filter_problem(parse_key(key)[1], specs)
            except ThresholdSyntaxError as exc:
                problem = str(exc)
            if problem:
                self.problems.append(Problem(("thresholds", key), problem))
                continue
            for index, item in enumerate(entries):
                abort, delay = item.abort_on_fail, item.delay_abort_eval
                try:
                    parsed.append(parse_threshold(key, item.threshold, abort_on_fail=abort, delay_abort_eval_s=delay))
                except ThresholdSyntaxError as exc:
                    self.problems.append(Problem(("thresholds", key, index), str(exc)))
        return tuple(parsed)

    def _gates(self, file: ScenarioFile) -> tuple[GateRule, ...]:
        if file.gates is None:
            return ()
        rules = []
        for figure, budget in file.gates.max_regression.items():
            try:
                rules.append(parse_gate(figure, budget))
            except GateSyntaxError as exc:
                self.problems.append(Problem(("gates", "max_regression", figure), str(exc)))
        return tuple(rules)

    def _closed_model_only(self, entry: Any, path: KeyPath) -> None:
        """Think time and bursts pace a VU's own loop; an arrival-rate executor's schedule starts every
        request, so there they would be silently ignored: say so instead."""
        for index, cls in enumerate(entry.classes):
            where = (*path, "classes", index)
            if cls.think_time.max > 0:
                self.problems.append(Problem((*where, "think_time"), _OPEN_MODEL_NOTE.format(what="think_time")))
            if cls.behavior.burst is not None:
                self.problems.append(Problem((*where, "behavior", "burst"), _OPEN_MODEL_NOTE.format(what="burst")))

    def _user_class(self, entry: ClassEntry, index: int, path: KeyPath) -> UserClass | None:
        prompts = self._prompts(entry.prompts, (*path, "prompts"))
        behavior = entry.behavior
        make = partial(
            UserClass,
            name=entry.name or f"class{index}",
            weight=entry.weight,
            protocol=entry.protocol,
            request=entry.request,
            prompts=prompts,
            think_time=entry.think_time,
            behavior=Behavior(
                cancel_after_tokens=behavior.cancel_after_tokens,
                cancel_probability=1.0 if behavior.cancel_probability is None else behavior.cancel_probability,
                read_delay=behavior.read_delay,
                reconnect=behavior.reconnect,
                burst_size=behavior.burst.size if behavior.burst else 1,
                burst_every=behavior.burst.every if behavior.burst else 0.0,
            ),
            timeout=entry.timeout,
        )
        return self._attempt(path, make)

    def _prompts(self, entry: PromptsEntry, path: KeyPath) -> PromptSource:
        if entry.inline is not None:
            return PromptSource(kind="inline", prompts=tuple(entry.inline), order=entry.order, seed=entry.seed)
        if entry.file is not None:
            key = (entry.file, entry.format, entry.field)
            if key not in self._files:
                try:
                    self._files[key] = read_prompts(entry.file, self.base_dir, entry.format, entry.field)
                except PromptFileError as exc:
                    self.problems.append(Problem((*path, "file"), str(exc)))
                    self._files[key] = ("",)  # stands in, so that the problem is reported once
            return PromptSource(kind="file", prompts=self._files[key], order=entry.order, seed=entry.seed)
        words = (entry.synthetic or SyntheticPrompts()).words
        return PromptSource(
            kind="synthetic", order=entry.order, seed=entry.seed, words_min=words.min, words_max=words.max
        )

    def _attempt(self, path: KeyPath, make: Callable[[], _T]) -> _T | None:
        # Checks that span a whole class or scenario (protocol against behavior, warmup against the
        # load, unique class names) live in the spec; their problems are located here.
        try:
            return make()
        except ValidationError as exc:
            self.problems.extend(problems_from(exc, None, base=path))
            return None


def _tag_filter_problem(tags: tuple[tuple[str, str], ...], specs: dict[str, ScenarioSpec]) -> str | None:
    """What is wrong with a threshold's ``{tag:value}`` filter, if it could never match a request."""
    scenarios = [spec for name, spec in specs.items() if dict(tags).get("scenario", name) == name]
    for name, value in tags:
        if name == "scenario":
            if value not in specs:
                return f"no scenario named {value!r}; the file has: {', '.join(specs)}"
        elif name == "class":
            classes = {c.name for spec in scenarios for c in spec.classes}
            if value not in classes:
                return f"no class named {value!r} here; expected one of: {', '.join(sorted(classes))}"
        elif name == "protocol":
            if value not in PROTOCOLS:
                return f"unknown protocol {value!r}; expected one of: {', '.join(PROTOCOLS)}"
        else:
            custom = {tag for spec in scenarios for tag in spec.tags}
            if name not in custom:
                known = [*TAG_NAMES_BUILT_IN, *sorted(custom)]
                return f"no scenario has the tag {name!r}; expected one of: {', '.join(known)}"
    return None
