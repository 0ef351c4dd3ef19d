"""Live progress while a run goes: stage, time, rate, in flight, recent TTFT, errors and client CPU.

Reads only cheap state (counters and the last seconds of the series); never a histogram percentile per
refresh (~0.4 ms each here). Warns visibly when the client is above 70 % CPU or its schedule runs late,
because then its own measurements are no longer trustworthy.
"""

from __future__ import annotations

import bisect
import time
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from infer_bench.metrics.recorder import Recorder
from infer_bench.runner import CPU_WARNING, LAG_WARNING_MS, RunState
from infer_bench.swarm import NS, Swarm

WINDOW_S = 5


class RecentWindow:
    """Totals over the last complete seconds, recomputed only when another second completes.

    The view refreshes on the event loop that times every token, so it must stay cheap: each second's TTFT
    list is sorted once, when the second completes, and the window's percentiles come from a binary search
    over those sorted lists (~50 µs) rather than from sorting 5 s of samples again (~2.5 ms at 4,000/s).
    """

    def __init__(self) -> None:
        self._sorted: dict[int, list[int]] = {}
        self._complete = -1
        self._figures: dict[str, Any] = {}

    def __call__(self, recorder: Recorder) -> dict[str, Any]:
        complete = len(recorder.series) - 1
        if complete != self._complete:
            self._complete = complete
            self._figures = self._compute(recorder.series[:-1][-WINDOW_S:])
        return self._figures

    def _compute(self, done: list[Any]) -> dict[str, Any]:
        seconds = max(len(done), 1)
        lists = []
        for sec in done:
            if sec.t not in self._sorted:
                self._sorted[sec.t] = sorted(sec.ttft_us)
            lists.append(self._sorted[sec.t])
        for t in [t for t in self._sorted if done and t < done[0].t]:
            del self._sorted[t]
        return {
            "rate": sum(s.succeeded + s.failed for s in done) / seconds,
            "failed": sum(s.failed for s in done),
            "dropped": sum(s.dropped for s in done),
            "tokens": sum(s.tokens for s in done) / seconds,
            "p50": _percentile_ms(lists, 0.50),
            "p99": _percentile_ms(lists, 0.99),
        }


def _percentile_ms(lists: list[list[int]], q: float) -> float | None:
    """The value at rank ``int(q * n)`` of the sorted lists taken together (µs in, ms out)."""
    total = sum(map(len, lists))
    if not total:
        return None
    rank = min(total - 1, int(total * q)) + 1  # how many values must be <= the answer
    low = min(values[0] for values in lists if values)
    high = max(values[-1] for values in lists if values)
    while low < high:
        middle = (low + high) // 2
        if sum(bisect.bisect_right(values, middle) for values in lists) >= rank:
            high = middle
        else:
            low = middle + 1
    return low / 1000


def _ms(value: float | None) -> str:
    return "–" if value is None else f"{value:,.1f} ms"


def render(swarm: Swarm, recorder: Recorder, state: RunState, recent: dict[str, Any]) -> Group:
    now = time.perf_counter_ns()
    table = Table(box=None, header_style="bold", pad_edge=False)
    for col in ("scenario", "executor", "stage", "elapsed", "left", "VUs", "in flight", "interrupted"):
        table.add_column(col, justify="left" if col in ("scenario", "executor") else "right")
    for p in swarm.progress.values():
        elapsed = (now - p.started_ns) / NS if p.started_ns else 0.0
        left = max(0.0, (p.ends_ns - now) / NS) if p.started_ns and not p.done else 0.0
        status = "done" if p.done else f"{left:,.0f} s"
        table.add_row(
            p.name, p.executor, p.stage or "–", f"{elapsed:,.0f} s", status, str(p.vus), str(p.in_flight),
            str(p.interrupted),
        )  # fmt: skip
    cpu = state.cpu_by_second[-1] if state.cpu_by_second else 0.0
    line = Text.assemble(
        ("rate ", "dim"), f"{recent['rate']:,.1f}/s", ("  tokens ", "dim"), f"{recent['tokens']:,.0f}/s",
        ("  TTFT p50 ", "dim"), _ms(recent["p50"]), ("  p99 ", "dim"), _ms(recent["p99"]),
        ("  failed ", "dim"), (str(recent["failed"]), "bold red" if recent["failed"] else ""),
        ("  dropped ", "dim"), (str(recent["dropped"]), "bold red" if recent["dropped"] else ""),
        ("  client CPU ", "dim"), (f"{cpu:.0%}", "bold red" if cpu > CPU_WARNING else ""),
        (f"   (last {WINDOW_S} s)", "dim"),
    )  # fmt: skip
    parts: list[Any] = [table, line]
    if cpu > CPU_WARNING:
        warning = f"⚠ client above {CPU_WARNING:.0%} CPU: its latency figures now include its own queueing"
        parts.append(Text(warning, style="bold yellow"))
    lag_ms = max((sec.lag_max_us for sec in recorder.series[:-1][-WINDOW_S:]), default=0) / 1000
    if lag_ms > LAG_WARNING_MS:
        parts.append(Text(f"⚠ the client's schedule runs late (up to {lag_ms:,.1f} ms): it cannot keep this rate",
                          style="bold yellow"))  # fmt: skip
    if recent["dropped"]:
        parts.append(Text("⚠ arrivals dropped: max_vus reached, the schedule cannot be kept", style="bold yellow"))
    return Group(*parts)


class LiveView:
    """A rich Live display on a terminal; a plain progress line every 5 s elsewhere (CI logs)."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self._live: Live | None = None
        self._last_line = 0.0
        self._recent = RecentWindow()

    def __enter__(self) -> LiveView:
        if self.console.is_terminal:
            self._live = Live(console=self.console, auto_refresh=False, transient=True)
            self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.__exit__(None, None, None)

    def __call__(self, swarm: Swarm, recorder: Recorder, state: RunState) -> None:
        if self._live is not None:
            self._live.update(render(swarm, recorder, state, self._recent(recorder)), refresh=True)
            return
        now = time.monotonic()
        if now - self._last_line >= 5:
            self._last_line = now
            recent = self._recent(recorder)
            elapsed = (time.perf_counter_ns() - state.start_ns) / NS
            self.console.print(
                f"[{elapsed:6.1f} s] rate {recent['rate']:,.1f}/s · TTFT p50 {_ms(recent['p50'])} "
                f"p99 {_ms(recent['p99'])} · failed {recent['failed']} · dropped {recent['dropped']}",
                highlight=False,
            )
