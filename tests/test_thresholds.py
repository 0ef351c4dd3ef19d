"""Thresholds in k6's syntax: parsing, checking on a run's figures, the summary's ✓/✗, exit codes, aborts."""

from __future__ import annotations

import io
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from rich.console import Console

from infer_bench.measures import Group, Measures
from infer_bench.metrics.recorder import new_histogram
from infer_bench.report.summary import render_summary
from infer_bench.runner import exit_code, run_scenario
from infer_bench.scenario import parse_scenario
from infer_bench.scenario.thresholds import Threshold, ThresholdSyntaxError, parse_threshold
from infer_bench.thresholds import evaluate, first_abort
from reference_server.serve import EmbeddedServer

# --- parsing ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "expression", "aggregation", "percentile", "operator", "limit", "unit"),
    [
        pytest.param("ttft", "p(95)<500ms", "p", 95.0, "<", 500.0, "ms", id="percentile-ms"),
        pytest.param("ttft", "p(99.9) <= 1.5s", "p", 99.9, "<=", 1500.0, "ms", id="fraction-percentile-seconds"),
        pytest.param("itl", "med<20", "p", 50.0, "<", 20.0, "ms", id="bare-number-is-ms-as-in-k6"),
        pytest.param("e2e", "avg<250us", "avg", None, "<", 0.25, "ms", id="avg-microseconds"),
        pytest.param("ttft", "max===1s", "max", None, "==", 1000.0, "ms", id="k6-triple-equals"),
        pytest.param("ttft", "count>=100", "count", None, ">=", 100.0, "", id="trend-count-is-plain"),
        pytest.param("output_tokens", "min>=16", "min", None, ">=", 16.0, "", id="token-counts-are-plain"),
        pytest.param("error_rate", "rate<0.01", "rate", None, "<", 0.01, "", id="rate"),
        pytest.param("dropped", "count<1", "count", None, "<", 1.0, "", id="counter-count"),
        pytest.param("succeeded", "rate>40", "rate", None, ">", 40.0, "/s", id="counter-per-second"),
    ],
)
def test_threshold_expressions_read_as_k6_does(
    key: str, expression: str, aggregation: str, percentile: float | None, operator: str, limit: float, unit: str
) -> None:
    t = parse_threshold(key, expression)
    assert (t.aggregation, t.percentile, t.operator, t.unit) == (aggregation, percentile, operator, unit)
    assert t.limit == pytest.approx(limit)


def test_tag_filters_are_parsed_and_sorted() -> None:
    t = parse_threshold("itl{ scenario:chat , class:fast }", "p(99)<50ms")
    assert (t.metric, t.tags, t.key) == (
        "itl",
        (("class", "fast"), ("scenario", "chat")),
        "itl{ scenario:chat , class:fast }",
    )


