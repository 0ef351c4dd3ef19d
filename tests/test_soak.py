"""Soak: 2,000 SSE and WebSocket clients on one server, a tenth of them abusive; nobody else pays for them.

One ``infer-bench serve`` process (tests/soak/server.yaml) is driven by ``infer-bench run``, as users
run both: first ``baseline.yaml`` (1,800 well-behaved clients, 900 over SSE and 900 over WebSocket, each
streaming 24 tokens and thinking 4-8 s), then ``soak.yaml``: the same 1,800 plus 20 slow readers that ask
a fast model for 50,000 tokens and read one every 2 s, and 180 cancellers that leave after 4 of 256
tokens and are back 1-2 s later. Each run ramps up for 4 s and holds for 12 s; the first 7 s (the ramp and
the turbulence after it) are left out of its statistics.

What must hold (the factors are the claim; docs/reliability.md keeps the latest figures):
- the well-behaved clients of the soak complete every request, and their inter-token p99 (and the
  WebSocket clients' TTFT p99) stay within ``P99_FACTOR`` of the baseline's (with a floor,
  ``P99_FLOOR_MS``, so that a quiet baseline's few milliseconds do not turn scheduling noise into a
  failure); the SSE clients' TTFT p99, whose tail is new connections, stays under ``SSE_TTFT_BOUND_MS``;
- the abusers were real: the 20 slow readers were still stuck, unread, when the run ended (the server
  drops such a stream once its buffer overflows — tests/test_slow_consumer.py — which under this load
  takes longer than the run; the drops and 80 % warnings it got to are reported), and the server
  counted the cancellations;
- the server's memory stays bounded: its peak RSS during the soak is within ``RSS_FACTOR`` of its peak
  during the baseline, and it stops growing (its last third rises by at most ``RSS_TAIL_GROWTH_MB``).

The two runs take about 40 s. ``pytest -s tests/test_soak.py`` prints the figures.
"""

from __future__ import annotations

import re
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
import pytest

from infer_bench.result import load_result
from infer_bench.scenario.loader import load_scenario
from test_cli import CLI, ENV, serving

pytestmark = pytest.mark.slow

SOAK = Path(__file__).parent / "soak"
WELL_BEHAVED = ("sse", "ws")
P99_FACTOR = 5.0
P99_FLOOR_MS = 500.0
# SSE's TTFT tail under abuse is new connections (keep-alive reconnects, and the SSE cancellers close theirs
# at every cancel): 84-572 ms at p99 over sixteen runs, 1.1-6.3x its baseline. Bounded absolutely: a stall
# behind the abusers costs seconds.
SSE_TTFT_BOUND_MS = 2000.0
RSS_FACTOR = 1.5
RSS_TAIL_GROWTH_MB = 16.0
RUN_TIMEOUT_S = 120.0


