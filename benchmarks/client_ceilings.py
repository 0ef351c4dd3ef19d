"""Client ceilings: how much load one infer-bench process generates, and how true its TTFT stays under it.

What it measures
    Every target is pinned to CPU 0 and every client to CPU 1 (``taskset``); all traffic is on 127.0.0.1.
    The client is ``python -m infer_bench.cli run SCENARIO --quiet`` (the tool as users run it), one process.

    1. HTTP req/s beside wrk. nginx (one process, ``master_process off``) answers ``POST /predict`` with a
       fixed ``{"output":[1]}``. wrk (``-t1 -c50``, the body infer-bench sends) gives the reference rate;
       infer-bench runs a closed loop of 50 VUs (``constant-vus``, ``protocol: http``) against it.
       Goal: infer-bench >= 0.6x wrk.
    2. SSE ceiling. ``fixed_delay_server.py`` streams 64 token events to every POST, the first 20 ms
       after the request arrived, the rest right after it. infer-bench runs a closed loop of 400 VUs
       (``protocol: sse``), which at 20 ms per stream could ask up to 20,000 streams/s: the client's core
       is the limit (its CPU should read ~100 %). Goal: >= 4,000 streams/s. The same closed loop over
       WebSocket (``protocol: websocket``, one generation in flight per socket, the server answering with
       the reference server's ``token``/``done`` messages) is shown beside it, with no goal yet.
    3. TTFT error. Open loop (``constant-arrival-rate``, Poisson arrivals, VUs enough that none are dropped)
       at 50 % and 80 % of the measured ceiling, and at the goal's 4,000 streams/s. The server records the
       actual delay of each first token (request read → first-token write, its own timer overshoot
       included); the client's error is its ``ttft_sent`` percentile minus the server's delay percentile
       (the two cannot be paired per request, so this is a difference of percentiles; the server's delay is
       nearly constant, 20.0-20.1 ms at p50, so the difference is close to the error's own percentile).
       Goal: error p99 <= 1 ms at 4,000 streams/s, with nothing dropped and no failed request.

    Each scenario has a 2 s warmup, left out of every figure: the client's (its ``warmup``), the rates
    (the mean of the result's per-second series over the whole seconds of load after it;
    ``headline.request_rate`` divides by the whole run, warmup and drain included) and the server's delay
    statistics (``/stats?skip_ms=2000``: requests in the first 2 s after the run's first one). Every
    figure is the median over ``--repeats`` runs; the runs of one part are interleaved.

How to read the output
    HTTP          req/s of wrk and of infer-bench, the ratio, the client's CPU (median of its per-second
                  samples), the target's CPU share, and the individual runs.
    ceiling       streams/s and tokens/s (SSE events, WebSocket messages); the client CPU should be ~100 %,
                  or the VUs were too few.
    TTFT          per load: requested and achieved rate, dropped arrivals, client CPU, schedule lag p99
                  (how late the client sent against the schedule), TTFT from the intended start and from
                  the send (p50/p99), the server's actual delay (p50/p99), and the errors: ``err sent`` is
                  ``ttft_sent`` minus the server (the goal's figure); ``err sched`` is ``ttft`` (from the
                  intended start) minus the server, i.e. the error a user reads in the report, schedule lag
                  included.
    other CPU     share of CPU 0 / CPU 1 used by processes other than the target and the client during
                  the run; above 10 % a note says another process was competing (this machine is shared;
                  MEASUREMENTS.md treats figures here as ±15 %).

    The exit code is 0 when every goal passes, 1 when one fails, 2 when the benchmark could not run.

Profiling
    ``--profile DIR`` attaches ``py-spy record --nonblocking`` (on CPU 0, beside the target) to the client
    of the first HTTP run, the first SSE and WebSocket ceiling runs and the first run at the goal rate,
    writes collapsed stacks to DIR and prints the hottest code (own samples by function and by line, and
    samples below each infer_bench function). Those runs are slightly perturbed; a note says so.

Usage
    .venv/bin/python benchmarks/client_ceilings.py [--duration 10] [--repeats 3] [--src DIR] [--profile DIR]
        [--fifo] [--http-only]

    ``--fifo`` runs every target and client (and wrk) under SCHED_FIFO, so that other processes on a shared
    machine wait for them: their measurements then no longer depend on what else runs (each process is
    bounded in time and never busy-waits, so nothing starves for long). It needs root or CAP_SYS_NICE.

    ``--src DIR`` runs the client from another source tree (PYTHONPATH), e.g. a ``git archive`` of a commit,
    to compare revisions. Requires Linux, two CPUs, ``taskset``, ``wrk`` and ``nginx``
    (``apt-get install wrk nginx``); ``py-spy`` for ``--profile``.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import http.client
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from predict_throughput import (
    BODY,
    HOST,
    BenchmarkError,
    WrkResult,
    align,
    cpu_seconds,
    free_port,
    idle_shares,
    parse_wrk,
    pinned,
    stop,
    tail,
    wait_ready,
)

GOAL_HTTP_RATIO = 0.6
GOAL_STREAMS_PER_S = 4_000.0
GOAL_TTFT_ERROR_P99_MS = 1.0
DELAY_MS = 20.0
TOKENS = 64
LOADS = (0.5, 0.8)  # of the measured ceiling

HTTP_VUS = 50
STREAM_VUS = 400
WARMUP_S = 2  # connections open lazily: the first seconds of an open-loop run are a transient
GRACEFUL_STOP_S = 5
CLIENT_GRACE_S = 60.0  # beyond duration + graceful stop, a client run is killed
FOREIGN_CPU_NOTE = 0.10
CLIENT_SATURATED = 0.9
IDLE_CPU_SHARE = 0.85
PROFILE_TOP = 15
DRIVER_FRAMES = frozenset({
    "<module> (infer_bench/cli.py)", "main (infer_bench/cli.py)", "run (infer_bench/cli.py)",
    "run_scenario (infer_bench/runner.py)", "_run_loop (infer_bench/runner.py)",
})  # fmt: skip

BENCH_DIR = Path(__file__).resolve().parent
CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK")

NGINX_CONFIG = """\
daemon off;
master_process off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    keepalive_requests 1000000000;
    keepalive_timeout 300s;
    server {{
        listen {host}:{port} backlog=4096;
        location = /predict {{ default_type application/json; return 200 '{{"output":[1]}}'; }}
        location = /healthz {{ default_type text/plain; return 200 'ok'; }}
    }}
}}
"""

WRK_SCRIPT = f"""\
wrk.method = "POST"
wrk.body = '{BODY.decode()}'
wrk.headers["Content-Type"] = "application/json"
"""


# --- scenarios ------------------------------------------------------------------------------------


def _scenario(port: int, executor: str, protocol: str, request: str) -> str:
    return f"""\
