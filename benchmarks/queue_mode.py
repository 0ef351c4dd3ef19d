"""Queue mode against direct streaming on loopback: jobs a second, and latency added per token.

What it does
    Starts the reference server three times as subprocesses on 127.0.0.1 with the same model settings:
    direct (``infer-bench serve --direct``), the in-process queue (``serve --queue memory://``, the
    default: the queue code path with no Redis), and queue mode (``infer-bench serve --queue`` plus ``--workers``
    ``infer-bench worker`` processes on Redis at ``--redis``, under a key prefix of its own, deleted at
    the end). Against each it runs, with a small asyncio SSE client (raw HTTP/1.1, stamps at receipt):

    latency     one stream at a time, ``--tokens`` tokens, for ``--seconds``: TTFT and mean inter-token gap
    throughput  ``--clients`` closed-loop clients, 16 tokens a stream, for ``--seconds``: streams a second

    twice: on the default cost model (5 ms + 0.1 ms/sequence a step) and on a zero-cost model, where
    only the serving path costs anything (the queue path's overhead, bare).

How to read the output
    ttft / itl      medians over the streams of the latency phase, milliseconds
    added/token     queue ITL minus direct ITL: what the queue path (and the trip through Redis) adds to
                    each token
    jobs/s          completed streams a second in the throughput phase (all must end with ``done``)

    step check  ``--step-check N``: only this. A worker step's write round trip (one chunk for each of N
                running jobs, on Redis) timed with and without reading their cancel marks in the same
                pipeline (one ``MGET``): what noticing a cancel costs each step, median of 2,000 steps.

    connections ``--connections N``: only this. A queue front end with no worker, N streams held open
                (their jobs wait), then the front end's TCP connections to Redis are counted
                (/proc, Linux): what N concurrent streams cost Redis in connections.

Usage
    .venv/bin/python benchmarks/queue_mode.py [--seconds 5] [--clients 32] [--tokens 64] [--workers 1]
                                              [--redis redis://127.0.0.1:6379/0] [--connections N]
                                              [--step-check N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import redis

MODELS = {
    "default cost": "{kind: tokens, name: tokens}",
    "zero cost": "{kind: tokens, name: tokens, base_ms: 0, per_seq_ms: 0, prefill_ms: 0, per_input_token_ms: 0}",
}


@dataclass
class Stream:
    ok: bool = False
    ttft_s: float | None = None
    gaps_s: list[float] = field(default_factory=list)


async def one_stream(host: str, port: int, max_tokens: int, prompt: str) -> Stream:
    """POST /v1/stream and read it to its end; token arrival stamped per read (coalesced tokens count as one)."""
    body = json.dumps({"prompt": prompt, "max_tokens": max_tokens}).encode()
    head = (
        f"POST /v1/stream HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    started = time.perf_counter()
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(head + body)
    out = Stream()
    last = None
    buffer = b""
    try:
        while True:
            data = await asyncio.wait_for(reader.read(65536), 30)
            if not data:
                break
            now = time.perf_counter()
            buffer += data
            tokens = data.count(b"event: token")
            if tokens:
                if last is None:
                    out.ttft_s = now - started
                else:
                    out.gaps_s.append((now - last) / tokens)
                last = now
            if b"event: done" in buffer:
                out.ok = True
                break
            if b"event: error" in buffer or buffer.startswith(b"HTTP/1.1 5"):
                break
    finally:
        writer.close()
    return out


async def latency(host: str, port: int, tokens: int, seconds: float) -> tuple[float, float, int]:
    ttfts, itls = [], []
    deadline = time.monotonic() + seconds
    n = 0
    while time.monotonic() < deadline:
        s = await one_stream(host, port, tokens, f"latency probe {n}")
        n += 1
        if s.ok and s.ttft_s is not None and s.gaps_s:
            ttfts.append(s.ttft_s)
            itls.append(statistics.fmean(s.gaps_s))
    if not ttfts:  # every stream came in one read (no gap to measure)
        return float("nan"), float("nan"), n
    return statistics.median(ttfts) * 1000, statistics.median(itls) * 1000, n


async def throughput(host: str, port: int, clients: int, seconds: float) -> tuple[float, int]:
    done = failed = 0
    deadline = time.monotonic() + seconds

    async def client(i: int) -> None:
        nonlocal done, failed
        k = 0
        while time.monotonic() < deadline:
            s = await one_stream(host, port, 16, f"client {i} request {k}")
            k += 1
            if s.ok:
                done += 1
            else:
                failed += 1

    started = time.monotonic()
    await asyncio.gather(*(client(i) for i in range(clients)))
    return done / (time.monotonic() - started), failed


@contextmanager
def processes(commands: list[list[str]]) -> Iterator[list[str]]:
    """Start each command; yield the first stdout line of each (the server's URL line); stop them all."""
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, text=True) for c in commands]
    try:
        lines = []
        for p in procs:
            assert p.stdout is not None
            lines.append(p.stdout.readline().strip())
        yield lines
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=20)
            if p.stdout is not None:
                p.stdout.close()


