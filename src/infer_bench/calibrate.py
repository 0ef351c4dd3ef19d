"""``infer-bench calibrate``: this machine's per-process client ceiling, and the tool's own overhead below it.

Two parts, each against the reference server started on loopback as a subprocess (its own interpreter,
so it never shares this process's GIL):

1. **Ceiling.** Zero-cost models (every step, prefill and batch costs 0 ms). Short open-loop runs (Poisson
   arrivals, the ordinary runner) at rising rates: doubling from a start rate until a run breaks a bound,
   then bisection between the last good and the first bad rate (``sweep.analysis.find_capacity``). A run
   is good when the client sent on schedule (schedule lag p99 within ``Bounds.lag_p99_ms``) with CPU to
   spare (mean client CPU within ``Bounds.cpu``) and the target kept up (no drops, no failures). When the
   target is the one that gave out first, the ceiling found is the target's, a lower bound on the
   client's, and the record says so (``limited_by: target``).
2. **Overhead.** A server whose every decode step takes a known ``PACED_STEP_MS`` (so every token gap
   is that step). At fractions of the ceiling (25 %, 50 %, 80 %) the client's TTFT and ITL are compared
   with the server's own stamps of the same requests (``/stats``: its mean TTFT and ITL over the run).
   The difference is what the client adds: loopback, parsing, its own scheduling.

The record is stored per machine (``infer_bench.calibration``) for runs to check their rate against.
Everything is bounded: a fixed number of runs of fixed length (``--quick`` about 30 s, the default
under 3 minutes).
"""

from __future__ import annotations

import json
import statistics
import time
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from infer_bench.errors import RunAborted, UsageError
from infer_bench.sweep.analysis import find_capacity

PROTOCOLS = ("http", "sse", "websocket", "openai")
ZERO_COST: dict[str, Any] = {
    "max_num_seqs": 4096,
    "max_queue": 100_000,
    "batch_size": 256,
    "models": [
        {"kind": "echo", "base_ms": 0, "per_item_ms": 0},
        {"kind": "tokens", "base_ms": 0, "per_seq_ms": 0, "prefill_ms": 0, "per_input_token_ms": 0},
    ],
}
PACED_STEP_MS = 2.0
"""The known per-token delay of the overhead part: small, so the client's share of a gap is visible."""
MAX_TOKENS = 16
"""Tokens per streamed request: a short chat answer; the ceiling is in requests/s of this size."""


def paced_settings(step_ms: float = PACED_STEP_MS) -> dict[str, Any]:
    """Server settings whose every generation step (and every /predict batch) takes ``step_ms``, nothing else."""
    return {
        **ZERO_COST,
        "models": [
            {"kind": "echo", "base_ms": step_ms, "per_item_ms": 0},
            {"kind": "tokens", "base_ms": step_ms, "per_seq_ms": 0, "prefill_ms": 0, "per_input_token_ms": 0},
        ],
    }


@dataclass(frozen=True)
class Bounds:
    """What a client rate must keep to count as accurately measured."""

    lag_p99_ms: float = 10.0
    """Schedule lag p99: requests sent later than this against their schedule carry the wait as latency. The
    runner warns at the same lag; a tighter bound measures the machine's other tenants more than the client
    (on a shared 2-core machine, p99 lags of 2-8 ms came at 15 % client CPU)."""
    cpu: float = 0.85
    """Mean client CPU over the run: past this the loop queues its own work (MEASUREMENTS.md: 80 % is unstable)."""
    loss: float = 0.001
    """Dropped or failed requests allowed, as a fraction of those sent: more means the target gave out."""


@dataclass(frozen=True)
class Mode:
    """How long and how finely to search: ``quick`` or the default."""

    name: str
    run_s: float
    warmup_s: float
    start_rate: float
    maximum: float
    resolution: float
    confirm: int
    max_runs: int
    overhead_run_s: float
    retries: int = 2
    """Runs failed by the machine's other work that are run again (in all, not per rate)."""
    fractions: tuple[float, ...] = (0.25, 0.5, 0.8)


QUICK = Mode("quick", run_s=2.0, warmup_s=0.5, start_rate=100, maximum=32_000, resolution=0.25, confirm=0,
             max_runs=8, overhead_run_s=1.5, retries=1)  # fmt: skip
