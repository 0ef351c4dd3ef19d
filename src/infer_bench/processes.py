"""``infer-bench run --processes N``: one run as N shards in N local processes, merged into one result.

The parent resolves the target (it starts the one reference server for ``target: reference``), picks a
start time a little in the future and starts N children of this same CLI, each with ``--shard i/N`` and
that start time: they start together without talking to each other (``infer_bench.shard`` says who
sends what). Each child writes its result and, once a second, a small progress file; the parent prints
one progress line a second from those, waits for every child (bounded: the scenario's longest duration
plus its graceful stop, the start delay and a margin, then SIGTERM, then SIGKILL by PID), and merges the
results (``infer_bench.merge``).

Stops: Ctrl-C or SIGTERM in the parent is forwarded as SIGTERM to every child, whose partial results are
still merged and written (exit 3). A child that dies fails the run with a message naming its shard, and
the others' results are kept. A shard stopped by an ``abort_on_fail`` threshold stops every other shard,
and the merged run is ``aborted``. Children run in their own sessions so a terminal's Ctrl-C reaches the
parent only, and the parent decides.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from infer_bench.clients.requests import Target
from infer_bench.errors import RunAborted, UsageError
from infer_bench.merge import explain_stop, merge_results
from infer_bench.result import check_writable, load_result, write_result
from infer_bench.runner import check_reachable, check_reference_settings, exit_code, reference_server
from infer_bench.scenario import ConstantArrivalRate, RampingArrivalRate, Scenario
from infer_bench.shard import Shard

START_DELAY_S = 1.5
START_DELAY_PER_CHILD_S = 0.25  # an interpreter and the scenario load in ~0.5 s; N of them share the cores
MARGIN_S = 30.0  # beyond the scenario's own bound: results to write, sockets to close
KILL_AFTER_S = 10.0  # after the SIGTERM that stops a child, before its SIGKILL
POLL_S = 0.1
EXIT_CODES_WITH_RESULT = (0, 1, 3)

Progress = Callable[[str], None]


def process_count(text: str) -> int:
    """``--processes``: a whole number ≥ 1, or ``auto`` (one per core but one, at least 1).

    Raises:
        UsageError: neither.
    """
    if text == "auto":
        return max(1, (os.cpu_count() or 1) - 1)
    try:
        count = int(text)
    except ValueError:
        count = 0
    if count < 1:
        raise UsageError(f"--processes {text}: expected a whole number >= 1 or auto")
    return count


def check_shardable(scenario: Scenario, count: int) -> None:
    """Every open-loop shard needs a VU for its arrivals, or it would drop all of them.

    Raises:
        UsageError: an arrival-rate scenario's ``max_vus`` is below ``count``.
    """
    for name, spec in scenario.scenarios.items():
        ex = spec.executor
        if isinstance(ex, ConstantArrivalRate | RampingArrivalRate) and ex.max_vus < count:
            raise UsageError(
                f"--processes {count}: scenario {name!r} has max_vus {ex.max_vus}; each process needs at least "
                f"one VU for its share of the arrivals (raise max_vus to {count} or use fewer processes)"
            )


def time_limit_s(scenario: Scenario) -> float:
    """How long the children may take, start delay excluded: the longest scenario, its graceful stop, a margin."""
    longest = max(s.start_time + s.executor.total_duration() + s.graceful_stop for s in scenario.scenarios.values())
    return longest + MARGIN_S


@dataclass(frozen=True)
class ChildArgs:
    """What every child is told besides its shard: the command line the user gave the parent."""

    scenario_path: str
    env_pairs: Sequence[str] = ()
    seed: int = 0
    insecure: bool = False
    no_thresholds: bool = False


@dataclass
class Child:
    shard: Shard
    proc: subprocess.Popen[bytes]
    result_path: Path
    progress_path: Path
    log_path: Path
    stop_sent_at: float | None = None

    @property
    def label(self) -> str:
        return f"shard {self.shard} (pid {self.proc.pid})"

    def stop(self) -> None:
        """SIGTERM: the child stops its swarm and still writes its partial result."""
        if self.proc.poll() is None and self.stop_sent_at is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            self.stop_sent_at = time.monotonic()

    def log_tail(self) -> str:
        try:
            text = self.log_path.read_text(errors="replace").strip()
        except OSError:
            return ""
        return text[-400:]


@dataclass
class Supervision:
    """How the wait for the children ended."""

    interrupted_by: str | None = None  # the parent's own Ctrl-C or SIGTERM
    aborted_by: Child | None = None  # a shard stopped by an abort_on_fail threshold
    timed_out: list[Child] = field(default_factory=list)


def run_processes(
    scenario: Scenario,
    args: ChildArgs,
    count: int,
    *,
    out: Path,
    verify_tls: bool = True,
    check_thresholds: bool = True,
    progress: Progress | None = None,
) -> tuple[dict[str, Any], int]:
    """Run ``scenario`` as ``count`` shards in child processes; write and return the merged result and exit code."""
    check_reference_settings(scenario)
    check_shardable(scenario, count)
    check_writable(out)
    with contextlib.ExitStack() as stack:
        url = scenario.target
        if url == "reference":
            url = stack.enter_context(reference_server(scenario.reference))
        check_reachable(Target.from_url(url, verify_tls=verify_tls))
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="infer-bench-shards-")))
        delay_s = START_DELAY_S + START_DELAY_PER_CHILD_S * count
        start_at_ns = time.time_ns() + int(delay_s * 1e9)
        with signals_caught() as caught:
            children = [_start_child(args, Shard(i, count), url, start_at_ns, tmp) for i in range(count)]
            if progress is not None:
                pids = ", ".join(str(c.proc.pid) for c in children)
                progress(f"{count} shards starting together in {delay_s:.1f} s (pids {pids})")
            limit = time.monotonic() + delay_s + time_limit_s(scenario)
            outcome = _supervise(children, limit, caught, progress)
        parts, dead = _collect(children)
    if not parts:
        raise RunAborted(f"no shard produced a result: {'; '.join(dead)}")
    merged = merge_results(parts, thresholds=scenario.thresholds if check_thresholds else ())
    _explain(merged, outcome, dead, count)
    write_result(out, merged)
    return merged, exit_code(merged)


def _start_child(args: ChildArgs, shard: Shard, url: str, start_at_ns: int, tmp: Path) -> Child:
    result_path = tmp / f"part-{shard.index}.json"
    progress_path = tmp / f"progress-{shard.index}.json"
    log_path = tmp / f"shard-{shard.index}.log"
    cmd = [
        sys.executable, "-m", "infer_bench.cli", "run", args.scenario_path, "-q", "-o", str(result_path),
        "--seed", str(args.seed), "--shard", str(shard), "--start-at", str(start_at_ns), "--target-url", url,
        "--progress-file", str(progress_path),
    ]  # fmt: skip
    for pair in args.env_pairs:
        cmd += ["-e", pair]
    if args.insecure:
        cmd.append("--insecure")
    if args.no_thresholds:
        cmd.append("--no-thresholds")
    with log_path.open("wb") as log:  # a file, not a pipe: a chatty child can never block on it
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log,
                                start_new_session=True)  # fmt: skip
    return Child(shard, proc, result_path, progress_path, log_path)


@contextlib.contextmanager
def signals_caught() -> Iterator[list[str]]:
    """Ctrl-C and SIGTERM recorded (a supervisor then stops its shards) instead of ending the parent mid-run."""
    caught: list[str] = []
    names = {signal.SIGINT: "interrupted (Ctrl-C)", signal.SIGTERM: "interrupted (SIGTERM)"}

    def note(signum: int, frame: FrameType | None) -> None:
        caught.append(names.get(signal.Signals(signum), "interrupted"))

    previous = {sig: signal.signal(sig, note) for sig in names}
    try:
        yield caught
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _supervise(children: list[Child], limit: float, caught: list[str], progress: Progress | None) -> Supervision:
    """Wait for every child, bounded by ``limit`` (monotonic) and ``KILL_AFTER_S`` more; stop them all on a
    signal, a death or an abort."""
    outcome = Supervision()
    last_line = time.monotonic()
    while any(c.proc.poll() is None for c in children):
        now = time.monotonic()
        if caught and outcome.interrupted_by is None:
            outcome.interrupted_by = caught[0]
            _stop_all(children)
        for child in children:
            code = child.proc.poll()
            if code is None:
                if child.stop_sent_at is not None and now - child.stop_sent_at > KILL_AFTER_S:
                    with contextlib.suppress(ProcessLookupError):
                        child.proc.kill()
                continue
            if code not in EXIT_CODES_WITH_RESULT:
                _stop_all(children)  # one shard dead: the run has failed, the others stop now
            elif outcome.aborted_by is None and code == 1 and _status_of(child) == "aborted":
                outcome.aborted_by = child
                _stop_all(children)  # an abort_on_fail threshold stops every shard
        if now > limit and not outcome.timed_out:
            outcome.timed_out = [c for c in children if c.proc.poll() is None and c.stop_sent_at is None]
            _stop_all(children)
        if progress is not None and now - last_line >= 1.0:
            last_line = now
            if (line := _progress_line(children)) is not None:
                progress(line)
        time.sleep(POLL_S)
    return outcome


def _stop_all(children: list[Child]) -> None:
    for child in children:
        child.stop()


def _status_of(child: Child) -> str | None:
    try:
        status = json.loads(child.result_path.read_text(encoding="utf-8")).get("status")
    except (OSError, ValueError):
        return None
    return str(status) if status is not None else None


def _progress_line(children: list[Child]) -> str | None:
    """One line for every shard: the children's counts added; None before any shard has started."""
    counts: list[dict[str, float]] = []
    for child in children:
        try:
            counts.append(json.loads(child.progress_path.read_text(encoding="utf-8")))
        except (OSError, ValueError):
            continue
    running = sum(child.proc.poll() is None for child in children)
    return progress_line(counts, running, len(children))


