"""Running a scenario file end to end: target up, swarm, live view, result file, summary.

The reference server (``target: reference``) runs as a subprocess so it has its own interpreter and
core; the load generator never shares a GIL with the server it measures. Ctrl-C or SIGTERM stop the
swarm at once and the partial result is still written (status ``interrupted``, exit code 3). A failing
``abort_on_fail`` threshold stops it the same way (status ``aborted``, exit code 1).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from infer_bench.clients.requests import Target
from infer_bench.errors import RunAborted, ScenarioError, TargetUnreachable
from infer_bench.intervals import IntervalLog
from infer_bench.measures import Measures
from infer_bench.metrics.recorder import Recorder
from infer_bench.plan import expected_arrivals
from infer_bench.result import build_result, check_writable, write_result
from infer_bench.scenario import ConstantArrivalRate, RampingArrivalRate, Scenario
from infer_bench.scenario.thresholds import Threshold
from infer_bench.shard import Shard
from infer_bench.swarm import Swarm
from infer_bench.thresholds import evaluate, first_abort

CPU_WARNING = 0.70
LAG_WARNING_MS = 10.0  # a send this late against its schedule means the client cannot keep up
LOOP_LAG_WARNING_MS = 50.0  # an event loop this late on a timer delays every stamp taken meanwhile
TICK_S = 0.1
UNREACHABLE_S = 3  # seconds in a row with connection failures and no success end the run
SERVER_START_TIMEOUT_S = 30.0
MAX_START_WAIT_S = 60.0  # a shard told to start later than this was given a wrong --start-at


@dataclass(frozen=True)
class ShardPart:
    """How one process of a ``--processes`` run runs its shard (see ``infer_bench.processes``)."""

    shard: Shard
    start_at_ns: int
    """Wall-clock time (``time.time_ns``) at which every shard starts: one start for all, not a handshake."""
    target_url: str
    """The target as the parent resolved it: its reference server's URL for ``target: reference``."""
    progress_path: Path | None = None
    """Where to write this shard's progress once a second (JSON, replaced atomically) for the parent."""
    on_progress: Callable[[dict[str, Any]], str | None] | None = None
    """Given this shard's counts once a second (``--ray``: sent to the parent); a reason it returns stops the run."""
    handle_signals: bool = True
    """Stop on SIGINT and SIGTERM; off where the process belongs to someone else (a Ray worker)."""


@dataclass
class RunState:
    """What the live view and the result need beyond the recorder."""

    started_wall: str = ""
    start_ns: int = 0
    start_epoch_ns: int = 0
    cpu_by_second: list[float] = field(default_factory=list)
    loop_lag_ms_by_second: list[float] = field(default_factory=list)
    """The latest the 100 ms tick woke in each second: how long the event loop was busy with other work."""
    stop_reason: str | None = None
    thresholds: tuple[Threshold, ...] = ()
    """Thresholds checked at the end; those with ``abort_on_fail`` also every second."""
    aborted_by: Threshold | None = None
    intervals: IntervalLog = field(default_factory=IntervalLog)
    progress_path: Path | None = None
    on_progress: Callable[[dict[str, Any]], str | None] | None = None


Live = Callable[[Swarm, Recorder, RunState], None]


@contextlib.contextmanager
def reference_server(settings: dict[str, Any]) -> Iterator[str]:
    """Start ``infer-bench serve`` with ``settings`` on a free loopback port; yield its URL; stop it."""
    with tempfile.TemporaryDirectory(prefix="infer-bench-") as tmp:
        config = Path(tmp) / "server.yaml"
        config.write_text(yaml.safe_dump({**settings, "host": "127.0.0.1", "port": 0}))
        cmd = [sys.executable, "-m", "infer_bench.cli", "serve", "--config", str(config)]
        log = Path(tmp) / "server.log"  # a file, not a pipe: a chatty server can never block on it
        with log.open("w") as err:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True)
        try:
            yield _await_announcement(proc, log)
        finally:
            stop_process(proc)


def _await_announcement(proc: subprocess.Popen[str], log: Path) -> str:
    assert proc.stdout is not None
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while time.monotonic() < deadline:
            if not sel.select(timeout=0.2):
                if proc.poll() is not None:
                    break
                continue
            line = proc.stdout.readline()
            if not line:
                break
            if " on http://" in line:
                return line.rsplit(" on ", 1)[1].strip()
    err = log.read_text(errors="replace").strip()[-500:]
    raise RunAborted(f"the reference server did not start: {err or 'no announcement within the time limit'}")


def stop_process(proc: subprocess.Popen[Any]) -> None:
    """End a child we started, by its PID: SIGTERM, then SIGKILL after 15 s."""
    if proc.stdout is not None:
        proc.stdout.close()
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


