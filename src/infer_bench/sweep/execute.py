"""Running a sweep: for every cell a fresh server with its setting, the scenario at its load, its result kept.

The sweep directory holds one result file per cell (``cells/``) and per capacity-search run
(``capacity/``), and ``sweep.json`` with the conclusions. A cell whose result file exists with status
``complete`` is not run again, so an interrupted sweep resumes where it stopped; Ctrl-C keeps every
finished cell and writes the summary of what is done.
"""

from __future__ import annotations

import contextlib
import json
import shlex
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from infer_bench.errors import RunAborted, ScenarioError
from infer_bench.result import write_result
from infer_bench.runner import reference_server, run_scenario, stop_process
from infer_bench.scenario import ConstantArrivalRate, ConstantVUs, Scenario
from infer_bench.sweep.analysis import (
    Capacity,
    CellFigures,
    Recommendation,
    find_capacity,
    pareto_frontier,
    recommend,
)
from infer_bench.sweep.spec import Setting, Sweep

SUMMARY_SCHEMA = "infer-bench.sweep"
SUMMARY_VERSION = 1
Progress = Callable[[str], None]


@dataclass
class SweepResult:
    cells: list[CellFigures] = field(default_factory=list)
    capacities: list[Capacity] = field(default_factory=list)
    failures: list[dict[str, Any]] = field(default_factory=list)  # cells that could not run, and why
    interrupted: bool = False

    @property
    def frontier(self) -> list[CellFigures]:
        return pareto_frontier(self.cells)

    @property
    def recommendation(self) -> Recommendation | None:
        return recommend(self.cells, self.capacities)

    def to_json(self, sweep: Sweep) -> dict[str, Any]:
        rec = self.recommendation
        return {
            "schema": SUMMARY_SCHEMA, "version": SUMMARY_VERSION, "source": sweep.source,
            "scenario": str(sweep.scenario_path), "status": "interrupted" if self.interrupted else "complete",
            "settings": [s.label for s in sweep.settings], "loads": list(sweep.loads),
            "cells": [c.to_json() for c in self.cells],
            "capacity": [c.to_json() for c in self.capacities],
            "frontier": [c.to_json() for c in self.frontier],
            "recommendation": {"setting": rec.setting, "reason": rec.reason} if rec else None,
            "failures": self.failures,
        }  # fmt: skip


class SweepInterrupted(Exception):
    """Ctrl-C during a cell: what finished is kept."""


def check_scenario(scenario: Scenario, sweep: Sweep) -> None:
    """Only constant-load scenarios can be set to a load; a capacity search needs an SLO.

    Raises:
        ScenarioError: naming the sweep file and what is wrong.
    """
    for spec in scenario.scenarios.values():
        if not isinstance(spec.executor, ConstantArrivalRate | ConstantVUs):
            raise ScenarioError(
                f"{sweep.source}: scenario {spec.name!r} of {sweep.scenario_path} uses {spec.executor.kind}; a sweep "
                "sets each load on constant-arrival-rate (rate) or constant-vus (VUs) scenarios"
            )
        if sweep.capacity is not None and not isinstance(spec.executor, ConstantArrivalRate):
            raise ScenarioError(f"{sweep.source}: capacity searches rates: scenario {spec.name!r} is not arrival-rate")
    if sweep.capacity is not None and not scenario.thresholds:
        raise ScenarioError(
            f"{sweep.source}: a capacity search needs thresholds in {sweep.scenario_path} (they are the SLO)"
        )


def check_settings(scenario: Scenario, sweep: Sweep) -> None:
    """Every setting of the grid must be valid for the bundled server, before any cell runs.

    Raises:
        ScenarioError: the first setting the server would refuse, and why.
    """
    if sweep.server.command is not None:
        return
    from reference_server.errors import ConfigError as ServerConfigError
    from reference_server.settings import validate_settings

    for setting in sweep.settings:
        settings = server_settings({**scenario.reference, **sweep.server.settings}, setting)
        try:
            validate_settings({**settings, "host": "127.0.0.1", "port": 0}, f"{sweep.source}: {setting.label}")
        except ServerConfigError as exc:
            raise ScenarioError(str(exc)) from None


