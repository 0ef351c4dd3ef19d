"""``infer-bench run --ray ADDRESS|auto|local``: the shards of a run as Ray actors, one per CPU, merged into one result.

The same shards as ``--processes`` (``infer_bench.shard``), placed by Ray instead of started here: each
actor asks for one CPU, so a cluster of 3 nodes of 8 cores takes 24 actors, spread over the nodes. The
parent resolves the target, creates the actors and waits until every one is up (importing infer-bench
takes a moment on a fresh worker), then gives them one start time a second ahead on the wall clock
(nodes' clocks must agree: NTP). Each actor runs the ordinary runner on its shard and returns its result
through Ray; the parent merges them (``infer_bench.merge``), as ``--processes`` does.

While they run, each actor sends its counts once a second to a small ``Board`` actor; the parent prints
one line a second from it. The board is also how a run stops as a whole: Ctrl-C in the parent, a shard
aborted by ``abort_on_fail``, a dead actor or the time limit put a reason on the board, and every shard
reads it with its next report (within about two seconds), stops, and returns its partial result. An actor
that dies (its node lost, its process killed) fails the run with a message naming its shard and node;
the others' results are kept (status ``interrupted``, exit 3). An actor that overruns the limit by
``KILL_AFTER_S`` after being asked to stop is killed.

Ray is an optional extra (``pip install 'infer-bench[ray]'``); this module is imported only for ``--ray``.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from infer_bench.clients.requests import Target
from infer_bench.errors import RunAborted, UsageError
from infer_bench.merge import explain_stop, merge_results
from infer_bench.processes import check_shardable, progress_line, signals_caught, time_limit_s
from infer_bench.result import check_writable, write_result
from infer_bench.runner import (
    ShardPart,
    check_reachable,
    check_reference_settings,
    exit_code,
    reference_server,
    run_scenario,
)
from infer_bench.scenario import Scenario
from infer_bench.shard import Shard

START_DELAY_S = 1.0  # after every actor is up: the start time has to reach them all first
READY_TIMEOUT_S = 120.0  # a fresh worker imports Python, uvloop and infer-bench; a busy cluster queues actors
KILL_AFTER_S = 15.0
POLL_S = 0.2
INSTALL_HINT = "pip install 'infer-bench[ray]'"

Progress = Callable[[str], None]


def _ray() -> Any:
    """The ``ray`` module, or a usage error saying how to get it."""
    try:
        import ray
    except ImportError:
        raise UsageError(f"--ray needs Ray, an optional extra: {INSTALL_HINT}") from None
    return ray


class Board:
    """A Ray actor of no CPU: the shards' latest counts, and the reason the run must stop, if any."""

    def __init__(self) -> None:
        self.counts: dict[int, dict[str, float]] = {}
        self.stop_reason: str | None = None

    def report(self, index: int, counts: dict[str, float]) -> str | None:
        self.counts[index] = counts
        return self.stop_reason

    def stop(self, reason: str) -> None:
        if self.stop_reason is None:
            self.stop_reason = reason

    def snapshot(self) -> list[dict[str, float]]:
        return list(self.counts.values())


class _Reporter:
    """The runner's once-a-second progress callback inside an actor: never waits on the board.

    Each call sends the counts and reads the answer to the previous call if it has come (it has: a second
    went by), so a stop reason reaches the shard one or two seconds after it was set.
    """

    def __init__(self, ray: Any, board: Any, index: int) -> None:
        self._ray, self._board, self._index = ray, board, index
        self._pending: Any = None

    def __call__(self, counts: dict[str, Any]) -> str | None:
        reason: str | None = None
        if self._pending is not None:
            ready, _ = self._ray.wait([self._pending], timeout=0)
            if ready:
                reason = self._ray.get(ready[0])
        self._pending = self._board.report.remote(self._index, counts)
        return reason


class ShardRunner:
    """A Ray actor (one CPU) that runs one shard of a run with the ordinary runner."""

    def where(self) -> tuple[str, int]:
        """The node's host name and this worker's PID: for messages naming a shard, and to know it is up."""
        return socket.gethostname(), os.getpid()

    def run(
        self, scenario: Scenario, shard: Shard, start_at_ns: int, url: str, seed: int, check_thresholds: bool,
        board: Any,
    ) -> dict[str, Any]:  # fmt: skip
        import ray

        part = ShardPart(shard, start_at_ns, url, on_progress=_Reporter(ray, board, shard.index), handle_signals=False)
        result, _ = run_scenario(scenario, out=None, seed=seed, check_thresholds=check_thresholds, part=part)
        return result


