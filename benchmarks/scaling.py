"""Scaling: what 1 and 2 infer-bench processes (and 2 Ray actors) send, and whether memory stays flat.

What it measures
    1. Throughput with 1 and 2 processes (``run --processes 2``) and, with ``--ray``, 2 Ray actors on a
       local Ray (``run --ray local -p 2``), each a closed loop that keeps the client busy:
       - HTTP req/s: ``protocol: http``, 64 VUs, ``POST /predict`` against nginx (one worker) answering a
         fixed body;
       - streaming req/s: ``protocol: sse``, 400 VUs, against ``fixed_delay_server.py`` (first token
         after 20 ms, 16 tokens per stream).
       The rate is the mean of the merged per-second series over the whole seconds after the warmup.
       Nothing is pinned: with N client processes and a target on a machine of C cores they share the
       cores, so on 2 cores the second process competes with the target (and the rest of the machine)
       and cannot double the rate; on more cores than processes + target it should come close to N×.
    2. Peak memory (RSS, the client process's ``ru_maxrss`` from ``wait4``) of a 100k-request and a
       1M-request run (``shared-iterations``, 64 VUs, HTTP against nginx): the recorder keeps histograms,
       not samples, so both should be about the same.

Every run is bounded (``timeout``); targets and clients are stopped by PID; traffic is on 127.0.0.1.

Usage
    .venv/bin/python benchmarks/scaling.py [--duration 8] [--ray] [--skip-rss] [--rss-requests 100000,1000000]

Needs Linux and nginx (``apt-get install nginx``). Prints a table of figures; exit code 0, or 2 when it
could not run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from client_ceilings import NGINX_CONFIG
from predict_throughput import HOST, BenchmarkError, free_port, stop, wait_ready

BENCH_DIR = Path(__file__).resolve().parent
WARMUP_S = 2
DELAY_MS = 20.0
TOKENS = 16
HTTP_VUS = 64
STREAM_VUS = 400
RUN_GRACE_S = 90.0  # beyond the run's own duration (Ray starts a cluster first)


@contextlib.contextmanager
def target(name: str, argv: list[str], port: int, workdir: Path) -> Iterator[int]:
    """Start ``argv`` (not pinned: clients and target share the machine), yield its port once ready, stop it."""
    log = workdir / f"{name}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_ready(proc, port, log)
        yield port
    finally:
        stop(proc)


def nginx(workdir: Path) -> contextlib.AbstractContextManager[int]:
    port = free_port()
    home = workdir / "nginx"
    home.mkdir(exist_ok=True)
    config = home / "nginx.conf"
    config.write_text(NGINX_CONFIG.format(dir=home, host=HOST, port=port), encoding="utf-8")
    return target("nginx", ["nginx", "-p", str(home), "-c", str(config), "-e", str(home / "error.log")], port, workdir)


def fixed_delay(workdir: Path) -> contextlib.AbstractContextManager[int]:
    port = free_port()
    argv = [sys.executable, str(BENCH_DIR / "fixed_delay_server.py"), "--host", HOST, "--port", str(port),
            "--delay-ms", f"{DELAY_MS:g}", "--tokens", str(TOKENS)]  # fmt: skip
    return target("fixed-delay", argv, port, workdir)


def closed_loop(port: int, protocol: str, vus: int, duration_s: int) -> str:
    request = "{method: POST, path: /predict}" if protocol == "http" else f"{{max_tokens: {TOKENS}}}"
    return f"""\
target: http://{HOST}:{port}
scenarios:
  load:
    executor: constant-vus
    vus: {vus}
    duration: {duration_s}s
    warmup: {WARMUP_S}s
    timeout: 10s
    protocol: {protocol}
    request: {request}
"""


def iterations(port: int, count: int) -> str:
    return f"""\
target: http://{HOST}:{port}
scenarios:
  many:
    executor: shared-iterations
    vus: {HTTP_VUS}
    iterations: {count}
    max_duration: 10m
    protocol: http
    request: {{method: POST, path: /predict}}
