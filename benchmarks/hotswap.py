"""Zero-downtime hot-swaps of the reference server's generation model, under streaming load.

What it does
    Starts ``infer-bench serve`` (a subprocess on 127.0.0.1, admin API on with a random token) and
    drives it with ``--clients`` threads, each streaming ``POST /v1/stream`` requests of ``--tokens``
    tokens back to back, plus one thread of ``POST /predict``. Every ``--swap-every`` seconds it loads
    the next version of the ``tokens`` model through ``POST /admin/models/tokens/load`` (the server loads
    and warms it in the background, then swaps) and waits until it serves. It stops after ``--duration``.

How to read the output
    swaps            versions loaded and swapped in, of those asked for
    requests         streams and predictions answered in all
    failed           any non-200, stream without its ``done``, missing or repeated token, or a stream
                     whose ``done`` names another version than its ``X-Model-Version`` header: must be 0
    by version       streams answered by each version: every version swapped in must show up
    worst stream     the longest stream (seconds), against the median: a swap should not stall anyone

    The exit code is 0 when nothing failed and every version was observed, 1 otherwise.

Usage
    .venv/bin/python benchmarks/hotswap.py [--duration 20] [--swap-every 2] [--clients 8] [--tokens 32]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import yaml

BIN_DIR = Path(sys.executable).parent
MODEL = {"kind": "tokens", "base_ms": 5, "per_seq_ms": 0.1}


@dataclass
class Tally:
    lock: threading.Lock = field(default_factory=threading.Lock)
    requests: int = 0
    failures: list[str] = field(default_factory=list)
    by_version: collections.Counter[str] = field(default_factory=collections.Counter)
    stream_s: list[float] = field(default_factory=list)

    def ok(self, version: str | None = None, seconds: float | None = None) -> None:
        with self.lock:
            self.requests += 1
            if version is not None:
                self.by_version[version] += 1
            if seconds is not None:
                self.stream_s.append(seconds)

    def fail(self, why: str) -> None:
        with self.lock:
            self.requests += 1
            self.failures.append(why)


def check_stream(response: httpx.Response, tokens: int) -> str | None:
    """Why a stream is wrong, or None: every token in order, one ``done``, on the announced version."""
    events: list[tuple[str, str]] = []
    event, data = "", ""
    for line in response.iter_lines():
        if line.startswith("event: "):
            event = line[7:]
        elif line.startswith("data: "):
            data = line[6:]
        elif not line and event:
            events.append((event, data))
            event, data = "", ""
    seqs = [json.loads(d)["seq"] for e, d in events if e == "token"]
    if seqs != list(range(tokens)):
        return f"tokens {seqs[:3]}...{seqs[-3:]} of {len(seqs)}"
    if not events or events[-1][0] != "done":
        return f"ended with {events[-1] if events else 'nothing'}"
    if json.loads(events[-1][1])["model_version"] != response.headers.get("x-model-version"):
        return "done names another version than X-Model-Version"
    return None


def stream_client(url: str, tokens: int, stop: threading.Event, tally: Tally) -> None:
    with httpx.Client(timeout=httpx.Timeout(30.0), trust_env=False) as http:
        while not stop.is_set():
            started = time.perf_counter()
            try:
                with http.stream("POST", url + "/v1/stream", json={"prompt": "hot swap", "max_tokens": tokens}) as r:
                    if r.status_code != 200:
                        tally.fail(f"status {r.status_code}")
                        continue
                    why = check_stream(r, tokens)
            except httpx.HTTPError as exc:
                tally.fail(f"{type(exc).__name__}: {exc}")
                continue
            if why is None:
                tally.ok(r.headers["x-model-version"], time.perf_counter() - started)
            else:
                tally.fail(why)


def predict_client(url: str, stop: threading.Event, tally: Tally) -> None:
    with httpx.Client(timeout=httpx.Timeout(30.0), trust_env=False) as http:
        while not stop.is_set():
            try:
                r = http.post(url + "/predict", json={"input": [1.0, 2.0]})
            except httpx.HTTPError as exc:
                tally.fail(f"predict {type(exc).__name__}")
                continue
            if r.status_code == 200 and r.json()["output"] == [1.0, 2.0]:
                tally.ok()
            else:
                tally.fail(f"predict {r.status_code}")


def start_server(workdir: Path, token: str) -> tuple[subprocess.Popen[str], str]:
    config = workdir / "server.yaml"
    config.write_text(yaml.safe_dump({"port": 0, "models": [{"kind": "echo"}, {**MODEL, "version": "1"}]}))
    env = {**os.environ, "INFERBENCH_ADMIN_TOKEN": token}
    log = (workdir / "server.log").open("w")
    cmd = [str(BIN_DIR / "infer-bench"), "serve", "--config", str(config)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=env)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if " on " not in line:
        proc.kill()
        raise SystemExit(f"the server did not start: {line!r}; see {workdir / 'server.log'}")
    return proc, line.split(" on ", 1)[1].strip()


def swap(http: httpx.Client, url: str, token: str, version: str, timeout_s: float) -> bool:
    auth = {"Authorization": f"Bearer {token}"}
    r = http.post(url + "/admin/models/tokens/load", json={**MODEL, "version": version, "load_ms": 200}, headers=auth)
    if r.status_code != 202:
        return False
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        models = http.get(url + "/admin/models", headers=auth).json()["models"]
        if next(m for m in models if m["name"] == "tokens")["serving"] == version:
            return True
        time.sleep(0.02)
    return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of load (default 20)")
    parser.add_argument("--swap-every", type=float, default=2.0, help="seconds between swaps (default 2)")
    parser.add_argument("--clients", type=int, default=8, help="streaming client threads (default 8)")
    parser.add_argument("--tokens", type=int, default=32, help="tokens per stream (default 32)")
    args = parser.parse_args(argv)

    token = secrets.token_urlsafe(16)
    tally, stop = Tally(), threading.Event()
    with tempfile.TemporaryDirectory(prefix="hotswap-") as tmp:
        proc, url = start_server(Path(tmp), token)
        try:
            threads = [
                threading.Thread(target=stream_client, args=(url, args.tokens, stop, tally))
                for _ in range(args.clients)
            ]
            threads.append(threading.Thread(target=predict_client, args=(url, stop, tally)))
            for t in threads:
                t.start()
            asked = swapped = 0
            ends_at = time.monotonic() + args.duration
            with httpx.Client(timeout=httpx.Timeout(30.0), trust_env=False) as http:
                while time.monotonic() + args.swap_every < ends_at:
                    time.sleep(args.swap_every)
                    asked += 1
                    swapped += swap(http, url, token, str(asked + 1), timeout_s=10.0)
                time.sleep(max(0.0, ends_at - time.monotonic()))
            stop.set()
            for t in threads:
                t.join(30.0)
        finally:
            proc.terminate()
            proc.wait(30.0)

    versions = {str(v) for v in range(1, swapped + 2)}
    seen = set(tally.by_version)
    durations = sorted(tally.stream_s)
    print(f"hot-swap benchmark: {args.duration:g} s, {args.clients} streaming clients + 1 predict client, "
          f"{args.tokens} tokens per stream, a swap every {args.swap_every:g} s")  # fmt: skip
    print(f"swaps        {swapped} of {asked}")
    print(f"requests     {tally.requests}")
    print(f"failed       {len(tally.failures)}")
    for why, n in collections.Counter(tally.failures).most_common(5):
        print(f"  {n} x {why}")
    print("by version   " + "  ".join(f"v{v}: {tally.by_version[v]}" for v in sorted(tally.by_version, key=int)))
    if durations:
        print(f"streams      median {statistics.median(durations):.3f} s, worst {durations[-1]:.3f} s")
    ok = not tally.failures and swapped == asked and versions <= seen
    print("result       " + ("PASS: no failed request, every version observed" if ok else "FAIL"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