target: http://{HOST}:{port}
scenarios:
  load:
{executor}    warmup: {WARMUP_S}s
    graceful_stop: {GRACEFUL_STOP_S}s
    timeout: 10s
    protocol: {protocol}
    request: {request}
"""


def http_scenario(port: int, duration_s: int) -> str:
    executor = f"    executor: constant-vus\n    vus: {HTTP_VUS}\n    duration: {duration_s}s\n"
    return _scenario(port, executor, "http", "{method: POST, path: /predict, body: {input: [1.0, 2.0, 3.0]}}")


def stream_closed_scenario(port: int, duration_s: int) -> str:
    executor = f"    executor: constant-vus\n    vus: {STREAM_VUS}\n    duration: {duration_s}s\n"
    return _scenario(port, executor, "sse", f"{{max_tokens: {TOKENS}}}")


def websocket_closed_scenario(port: int, duration_s: int) -> str:
    executor = f"    executor: constant-vus\n    vus: {STREAM_VUS}\n    duration: {duration_s}s\n"
    return _scenario(port, executor, "websocket", f"{{max_tokens: {TOKENS}, in_flight: 1}}")


def stream_open_scenario(port: int, duration_s: int, rate: float) -> str:
    # Little's law: rate x 20 ms streams in flight when all is well; room for 40x that before a drop.
    in_flight = rate * DELAY_MS / 1000
    pre_allocated = max(64, int(in_flight * 4))
    executor = (
        f"    executor: constant-arrival-rate\n    rate: {rate:.0f}\n    duration: {duration_s}s\n"
        f"    pre_allocated_vus: {pre_allocated}\n    max_vus: {max(2_000, int(in_flight * 40))}\n"
        "    arrival: poisson\n    seed: 1\n"
    )
    return _scenario(port, executor, "sse", f"{{max_tokens: {TOKENS}}}")


# --- CPU accounting -------------------------------------------------------------------------------


def _busy_jiffies(cpus: tuple[int, ...]) -> dict[int, int]:
    """Non-idle jiffies of each CPU so far (user through steal), from /proc/stat."""
    busy = {}
    for line in Path("/proc/stat").read_text().splitlines():
        name, *values = line.split()
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
            jiffies = [int(v) for v in values[:8]]
            busy[int(name[3:])] = sum(jiffies) - jiffies[3] - jiffies[4]
    return busy


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@dataclass(frozen=True)
class Window:
    """CPU use during one run: the target's, the client's, and everybody else's on each benchmark CPU."""

    wall_s: float
    target_share: float
    client_share: float
    foreign: dict[int, float]  # CPU -> share of it used by processes other than the target and the client