@pytest.mark.parametrize(
    ("key", "expression", "message"),
    [
        pytest.param("ttft", "p(101)<1s", "between 0 and 100", id="percentile-range"),
        pytest.param("ttft", "rate<1", "rate does not apply to ttft, a trend metric", id="rate-on-trend"),
        pytest.param("dropped", "avg<1", "avg does not apply to dropped, a counter metric", id="avg-on-counter"),
        pytest.param("output_tokens", "avg<1s", "expected a number, got '1s'", id="duration-on-count"),
        pytest.param("ttft", "p(95)", "expected AGGREGATION OPERATOR VALUE", id="no-operator"),
        pytest.param("ttft{scenario}", "p(95)<1s", "expected tag:value pairs", id="filter-without-value"),
        pytest.param("ttft{a:1,a:2}", "p(95)<1s", "filtered twice", id="filter-twice"),
        pytest.param("latency", "p(95)<1s", "unknown metric 'latency'", id="unknown-metric"),
    ],
)
def test_unreadable_thresholds_say_what_was_expected(key: str, expression: str, message: str) -> None:
    with pytest.raises(ThresholdSyntaxError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_threshold(key, expression)


# --- checking on figures ----------------------------------------------------------------------------


def _group(tags: dict[str, str], ttft_ms: list[float], outcomes: dict[str, int], dropped: int = 0) -> Group:
    hist = new_histogram()
    for value in ttft_ms:
        hist.record_value(int(value * 1000))
    return Group(tags, {"ttft": hist}, outcomes, tokens=10 * sum(outcomes.values()), dropped=dropped)


MEASURES = Measures(
    [
        _group({"scenario": "chat", "class": "fast"}, [10.0] * 99 + [100.0], {"completed": 100}),
        _group({"scenario": "chat", "class": "slow"}, [200.0] * 50, {"completed": 48, "disconnected": 2}, dropped=3),
    ],
    duration_s=10.0,
)


@pytest.mark.parametrize(
    ("key", "expression", "value", "ok"),
    [
        pytest.param("ttft", "max<300ms", 200.0, True, id="all-groups"),
        pytest.param("ttft{class:fast}", "p(99)<50ms", 10.0, True, id="sub-metric"),
        pytest.param("ttft{class:fast}", "max<50ms", 100.0, False, id="sub-metric-fails"),
        pytest.param("ttft{class:slow}", "count==50", 50.0, True, id="trend-count"),
        pytest.param("disconnect_rate", "rate<0.01", 2 / 150, False, id="rate"),
        pytest.param("disconnect_rate{class:fast}", "rate<0.01", 0.0, True, id="rate-of-sub-metric"),
        pytest.param("dropped", "count<1", 3.0, False, id="counter"),
        pytest.param("succeeded", "rate>10", 14.8, True, id="counter-rate-per-second"),
        pytest.param("ttft{class:none}", "p(95)<1s", None, False, id="no-data-fails"),
    ],
)
def test_thresholds_are_checked_on_the_selected_groups(
    key: str, expression: str, value: float | None, ok: bool
) -> None:
    (result,) = evaluate([parse_threshold(key, expression)], MEASURES)
    assert result.ok is ok
    if value is None:
        assert result.value is None
    else:
        assert result.value == pytest.approx(value, rel=1e-3)  # HDR keeps 3 significant digits


def test_abort_waits_for_its_delay_and_for_data() -> None:
    slow = parse_threshold("ttft", "p(50)<1ms", abort_on_fail=True, delay_abort_eval_s=5.0)
    not_watched = parse_threshold("ttft", "p(50)<1ms")
    no_data = parse_threshold("ttft{class:none}", "p(50)<1ms", abort_on_fail=True)
    assert first_abort([slow, not_watched, no_data], MEASURES, elapsed_s=4.9) is None
    found = first_abort([slow, not_watched, no_data], MEASURES, elapsed_s=5.0)
    assert found is not None
    assert found.threshold is slow
    assert found.aborted


def test_a_failed_threshold_makes_exit_code_one_and_an_interruption_three() -> None:
    passed = {"status": "complete", "thresholds": [{"ok": True}]}
    assert exit_code(passed) == 0
    assert exit_code({**passed, "thresholds": [{"ok": True}, {"ok": False}]}) == 1
    assert exit_code({"status": "aborted", "thresholds": [{"ok": False}]}) == 1
    assert exit_code({"status": "interrupted", "thresholds": [{"ok": False}]}) == 3
    assert exit_code({"status": "complete"}) == 0


def test_summary_opens_with_a_mark_per_threshold() -> None:
    results = evaluate([parse_threshold("ttft", "max<300ms"), parse_threshold("dropped", "count<1")], MEASURES)
    result = {
        "status": "complete", "stop_reason": None, "duration_s": 10.0, "scenario": {"source": "s.yaml", "target": "t"},
        "headline": {"requests": 150, "succeeded": 148, "request_rate": 14.8, "completion_rate": 0.98,
                     "disconnect_rate": 0.01, "error_rate": 0.01, "dropped": 3, "tokens": 1500, "token_rate": 150},
        "total": {"summary": {}, "outcomes": {}}, "groups": [], "thresholds": [r.to_json() for r in results],
    }  # fmt: skip
    out = io.StringIO()
    Console(file=out, width=120, color_system=None).print(render_summary(result))
    lines = out.getvalue().splitlines()
    assert lines[0] == "thresholds: 1 passed, 1 failed"
    assert lines[1].startswith("  ✓ ttft max<300ms  200")
    assert lines[2] == "  ✗ dropped count<1  3"


def test_thresholds_survive_in_the_scenario_spec() -> None:
    scenario = parse_scenario("""
target: reference
scenarios:
  chat: {executor: constant-vus, duration: 5s}
thresholds:
  ttft: ["p(95)<500ms"]
  disconnect_rate: [{threshold: rate<0.01, abortOnFail: true, delayAbortEval: 10s}]
""")
    assert [t.label for t in scenario.thresholds] == ["ttft p(95)<500ms", "disconnect_rate rate<0.01"]
    assert isinstance(scenario.thresholds[1], Threshold)
    assert (scenario.thresholds[1].abort_on_fail, scenario.thresholds[1].delay_abort_eval_s) == (True, 10.0)


# --- in a real run ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def target() -> Iterator[str]:
    with EmbeddedServer() as server:
        yield server.url


def _scenario(url: str, duration: str, thresholds: str) -> str:
    return f"""
target: {url}
scenarios:
  chat:
    executor: constant-vus
    vus: 2
    duration: {duration}
    request: {{max_tokens: 8}}
thresholds:
{thresholds}
"""


@pytest.mark.slow
def test_abort_on_fail_stops_the_run_early_with_exit_code_one(target: str, tmp_path: Path) -> None:
    text = _scenario(target, "30s", '  ttft: [{threshold: "p(50)<1us", abort_on_fail: true}]')
    result, code = run_scenario(parse_scenario(text), out=tmp_path / "r.json")
    assert code == 1
    assert result["status"] == "aborted"
    assert result["duration_s"] < 15  # checked once a second; far from the 30 s of load
    assert "abort_on_fail" in result["stop_reason"]
    (threshold,) = result["thresholds"]
    assert threshold["aborted"]
    assert not threshold["ok"]


@pytest.mark.slow
def test_cli_exit_codes_for_thresholds(target: str, tmp_path: Path) -> None:
    scenario = tmp_path / "s.yaml"
    scenario.write_text(_scenario(target, "1s", '  ttft: ["p(95)<1us"]\n  dropped: ["count<1"]'))
    cli = [sys.executable, "-m", "infer_bench.cli", "run", str(scenario), "-q", "-o", str(tmp_path / "r.json")]
    env = {"COLUMNS": "200", "NO_COLOR": "1", "PATH": "/usr/bin:/bin"}
    failed = subprocess.run(cli, capture_output=True, text=True, timeout=60, check=False, env=env)
    assert failed.returncode == 1, failed.stderr
    assert failed.stdout.startswith("thresholds: 1 passed, 1 failed\n  ✗ ttft p(95)<1us")
    assert "1 threshold(s) failed: ttft p(95)<1us" in failed.stderr
    skipped = subprocess.run(
        [*cli, "--no-thresholds"], capture_output=True, text=True, timeout=60, check=False, env=env
    )
    assert skipped.returncode == 0, skipped.stderr
    assert "thresholds" not in skipped.stdout


def test_the_ci_examples_validate() -> None:
    """The scenario of docs/ci.md and its shortened copy in reports/ stay valid as the format evolves."""
    import re

    root = Path(__file__).parent.parent
    docs = (root / "docs" / "ci.md").read_text(encoding="utf-8")
    block = re.search(r"```yaml\n(# ci/load.yaml\n.*?)```", docs, re.DOTALL)
    assert block is not None
    for text in (block[1], (root / "reports" / "ci-load.yaml").read_text(encoding="utf-8")):
        scenario = parse_scenario(text, env={})
        assert scenario.thresholds
        assert [rule.figure for rule in scenario.gates] == ["ttft.p95", "itl.p50", "throughput"]