def check_reachable(target: Target) -> None:
    try:
        with socket.create_connection((target.host, target.port), timeout=5):
            pass
    except OSError as exc:
        raise TargetUnreachable(f"cannot connect to {target.host_header}: {exc.strerror or exc}") from None


def check_reference_settings(scenario: Scenario) -> None:
    """With ``target: reference``, the ``reference:`` settings must be valid server settings.

    Raises:
        ScenarioError: naming the scenario file and the setting.
    """
    if scenario.target != "reference":
        return
    from reference_server.errors import ConfigError as ServerConfigError
    from reference_server.settings import validate_settings

    try:
        validate_settings({**scenario.reference, "host": "127.0.0.1", "port": 0}, f"{scenario.source}: reference")
    except ServerConfigError as exc:
        raise ScenarioError(str(exc)) from None


def run_scenario(
    scenario: Scenario,
    *,
    out: Path | None,
    live: Live | None = None,
    seed: int = 0,
    verify_tls: bool = True,
    check_thresholds: bool = True,
    part: ShardPart | None = None,
) -> tuple[dict[str, Any], int]:
    """Run ``scenario`` (or, with ``part``, one shard of it); return the result and the exit code.

    The code is 0, 1 when a threshold failed (or aborted the run), or 3 when the run was interrupted.
    With ``check_thresholds`` false, thresholds are neither checked nor able to abort the run.
    """
    check_reference_settings(scenario)
    if out is not None:
        check_writable(out)
    with contextlib.ExitStack() as stack:
        url = scenario.target if part is None else part.target_url
        if url == "reference":
            url = stack.enter_context(reference_server(scenario.reference))
        target = Target.from_url(url, verify_tls=verify_tls)
        check_reachable(target)
        result = _run_loop(scenario, target, url, live, seed, check_thresholds, part)
    if out is not None:
        write_result(out, result)
    return result, exit_code(result)


def exit_code(result: dict[str, Any]) -> int:
    """3 for an interrupted run, 1 for a failed threshold (an aborted run included), else 0."""
    if result["status"] == "interrupted":
        return 3
    if any(not t["ok"] for t in result.get("thresholds") or ()):
        return 1
    return 0


def _run_loop(
    scenario: Scenario,
    target: Target,
    url: str,
    live: Live | None,
    seed: int,
    check_thresholds: bool,
    part: ShardPart | None = None,
) -> dict[str, Any]:
    loop_factory = _loop_factory()
    # Objects made before the run never die during it: freeze them out of the collector's scans, and
    # collect the young generation less often (profiled: 16 ms full collections at 4,000 streams/s).
    gc.collect()
    gc.freeze()
    thresholds = gc.get_threshold()
    gc.set_threshold(10_000, 10, 10)
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            return runner.run(_run(scenario, target, url, live, seed, check_thresholds, part))
    finally:
        gc.set_threshold(*thresholds)
        gc.unfreeze()


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on every supported platform
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


async def _run(
    scenario: Scenario,
    target: Target,
    url: str,
    live: Live | None,
    seed: int,
    check_thresholds: bool,
    part: ShardPart | None,
) -> dict[str, Any]:
    state = RunState(
        thresholds=scenario.thresholds if check_thresholds else (),
        progress_path=part.progress_path if part is not None else None,
        on_progress=part.on_progress if part is not None else None,
    )
    recorder = Recorder(0)
    swarm = Swarm(target, recorder, shard=part.shard if part is not None else Shard())
    loop = asyncio.get_running_loop()

    def interrupt(reason: str) -> None:
        if state.stop_reason is None:
            state.stop_reason = reason
        swarm.stop()

    signals = (signal.SIGINT, signal.SIGTERM) if part is None or part.handle_signals else ()
    for sig in signals:
        name = "interrupted (Ctrl-C)" if sig == signal.SIGINT else "interrupted (SIGTERM)"
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, interrupt, name)
    if part is not None:  # every shard waits for the one start time; a stop request ends the wait
        wait_ns = min(part.start_at_ns - time.time_ns(), int(MAX_START_WAIT_S * 1e9))
        await swarm.sleep_until(time.perf_counter_ns() + wait_ns)
    state.started_wall = datetime.now(UTC).isoformat(timespec="milliseconds")
    state.start_epoch_ns, state.start_ns = time.time_ns(), time.perf_counter_ns()
    recorder.start_ns = state.start_ns
    ticker = asyncio.ensure_future(_tick(swarm, recorder, state, live))
    try:
        await swarm.run(scenario.scenarios, seed)
    except asyncio.CancelledError:
        interrupt("interrupted")
    finally:
        ticker.cancel()
        for sig in signals:
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(sig)
    duration_s = (time.perf_counter_ns() - state.start_ns) / 1e9
    if swarm.failure is not None:
        state.stop_reason = f"internal error: {swarm.failure!r} (a bug in infer-bench; please report it)"
        traceback.print_exception(swarm.failure, file=sys.stderr)
    if live is not None:
        live(swarm, recorder, state)
    recorder.flush()
    state.intervals.take(duration_s, recorder)
    status = "aborted" if state.aborted_by else "interrupted" if state.stop_reason else "complete"
    result = build_result(
        recorder,
        scenario=describe_scenario(scenario, url),
        started_at=state.started_wall,
        duration_s=duration_s,
        status=status,
        stop_reason=state.stop_reason,
        rates=_open_rates(scenario, swarm),
    )
    result["start_epoch_ns"] = state.start_epoch_ns
    if part is not None:
        result["shard"] = {"index": part.shard.index, "count": part.shard.count}
    result["intervals"] = state.intervals.to_json()
    if state.thresholds:
        measures = Measures.from_recorder(recorder, duration_s)
        result["thresholds"] = [r.to_json() for r in evaluate(state.thresholds, measures, state.aborted_by)]
    result["headline"]["interrupted"] = sum(p.interrupted for p in swarm.progress.values())
    result["warnings"] = _cpu_warnings(state) + _lag_warnings(recorder) + _loop_lag_warnings(state)
    result["client"] = {
        "cpu_by_second": [round(c, 3) for c in state.cpu_by_second],
        "loop_lag_ms_by_second": [round(lag, 3) for lag in state.loop_lag_ms_by_second],
        "pid": os.getpid(),
    }
    _check_calibrated_range(result)
    return result