class Meter:
    """Samples the CPUs around one client run; the client's CPU comes from the reaped child's rusage."""

    def __init__(self, target_pid: int, target_cpu: int, client_cpu: int) -> None:
        self.target_pid, self.target_cpu, self.client_cpu = target_pid, target_cpu, client_cpu
        self._cpus = (target_cpu, client_cpu)
        self._wall = time.monotonic()
        self._target = cpu_seconds(target_pid)
        self._children = _children_cpu_s()
        self._busy = _busy_jiffies(self._cpus)

    def finish(self) -> Window:
        """Call once the client has been reaped (its CPU time is then in RUSAGE_CHILDREN)."""
        wall = time.monotonic() - self._wall
        target = (cpu_seconds(self.target_pid) - self._target) / wall
        client = (_children_cpu_s() - self._children) / wall
        busy = _busy_jiffies(self._cpus)
        used = {cpu: (busy[cpu] - self._busy[cpu]) / CLOCK_TICKS_PER_S / wall for cpu in self._cpus}
        ours = {self.target_cpu: target, self.client_cpu: client}
        foreign = {cpu: max(0.0, used[cpu] - ours[cpu]) for cpu in self._cpus}
        return Window(wall, target, client, foreign)


# --- targets --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    name: str
    port: int
    pid: int


@contextlib.contextmanager
def running(name: str, argv: list[str], port: int, cpu: int, workdir: Path) -> Iterator[Target]:
    """Start ``argv`` pinned to ``cpu``, yield once ``GET /healthz`` answers, and always stop it by PID."""
    log = workdir / f"{name}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(placed(cpu, argv), stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_ready(proc, port, log)
        print(f"  {name}: pid {proc.pid}, port {port}, pinned to CPU {cpu}", flush=True)
        yield Target(name, port, proc.pid)
    finally:
        stop(proc)


def nginx(cpu: int, workdir: Path) -> contextlib.AbstractContextManager[Target]:
    port = free_port()
    home = workdir / "nginx"
    home.mkdir()
    config = home / "nginx.conf"
    config.write_text(NGINX_CONFIG.format(dir=home, host=HOST, port=port), encoding="utf-8")
    argv = ["nginx", "-p", str(home), "-c", str(config), "-e", str(home / "nginx-error.log")]
    return running("nginx", argv, port, cpu, workdir)


def fixed_delay_server(cpu: int, workdir: Path) -> contextlib.AbstractContextManager[Target]:
    port = free_port()
    argv = [sys.executable, str(BENCH_DIR / "fixed_delay_server.py"), "--host", HOST, "--port", str(port)]
    argv += ["--delay-ms", f"{DELAY_MS:g}", "--tokens", str(TOKENS)]
    return running("fixed-delay", argv, port, cpu, workdir)


def server_stats(port: int, *, reset: bool, skip_s: float = 0.0) -> dict[str, Any]:
    """The fixed-delay server's first-token delays since its last reset, but for the first ``skip_s``."""
    conn = http.client.HTTPConnection(HOST, port, timeout=5.0)
    try:
        conn.request("GET", f"/stats?skip_ms={skip_s * 1000:g}&reset={int(reset)}")
        stats: dict[str, Any] = json.loads(conn.getresponse().read())
        return stats
    finally:
        conn.close()


# --- clients --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WrkRun:
    wrk: WrkResult
    window: Window


@dataclass(frozen=True)
class ClientRun:
    """One infer-bench run: its result file and the CPU window around it."""

    result: dict[str, Any]
    window: Window
    duration_s: int

    def _steady(self) -> list[dict[str, Any]]:
        series = [s for s in self.result["series"] if WARMUP_S <= s["t"] < self.duration_s]
        if not series:
            raise BenchmarkError(f"the result has no whole second of load after the warmup: {self.result['series']}")
        return series

    @property
    def requests_per_s(self) -> float:
        return statistics.mean(float(s["succeeded"]) for s in self._steady())

    @property
    def tokens_per_s(self) -> float:
        return statistics.mean(float(s["tokens"]) for s in self._steady())

    @property
    def client_cpu(self) -> float:
        samples = self.result["client"]["cpu_by_second"]
        return statistics.median(samples[WARMUP_S:] or samples) if samples else 0.0

    @property
    def failed(self) -> int:
        return int(self.result["headline"]["failed"])

    @property
    def dropped(self) -> int:
        return int(self.result["headline"]["dropped"])

    def ms(self, metric: str, label: str) -> float:
        """A percentile (``p50``, ``p99``) of ``metric`` in ms, from the whole run's merged histograms."""
        return float(self.result["total"]["summary"][metric][label])