DEFAULT = Mode("default", run_s=5.0, warmup_s=1.0, start_rate=100, maximum=64_000, resolution=0.08, confirm=1,
               max_runs=16, overhead_run_s=5.0, retries=3)  # fmt: skip


@dataclass(frozen=True)
class Probe:
    """What one short open-loop run at ``rate`` measured of the client."""

    rate: float
    sent: int
    dropped: int
    failed: int
    cpu: float
    lag_p99_ms: float
    latency_p50_ms: float | None = None
    latency_p99_ms: float | None = None


def judge(probe: Probe, bounds: Bounds) -> tuple[str, str] | None:
    """Why ``probe``'s rate is beyond the accurate range — (``client``, ``target`` or ``machine``, reason) — or None.

    A busy client is the client's limit. Lost requests (drops: every VU was waiting on the target) with a
    client that had CPU to spare are the target's, even when sends were late too: a saturated target
    backs up connects and VUs, and the schedule waits for them. Late sends from a client at under half
    its CPU bound are the machine's: other work kept it off the CPU (or its loop was blocked).
    """
    late = probe.lag_p99_ms > bounds.lag_p99_ms
    lag = f"schedule lag p99 {probe.lag_p99_ms:,.1f} ms > {bounds.lag_p99_ms:g} ms"
    if probe.cpu > bounds.cpu:
        return "client", f"client CPU {probe.cpu:.0%} > {bounds.cpu:.0%}" + (f", {lag}" if late else "")
    if probe.dropped + probe.failed > bounds.loss * max(probe.sent + probe.dropped, 1):
        lost = f"{probe.dropped:,} dropped, {probe.failed:,} failed"
        return "target", f"the target fell behind ({lost}" + (f"; {lag}" if late else "") + ")"
    if late and probe.cpu <= bounds.cpu / 2:
        return "machine", f"{lag} at {probe.cpu:.0%} client CPU (other work on the machine, or a blocked loop)"
    if late:
        return "client", lag
    return None


@dataclass
class Ceiling:
    """The highest rate found within the bounds, what gave out above it, and every run tried."""

    rate: float | None
    limited_by: str  # client | target | machine | none (nothing gave out up to the highest rate tried)
    reason: str
    verdict: str
    probes: list[tuple[Probe, str | None]] = field(default_factory=list)


Measure = Callable[[float], Probe]


def search_ceiling(
    measure: Measure, mode: Mode, bounds: Bounds, progress: Callable[[str], None] | None = None
) -> Ceiling:
    """Doubling then bisection over ``measure(rate)`` (pure but for ``measure``): the highest rate within ``bounds``.

    A run failed by the machine (late with CPU to spare) is run again, up to ``mode.retries`` times in all:
    a shared machine's other work comes and goes, and one busy moment is not the client's ceiling.
    """
    probes: list[tuple[Probe, str | None]] = []
    failures: dict[float, tuple[str, str]] = {}
    retries = [mode.retries]

    def passes(rate: float) -> bool:
        while True:
            probe = measure(rate)
            failed = judge(probe, bounds)
            probes.append((probe, failed[1] if failed else None))
            if progress is not None:
                progress(_probe_line(probe, failed))
            if failed is None or failed[0] != "machine" or retries[0] <= 0:
                break
            retries[0] -= 1
        if failed:
            failures[rate] = failed
        return failed is None

    cap = find_capacity("client", passes, start=mode.start_rate, maximum=mode.maximum,
                        resolution=mode.resolution, confirm=mode.confirm, max_runs=mode.max_runs)  # fmt: skip
    if cap.failed_at is None:
        top = max(p.rate for p, _ in probes)  # the maximum, or where the run budget ended
        return Ceiling(
            cap.rate, "none", f"nothing gave out up to {top:,.0f}/s: the ceiling is higher", cap.verdict, probes
        )
    limited_by, reason = failures.get(cap.failed_at, ("client", "a confirmation run failed"))
    return Ceiling(cap.rate, limited_by, f"at {cap.failed_at:,.0f}/s: {reason}", cap.verdict, probes)


