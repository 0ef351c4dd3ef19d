"""Live progress while a run goes: stage, time, rate, in flight, recent TTFT, errors and client CPU.

Reads only cheap state (counters and the last seconds of the series); never a histogram percentile per
refresh (~0.4 ms each here). Warns visibly when the client is above 70 % CPU or its schedule runs late,
because then its own measurements are no longer trustworthy.
"""

from __future__ import annotations

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


def _recent(recorder: Recorder) -> dict[str, Any]:
    """Totals over the last complete seconds of the series."""
    done = recorder.series[:-1][-WINDOW_S:]
    seconds = max(len(done), 1)
    ttft = sorted(v for s in done for v in s.ttft_us)
    return {
        "rate": sum(s.succeeded + s.failed for s in done) / seconds,
        "failed": sum(s.failed for s in done),
        "dropped": sum(s.dropped for s in done),
        "tokens": sum(s.tokens for s in done) / seconds,
        "p50": ttft[len(ttft) // 2] / 1000 if ttft else None,
        "p99": ttft[min(len(ttft) - 1, int(len(ttft) * 0.99))] / 1000 if ttft else None,
    }


def _ms(value: float | None) -> str:
    return "–" if value is None else f"{value:,.1f} ms"


def render(swarm: Swarm, recorder: Recorder, state: RunState) -> Group:
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
    recent = _recent(recorder)
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
            self._live.update(render(swarm, recorder, state), refresh=True)
            return
        now = time.monotonic()
        if now - self._last_line >= 5:
            self._last_line = now
            recent = _recent(recorder)
            elapsed = (time.perf_counter_ns() - state.start_ns) / NS
            self.console.print(
                f"[{elapsed:6.1f} s] rate {recent['rate']:,.1f}/s · TTFT p50 {_ms(recent['p50'])} "
                f"p99 {_ms(recent['p99'])} · failed {recent['failed']} · dropped {recent['dropped']}",
                highlight=False,
            )