class Clients:
    """Runs wrk and infer-bench on the client CPU, one process at a time, each bounded in time."""

    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.env = dict(os.environ)
        if args.src is not None:
            self.env["PYTHONPATH"] = str(args.src)
        self.script = workdir / "post.lua"
        self.script.write_text(WRK_SCRIPT, encoding="utf-8")
        self._runs = 0

    def wrk(self, target: Target) -> WrkRun:
        args = self.args
        argv = ["wrk", "-t1", f"-c{HTTP_VUS}", f"-d{args.duration}s", "--latency", "-s", str(self.script)]
        argv.append(f"http://{HOST}:{target.port}/predict")
        meter = Meter(target.pid, args.target_cpu, args.client_cpu)
        done = subprocess.run(
            placed(args.client_cpu, argv), capture_output=True, text=True, timeout=args.duration + CLIENT_GRACE_S
        )
        window = meter.finish()
        if done.returncode != 0:
            raise BenchmarkError(f"wrk exited with {done.returncode}:\n{done.stderr or done.stdout}")
        return WrkRun(parse_wrk(done.stdout), window)

    def infer_bench(self, target: Target, scenario: str, profile_as: str | None = None) -> ClientRun:
        """Run one scenario; with ``profile_as``, py-spy samples the client into the profile directory."""
        args = self.args
        self._runs += 1
        path = self.workdir / f"run-{self._runs}.yaml"
        path.write_text(scenario, encoding="utf-8")
        out = self.workdir / f"run-{self._runs}.json"
        log = self.workdir / f"run-{self._runs}.log"
        argv = [sys.executable, "-m", "infer_bench.cli", "run", str(path), "--quiet", "-o", str(out)]
        meter = Meter(target.pid, args.target_cpu, args.client_cpu)
        with log.open("wb") as sink:
            proc = subprocess.Popen(placed(args.client_cpu, argv), stdout=sink, stderr=subprocess.STDOUT, env=self.env)
        try:
            with self._profiled(proc, profile_as):
                proc.wait(timeout=args.duration + GRACEFUL_STOP_S + CLIENT_GRACE_S)
        finally:
            stop(proc)
        window = meter.finish()
        if proc.returncode != 0 or not out.exists():
            raise BenchmarkError(f"infer-bench exited with {proc.returncode}:\n{tail(log)}")
        return ClientRun(json.loads(out.read_text(encoding="utf-8")), window, args.duration)

    @contextlib.contextmanager
    def _profiled(self, proc: subprocess.Popen[bytes], name: str | None) -> Iterator[None]:
        if name is None or self.args.profile is None:
            yield
            return
        time.sleep(WARMUP_S)  # py-spy needs a running interpreter to attach to; the warmup is not measured
        raw = self.args.profile / f"{name}.txt"
        spy = [str(Path(sys.executable).parent / "py-spy"), "record", "--nonblocking", "--format", "raw"]
        spy += ["--rate", "250", "--duration", str(max(1, self.args.duration - WARMUP_S))]
        spy += ["--pid", str(proc.pid), "-o", str(raw)]
        spy_log = self.workdir / f"py-spy-{name}.log"
        with spy_log.open("wb") as sink:
            profiler = subprocess.Popen(pinned(self.args.target_cpu, spy), stdout=sink, stderr=subprocess.STDOUT)
        try:
            yield
        finally:
            try:
                profiler.wait(timeout=CLIENT_GRACE_S)
            finally:
                stop(profiler)
        if not raw.exists():
            print(f"  py-spy wrote no profile:\n{tail(spy_log)}", flush=True)


# --- measuring ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TtftRun:
    client: ClientRun
    server: dict[str, Any]  # the fixed-delay server's /stats for the run

    def server_ms(self, label: str) -> float:
        return float(self.server["first_token_delay_us"][label]) / 1000

    def error_ms(self, metric: str, label: str) -> float:
        return self.client.ms(metric, label) - self.server_ms(label)