def _probe_line(probe: Probe, failed: tuple[str, str] | None) -> str:
    mark = "✓" if failed is None else f"✗ {failed[1]}"
    return (
        f"{probe.rate:>9,.0f}/s  CPU {probe.cpu:4.0%}  lag p99 {probe.lag_p99_ms:6.2f} ms  "
        f"dropped {probe.dropped:,}  failed {probe.failed:,}  {mark}"
    )


# --- measuring: one run of the ordinary runner ---------------------------------------------------------


def probe_scenario(url: str, protocol: str, rate: float, run_s: float, warmup_s: float) -> str:
    """A scenario (YAML) of Poisson arrivals at ``rate`` for ``run_s`` seconds against ``url``."""
    request = {
        "http": "{}",
        "sse": f"{{max_tokens: {MAX_TOKENS}}}",
        "websocket": f"{{max_tokens: {MAX_TOKENS}}}",
        "openai": f"{{max_tokens: {MAX_TOKENS}, include_usage: false}}",
    }[protocol]
    # VUs: enough for a second of backlog at the zero-cost server's latency, and never a drop by their lack
    # below that; every VU is a connection, so not many more.
    max_vus = int(min(max(256, rate / 2), 16_384))
    return f"""
target: {url}
scenarios:
  calibrate:
    executor: constant-arrival-rate
    rate: {rate:.3f}
    duration: {run_s}s
    warmup: {warmup_s}s
    graceful_stop: 2s
    pre_allocated_vus: {min(max_vus, max(16, int(rate / 50)))}
    max_vus: {max_vus}
    arrival: poisson
    seed: 7
    protocol: {protocol}
    request: {request}
"""


def run_probe(url: str, protocol: str, rate: float, run_s: float, warmup_s: float) -> dict[str, Any]:
    """One run of the ordinary runner, no thresholds, no file; its result.

    Raises:
        RunAborted: the run was interrupted (Ctrl-C): the calibration stops with it.
    """
    from infer_bench.runner import run_scenario
    from infer_bench.scenario import parse_scenario

    scenario = parse_scenario(probe_scenario(url, protocol, rate, run_s, warmup_s), source="calibrate")
    result, _ = run_scenario(scenario, out=None, check_thresholds=False)
    if result["status"] != "complete":
        raise RunAborted(f"calibration stopped: the run at {rate:,.0f}/s ended early ({result['stop_reason']})")
    return result


def probe_of(result: Mapping[str, Any], rate: float, metric: str) -> Probe:
    """The figures of a probe run: sent, lost, mean CPU after the first second, lag p99, latency."""
    summary = result["total"]["summary"]
    cpu = list(result["client"]["cpu_by_second"])
    steady = cpu[1:] if len(cpu) > 1 else cpu  # the first second includes the warmup's connection setup
    latency = summary.get(metric) or {}
    head = result["headline"]
    return Probe(
        rate=rate,
        sent=int(head["requests"]),
        dropped=int(head["dropped"]),
        failed=int(head["failed"]),
        cpu=round(statistics.fmean(steady), 3) if steady else 0.0,
        lag_p99_ms=float((summary.get("schedule_lag") or {}).get("p99", 0.0)),
        latency_p50_ms=latency.get("p50"),
        latency_p99_ms=latency.get("p99"),
    )


def _latency_metric(protocol: str) -> str:
    return "e2e" if protocol == "http" else "ttft"


def server_stamps(url: str) -> dict[str, tuple[int, float]]:
    """The server's own TTFT and ITL so far, (count, sum in seconds), from ``/stats``."""
    with urllib.request.urlopen(url + "/stats", timeout=5) as response:  # loopback only
        metrics = json.loads(response.read())["metrics"]
    out: dict[str, tuple[int, float]] = {}
    for name, key in (("inferbench_ttft_seconds", "ttft"), ("inferbench_inter_token_seconds", "itl")):
        children = metrics.get(name) or []
        out[key] = (sum(int(c["count"]) for c in children), sum(float(c["sum"]) for c in children))
    return out


def _mean_between(
    before: Mapping[str, tuple[int, float]], after: Mapping[str, tuple[int, float]], key: str
) -> float | None:
    count = after[key][0] - before[key][0]
    return (after[key][1] - before[key][1]) / count * 1000 if count > 0 else None


