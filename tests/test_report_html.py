"""The HTML report: self-contained, deterministic, overlaying runs; and a real browser renders it cleanly."""

from __future__ import annotations

import random
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

import synthetic
from infer_bench.report.html import render_html, spectrum_points
from infer_bench.report.svg import nines

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def ramp_result(seed: int, scale: float) -> dict[str, Any]:
    result = synthetic.make_result(synthetic.noisy_run(random.Random(seed), scale, seconds=12, per_second=30))
    stages = [{"duration": 4.0, "target": 20}, {"duration": 8.0, "target": 40}]
    result["scenario"]["scenarios"] = {
        "ramp": {"executor": {"kind": "ramping-arrival-rate", "stages": stages}, "start_time": 0.0, "warmup": 1.0}
    }
    result["total"]["outcomes"] = {"completed": 300, "truncated": 50, "disconnected": 10}
    result["thresholds"] = [
        {"metric": "ttft", "expression": "p(95)<200ms", "ok": False, "value": 250.0, "unit": "ms", "aborted": False}
    ]
    return result


@pytest.fixture(scope="module")
def report() -> str:
    baseline, current = ramp_result(1, 1.0), ramp_result(2, 1.2)
    baseline["source_path"], current["source_path"] = "baseline.json", "current.json"
    return render_html([baseline, current])


def test_the_report_loads_nothing_from_anywhere(report: str) -> None:
    assert "<script" not in report
    assert not re.search(r"""(src|href)\s*=|@import|url\(""", report)
    assert "Content-Security-Policy" in report  # and a browser would log any attempt (checked below)


def test_the_report_overlays_runs_and_marks_stages(report: str) -> None:
    for section in ("Latency percentile spectrum", "Over time", "Outcomes", "Settings and environment"):
        assert section in report
    assert report.count("<svg") == 4  # spectra of TTFT (no ITL, no E2E here), TTFT and throughput over time, outcomes
    assert "<title>baseline</title>" in report
    assert "<title>current</title>" in report
    assert "warmup ends" in report
    assert "stage 2" in report
    assert "✗</td><td class='l'>ttft</td>" in report


def test_the_report_is_deterministic() -> None:
    assert render_html([ramp_result(1, 1.0)]) == render_html([ramp_result(1, 1.0)])


def test_the_spectrum_is_a_staircase_up_to_the_last_sample() -> None:
    result = ramp_result(3, 1.0)
    from infer_bench.measures import Measures

    hist = Measures.from_result(result).select().histograms["ttft"]
    points = spectrum_points(hist)
    assert points[0][0] == 0.0
    assert [p[0] for p in points] == sorted(p[0] for p in points)
    assert points[-1][0] == pytest.approx(nines(100 * (1 - 1 / hist.get_total_count())))
    assert points[-1][1] == hist.get_max_value() / 1000


def _chromium(*args: str) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM is not None
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)


def _console(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if ":CONSOLE" in line]


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (Debian: apt-get install -y chromium)")
def test_chromium_renders_the_report_without_console_errors(report: str, tmp_path: Path) -> None:
    # First prove the check can fail: a page that errors and breaks the policy is caught.
    probe = tmp_path / "probe.html"
    probe.write_text(
        "<html><head><meta http-equiv='Content-Security-Policy' content=\"default-src 'none'\"></head>"
        "<body><img src='https://example.invalid/x.png'></body></html>"
    )
    assert _console(_chromium("--dump-dom", probe.as_uri()).stderr)
    page = tmp_path / "report.html"
    page.write_text(report, encoding="utf-8")
    shot = tmp_path / "report.png"
    done = _chromium("--hide-scrollbars", "--window-size=1400,2400", f"--screenshot={shot}", page.as_uri())
    assert _console(done.stderr) == []
    assert shot.stat().st_size > 50_000  # a blank page is a few kB; plots make it far larger
    dom = _chromium("--dump-dom", page.as_uri())
    assert _console(dom.stderr) == []
    assert dom.stdout.count("<svg") == report.count("<svg")