@dataclass
class Measurements:
    wrk: list[WrkRun]
    http: list[ClientRun]
    ceiling: list[ClientRun]
    websocket: list[ClientRun]
    ttft: dict[str, list[TtftRun]]  # load label -> runs
    rates: dict[str, float]  # load label -> requested streams/s

    @property
    def ceiling_per_s(self) -> float:
        return statistics.median(r.requests_per_s for r in self.ceiling)


def progress(label: str, run: ClientRun | WrkRun) -> None:
    w = run.window
    if isinstance(run, WrkRun):
        figures = f"{run.wrk.requests_per_s:>9,.0f} req/s  errors {run.wrk.errors}"
    else:
        figures = f"{run.requests_per_s:>9,.0f} req/s  {run.tokens_per_s:>9,.0f} tokens/s"
        figures += f"  client CPU {run.client_cpu:4.0%}"
    others = " ".join(f"{share:.0%}" for share in w.foreign.values())
    print(f"  {label:<24}{figures}  target CPU {w.target_share:4.0%}  other CPU {others}", flush=True)


def measure_http(args: argparse.Namespace, clients: Clients, workdir: Path) -> tuple[list[WrkRun], list[ClientRun]]:
    wrk_runs: list[WrkRun] = []
    ib_runs: list[ClientRun] = []
    with nginx(args.target_cpu, workdir) as target:
        scenario = http_scenario(target.port, args.duration)
        for round_no in range(1, args.repeats + 1):
            wrk_runs.append(clients.wrk(target))
            progress(f"http {round_no}/{args.repeats} wrk", wrk_runs[-1])
            ib_runs.append(clients.infer_bench(target, scenario, profile_as="http" if round_no == 1 else None))
            progress(f"http {round_no}/{args.repeats} infer-bench", ib_runs[-1])
    return wrk_runs, ib_runs


def measure_streams(
    args: argparse.Namespace, clients: Clients, workdir: Path
) -> tuple[list[ClientRun], list[ClientRun], dict[str, list[TtftRun]], dict[str, float]]:
    ceiling: list[ClientRun] = []
    websocket: list[ClientRun] = []
    ttft: dict[str, list[TtftRun]] = collections.defaultdict(list)
    with fixed_delay_server(args.target_cpu, workdir) as target:
        closed = stream_closed_scenario(target.port, args.duration)
        closed_ws = websocket_closed_scenario(target.port, args.duration)
        for round_no in range(1, args.repeats + 1):
            first = round_no == 1
            ceiling.append(clients.infer_bench(target, closed, profile_as="sse-ceiling" if first else None))
            progress(f"sse ceiling {round_no}/{args.repeats}", ceiling[-1])
            if not args.skip_websocket:
                websocket.append(clients.infer_bench(target, closed_ws, profile_as="ws-ceiling" if first else None))
                progress(f"ws ceiling {round_no}/{args.repeats}", websocket[-1])
        top = statistics.median(r.requests_per_s for r in ceiling)
        rates = {f"{share:.0%} of ceiling": top * share for share in LOADS}
        rates[f"goal {GOAL_STREAMS_PER_S:,.0f}/s"] = GOAL_STREAMS_PER_S
        for round_no in range(1, args.repeats + 1):
            for label, rate in rates.items():
                profile = "sse-goal-rate" if round_no == 1 and rate == GOAL_STREAMS_PER_S else None
                server_stats(target.port, reset=True)
                run = clients.infer_bench(target, stream_open_scenario(target.port, args.duration, rate), profile)
                ttft[label].append(TtftRun(run, server_stats(target.port, reset=True, skip_s=WARMUP_S)))
                progress(f"ttft {label} {round_no}/{args.repeats}", run)
    return ceiling, websocket, dict(ttft), rates


# --- report ---------------------------------------------------------------------------------------


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def _median(values: Iterator[float] | list[float]) -> float:
    return statistics.median(list(values))


def _others(windows: list[Window]) -> str:
    cpus = sorted(windows[0].foreign)
    return " / ".join(f"{_median(w.foreign[cpu] for w in windows):.0%}" for cpu in cpus)