@dataclass(frozen=True)
class Overhead:
    """The client's own share of latency at one fraction of the ceiling, against a server of known step."""

    fraction: float
    rate: float
    cpu: float
    lag_p99_ms: float
    metric: str  # ttft (streaming) or e2e (http)
    p50_ms: float | None
    p99_ms: float | None
    added_mean_ms: float | None
    """Client mean (from the actual send) minus the server's own mean for the same requests; for http the
    known step (the server keeps no per-request stamp of /predict)."""
    itl_p50_ms: float | None
    itl_p99_ms: float | None
    itl_added_mean_ms: float | None
    beyond: str | None = None
    """Why this run broke the ceiling's bounds (the machine's other work, most often), or None."""


def measure_overhead(url: str, protocol: str, fraction: float, ceiling: float, mode: Mode, bounds: Bounds) -> Overhead:
    rate = fraction * ceiling
    streaming = protocol != "http"
    before = server_stamps(url) if streaming else {}
    result = run_probe(url, protocol, rate, mode.overhead_run_s, mode.warmup_s)
    after = server_stamps(url) if streaming else {}
    metric = _latency_metric(protocol)
    summary = result["total"]["summary"]
    probe = probe_of(result, rate, metric)
    sent = summary.get(f"{metric}_sent") or {}
    itl = summary.get("itl") or {}
    if streaming:
        server_ttft, server_itl = _mean_between(before, after, "ttft"), _mean_between(before, after, "itl")
    else:
        server_ttft, server_itl = PACED_STEP_MS, None

    def added(client: float | None, server: float | None) -> float | None:
        return round(client - server, 3) if client is not None and server is not None else None

    return Overhead(
        fraction, round(rate, 1), probe.cpu, probe.lag_p99_ms, metric, probe.latency_p50_ms, probe.latency_p99_ms,
        added(sent.get("mean"), server_ttft), itl.get("p50"), itl.get("p99"), added(itl.get("mean"), server_itl),
        (judge(probe, bounds) or (None, None))[1],
    )  # fmt: skip