@dataclass
class ProcessSampler:
    """Samples a process's resident set size (MB) and open file descriptors four times a second while
    the ``with`` block runs (its descriptors are its sockets, less a few dozen files)."""

    pid: int
    rss_mb: list[float] = field(default_factory=list)
    fds: list[int] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> ProcessSampler:
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _sample(self) -> None:
        proc = Path(f"/proc/{self.pid}")
        while not self._stop.wait(0.25):
            match = re.search(r"^VmRSS:\s+(\d+) kB", (proc / "status").read_text(), re.MULTILINE)
            if match:
                self.rss_mb.append(int(match.group(1)) / 1024)
            self.fds.append(sum(1 for _ in (proc / "fd").iterdir()))

    @property
    def peak_rss(self) -> float:
        return max(self.rss_mb)

    def tail_growth(self) -> float:
        """How much the RSS rose over the last third of the samples."""
        tail = self.rss_mb[len(self.rss_mb) * 2 // 3 :]
        return max(tail) - tail[0]


def _run(scenario: Path, url: str, out: Path) -> dict[str, Any]:
    proc = subprocess.run(
        [*CLI, "run", str(scenario), "--quiet", "-e", f"TARGET={url}", "--out", str(out)],
        capture_output=True, text=True, env=ENV, timeout=RUN_TIMEOUT_S, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result: dict[str, Any] = load_result(out)
    return result


def _class_stats(result: dict[str, Any], name: str) -> dict[str, Any]:
    (group,) = [g for g in result["groups"] if g["tags"].get("class") == name]
    return group


def _p99(group: dict[str, Any], metric: str) -> float:
    return float(group["summary"][metric]["p99"])


def _counter(metrics_text: str, name: str, **labels: str) -> float:
    """The sum of a Prometheus counter over the series that carry ``labels``."""
    total = 0.0
    for line in metrics_text.splitlines():
        if not line.startswith(name + "{"):
            continue
        if all(f'{key}="{value}"' in line for key, value in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_the_baseline_is_the_soak_without_its_abusers() -> None:
    env = {"TARGET": "http://127.0.0.1:1"}
    baseline = load_scenario(SOAK / "baseline.yaml", env).scenarios["soak"]
    soak = load_scenario(SOAK / "soak.yaml", env).scenarios["soak"]
    assert tuple(c for c in soak.classes if c.name in WELL_BEHAVED) == baseline.classes
    for spec in (baseline, soak):  # 900 VUs of each well-behaved class at the peak, in both runs
        peak = spec.executor.stages[-1].target  # type: ignore[union-attr]
        assert peak * 90 / sum(c.weight for c in spec.classes) == 900


def test_abusive_clients_cost_the_well_behaved_little_and_the_server_bounded_memory(tmp_path: Path) -> None:
    with serving("--config", str(SOAK / "server.yaml")) as served:
        with ProcessSampler(served.proc.pid) as baseline_proc:
            baseline = _run(SOAK / "baseline.yaml", served.url, tmp_path / "baseline.json")
        with ProcessSampler(served.proc.pid) as soak_proc:
            soak = _run(SOAK / "soak.yaml", served.url, tmp_path / "soak.json")
        with httpx.Client(timeout=10, trust_env=False) as http:
            metrics = http.get(served.url + "/metrics").text

    figures: list[str] = []
    checks: list[tuple[bool, str]] = []
    for name in WELL_BEHAVED:
        before, during = _class_stats(baseline, name), _class_stats(soak, name)
        for run, group in (("baseline", before), ("soak", during)):
            outcomes = group["outcomes"]
            checks.append((outcomes == {"truncated": group["requests"]}, f"{run} {name} outcomes: {outcomes}"))
        for metric in ("ttft", "itl"):
            calm, abused = _p99(before, metric), _p99(during, metric)
            figures.append(f"{name} {metric} p99: baseline {calm:.1f} ms, soak {abused:.1f} ms ({abused / calm:.2f}x)")
            bound = SSE_TTFT_BOUND_MS if (name, metric) == ("sse", "ttft") else max(P99_FACTOR * calm, P99_FLOOR_MS)
            checks.append((abused <= bound, figures[-1]))

    slow_drops = _counter(metrics, "inferbench_slow_consumer_drops_total")
    slow_warned = _counter(metrics, "inferbench_slow_consumer_warnings_total")
    cancels = _counter(metrics, "inferbench_stream_aborts_total", cause="cancel") + _counter(
        metrics, "inferbench_stream_aborts_total", cause="disconnect"
    )
    figures.append(
        f"server: {slow_warned:.0f} slow readers warned, {slow_drops:.0f} dropped; {cancels:.0f} streams cancelled"
    )
    stuck = int(soak["headline"]["interrupted"])
    figures.append(f"client: {stuck} requests still in flight when the soak ended (the slow readers: 20)")
    checks.append((stuck >= 20, "the slow readers did not stay stuck: no abuse"))
    checks.append((cancels >= 1000, "the cancellers did not cancel"))
    figures.append(
        f"server: peak {max(baseline_proc.fds)} / {max(soak_proc.fds)} open descriptors (baseline / soak); RSS peak "
        f"{baseline_proc.peak_rss:.0f} / {soak_proc.peak_rss:.0f} MB, soak last-third growth "
        f"{soak_proc.tail_growth():.1f} MB"
    )
    checks.append((max(soak_proc.fds) >= 1500, f"fewer clients connected at once than meant: {figures[-1]}"))
    checks.append((soak_proc.peak_rss <= RSS_FACTOR * baseline_proc.peak_rss, figures[-1]))
    checks.append((soak_proc.tail_growth() <= RSS_TAIL_GROWTH_MB, figures[-1]))
    print("\n".join(figures))
    failed = [what for ok, what in checks if not ok]
    assert not failed, "\n".join([*failed, "figures:", *figures])