def http_section(m: Measurements) -> tuple[str, bool]:
    wrk_rate = _median(r.wrk.requests_per_s for r in m.wrk)
    ib_rate = _median(r.requests_per_s for r in m.http)
    ratio = ib_rate / wrk_rate
    clean = all(r.wrk.errors == 0 for r in m.wrk) and all(r.failed == 0 for r in m.http)
    passed = clean and ratio >= GOAL_HTTP_RATIO
    rows = [
        ("wrk", f"{wrk_rate:,.0f}", "1.00", "-", f"{_median(r.window.target_share for r in m.wrk):.0%}",
         _others([r.window for r in m.wrk]), " ".join(f"{r.wrk.requests_per_s:,.0f}" for r in m.wrk)),
        ("infer-bench", f"{ib_rate:,.0f}", f"{ratio:.2f}", f"{_median(r.client_cpu for r in m.http):.0%}",
         f"{_median(r.window.target_share for r in m.http):.0%}", _others([r.window for r in m.http]),
         " ".join(f"{r.requests_per_s:,.0f}" for r in m.http)),
    ]  # fmt: skip
    header = ("client", "req/s", "x wrk", "client CPU", "nginx CPU", "other CPU 0/1", "runs (req/s)")
    text = align(header, rows, {0, 6})
    text += f"\ngoal: infer-bench >= {GOAL_HTTP_RATIO}x wrk, no errors: {verdict(passed)}"
    return text, passed


def _ceiling_row(name: str, runs: list[ClientRun]) -> tuple[str, ...]:
    return (
        name, f"{_median(r.requests_per_s for r in runs):,.0f}", f"{_median(r.tokens_per_s for r in runs):,.0f}",
        f"{_median(r.client_cpu for r in runs):.0%}", f"{_median(r.window.target_share for r in runs):.0%}",
        _others([r.window for r in runs]), str(sum(r.failed for r in runs)),
        " ".join(f"{r.requests_per_s:,.0f}" for r in runs),
    )  # fmt: skip


def ceiling_section(m: Measurements) -> tuple[str, bool]:
    streams = m.ceiling_per_s
    passed = streams >= GOAL_STREAMS_PER_S and all(r.failed == 0 for r in m.ceiling)
    rows = [_ceiling_row(f"SSE, {STREAM_VUS} VUs", m.ceiling)]
    if m.websocket:
        rows.append(_ceiling_row(f"WebSocket, {STREAM_VUS} VUs", m.websocket))
    header = ("closed loop", "streams/s", "tokens/s", "client CPU", "server CPU", "other CPU 0/1", "failed", "runs")
    text = align(header, rows, {0, 7})
    text += f"\ngoal: SSE >= {GOAL_STREAMS_PER_S:,.0f} streams/s per process: {verdict(passed)}"
    if m.websocket:
        text += " (WebSocket: no goal yet, shown for reference)"
    return text, passed


def ttft_row(label: str, rate: float, runs: list[TtftRun]) -> tuple[tuple[str, ...], bool]:
    def pair(get: Callable[[TtftRun, str], float]) -> str:
        return f"{_median(get(r, 'p50') for r in runs):.2f} / {_median(get(r, 'p99') for r in runs):.2f}"

    error_p99 = _median(r.error_ms("ttft_sent", "p99") for r in runs)
    dropped = sum(r.client.dropped for r in runs)
    failed = sum(r.client.failed for r in runs)
    passed = error_p99 <= GOAL_TTFT_ERROR_P99_MS and dropped == 0 and failed == 0
    achieved = _median(float(r.client.result["headline"].get("achieved_rate", 0.0)) for r in runs)
    row = (
        label, f"{rate:,.0f}", f"{achieved:,.0f}", f"{dropped}/{failed}",
        f"{_median(r.client.client_cpu for r in runs):.0%}",
        f"{_median(r.client.ms('schedule_lag', 'p99') for r in runs):.2f}",
        pair(lambda r, q: r.client.ms("ttft", q)), pair(lambda r, q: r.client.ms("ttft_sent", q)),
        pair(lambda r, q: r.server_ms(q)), pair(lambda r, q: r.error_ms("ttft_sent", q)),
        pair(lambda r, q: r.error_ms("ttft", q)), _others([r.client.window for r in runs]), verdict(passed),
    )  # fmt: skip
    return row, passed


def ttft_section(m: Measurements) -> tuple[str, bool]:
    rows, verdicts = [], {}
    for label, runs in m.ttft.items():
        row, passed = ttft_row(label, m.rates[label], runs)
        rows.append(row)
        verdicts[label] = passed
    header = (
        "load", "rate/s", "achieved", "drop/fail", "client CPU", "lag p99", "ttft p50/p99", "ttft_sent p50/p99",
        "server p50/p99", "err sent p50/p99", "err sched p50/p99", "other CPU 0/1", "err p99<=1ms",
    )  # fmt: skip
    goal_label = next(label for label, rate in m.rates.items() if rate == GOAL_STREAMS_PER_S)
    passed = verdicts[goal_label]
    text = align(header, rows, {0})
    text += (
        f"\ngoal: TTFT error p99 <= {GOAL_TTFT_ERROR_P99_MS:g} ms at {GOAL_STREAMS_PER_S:,.0f} streams/s, nothing "
        f"dropped or failed: {verdict(passed)} (the other loads are shown for the client's accurate range)"
    )
    return text, passed


