"""The sweep file: which scenario, which server settings to vary, at which loads, under which SLO.

::

    scenario: batching-scenario.yaml     # relative to the sweep file; its thresholds are the SLO
    out: sweep-results                   # the sweep directory (default: <sweep file stem>-results)
    server:                              # default: the bundled reference server with these base settings
      settings: {model: echo}
      # or any server: command with {port} and grid values, and a readiness URL
      # command: "my-server --max-batch {batch_size} --port {port}"
      # ready_url: "http://127.0.0.1:{port}/health"
    grid:                                # every combination is one setting
      batch_size: [1, 8, 32]
      batch_timeout_ms: [0, 5]
      echo.base_ms: [5]                  # a model's parameter: <model name>.<field>
    loads: [50, 200, 800]                # rates (arrival-rate scenarios) or VUs (constant-vus)
    capacity: {start: 50, max: 5000}     # optional: the highest rate within the SLO, per setting

Errors name the file, line and key, as scenario errors do (exit code 2).
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, field_validator

from infer_bench.errors import ScenarioError
from infer_bench.scenario.base import NonNegativeNumber, PositiveNumber, SpecModel, invalid, show
from infer_bench.scenario.diagnostics import InvalidScenario, Locator, Problem, problems_from
from infer_bench.scenario.document import read_document
from infer_bench.scenario.variables import substitute

Scalar = int | float | str | bool


class ServerEntry(SpecModel):
    settings: dict[str, Any] = Field(default_factory=dict)
    """Base settings of the bundled reference server; each grid point is applied on top."""
    command: str | None = None
    """Any server instead of the bundled one: a command line with ``{port}`` and grid names in braces."""
    ready_url: str | None = None
    """With ``command``: polled until it answers 2xx (``{port}`` is filled in)."""
    start_timeout: PositiveNumber = 60.0

    @field_validator("command")
    @classmethod
    def _needs_port(cls, value: str | None) -> str | None:
        if value is not None and "{port}" not in value:
            raise invalid("the command must take the port as {port}: each setting gets a free port")
        return value


class CapacityEntry(SpecModel):
    start: PositiveNumber
    """The first rate tried; it doubles until the SLO fails (or ``max``), then bisects."""
    max: PositiveNumber
    resolution: PositiveNumber = 0.1
    """Stop bisecting when the failing rate is within this fraction above the passing one."""
    confirm: int = Field(1, ge=0, le=5)
    """Extra runs at the capacity found; it must pass them all, or the next lower passing rate is taken."""


class SweepFile(SpecModel):
    scenario: str
    out: str | None = None
    server: ServerEntry = Field(default_factory=ServerEntry)
    grid: dict[str, list[Scalar]] = Field(default_factory=dict)
    loads: list[PositiveNumber] = Field(default_factory=list)
    capacity: CapacityEntry | None = None
    settle: NonNegativeNumber = 0.0
    """Seconds to wait after the server is ready before the scenario starts."""
    server_command: str | None = None
    """Shorthand for ``server: {command: ...}``."""
    ready_url: str | None = None
    """Shorthand for ``server: {ready_url: ...}``."""

    @field_validator("grid")
    @classmethod
    def _grid_values(cls, grid: dict[str, list[Scalar]]) -> dict[str, list[Scalar]]:
        for name, values in grid.items():
            if not values:
                raise invalid("expected at least one value", at=name)
            if len(set(map(repr, values))) != len(values):
                raise invalid(f"a value is listed twice in {show(values)}", at=name)
        return grid


@dataclass(frozen=True)
class Setting:
    """One point of the grid: the values of every swept name."""

    values: tuple[tuple[str, Scalar], ...]

    @property
    def label(self) -> str:
        return ", ".join(f"{name}={value}" for name, value in self.values) or "defaults"

    @property
    def key(self) -> str:
        """A file-name-safe identity: the same setting always maps to the same files."""
        text = "_".join(f"{name}-{value}" for name, value in self.values) or "defaults"
        return "".join(c if c.isalnum() or c in "-_." else "~" for c in text)

    def as_dict(self) -> dict[str, Scalar]:
        return dict(self.values)


@dataclass(frozen=True)
class Sweep:
    source: str
    scenario_path: Path
    out_dir: Path
    server: ServerEntry
    settings: tuple[Setting, ...]
    loads: tuple[float, ...]
    capacity: CapacityEntry | None
    settle_s: float


def load_sweep(path: Path, env: Mapping[str, str] | None = None) -> Sweep:
    """The sweep in ``path``; the scenario and ``out`` are relative to its directory.

    Raises:
        ScenarioError: the file is unreadable or invalid, each problem located.
    """
    source = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ScenarioError(f"{source}: no such sweep file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ScenarioError(f"{source}: cannot read the sweep file ({exc})") from None
    return parse_sweep(text, source=source, base_dir=path.parent, env=env, stem=path.stem)


def parse_sweep(
    text: str, *, source: str = "<sweep>", base_dir: Path | None = None, env: Mapping[str, str] | None = None,
    stem: str = "sweep",
) -> Sweep:  # fmt: skip
    base = base_dir or Path.cwd()
    locator = Locator(source)
    try:
        document = read_document(substitute(text, env or {}))
        locator = Locator(source, document.lines)
        if not isinstance(document.data, dict):
            raise InvalidScenario([Problem((), "expected a mapping with scenario, grid and loads", line=1)])
        try:
            file = SweepFile.model_validate(document.data)
        except ValidationError as exc:
            raise InvalidScenario(problems_from(exc, document.data)) from None
        problems = _check(file)
        if problems:
            raise InvalidScenario(problems)
        if file.server_command or file.ready_url:
            try:
                server = ServerEntry.model_validate(
                    {**file.server.model_dump(exclude_unset=True), "command": file.server_command,
                     "ready_url": file.ready_url}
                )  # fmt: skip
            except ValidationError as exc:
                raise InvalidScenario(
                    [Problem(("server_command",), p.message) for p in problems_from(exc, None)]
                ) from None
            file = file.model_copy(update={"server": server, "server_command": None, "ready_url": None})
            if problems := _check(file):
                raise InvalidScenario(problems)
    except InvalidScenario as exc:
        raise ScenarioError(locator.render(exc.problems)) from None
    names = list(file.grid)
    settings = tuple(Setting(tuple(zip(names, combo, strict=True))) for combo in itertools.product(*file.grid.values()))
    return Sweep(
        source=source,
        scenario_path=base / file.scenario,
        out_dir=Path(os.path.normpath(base / (file.out or f"{stem}-results"))),
        server=file.server,
        settings=settings,
        loads=tuple(file.loads),
        capacity=file.capacity,
        settle_s=file.settle,
    )


def _check(file: SweepFile) -> list[Problem]:
    problems = []
    if (file.server_command or file.ready_url) and (file.server.command or file.server.ready_url):
        problems.append(Problem(("server_command",), "give the command either here or under server:, not both"))
    if not file.loads and file.capacity is None:
        problems.append(Problem(("loads",), "give loads to run, a capacity search, or both"))
    if file.capacity is not None and file.capacity.max < file.capacity.start:
        problems.append(Problem(("capacity", "max"), f"must be at least start ({file.capacity.start:g})"))
    for name in file.grid:
        if file.server.command is None and not _is_setting_name(name):
            problems.append(Problem(("grid", name), "expected a server setting or <model name>.<parameter>"))
        elif file.server.command is not None and "{" + name + "}" not in file.server.command:
            problems.append(Problem(("grid", name), f"the server command does not use {{{name}}}"))
    if file.server.command is not None and file.server.settings:
        problems.append(Problem(("server", "settings"), "settings apply to the bundled server, not to a command"))
    count = math.prod(len(v) for v in file.grid.values())
    if count > 1000:
        problems.append(Problem(("grid",), f"{count} settings: more than 1,000 is not a sweep one can wait for"))
    return problems


def _is_setting_name(name: str) -> bool:
    from reference_server.settings import ServerSettings

    if "." in name:
        model, _, field = name.partition(".")
        return bool(model) and bool(field) and "." not in field
    return name in ServerSettings.model_fields and name not in ("host", "port", "models")
