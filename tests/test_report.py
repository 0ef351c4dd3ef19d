"""``infer-bench report``: text, Markdown, JSON, JUnit and HDR logs from result files of a real run."""

from __future__ import annotations

import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
from hdrh.histogram import HdrHistogram

from infer_bench.report.formats import render_report
from infer_bench.result import load_result
from infer_bench.runner import run_scenario
from infer_bench.scenario import parse_scenario
from reference_server.serve import EmbeddedServer

pytestmark = pytest.mark.slow  # one real 3-second run on loopback, shared by the module


@pytest.fixture(scope="module")
def result_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("report") / "run.json"
    with EmbeddedServer() as server:
        scenario = parse_scenario(f"""
target: {server.url}
scenarios:
  chat:
    executor: constant-vus
    vus: 2
    duration: 3s
    request: {{max_tokens: 8}}
thresholds:
  ttft: ["p(95)<10s", "max<1us"]
  dropped: ["count<1"]
""")
        run_scenario(scenario, out=out)
    return out


@pytest.fixture
def result(result_file: Path) -> dict[str, Any]:
    return load_result(result_file)


def test_markdown_has_thresholds_figures_and_latencies(result: dict[str, Any]) -> None:
    text = render_report("markdown", [result])
    assert text.startswith("## infer-bench · run\n")
    assert "**Thresholds: 2 passed, 1 failed**" in text
    assert "| ❌ | `ttft` | `max<1us` |" in text
    assert "| time to first token |" in text
    assert "| requests | succeeded | req/s |" in text


def test_junit_has_one_test_case_per_threshold(result: dict[str, Any]) -> None:
    root = ET.fromstring(render_report("junit", [result]))
    (suite,) = root
    cases = suite.findall("testcase")
    assert [c.get("name") for c in cases] == ["run completed", "ttft p(95)<10s", "ttft max<1us", "dropped count<1"]
    assert [c.find("failure") is not None for c in cases] == [False, False, True, False]
    assert (root.get("tests"), root.get("failures")) == ("4", "1")


def test_json_report_is_the_summary_without_histograms(result: dict[str, Any]) -> None:
    data = json.loads(render_report("json", [result]))
    assert data["status"] == "complete"
    assert data["summary"]["ttft"]["count"] == result["headline"]["succeeded"]
    assert [t["ok"] for t in data["thresholds"]] == [True, False, True]
    assert "histograms" not in json.dumps(data)
    several = json.loads(render_report("json", [result, result]))
    assert isinstance(several, list)
    assert len(several) == 2


def test_text_report_is_the_run_summary(result: dict[str, Any]) -> None:
    text = render_report("text", [result])
    assert text.startswith("thresholds: 2 passed, 1 failed\n")
    assert "time to first token" in text


def test_hlog_lines_decode_to_the_runs_histograms(result: dict[str, Any]) -> None:
    lines = render_report("hlog", [result]).splitlines()
    assert lines[0] == "#[Histogram log format version 1.3]"
    assert lines[4] == '"StartTimestamp","Interval_Length","Interval_Max","Interval_Compressed_Histogram"'
    total = HdrHistogram(1, 3_600_000_000, 3)
    starts = []
    for line in lines[5:]:
        tag, start, length, interval_max, payload = line.split(",")
        assert float(length) > 0
        if tag == "Tag=ttft":
            hist = HdrHistogram.decode(payload)
            assert float(interval_max) == pytest.approx(hist.get_max_value() / 1000, abs=0.001)
            total.add(hist)
            starts.append(float(start))
    assert starts == sorted(starts)
    assert total.get_total_count() == result["total"]["summary"]["ttft"]["count"]
    assert total.get_value_at_percentile(99) / 1000 == result["total"]["summary"]["ttft"]["p99"]


def test_the_report_command_writes_every_format(result_file: Path, tmp_path: Path) -> None:
    for fmt in ("markdown", "json", "junit", "hlog", "text"):
        out = tmp_path / f"report.{fmt}"
        done = subprocess.run(
            [sys.executable, "-m", "infer_bench.cli", "report", str(result_file), "-f", fmt, "-o", str(out)],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert out.read_text().strip()
    unknown = subprocess.run(
        [sys.executable, "-m", "infer_bench.cli", "report", str(result_file), "-f", "pdf"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert unknown.returncode == 2
    assert "unknown report format 'pdf'" in unknown.stderr


def test_a_v1_result_still_reports_but_has_no_hdr_log(result: dict[str, Any]) -> None:
    from infer_bench.errors import UsageError

    old = {key: value for key, value in result.items() if key not in ("intervals", "thresholds")}
    old["version"] = 1
    assert "time to first token" in render_report("markdown", [old])
    with pytest.raises(UsageError, match="no interval histograms"):
        render_report("hlog", [old])