def notes(m: Measurements, idle: dict[int, float], args: argparse.Namespace) -> list[str]:
    """Warnings that change how far the figures can be trusted."""
    out = []
    busy = {cpu: share for cpu, share in idle.items() if share < IDLE_CPU_SHARE}
    if busy:
        shown = ", ".join(f"CPU {cpu} only {share:.0%} idle" for cpu, share in busy.items())
        out.append(f"the machine was busy before the run ({shown})")
    windows = [r.window for r in m.wrk] + [r.window for r in (*m.http, *m.ceiling, *m.websocket)]
    windows += [r.client.window for runs in m.ttft.values() for r in runs]
    noisy = [w for w in windows if max(w.foreign.values()) > FOREIGN_CPU_NOTE]
    if noisy:
        worst = max(max(w.foreign.values()) for w in noisy)
        out.append(
            f"in {len(noisy)} of {len(windows)} runs other processes used over {FOREIGN_CPU_NOTE:.0%} of a "
            f"benchmark CPU (worst {worst:.0%}): those figures understate the client"
        )
    unsaturated = [r for r in m.ceiling if r.client_cpu < CLIENT_SATURATED]
    if unsaturated:
        out.append(
            f"in {len(unsaturated)} SSE-ceiling runs the client used under {CLIENT_SATURATED:.0%} of its core: "
            f"the ceiling is a lower bound (more VUs, or a busy target core)"
        )
    if args.profile is not None:
        out.append("the first HTTP, ceiling and goal-rate runs were profiled by py-spy on CPU 0")
    out.append("TTFT errors are differences of percentiles (client minus server), over the same requests")
    return out


def report(m: Measurements, idle: dict[int, float], args: argparse.Namespace) -> bool:
    print()
    print(
        f"client ceilings: infer-bench on CPU {args.client_cpu}, targets on CPU {args.target_cpu}, "
        f"{args.duration} s runs, median of {args.repeats}" + (f", client source {args.src}" if args.src else "")
    )
    sections = [
        ("HTTP: POST /predict against nginx, closed loop, 50 connections", http_section),
        (f"Streaming ceiling: fixed-delay server, first token after {DELAY_MS:g} ms, {TOKENS} tokens", ceiling_section),
        ("TTFT error: open loop, Poisson arrivals, milliseconds (error = client minus server)", ttft_section),
    ]
    if not m.http:
        print("\nHTTP: skipped (--skip-http)")
        sections = sections[1:]
    if not m.ceiling:
        sections = sections[:1]
    verdicts = []
    for title, section in sections:
        text, passed = section(m)
        print(f"\n{title}\n{text}")
        verdicts.append(passed)
    for note in notes(m, idle, args):
        print(f"note: {note}")
    passed = all(verdicts)
    print(f"\nall goals: {verdict(passed)}")
    return passed


def print_profiles(directory: Path) -> None:
    """The client's hottest code in each collapsed-stack profile: own samples by function and by line, and
    samples below each infer_bench function (the driver's frames, on every stack, are left out)."""
    for raw in sorted(directory.glob("*.txt")):
        own: collections.Counter[str] = collections.Counter()
        lines: collections.Counter[str] = collections.Counter()
        below: collections.Counter[str] = collections.Counter()
        total = 0
        for line in raw.read_text(encoding="utf-8", errors="replace").splitlines():
            stack, _, count_text = line.rpartition(" ")
            frames = stack.split(";")[1:]  # the first entry names the thread
            if not frames or not count_text.isdigit():
                continue
            count = int(count_text)
            total += count
            own[_frame_name(frames[-1])] += count
            lines[_frame_name(frames[-1], with_line=True)] += count
            for name in {_frame_name(f) for f in frames if "infer_bench/" in f}:
                below[name] += count
        if not total:
            continue
        print(f"\nprofile {raw.name} ({total} samples while busy)")
        for title, counter in (
            ("own, by function", own),
            ("own, by line", lines),
            (
                "inclusive, infer_bench below the driver",
                collections.Counter({n: c for n, c in below.items() if n not in DRIVER_FRAMES}),
            ),
        ):
            print(f"  {title}:")
            for name, count in counter.most_common(PROFILE_TOP):
                print(f"    {count / total:6.1%}  {name}")