def server_settings(base: dict[str, Any], setting: Setting) -> dict[str, Any]:
    """The bundled server's settings for ``setting``: ``name`` sets a field, ``model.field`` a model's.

    Raises:
        ScenarioError: a model the settings do not have.
    """
    from reference_server.settings import ServerSettings

    settings = dict(base)
    for name, value in setting.values:
        if "." not in name:
            settings[name] = value
            continue
        model, _, param = name.partition(".")
        if "models" not in settings:
            settings["models"] = [m.model_dump(mode="json") for m in ServerSettings().models]
        models = [dict(m) for m in settings["models"]]
        matches = [m for m in models if m.get("name", m.get("kind")) == model]
        if not matches:
            known = ", ".join(str(m.get("name", m.get("kind"))) for m in models)
            raise ScenarioError(f"grid {name}: the server has no model named {model!r} (it has {known})")
        for m in matches:
            m[param] = value
        settings["models"] = models
    return settings


def at_load(scenario: Scenario, load: float, url: str) -> Scenario:
    """``scenario`` against ``url`` with every scenario's rate (or VUs) set to ``load``."""
    specs = {}
    for name, spec in scenario.scenarios.items():
        ex = spec.executor
        update: dict[str, Any] = {"rate": load} if isinstance(ex, ConstantArrivalRate) else {"vus": max(1, round(load))}
        specs[name] = spec.model_copy(update={"executor": ex.model_copy(update=update)})
    return scenario.model_copy(update={"scenarios": specs, "target": url, "reference": {}})


def figures(result: dict[str, Any], setting: str, load: float, scenario: Scenario) -> CellFigures:
    """A result's headline figures; throughput from the steady seconds (after warmup, before the drain)."""
    warmup = max(s.warmup for s in scenario.scenarios.values())
    end = max(s.start_time + s.executor.total_duration() for s in scenario.scenarios.values())
    steady = [s for s in result.get("series", []) if warmup <= s["t"] and s["t"] + 1 <= end]
    if steady:
        throughput = sum(s["succeeded"] for s in steady) / len(steady)
    else:
        throughput = float(result["headline"]["request_rate"])
    summary = result.get("total", {}).get("summary", {})

    def ms(metric: str, label: str) -> float | None:
        value = summary.get(metric, {}).get(label)
        return float(value) if value is not None else None

    ttft = "ttft" if "ttft" in summary else "e2e"  # plain HTTP has no tokens: its latency is end to end
    passed = all(t.get("ok", False) for t in result.get("thresholds") or [])
    return CellFigures(
        setting=setting, load=load, throughput=throughput, ttft_p50_ms=ms(ttft, "p50"), ttft_p99_ms=ms(ttft, "p99"),
        itl_p99_ms=ms("itl", "p99"), completion_rate=float(result["headline"]["completion_rate"]),
        slo_passed=passed and result.get("status") == "complete",
    )  # fmt: skip


