"""``infer-bench run`` end to end: real servers on loopback, real clients, every outcome provoked."""

from __future__ import annotations

import json
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from fakes import broken_server
from infer_bench.runner import reference_server, run_scenario
from infer_bench.scenario import load_scenario, parse_scenario

pytestmark = pytest.mark.slow  # real servers on loopback; still run in CI

SCENARIOS = Path(__file__).parent.parent / "scenarios"

# A tokens model whose every step costs exactly 20 ms, with no prefill and no per-sequence term.
FIXED_STEP = {"models": [{"kind": "echo"}, {"kind": "tokens", "base_ms": 20, "per_seq_ms": 0, "prefill_ms": 0,
                                                "per_input_token_ms": 0}]}  # fmt: skip


@pytest.fixture(scope="module")
def fixed_server() -> Iterator[str]:
    with reference_server(FIXED_STEP) as url:
        yield url


def run_text(text: str, tmp_path: Path) -> dict[str, Any]:
    out = tmp_path / "result.json"
    result, code = run_scenario(parse_scenario(text, source="test.yaml"), out=out)
    assert code == 0
    assert json.loads(out.read_text())["headline"] == result["headline"]
    return result


def server_stats(url: str) -> dict[str, Any]:
    stats: dict[str, Any] = httpx.get(url + "/stats", trust_env=False).json()["metrics"]
    return stats


def test_measured_ttft_and_itl_match_the_servers_own_timing(fixed_server: str, tmp_path: Path) -> None:
    """The client's figures must equal the server's plus transport, whatever the machine's speed.

    The server times each token at its emission; the client at its arrival. Their difference is loopback
    transport and parsing, well under a millisecond, so the comparison is to the server's own mean,
    never to a wall-clock constant.
    """
    before = server_stats(fixed_server)
    result = run_text(f"""
target: {fixed_server}
scenarios:
  fixed:
    executor: per-vu-iterations
    vus: 2
    iterations: 10
    protocol: sse
    request: {{max_tokens: 12}}
""", tmp_path)  # fmt: skip
    after = server_stats(fixed_server)

    def server_mean_ms(name: str) -> float:
        a = before[name][0] if before[name] else {"sum": 0.0, "count": 0}
        (b,) = after[name]
        return float(b["sum"] - a["sum"]) / (b["count"] - a["count"]) * 1000

    summary = result["total"]["summary"]
    assert result["headline"]["succeeded"] == 20
    assert summary["itl"]["count"] == 20 * 11
    assert summary["itl"]["mean"] == pytest.approx(server_mean_ms("inferbench_inter_token_seconds"), abs=1.0)
    # From the send, not the schedule: a VU's first request also opens its connection, which the server
    # cannot see. The margin is a tenth of the 20 ms step, which any miscounted token would exceed: on a
    # loaded 2-core machine both processes wait for a CPU now and then, and that lands in the difference.
    assert summary["ttft_sent"]["mean"] == pytest.approx(server_mean_ms("inferbench_ttft_seconds"), abs=2.0)
    assert summary["ttft"]["mean"] >= summary["ttft_sent"]["mean"]
    assert summary["itl"]["p50"] >= 19.5  # typical gaps cannot beat the 20 ms step (single ones can: jitter)
    assert summary["output_tokens"]["min"] == summary["output_tokens"]["max"] == 12


def test_every_outcome_of_a_well_behaved_server_is_counted(fixed_server: str, tmp_path: Path) -> None:
    result = run_text(f"""
target: {fixed_server}
scenarios:
  length: {{executor: per-vu-iterations, vus: 1, iterations: 2, protocol: sse, request: {{max_tokens: 3}}}}
  natural:
    executor: per-vu-iterations
    iterations: 2
    protocol: openai
    request: {{api: completions, max_tokens: 3}}
  cancel:
    executor: per-vu-iterations
    iterations: 2
    protocol: sse
    request: {{max_tokens: 50}}
    behavior: {{cancel_after_tokens: 2}}
  timeout:
    executor: per-vu-iterations
    iterations: 1
    protocol: sse
    request: {{max_tokens: 50}}
    timeout: 100ms
  not-found: {{executor: per-vu-iterations, iterations: 2, protocol: http, request: {{path: /nope}}}}
""", tmp_path)  # fmt: skip
    by_scenario = {g["tags"]["scenario"]: g["outcomes"] for g in result["groups"]}
    assert by_scenario == {
        "length": {"truncated": 2},
        "natural": {"truncated": 2},
        "cancel": {"cancelled": 2},
        "timeout": {"timed_out": 1},
        "not-found": {"http_error": 2},
    }
    statuses = {g["tags"]["scenario"]: g["statuses"] for g in result["groups"]}
    assert statuses["not-found"] == {"404": 2}