"""


@dataclass(frozen=True)
class Run:
    result: dict[str, Any]
    wall_s: float
    max_rss_mb: float


def run_client(scenario: str, workdir: Path, name: str, extra: list[str], limit_s: float) -> Run:
    """``infer-bench run`` as users run it, quiet; its result, wall time and peak RSS (that process's own)."""
    path, out, log = workdir / f"{name}.yaml", workdir / f"{name}.json", workdir / f"{name}.log"
    path.write_text(scenario, encoding="utf-8")
    argv = [sys.executable, "-m", "infer_bench.cli", "run", str(path), "-q", "-o", str(out), *extra]
    started = time.monotonic()
    with log.open("wb") as sink:
        proc = subprocess.Popen(argv, stdout=sink, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONHASHSEED": "0"})
    deadline = started + limit_s
    while True:  # bounded: reaped, or killed at the deadline
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.monotonic() > deadline:
            proc.kill()
            pid, status, usage = os.wait4(proc.pid, 0)
            raise BenchmarkError(f"{name}: no result within {limit_s:g} s")
        time.sleep(0.05)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode not in (0, 1) or not out.exists():
        raise BenchmarkError(f"{name}: exit {proc.returncode}\n{log.read_text(errors='replace')[-1500:]}")
    return Run(json.loads(out.read_text()), time.monotonic() - started, usage.ru_maxrss / 1024)


def steady_rate(result: dict[str, Any]) -> float:
    """Successes per second over the whole seconds after the warmup (the last, partial second left out)."""
    seconds = [s for s in result["series"] if WARMUP_S <= s["t"] < result["duration_s"] - 1]
    return sum(s["succeeded"] for s in seconds) / len(seconds) if seconds else 0.0


def client_cpu(result: dict[str, Any]) -> float:
    """The client processes' CPU added (cores): each one's mean over its seconds after the first."""
    client = result.get("client") or {}
    per = [shard["cpu_by_second"] for shard in client.get("shards", [])] or [client.get("cpu_by_second", [])]
    return sum(sum(c[1:]) / len(c[1:]) for c in per if len(c) > 1)


def throughput(args: argparse.Namespace, workdir: Path) -> list[tuple[str, str, float, float, float]]:
    rows: list[tuple[str, str, float, float, float]] = []
    layouts: list[tuple[str, list[str]]] = [("1 process", []), ("2 processes", ["--processes", "2"])]
    if args.ray:
        layouts.append(("2 Ray actors", ["--ray", "local", "--processes", "2"]))
    cases = [("HTTP req/s (nginx)", nginx, "http", HTTP_VUS), ("SSE streams/s (fixed delay)", fixed_delay, "sse",
                                                                  STREAM_VUS)]  # fmt: skip
    for label, start, protocol, vus in cases:
        with start(workdir) as port:
            base = 0.0
            for layout, extra in layouts:
                name = f"{protocol}-{layout.replace(' ', '-')}"
                run = run_client(closed_loop(port, protocol, vus, args.duration), workdir, name, extra,
                                 args.duration + RUN_GRACE_S)  # fmt: skip
                rate = steady_rate(run.result)
                base = base or rate
                rows.append((label, layout, rate, rate / base if base else 0.0, client_cpu(run.result)))
                print(f"  {label:28} {layout:14} {rate:10,.0f}/s  ×{rows[-1][3]:.2f}  client CPU {rows[-1][4]:.2f}",
                      flush=True)  # fmt: skip
    return rows


def memory(args: argparse.Namespace, workdir: Path) -> list[tuple[int, float, float, float]]:
    rows: list[tuple[int, float, float, float]] = []
    with nginx(workdir) as port:
        for count in args.rss_requests:
            run = run_client(iterations(port, count), workdir, f"rss-{count}", [], 600 + RUN_GRACE_S)
            requests = run.result["headline"]["requests"]
            rows.append((requests, run.max_rss_mb, run.wall_s, requests / max(run.result["duration_s"], 1e-9)))
            print(f"  {requests:>10,} requests  peak RSS {run.max_rss_mb:7.1f} MB  {run.wall_s:6.1f} s  "
                  f"{rows[-1][3]:,.0f} req/s", flush=True)  # fmt: skip
    return rows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=8, help="seconds of load per throughput run (default 8)")
    parser.add_argument("--ray", action="store_true", help="also 2 Ray actors on a local Ray (needs infer-bench[ray])")
    parser.add_argument("--skip-rss", action="store_true", help="leave out the memory part")
    parser.add_argument("--skip-throughput", action="store_true", help="leave out the throughput part")
    parser.add_argument(
        "--rss-requests", type=lambda text: [int(v) for v in text.split(",")], default=[100_000, 1_000_000],
        help="request counts of the memory runs (default 100000,1000000)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.duration < WARMUP_S + 3:
        parser.error(f"--duration must be at least {WARMUP_S + 3}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if shutil.which("nginx") is None:
        print("error: nginx is not on PATH (apt-get install nginx)", file=sys.stderr)
        return 2
    print(f"machine: {os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.2f} (the target shares the cores)")
    try:
        with tempfile.TemporaryDirectory(prefix="scaling-") as tmp:
            workdir = Path(tmp)
            if not args.skip_throughput:
                print("throughput (closed loops; rate over the seconds after the warmup):", flush=True)
                throughput(args, workdir)
            if not args.skip_rss:
                print("memory (shared-iterations, 64 VUs, HTTP against nginx; one process):", flush=True)
                memory(args, workdir)
    except (BenchmarkError, OSError, subprocess.TimeoutExpired) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