def _check_calibrated_range(result: dict[str, Any]) -> None:
    """Note how this process's rate stood against this machine's calibration, and warn beyond it."""
    from infer_bench.calibration import load_calibrations, range_note, range_warnings, run_protocols

    note = range_note(result["series"], run_protocols(result), load_calibrations())
    if note is not None:
        result["calibration"] = note
        result["warnings"] += range_warnings(note)


async def _tick(swarm: Swarm, recorder: Recorder, state: RunState, live: Live | None) -> None:
    """Once a second: fold buffers into histograms, sample client CPU, refresh the live view."""
    last_wall, last_cpu = time.perf_counter(), time.process_time()
    last_live = 0.0
    loop_lag_s = 0.0
    while True:
        # Fold buffers often: at 4,000 streams/s a once-a-second fold of ~250k gaps stalled the loop
        # for 20-40 ms (profiled), which every arrival in that window paid as latency.
        slept_at = time.perf_counter()
        await asyncio.sleep(TICK_S)
        # How late this tick woke is the event loop's lag: measured on the timer the run has anyway.
        loop_lag_s = max(loop_lag_s, time.perf_counter() - slept_at - TICK_S)
        recorder.flush()
        now_wall, now_cpu = time.perf_counter(), time.process_time()
        if now_wall - last_wall >= 1.0:
            state.cpu_by_second.append((now_cpu - last_cpu) / (now_wall - last_wall))
            state.loop_lag_ms_by_second.append(loop_lag_s * 1000)
            loop_lag_s = 0.0
            last_wall, last_cpu = now_wall, now_cpu
            elapsed_s = (time.perf_counter_ns() - state.start_ns) / 1e9
            state.intervals.take(elapsed_s, recorder)
            _check_aborts(swarm, recorder, state, elapsed_s)
            if state.stop_reason is None and _target_gone(recorder):
                state.stop_reason = f"the target stopped accepting connections ({UNREACHABLE_S} s without one)"
                swarm.stop()
            if state.progress_path is not None or state.on_progress is not None:
                _report_progress(state, swarm, recorder, elapsed_s)
        # Once a second, as the figures it shows change: a refresh costs the loop ~4 ms of rich rendering.
        if live is not None and now_wall - last_live >= 1.0:
            last_live = now_wall
            live(swarm, recorder, state)


def _report_progress(state: RunState, swarm: Swarm, recorder: Recorder, elapsed_s: float) -> None:
    """This shard's counts so far, for the parent's progress line: to a file, replaced atomically (never
    half-written), or to a callback, whose answer may stop the run (another shard failed or aborted)."""
    series = recorder.series
    progress = {
        "elapsed_s": round(elapsed_s, 3),
        "started": sum(s.started for s in series),
        "succeeded": sum(s.succeeded for s in series),
        "failed": sum(s.failed for s in series),
        "dropped": sum(s.dropped for s in series),
        "in_flight": sum(p.in_flight for p in swarm.progress.values()),
        "vus": sum(p.vus for p in swarm.progress.values()),
    }
    if state.on_progress is not None and (reason := state.on_progress(progress)) and state.stop_reason is None:
        state.stop_reason = reason
        swarm.stop()
    if (path := state.progress_path) is None:
        return
    tmp = path.with_name(f".{path.name}.tmp")
    with contextlib.suppress(OSError):  # progress is a courtesy: never let it stop the run
        tmp.write_text(json.dumps(progress), encoding="utf-8")
        tmp.replace(path)