def _frame_name(frame: str, with_line: bool = False) -> str:
    """``func (path/to/pkg/file.py:123)`` → ``func (pkg/file.py)``, or ``pkg/file.py:123`` with the line."""
    func, _, where = frame.partition(" (")
    path, _, line = where.rstrip(")").rpartition(":")
    parts = Path(path).parts
    short = "/".join(parts[-2:]) if len(parts) >= 2 else path
    return f"{short}:{line} {func}" if with_line else f"{func} ({short})"


# --- driver ---------------------------------------------------------------------------------------


FIFO_PREFIX: list[str] = []  # set by --fifo: targets and clients run under ``chrt -f 50``


def placed(cpu: int, argv: list[str]) -> list[str]:
    """``argv`` pinned to ``cpu`` (and real-time with --fifo); chrt and taskset exec, so the PID is argv's own."""
    return [*FIFO_PREFIX, *pinned(cpu, argv)]


def check_tools(args: argparse.Namespace) -> None:
    for tool, package in (("wrk", "wrk"), ("nginx", "nginx"), ("taskset", "util-linux")):
        install = f"apt-get install {package}"
        if shutil.which(tool) is None:
            raise BenchmarkError(f"{tool} is not on PATH; install it ({install}) and run again")
    usable = os.sched_getaffinity(0)
    if args.target_cpu == args.client_cpu or not {args.target_cpu, args.client_cpu} <= usable:
        raise BenchmarkError(f"need two distinct usable CPUs for target and client, have {sorted(usable)}")
    if args.profile is not None and not (Path(sys.executable).parent / "py-spy").exists():
        raise BenchmarkError("--profile needs py-spy in the venv (pip install py-spy)")
    if args.fifo:
        if subprocess.run(["chrt", "-f", "50", "true"], capture_output=True).returncode != 0:
            raise BenchmarkError("--fifo needs permission to use SCHED_FIFO (root or CAP_SYS_NICE)")
        FIFO_PREFIX[:] = ["chrt", "-f", "50"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=10, help="seconds of load per run (default 10)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per measurement; the median is reported")
    parser.add_argument("--target-cpu", type=int, default=0, help="CPU the targets are pinned to (default 0)")
    parser.add_argument("--client-cpu", type=int, default=1, help="CPU the clients are pinned to (default 1)")
    parser.add_argument("--src", type=Path, help="run the client from this source tree (PYTHONPATH)")
    parser.add_argument("--profile", type=Path, help="directory for py-spy profiles of the client")
    parser.add_argument("--skip-http", action="store_true", help="leave out the HTTP part")
    parser.add_argument("--skip-websocket", action="store_true", help="leave out the WebSocket ceiling")
    parser.add_argument("--http-only", action="store_true", help="only the HTTP part (quick iterations)")
    parser.add_argument(
        "--fifo", action="store_true",
        help="run targets, wrk and clients under SCHED_FIFO (chrt -f 50): other work on a shared machine "
        "then waits for them instead of the other way round",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.http_only and args.skip_http:
        parser.error("--http-only and --skip-http leave nothing to run")
    if args.duration < WARMUP_S + 2 or args.repeats < 1:
        parser.error(f"--duration must be at least {WARMUP_S + 2} and --repeats at least 1")
    if args.src is not None and not (args.src / "infer_bench").is_dir():
        parser.error(f"--src {args.src}: no infer_bench package in it")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        check_tools(args)
        if args.profile is not None:
            args.profile.mkdir(parents=True, exist_ok=True)
        idle = idle_shares({args.target_cpu, args.client_cpu})
        with tempfile.TemporaryDirectory(prefix="client-ceilings-") as tmp:
            workdir = Path(tmp)
            clients = Clients(args, workdir)
            wrk_runs, http_runs = ([], []) if args.skip_http else measure_http(args, clients, workdir)
            ceiling, websocket, ttft, rates = (
                ([], [], {}, {}) if args.http_only else measure_streams(args, clients, workdir)
            )
    except (BenchmarkError, OSError, subprocess.TimeoutExpired) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    measurements = Measurements(wrk_runs, http_runs, ceiling, websocket, ttft, rates)
    passed = report(measurements, idle, args)
    if args.profile is not None:
        print_profiles(args.profile)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