def progress_line(counts: Sequence[Mapping[str, float]], running: int, total: int) -> str | None:
    """The shards' counts added in one line (elapsed: the furthest shard's); None when none has reported."""
    totals: dict[str, float] = {}
    for data in counts:
        for name, value in data.items():
            totals[name] = max(totals.get(name, 0), value) if name == "elapsed_s" else totals.get(name, 0) + value
    if not totals:
        return None
    return (
        f"{running}/{total} shards running · {totals.get('elapsed_s', 0):.0f} s · "
        f"VUs {totals.get('vus', 0):,.0f} · in flight {totals.get('in_flight', 0):,.0f} · "
        f"started {totals.get('started', 0):,.0f} · ok {totals.get('succeeded', 0):,.0f} · "
        f"failed {totals.get('failed', 0):,.0f} · dropped {totals.get('dropped', 0):,.0f}"
    )


def _collect(children: list[Child]) -> tuple[list[dict[str, Any]], list[str]]:
    """The children's results, and what went wrong with those that left none."""
    parts: list[dict[str, Any]] = []
    dead: list[str] = []
    for child in children:
        code = child.proc.wait(timeout=5)
        if code in EXIT_CODES_WITH_RESULT and child.result_path.exists():
            parts.append(load_result(child.result_path))
            continue
        how = f"killed by signal {-code}" if code < 0 else f"exit code {code}"
        tail = child.log_tail()
        dead.append(f"{child.label} died ({how})" + (f": {tail}" if tail else ""))
    return parts, dead


def _explain(merged: dict[str, Any], outcome: Supervision, dead: list[str], count: int) -> None:
    abort_reason = None
    if outcome.aborted_by is not None:
        aborted = (p for p in merged["shards"]["parts"] if p["status"] == "aborted")
        abort_reason = next((f"{p['stop_reason']} (shard {p['shard']})" for p in aborted), None)
    explain_stop(
        merged, dead=dead, count=count, timed_out=[c.label for c in outcome.timed_out],
        interrupted_by=outcome.interrupted_by, aborted=outcome.aborted_by is not None,
        abort_reason=abort_reason,
    )  # fmt: skip