def test_injected_model_faults_are_stream_errors(tmp_path: Path) -> None:
    with reference_server({"models": [{"kind": "echo"}, {"kind": "tokens", "fail_rate": 1.0}]}) as url:
        result = run_text(f"""
target: {url}
scenarios:
  faulty: {{executor: per-vu-iterations, iterations: 3, protocol: sse, request: {{max_tokens: 30}}}}
""", tmp_path)  # fmt: skip
    assert result["total"]["outcomes"] == {"stream_error": 3}
    assert result["errors"][0]["error"] == "model_error"


@pytest.mark.parametrize(
    ("path", "outcome"),
    [
        pytest.param("/rate-limited", "rate_limited", id="429"),
        pytest.param("/server-error", "http_error", id="500"),
        pytest.param("/drop", "disconnected", id="connection-dropped-mid-stream"),
        pytest.param("/reset", "disconnected", id="connection-reset-mid-stream"),
        pytest.param("/no-done", "disconnected", id="stream-ended-without-final-event"),
        pytest.param("/garbage", "protocol_error", id="broken-chunked-encoding"),
        pytest.param("/stall", "timed_out", id="stalled-stream"),
    ],
)
def test_a_misbehaving_server_gives_each_failure_its_own_outcome(path: str, outcome: str, tmp_path: Path) -> None:
    with broken_server() as url:
        result = run_text(f"""
target: {url}
scenarios:
  broken:
    executor: per-vu-iterations
    iterations: 2
    protocol: sse
    request: {{path: {path}}}
    timeout: 300ms
""", tmp_path)  # fmt: skip
    assert result["total"]["outcomes"] == {outcome: 2}
    assert result["headline"]["completion_rate"] == 0.0
    assert result["errors"]


def test_a_request_on_a_connection_the_server_closed_as_idle_goes_again_on_a_new_one(tmp_path: Path) -> None:
    """The keep-alive race: the server closes an idle connection just as a request is sent on it. The
    server never read it, so it is sent again on a new connection, and counted once, as it ended."""
    with broken_server() as url:
        result = run_text(f"""
target: {url}
scenarios:
  idle: {{executor: per-vu-iterations, iterations: 3, protocol: sse, request: {{path: /idle-close}}}}
""", tmp_path)  # fmt: skip
    assert result["total"]["outcomes"] == {"completed": 3}
    assert result["headline"]["requests"] == 3


def test_a_fresh_connection_closed_before_any_answer_is_a_disconnect_not_a_retry(tmp_path: Path) -> None:
    with broken_server() as url:
        result = run_text(f"""
target: {url}
scenarios:
  closed: {{executor: per-vu-iterations, iterations: 2, protocol: sse, request: {{path: /close-unanswered}}}}
""", tmp_path)  # fmt: skip
    assert result["total"]["outcomes"] == {"disconnected": 2}


def test_open_loop_counts_arrivals_it_could_not_send_as_dropped(fixed_server: str, tmp_path: Path) -> None:
    """One VU, 20 ms per token × 10 tokens, 50 arrivals/s: most arrivals find the VU busy."""
    result = run_text(f"""
target: {fixed_server}
scenarios:
  overload:
    executor: constant-arrival-rate
    rate: 50
    duration: 1s
    pre_allocated_vus: 1
    max_vus: 1
    protocol: sse
    request: {{max_tokens: 10}}
""", tmp_path)  # fmt: skip
    head = result["headline"]
    assert head["requests"] + head["dropped"] == 50
    assert head["dropped"] >= 40
    assert head["requested_rate"] == 50.0
    assert head["achieved_rate"] == head["requests"]