def calibrate(
    protocol: str, mode: Mode = DEFAULT, bounds: Bounds | None = None, progress: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Find this machine's client ceiling for ``protocol`` and the overhead below it; the record to store.

    Raises:
        UsageError: an unknown protocol.
        RunAborted: the reference server did not start, or a run was interrupted.
    """
    from infer_bench.runner import reference_server

    if protocol not in PROTOCOLS:
        raise UsageError(f"--protocol {protocol}: expected one of {', '.join(PROTOCOLS)}")
    bounds = bounds or Bounds()
    say = progress or (lambda line: None)
    started = time.monotonic()
    say(f"ceiling: {protocol}, zero-cost server, {mode.run_s:g} s open-loop runs from {mode.start_rate:,.0f}/s")
    with reference_server(ZERO_COST) as url:
        metric = _latency_metric(protocol)
        ceiling = search_ceiling(
            lambda rate: probe_of(run_probe(url, protocol, rate, mode.run_s, mode.warmup_s), rate, metric),
            mode, bounds, say,
        )  # fmt: skip
    overhead: list[Overhead] = []
    if ceiling.rate is not None:
        say(f"overhead: server step {PACED_STEP_MS:g} ms, at {', '.join(f'{f:.0%}' for f in mode.fractions)}")
        with reference_server(paced_settings()) as url:
            for fraction in mode.fractions:
                overhead.append(measure_overhead(url, protocol, fraction, ceiling.rate, mode, bounds))
                say(_overhead_line(overhead[-1]))
    return {
        "protocol": protocol,
        "ceiling_rate": round(ceiling.rate, 1) if ceiling.rate is not None else None,
        "limited_by": ceiling.limited_by,
        "reason": ceiling.reason,
        "verdict": ceiling.verdict,
        "measured_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "mode": mode.name,
        "took_s": round(time.monotonic() - started, 1),
        "bounds": asdict(bounds),
        "max_tokens": MAX_TOKENS if protocol != "http" else None,
        "step_ms": PACED_STEP_MS,
        "probes": [{**asdict(p), "failed_because": why} for p, why in ceiling.probes],
        "overhead": [asdict(o) for o in overhead],
    }


def _overhead_line(o: Overhead) -> str:
    def ms(v: float | None) -> str:
        return f"{v:,.2f}" if v is not None else "–"

    return (
        f"{o.fraction:>4.0%} ({o.rate:,.0f}/s)  CPU {o.cpu:.0%}  {o.metric} p50/p99 {ms(o.p50_ms)}/{ms(o.p99_ms)} ms"
        f"  +{ms(o.added_mean_ms)} ms  ITL p50/p99 {ms(o.itl_p50_ms)}/{ms(o.itl_p99_ms)} ms"
        f"  +{ms(o.itl_added_mean_ms)} ms" + (f"  ✗ {o.beyond}" if o.beyond else "")
    )


def render_calibration(record: Mapping[str, Any]) -> Any:
    """The calibration as a rich renderable: the ceiling, the runs tried, and the overhead table."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    rate = record["ceiling_rate"]
    head = Text.assemble(
        ("calibration ", "bold"), (record["protocol"], "cyan"), f" · {record['mode']} · {record['took_s']:g} s · ",
        (f"ceiling {rate:,.0f} req/s per process" if rate is not None else "no ceiling found", "bold green"),
        f" · limited by {record['limited_by']} ({record['reason']})",
    )  # fmt: skip
    runs = Table(box=None, pad_edge=False, header_style="bold", title="runs", title_justify="left")
    for col in ("rate/s", "CPU", "lag p99", "sent", "dropped", "failed", "verdict"):
        runs.add_column(col, justify="left" if col == "verdict" else "right")
    for p in record["probes"]:
        runs.add_row(f"{p['rate']:,.0f}", f"{p['cpu']:.0%}", f"{p['lag_p99_ms']:,.2f} ms", f"{p['sent']:,}",
                     f"{p['dropped']:,}", f"{p['failed']:,}", p["failed_because"] or "✓")  # fmt: skip
    parts: list[Any] = [head, runs]
    if record["overhead"]:
        over = Table(box=None, pad_edge=False, header_style="bold", title_justify="left",
                     title=f"the client's overhead (server step {record['step_ms']:g} ms)")  # fmt: skip
        for col in ("load", "rate/s", "CPU", "lag p99", "latency p50", "p99", "added", "ITL p50", "ITL p99", "added"):
            over.add_column(col, justify="right")
        over.add_column("bounds")
        for o in record["overhead"]:
            over.add_row(f"{o['fraction']:.0%}", f"{o['rate']:,.0f}", f"{o['cpu']:.0%}", f"{o['lag_p99_ms']:,.2f}",
                         *(_ms(o[k]) for k in ("p50_ms", "p99_ms", "added_mean_ms", "itl_p50_ms", "itl_p99_ms",
                                                "itl_added_mean_ms")),
                         f"✗ {o['beyond']}" if o.get("beyond") else "✓")  # fmt: skip
        parts += [over, Text(
            "latency: TTFT (http: end to end) from the schedule. added: the client's mean from its send minus the "
            "server's own mean for the same requests (http: minus the known step); the server's framing and "
            "queueing outside its stamps count too: it bounds the client's share from above", style="dim")]  # fmt: skip
    return Group(*parts)


def _ms(value: float | None) -> str:
    return f"{value:,.2f} ms" if value is not None else "–"


def run_calibration(protocol: str, *, quick: bool = False) -> dict[str, Any]:
    """``infer-bench calibrate``: calibrate, store the record for this machine, print the table; the record."""
    import sys

    from rich.console import Console

    from infer_bench.calibration import cache_path, save_calibration

    if protocol not in PROTOCOLS:  # before any server starts
        raise UsageError(f"--protocol {protocol}: expected one of {', '.join(PROTOCOLS)}")
    err = Console(stderr=True, highlight=False)
    record = calibrate(protocol, QUICK if quick else DEFAULT, progress=lambda line: err.print(f"[dim]{line}[/]"))
    path = save_calibration(record, protocol) if record["ceiling_rate"] is not None else cache_path()
    Console(highlight=False, width=None if sys.stdout.isatty() else 140).print(render_calibration(record))
    if record["ceiling_rate"] is None:
        raise RunAborted(f"no rate from {record['probes'][0]['rate']:,.0f}/s up kept the bounds ({record['reason']}); "
                         "nothing stored")  # fmt: skip
    err.print(f"[dim]stored in {path}: runs of {protocol} on this machine warn above {record['ceiling_rate']:,.0f} "
              "req/s per process[/]")  # fmt: skip
    return record