class SweepRunner:
    def __init__(self, sweep: Sweep, scenario: Scenario, progress: Progress = print) -> None:
        self.sweep = sweep
        self.scenario = scenario
        self.progress = progress
        self.result = SweepResult()
        self._planned = len(sweep.settings) * len(sweep.loads)
        self._done = 0
        self._started = time.monotonic()
        self._cell_seconds: list[float] = []

    def run(self) -> SweepResult:
        out = self.sweep.out_dir
        (out / "cells").mkdir(parents=True, exist_ok=True)
        try:
            for setting in self.sweep.settings:
                for load in self.sweep.loads:
                    self._cell(setting, load, out / "cells" / f"{setting.key}@{load:g}.json", record=True)
                if self.sweep.capacity is not None:
                    self._capacity(setting)
        except (SweepInterrupted, KeyboardInterrupt):
            self.result.interrupted = True
        write_summary(out / "sweep.json", self.result.to_json(self.sweep))
        return self.result

    def _capacity(self, setting: Setting) -> None:
        cap = self.sweep.capacity
        assert cap is not None
        directory = self.sweep.out_dir / "capacity"
        directory.mkdir(exist_ok=True)
        tries: dict[float, int] = {}

        def passes(rate: float) -> bool:
            tries[rate] = tries.get(rate, 0) + 1
            path = directory / f"{setting.key}@{rate:.6g}#{tries[rate]}.json"
            cell = self._cell(setting, rate, path, record=False)
            return cell is not None and cell.slo_passed

        found = find_capacity(
            setting.label, passes, start=cap.start, maximum=cap.max, resolution=cap.resolution, confirm=cap.confirm
        )
        self.result.capacities.append(found)
        self.progress(f"capacity of {setting.label}: {found.verdict}")

    def _cell(self, setting: Setting, load: float, path: Path, *, record: bool) -> CellFigures | None:
        label = f"{setting.label} @ {load:g}"
        result = _finished(path)
        if result is None:
            begun = time.monotonic()
            try:
                result = self._run(setting, load, path)
            except (RunAborted, ScenarioError, OSError) as exc:
                self.result.failures.append({"setting": setting.label, "load": load, "error": str(exc)})
                self.progress(f"{self._counter(record)} {label}: could not run: {exc}")
                return None
            self._cell_seconds.append(time.monotonic() - begun)
            if result.get("status") == "interrupted":
                raise SweepInterrupted
            reused = ""
        else:
            reused = " (done before: kept)"
        cell = figures(result, setting.label, load, self.scenario)
        if record:
            self._done += 1
            self.result.cells.append(cell)
        verdict = "SLO ✓" if cell.slo_passed else "SLO ✗"
        latency = f"p99 {cell.ttft_p99_ms:,.1f} ms" if cell.ttft_p99_ms is not None else "no latency"
        self.progress(
            f"{self._counter(record)} {label}: {cell.throughput:,.1f}/s, {latency}, "
            f"completion {cell.completion_rate:.1%}, {verdict}{reused}{self._eta()}"
        )
        return cell

    def _counter(self, record: bool) -> str:
        return f"[{self._done}/{self._planned}]" if record else "[capacity]"

    def _eta(self) -> str:
        if not self._cell_seconds or self._done >= self._planned:
            return ""
        left = (self._planned - self._done) * (sum(self._cell_seconds) / len(self._cell_seconds))
        return f"  (~{left:,.0f} s left)"

    def _run(self, setting: Setting, load: float, path: Path) -> dict[str, Any]:
        with self._server(setting) as url:
            if self.sweep.settle_s:
                time.sleep(self.sweep.settle_s)
            scenario = at_load(self.scenario, load, url)
            result, _ = run_scenario(scenario, out=None)
        result["sweep"] = {"setting": setting.as_dict(), "load": load}
        write_result(path, result)
        return result

    @contextlib.contextmanager
    def _server(self, setting: Setting) -> Iterator[str]:
        server = self.sweep.server
        if server.command is None:
            settings = server_settings({**self.scenario.reference, **server.settings}, setting)
            with reference_server(settings) as url:
                yield url
            return
        with command_server(server.command, server.ready_url, setting, server.start_timeout) as url:
            yield url


@contextlib.contextmanager
def command_server(command: str, ready_url: str | None, setting: Setting, timeout_s: float) -> Iterator[str]:
    """Start ``command`` with ``{port}`` and the setting filled in; yield its base URL once ready; stop it.

    Raises:
        RunAborted: it exited or did not answer ``ready_url`` with 2xx within ``timeout_s``.
    """
    port = _free_port()
    values = {**{k.replace(".", "_"): v for k, v in setting.values}, **setting.as_dict(), "port": port}
    argv = shlex.split(command.format(**values))
    url = f"http://127.0.0.1:{port}"
    probe = (ready_url or url + "/").format(port=port)
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _await_ready(proc, probe, timeout_s, argv)
        yield url
    finally:
        stop_process(proc)


def _await_ready(proc: subprocess.Popen[bytes], url: str, timeout_s: float, argv: list[str]) -> None:
    deadline = time.monotonic() + timeout_s
    with httpx.Client(timeout=2.0, trust_env=False) as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RunAborted(f"the server command exited with status {proc.returncode}: {shlex.join(argv)}")
            with contextlib.suppress(httpx.HTTPError):
                if client.get(url).is_success:
                    return
            time.sleep(0.1)
    raise RunAborted(f"the server did not answer {url} within {timeout_s:g} s: {shlex.join(argv)}")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _finished(path: Path) -> dict[str, Any] | None:
    """The result at ``path`` if a completed run left it there (an interrupted one is run again)."""
    try:
        result: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return result if result.get("status") in ("complete", "aborted") else None


def write_summary(path: Path, summary: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)