def test_unreachable_target_is_reported_before_the_run(tmp_path: Path) -> None:
    from infer_bench.errors import TargetUnreachable

    scenario = parse_scenario(
        "target: http://127.0.0.1:1\nscenarios:\n  s: {executor: per-vu-iterations, protocol: sse}\n", source="t.yaml"
    )
    with pytest.raises(TargetUnreachable, match="cannot connect"):
        run_scenario(scenario, out=tmp_path / "r.json")
    assert not (tmp_path / "r.json").exists()


@pytest.mark.parametrize(
    "path", sorted(p for p in SCENARIOS.glob("*.yaml") if not p.name.startswith("sweep-")), ids=lambda p: p.stem
)
def test_example_scenarios_validate_and_run_briefly(path: Path, tmp_path: Path) -> None:
    scenario = load_scenario(path, {"DURATION": "2s", "RATE": "20", "RAMP": "1s"})
    if scenario.target != "reference":
        pytest.skip(f"{path.name} targets {scenario.target}")
    short = parse_scenario(path.read_text(), source=str(path), base_dir=path.parent,
                           env={"DURATION": "2s", "RATE": "20", "RAMP": "1s"})  # fmt: skip
    result, code = run_scenario(short, out=tmp_path / "r.json")
    assert code == 0
    assert result["headline"]["succeeded"] > 0
    assert result["headline"]["error_rate"] == 0.0


def test_websocket_lanes_share_one_socket_and_the_vus_iteration_budget(fixed_server: str, tmp_path: Path) -> None:
    before = server_stats(fixed_server)["inferbench_sequences_total"]
    result = run_text(f"""
target: {fixed_server}
scenarios:
  ws:
    executor: per-vu-iterations
    vus: 2
    iterations: 6
    protocol: websocket
    request: {{max_tokens: 5, in_flight: 3}}
  ws-cancel:
    executor: per-vu-iterations
    iterations: 2
    protocol: websocket
    request: {{max_tokens: 200}}
    behavior: {{cancel_after_tokens: 3}}
  ws-timeout:
    executor: per-vu-iterations
    iterations: 1
    protocol: websocket
    request: {{max_tokens: 200}}
    timeout: 150ms
""", tmp_path)  # fmt: skip
    by_scenario = {g["tags"]["scenario"]: g["outcomes"] for g in result["groups"]}
    assert by_scenario == {"ws": {"truncated": 12}, "ws-cancel": {"cancelled": 2}, "ws-timeout": {"timed_out": 1}}
    ws = next(g for g in result["groups"] if g["tags"]["scenario"] == "ws")
    assert ws["summary"]["output_tokens"]["min"] == 5
    # The client's cancel message stops generation on the server: three sequences ended as cancelled.
    after = server_stats(fixed_server)["inferbench_sequences_total"]
    cancelled = {e["labels"]["outcome"]: e["value"] for e in after}.get("cancelled", 0) - {
        e["labels"]["outcome"]: e["value"] for e in before
    }.get("cancelled", 0)
    assert cancelled == 3