def _check_aborts(swarm: Swarm, recorder: Recorder, state: RunState, elapsed_s: float) -> None:
    """Stop the run when an ``abort_on_fail`` threshold fails on the figures so far (k6's behaviour)."""
    watched = [t for t in state.thresholds if t.abort_on_fail]
    if not watched or state.stop_reason is not None:
        return
    failed = first_abort(watched, Measures.from_recorder(recorder, elapsed_s), elapsed_s)
    if failed is not None:
        from infer_bench.thresholds import format_value

        state.aborted_by = failed.threshold
        state.stop_reason = (
            f"threshold {failed.threshold.label} failed at {format_value(failed.value, failed.threshold.unit)} "
            "(abort_on_fail)"
        )
        swarm.stop()


def _target_gone(recorder: Recorder) -> bool:
    """Every one of the last complete seconds failed to connect and nothing succeeded: a dead target."""
    recent = recorder.series[:-1][-UNREACHABLE_S:]
    return len(recent) == UNREACHABLE_S and all(s.connect_errors and not s.succeeded for s in recent)


def _lag_warnings(recorder: Recorder) -> list[str]:
    late = [s for s in recorder.series if s.lag_max_us > LAG_WARNING_MS * 1000]
    if not late:
        return []
    worst = max(s.lag_max_us for s in late) / 1000
    return [
        f"the client's schedule ran more than {LAG_WARNING_MS:g} ms late in {len(late)} s of the run "
        f"(worst {worst:,.1f} ms): open-loop latencies include that wait (they count from the schedule)"
    ]


def _loop_lag_warnings(state: RunState) -> list[str]:
    stalled = [lag for lag in state.loop_lag_ms_by_second if lag > LOOP_LAG_WARNING_MS]
    if not stalled:
        return []
    return [
        f"the client's event loop woke more than {LOOP_LAG_WARNING_MS:g} ms late in {len(stalled)} s of the run "
        f"(worst {max(stalled):,.0f} ms): every stamp taken meanwhile waited as long (a busy client or machine)"
    ]


def _cpu_warnings(state: RunState) -> list[str]:
    busy = [c for c in state.cpu_by_second if c > CPU_WARNING]
    if not busy:
        return []
    return [
        f"the client process was above {CPU_WARNING:.0%} CPU for {len(busy)} of {len(state.cpu_by_second)} s "
        f"(peak {max(busy):.0%}): latencies measured then include the client's own queueing; "
        "lower the load per process"
    ]


def _open_rates(scenario: Scenario, swarm: Swarm) -> dict[str, float]:
    requested = achieved = 0.0
    duration = 0.0
    for spec in scenario.scenarios.values():
        ex = spec.executor
        if isinstance(ex, ConstantArrivalRate | RampingArrivalRate):
            requested += expected_arrivals(ex) / swarm.shard.count  # the shards' rates add up to the whole
            achieved += swarm.progress[spec.name].dispatched
            duration = max(duration, ex.total_duration())
    if duration == 0:
        return {}
    return {"requested_rate": round(requested / duration, 3), "achieved_rate": round(achieved / duration, 3)}


def describe_scenario(scenario: Scenario, url: str) -> dict[str, Any]:
    """The ``scenario`` section of the result: what ran, where, and what it was to be judged by."""
    thresholds: dict[str, list[Any]] = {}
    for t in scenario.thresholds:
        entry: Any = t.expression
        if t.abort_on_fail:
            entry = {"threshold": t.expression, "abort_on_fail": True, "delay_abort_eval": t.delay_abort_eval_s}
        thresholds.setdefault(t.key, []).append(entry)
    described: dict[str, Any] = {
        "source": scenario.source,
        "target": url,
        "target_kind": "reference" if scenario.target == "reference" else "url",
        "reference": scenario.reference,
        "scenarios": _describe(scenario),
        "thresholds": thresholds,
    }
    if scenario.gates:
        described["gates"] = {
            "max_regression": {rule.figure: rule.budget_text for rule in scenario.gates},
            "confidence": scenario.gate_confidence,
        }
    return described


def _describe(scenario: Scenario) -> dict[str, Any]:
    """The scenario as run, for the result file, with secrets (API keys) redacted."""
    described = {}
    for name, spec in scenario.scenarios.items():
        dumped = spec.model_dump(mode="json")
        for cls in dumped.get("classes", []):
            request = cls.get("request") or {}
            if request.get("api_key"):
                request["api_key"] = "<redacted>"
            for header in list(request.get("headers") or {}):
                if header.lower() in ("authorization", "x-api-key", "api-key"):
                    request["headers"][header] = "<redacted>"
        described[name] = dumped
    return described