def redis_connections(pid: int, redis_port: int) -> int:
    """The process's established TCP connections to ``redis_port`` (Linux /proc; IPv4 loopback)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    count = 0
    for line in Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]:
        cols = line.split()
        remote_port = int(cols[2].split(":")[1], 16)
        if remote_port == redis_port and cols[3] == "01" and cols[9] in inodes:  # 01: ESTABLISHED
            count += 1
    return count


async def hold_streams(host: str, port: int, n: int, redis_port: int, pid: int) -> int:
    """Open ``n`` streams whose jobs wait (no worker), count the front end's Redis connections, hang up."""
    body = json.dumps({"prompt": "held", "max_tokens": 4}).encode()
    head = (
        f"POST /v1/stream HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    writers = []
    for _ in range(n):
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(head + body)
        assert b"retry:" in await asyncio.wait_for(reader.readuntil(b"retry:"), 10)
        writers.append(writer)
    await asyncio.sleep(2.0)  # every stream's reader has sent its XREAD at least twice
    count = redis_connections(pid, redis_port)
    for writer in writers:
        writer.close()
    return count


def measure_connections(args: argparse.Namespace, cli: list[str], prefix: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "server.yaml"
        config.write_text(f"queue_prefix: {prefix}\n")
        serve = [*cli, "serve", "--config", str(config), "--port", "0", "--queue", args.redis]
        proc = subprocess.Popen(serve, stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout is not None
            url = proc.stdout.readline().strip().rsplit(" ", 1)[1]
            host, port = url.removeprefix("http://").split(":")
            redis_port = int(args.redis.rsplit(":", 1)[1].split("/")[0])
            idle = redis_connections(proc.pid, redis_port)
            held = asyncio.run(hold_streams(host, int(port), args.connections, redis_port, proc.pid))
            print(f"front end's Redis connections: {idle} idle, {held} with {args.connections} open streams")
        finally:
            proc.terminate()
            proc.wait(timeout=20)
            if proc.stdout is not None:
                proc.stdout.close()


async def step_check(url: str, prefix: str, jobs: int, steps: int = 2000) -> tuple[float, float]:
    """Median seconds of a step's commit round trip without and with the cancel check (alternating)."""
    from reference_server.queue import Chunk, RedisStreams, StepWrites, connect

    streams = RedisStreams(connect(url), prefix)
    ids = [f"j{i}" for i in range(jobs)]
    await streams.cancel(ids[-1], "cancel", 60)  # one mark to find, as under a cancelling load
    plain: list[float] = []
    checked: list[float] = []
    try:
        for n in range(steps):
            for watch, into in (([], plain), (ids, checked)):
                step = StepWrites(chunks=[(i, Chunk(n, "token", "x")) for i in ids], watch=watch)
                started = time.perf_counter()
                await streams.commit_step(step)
                into.append(time.perf_counter() - started)
    finally:
        await streams.close()
    return statistics.median(plain), statistics.median(checked)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--connections", type=int, default=0, help="only count Redis connections for N streams")
    parser.add_argument("--step-check", type=int, default=0, help="only time a step's cancel check for N jobs")
    args = parser.parse_args()
    cli = [sys.executable, "-m", "infer_bench.cli"]
    prefix = f"inferbench-bench-{uuid.uuid4().hex[:8]}"
    try:
        if args.connections:
            measure_connections(args, cli, prefix)
            return
        if args.step_check:
            plain, checked = asyncio.run(step_check(args.redis, prefix, args.step_check))
            print(f"step commit, {args.step_check} jobs: {plain * 1e3:.3f} ms without the cancel check, "
                  f"{checked * 1e3:.3f} ms with it ({(checked - plain) * 1e3:+.3f} ms a step)")  # fmt: skip
            return
        with tempfile.TemporaryDirectory() as tmp:
            for label, model in MODELS.items():
                config = Path(tmp) / "server.yaml"
                config.write_text(f"queue_prefix: {prefix}\nmodels:\n  - {model}\n")
                serve = [*cli, "serve", "--config", str(config), "--port", "0"]
                results = {}
                for mode in ("direct", "memory", "queue"):
                    commands = [[*serve, "--direct"]]
                    if mode == "memory":
                        commands = [[*serve, "--queue", "memory://"]]
                    elif mode == "queue":
                        commands = [[*serve, "--queue", args.redis]] + [
                            [*cli, "worker", "--queue", args.redis, "--config", str(config)]
                            for _ in range(args.workers)
                        ]
                    with processes(commands) as lines:
                        url = lines[0].rsplit(" ", 1)[1]
                        host, port = url.removeprefix("http://").split(":")
                        ttft, itl, n = asyncio.run(latency(host, int(port), args.tokens, args.seconds))
                        rate, failed = asyncio.run(throughput(host, int(port), args.clients, args.seconds))
                    results[mode] = (ttft, itl, rate, failed, n)
                    print(f"{label:>12} {mode:>6}: ttft {ttft:7.2f} ms  itl {itl:6.3f} ms  ({n} streams)  "
                          f"{rate:8.1f} jobs/s  failed {failed}", flush=True)  # fmt: skip
                for mode in ("memory", "queue"):
                    added = results[mode][1] - results["direct"][1]
                    print(f"{label:>12} {mode:>6} added/token: {added:+.3f} ms; jobs/s {mode}/direct = "
                          f"{results[mode][2] / results['direct'][2]:.2f}", flush=True)  # fmt: skip
    finally:  # the keys go, whatever happened
        client = redis.Redis.from_url(args.redis)
        keys = list(client.scan_iter(match=f"{prefix}:*"))
        if keys:
            client.delete(*keys)
    print(f"({os.cpu_count()} cores; servers, workers, Redis and this client share them)")


if __name__ == "__main__":
    main()