def test_ctrl_c_stops_the_run_and_still_writes_the_partial_result(fixed_server: str, tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys
    import time

    scenario = tmp_path / "long.yaml"
    scenario.write_text(f"""
target: {fixed_server}
scenarios:
  long: {{executor: constant-vus, vus: 4, duration: 60s, protocol: sse, request: {{max_tokens: 5}}}}
""")
    out = tmp_path / "partial.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "infer_bench.cli", "run", str(scenario), "-o", str(out), "-q"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:  # wait until requests are flowing (the server counts them)
            stats = server_stats(fixed_server)["inferbench_requests_total"]
            if sum(e["value"] for e in stats) > 40:
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _stdout, stderr = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 3, stderr
    result = json.loads(out.read_text())
    assert result["status"] == "interrupted"
    assert "Ctrl-C" in result["stop_reason"]
    assert result["headline"]["succeeded"] > 0
    assert "partial result" in stderr
    assert "Traceback" not in stderr


@pytest.mark.parametrize(
    ("reconnect", "outcomes", "tokens", "reconnects"),
    [
        pytest.param(True, {"completed": 2}, 8, 2, id="resumes-with-last-event-id"),
        pytest.param(False, {"disconnected": 2}, 4, 0, id="without-reconnect-a-drop-is-a-disconnect"),
    ],
)
def test_a_dropped_sse_stream_resumes_with_last_event_id_when_asked(
    reconnect: bool, outcomes: dict[str, int], tokens: int, reconnects: int, tmp_path: Path
) -> None:
    with broken_server() as url:
        result = run_text(f"""
target: {url}
scenarios:
  resume:
    executor: per-vu-iterations
    iterations: 2
    protocol: sse
    request: {{path: /resumable}}
    behavior: {{reconnect: {str(reconnect).lower()}}}
""", tmp_path)  # fmt: skip
    (group,) = result["groups"]
    assert group["outcomes"] == outcomes
    assert group["tokens"] == tokens
    assert group["reconnects"] == reconnects


def test_a_burst_sends_its_requests_at_once_then_waits_for_the_next(fixed_server: str, tmp_path: Path) -> None:
    """Two bursts of 4 from one VU: 8 requests, and the second burst starts after `every`, not before."""
    result = run_text(f"""
target: {fixed_server}
scenarios:
  bursty:
    executor: per-vu-iterations
    vus: 1
    iterations: 8
    protocol: sse
    request: {{max_tokens: 2}}
    behavior: {{burst: {{size: 4, every: 300ms}}}}
""", tmp_path)  # fmt: skip
    assert result["total"]["outcomes"] == {"truncated": 8}
    starts = [s["started"] for s in result["series"]]
    assert sum(starts) == 8
    assert result["duration_s"] >= 0.3  # two bursts, 300 ms apart


def test_a_target_that_dies_mid_run_ends_it_with_a_partial_result(tmp_path: Path) -> None:
    import subprocess
    import sys
    import threading

    proc = subprocess.Popen(
        [sys.executable, "-m", "infer_bench.cli", "serve", "--port", "0"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().rsplit(" on ", 1)[1].strip()
        threading.Timer(1.0, proc.kill).start()
        scenario = parse_scenario(f"""
target: {url}
scenarios:
  doomed: {{executor: constant-vus, vus: 2, duration: 60s, protocol: sse, request: {{max_tokens: 8}}}}
""", source="doomed.yaml")  # fmt: skip
        result, code = run_scenario(scenario, out=tmp_path / "r.json")
    finally:
        proc.kill()
        proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()
    assert code == 3
    assert result["status"] == "interrupted"
    assert "stopped accepting connections" in result["stop_reason"]
    assert result["duration_s"] < 30
    assert result["headline"]["succeeded"] > 0
    assert result["total"]["outcomes"]["connect_error"] > 0
    assert json.loads((tmp_path / "r.json").read_text())["status"] == "interrupted"


@pytest.fixture(scope="module")
def self_signed(tmp_path_factory: pytest.TempPathFactory) -> ssl.SSLContext:
    """A server TLS context with a throwaway self-signed certificate for 127.0.0.1."""
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    return context


@pytest.mark.parametrize(
    ("verify", "outcome"),
    [
        pytest.param(False, "completed", id="insecure-accepts-a-self-signed-certificate"),
        pytest.param(True, "connect_error", id="a-refused-certificate-is-a-connect-error"),
    ],
)
def test_https_targets_stream_over_tls(self_signed: ssl.SSLContext, verify: bool, outcome: str, tmp_path: Path) -> None:
    with broken_server(tls=self_signed) as url:
        scenario = parse_scenario(f"""
target: {url}
scenarios:
  tls: {{executor: per-vu-iterations, iterations: 2, protocol: sse, request: {{path: /ok}}}}
""", source="tls.yaml")  # fmt: skip
        result, code = run_scenario(scenario, out=tmp_path / "r.json", verify_tls=verify)
    assert code == 0
    assert result["total"]["outcomes"] == {outcome: 2}
    if outcome == "connect_error":
        assert "CERTIFICATE_VERIFY_FAILED" in result["errors"][0]["error"]
    else:
        assert result["headline"]["tokens"] == 4