@dataclass
class _Actor:
    shard: Shard
    handle: Any
    host: str = "?"
    pid: int = 0
    result: dict[str, Any] | None = None
    failure: str | None = None

    @property
    def label(self) -> str:
        return f"shard {self.shard} (actor pid {self.pid} on {self.host})"


@dataclass
class _Outcome:
    interrupted_by: str | None = None
    aborted_by: _Actor | None = None
    timed_out: list[_Actor] = field(default_factory=list)


def connect(address: str) -> tuple[Any, bool]:
    """Join the Ray cluster at ``address`` (``auto``: the one ``ray start`` made on this machine; ``local``: a new
    one on this machine's cores), or the one this process already joined; the ``ray`` module, and whether
    this call joined (so the run leaves it again).

    Raises:
        UsageError: Ray is not installed, or no cluster answers at ``address``.
    """
    ray = _ray()
    if ray.is_initialized():
        return ray, False
    try:
        if address == "local":
            ray.init(include_dashboard=False, log_to_driver=False)
        else:
            ray.init(address=address, log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise UsageError(f"--ray {address}: cannot join a Ray cluster there ({exc})") from None
    return ray, True


def cluster_cpus(ray: Any) -> int:
    return int(ray.cluster_resources().get("CPU", 0))


def run_ray(
    scenario: Scenario,
    address: str,
    count: int | None,
    *,
    out: Path,
    seed: int = 0,
    verify_tls: bool = True,
    check_thresholds: bool = True,
    progress: Progress | None = None,
) -> tuple[dict[str, Any], int]:
    """Run ``scenario`` as ``count`` shards (default: one per CPU of the cluster) on Ray actors; write and return
    the merged result and the exit code.

    Raises:
        UsageError: Ray is missing, the cluster is unreachable or too small, or the scenario cannot be split.
        RunAborted: no actor produced a result.
    """
    check_reference_settings(scenario)
    check_writable(out)
    ray, joined = connect(address)
    try:
        return _run_on(ray, scenario, count, out, seed, verify_tls, check_thresholds, progress)
    finally:
        if joined:
            ray.shutdown()


def _run_on(
    ray: Any, scenario: Scenario, count: int | None, out: Path, seed: int, verify_tls: bool, check_thresholds: bool,
    progress: Progress | None,
) -> tuple[dict[str, Any], int]:  # fmt: skip
    cpus = cluster_cpus(ray)
    count = count or max(cpus, 1)
    if count > cpus:
        raise UsageError(f"--ray: {count} shards need {count} CPUs; the cluster has {cpus}")
    check_shardable(scenario, count)
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if scenario.target == "reference" and len(nodes) > 1:
        raise UsageError(
            f"--ray: target: reference runs on 127.0.0.1 here, out of reach of the other {len(nodes) - 1} node(s); "
            "start a server they can reach and give its URL as the target"
        )
    with contextlib.ExitStack() as stack:
        url = scenario.target
        if url == "reference":
            url = stack.enter_context(reference_server(scenario.reference))
        check_reachable(Target.from_url(url, verify_tls=verify_tls))
        board = ray.remote(num_cpus=0)(Board).remote()
        actor_class = ray.remote(num_cpus=1, max_restarts=0)(ShardRunner)
        actors = [_Actor(Shard(i, count), actor_class.options(scheduling_strategy="SPREAD").remote())
                  for i in range(count)]  # fmt: skip
        stack.callback(_kill_all, ray, [board, *(a.handle for a in actors)])
        with signals_caught() as caught:
            _await_ready(ray, actors)
            start_at_ns = time.time_ns() + int(START_DELAY_S * 1e9)
            if progress is not None:
                where = "; ".join(f"{a.shard} pid {a.pid} on {a.host}" for a in actors)
                progress(f"{count} shards on Ray actors ({where}) starting together in {START_DELAY_S:g} s")
            refs = {
                a.handle.run.remote(scenario, a.shard, start_at_ns, url, seed, check_thresholds, board): a
                for a in actors
            }
            limit = time.monotonic() + START_DELAY_S + time_limit_s(scenario)
            outcome = _supervise(ray, refs, board, limit, caught, progress)
    parts = [a.result for a in actors if a.result is not None]
    dead = [f"{a.label} died ({a.failure})" for a in actors if a.result is None]
    if not parts:
        raise RunAborted(f"no shard produced a result: {'; '.join(dead)}")
    merged = merge_results(parts, thresholds=scenario.thresholds if check_thresholds else ())
    _explain(merged, outcome, dead, count)
    write_result(out, merged)
    return merged, exit_code(merged)


def _await_ready(ray: Any, actors: list[_Actor]) -> None:
    """Every actor up (or a usage error naming what is missing): the start time is set after, not before."""
    refs = [a.handle.where.remote() for a in actors]
    _, pending = ray.wait(refs, num_returns=len(refs), timeout=READY_TIMEOUT_S)
    if pending:
        raise RunAborted(
            f"--ray: {len(pending)} of {len(refs)} actors did not start within {READY_TIMEOUT_S:g} s "
            "(is infer-bench installed on every node, and are the CPUs free?)"
        )
    for actor, (host, pid) in zip(actors, ray.get(refs), strict=True):
        actor.host, actor.pid = host, pid


def _supervise(
    ray: Any, refs: dict[Any, _Actor], board: Any, limit: float, caught: list[str], progress: Progress | None
) -> _Outcome:
    """Collect every actor's result, bounded by ``limit`` and ``KILL_AFTER_S`` more; stop them all (through the
    board) on a signal, a death, an abort or the limit."""
    outcome = _Outcome()
    pending = dict(refs)
    stop_sent_at: float | None = None
    last_line = time.monotonic()

    def stop(reason: str) -> None:
        nonlocal stop_sent_at
        if stop_sent_at is None:
            board.stop.remote(reason)
            stop_sent_at = time.monotonic()

    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=POLL_S)
        for ref in ready:
            actor = pending.pop(ref)
            try:
                actor.result = ray.get(ref)
            except ray.exceptions.RayActorError as exc:
                actor.failure = _death(exc)
                stop(f"stopped: {actor.label} died")
            except ray.exceptions.RayTaskError as exc:  # our own bug inside the actor: loud, and the run fails
                actor.failure = f"failed: {exc}".strip()[-600:]
                stop(f"stopped: {actor.label} failed")
            else:
                if outcome.aborted_by is None and actor.result.get("status") == "aborted":
                    outcome.aborted_by = actor
                    stop(f"stopped: {actor.result.get('stop_reason')} (shard {actor.shard})")
        now = time.monotonic()
        if caught and outcome.interrupted_by is None:
            outcome.interrupted_by = caught[0]
            stop(caught[0])
        if now > limit and not outcome.timed_out and pending:
            outcome.timed_out = list(pending.values())
            stop("stopped: the run overran its time limit")
        if stop_sent_at is not None and now - stop_sent_at > KILL_AFTER_S:
            for ref, actor in list(pending.items()):
                ray.kill(actor.handle)
                actor.failure = f"killed: no result {KILL_AFTER_S:g} s after it was asked to stop"
                del pending[ref]
        if progress is not None and now - last_line >= 1.0:
            last_line = now
            with contextlib.suppress(Exception):  # a progress line is a courtesy: never let it fail the run
                line = progress_line(ray.get(board.snapshot.remote(), timeout=1.0), len(pending), len(refs))
                if line is not None:
                    progress(line)
    return outcome


def _death(exc: BaseException) -> str:
    """What Ray says of a dead actor, in a line: why it died, without the stack."""
    text = " ".join(str(exc).split())
    for marker in ("The actor died because", "The actor is dead because", "The actor died unexpectedly"):
        if marker in text:
            text = text[text.index(marker) :]
            break
    return text.split(" Some common causes")[0][:300] or type(exc).__name__


def _kill_all(ray: Any, handles: list[Any]) -> None:
    for handle in handles:
        with contextlib.suppress(Exception):  # already dead, or the cluster is gone: nothing left to stop
            ray.kill(handle)


def _explain(merged: dict[str, Any], outcome: _Outcome, dead: list[str], count: int) -> None:
    aborted_by = outcome.aborted_by
    abort_reason = None
    if aborted_by is not None:
        abort_reason = f"{aborted_by.result and aborted_by.result.get('stop_reason')} (shard {aborted_by.shard})"
    explain_stop(
        merged, dead=dead, count=count, timed_out=[a.label for a in outcome.timed_out],
        interrupted_by=outcome.interrupted_by, aborted=outcome.aborted_by is not None,
        abort_reason=abort_reason,
    )  # fmt: skip
