"""The callback-driven plain HTTP lane: every outcome, the bulk recording and the fallback to the full parser.

Each test runs one lane against a small server on loopback that answers every request the same way, for a
short while, and checks what the recorder holds: counts that agree with each other, never timings.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
import uvloop
from hypothesis import given
from hypothesis import strategies as st

from infer_bench.clients.http_lane import LanePlan, run_plain_vu
from infer_bench.clients.requests import Target
from infer_bench.metrics.recorder import PLAIN_FOLD_EVERY, MetricSet, Recorder, new_histogram, record_many, tag_key
from infer_bench.metrics.timeline import GapBuffer, Outcome, Timeline
from infer_bench.runner import reference_server, run_scenario
from infer_bench.scenario import parse_scenario
from infer_bench.wire.http1 import encode_request

pytestmark = pytest.mark.slow  # real sockets on loopback

KEY = tag_key(scenario="s", protocol="http")
WHOLE = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 14\r\n\r\n" + b'{"output":[1]}'
CHUNKED = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"

Respond = Callable[[asyncio.StreamWriter, int], Awaitable[bool]]  # writes the n-th answer; False: hang up


def run(main: Coroutine[Any, Any, Any]) -> Any:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


def answer(*writes: bytes, then: str = "keep") -> Respond:
    """Each request answered by ``writes`` (drained one by one: separate reads, usually), then the connection
    kept, closed, or left to stall."""

    async def respond(writer: asyncio.StreamWriter, n: int) -> bool:
        for data in writes:
            writer.write(data)
            await writer.drain()
        if then == "stall":
            await asyncio.sleep(3600)
        return then == "keep"

    return respond


async def serve(respond: Respond, connections: list[int]) -> asyncio.Server:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(0)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    (int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-")),
                    0,
                )
                await reader.readexactly(length)
                connections[-1] += 1
                if not await respond(writer, connections[-1]):
                    break
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


def lane_run(
    respond: Respond | None,
    *,
    duration_s: float = 0.3,
    timeout_s: float = 5.0,
    warmup_s: float = 0.0,
    lanes: int = 1,
) -> tuple[Recorder, list[int]]:
    """``lanes`` VUs against a server answering with ``respond`` (None: a port where nothing listens)."""
    connections: list[int] = []

    async def main() -> Recorder:
        server = await serve(respond, connections) if respond is not None else None
        if server is not None:
            port = server.sockets[0].getsockname()[1]
        else:
            port = await closed_port()
        start = time.perf_counter_ns()
        recorder = Recorder(start)
        measure_from = start + int(warmup_s * 1e9)
        host = f"127.0.0.1:{port}"
        plan = LanePlan(
            Target("127.0.0.1", port, host), encode_request("POST", host, "/p", {}, b"{}"), recorder, KEY,
            recorder.plain_batch(KEY, measure_from), measure_from, start + int(duration_s * 1e9), timeout_s,
        )  # fmt: skip
        await asyncio.gather(*(run_plain_vu(plan) for _ in range(lanes)))
        if server is not None:
            server.close()
        recorder.flush()
        return recorder

    return run(main()), connections


async def closed_port() -> int:
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port: int = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    return port


def counts(metrics: MetricSet) -> dict[str, int]:
    return {name: hist.get_total_count() for name, hist in metrics.histograms.items() if hist.get_total_count()}


def assert_consistent(recorder: Recorder, outcome: str) -> MetricSet:
    """One outcome for every request, and the series agreeing with the histograms."""
    metrics = recorder.sets[KEY]
    n = metrics.requests
    assert n > 0
    assert dict(metrics.outcomes) == {outcome: n}
    assert sum(s.started for s in recorder.series) == n
    return metrics


def test_whole_responses_are_recorded_in_bulk_with_every_metric_of_a_request() -> None:
    recorder, connections = lane_run(answer(WHOLE), lanes=3)
    metrics = assert_consistent(recorder, "completed")
    n = metrics.requests
    assert n == sum(connections)  # every answered request recorded once, no connection opened twice
    assert len(connections) == 3
    assert sum(s.succeeded for s in recorder.series) == n
    assert dict(metrics.statuses) == {200: n}
    assert counts(metrics) == dict.fromkeys(("e2e", "e2e_sent", "headers", "output_tokens", "schedule_lag"), n)


@pytest.mark.parametrize(
    "respond",
    [
        pytest.param(answer(WHOLE[:40], WHOLE[40:]), id="head-split"),
        pytest.param(answer(WHOLE[:-3], WHOLE[-3:]), id="body-split"),
        pytest.param(answer(CHUNKED), id="chunked"),
        pytest.param(answer(WHOLE.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"), then="close"), id="close"),
        pytest.param(answer(b"HTTP/1.1 100 Continue\r\n\r\n" + WHOLE), id="interim-first"),
    ],
)
def test_responses_the_fast_path_cannot_read_complete_through_the_full_parser(respond: Respond) -> None:
    recorder, connections = lane_run(respond)
    metrics = assert_consistent(recorder, "completed")
    assert metrics.requests == sum(connections)
    assert counts(metrics)["headers"] == metrics.requests


def test_the_fast_path_resumes_after_a_response_split_across_reads() -> None:
    async def respond(writer: asyncio.StreamWriter, n: int) -> bool:
        pieces = (WHOLE[:10], WHOLE[10:]) if n % 2 else (WHOLE,)
        for piece in pieces:
            writer.write(piece)
            await writer.drain()
        return True

    recorder, connections = lane_run(respond)
    assert assert_consistent(recorder, "completed").requests == sum(connections)
    assert len(connections) == 1


@pytest.mark.parametrize(
    ("respond", "outcome", "error"),
    [
        pytest.param(
            answer(b"HTTP/1.1 500 Oops\r\ncontent-length: 2\r\n\r\nno"), "http_error", "HTTP 500: no", id="500"
        ),
        pytest.param(answer(b"HTTP/1.1 429 Slow\r\ncontent-length: 0\r\n\r\n"), "rate_limited", "HTTP 429", id="429"),
        pytest.param(answer(then="close"), "disconnected", "the connection closed", id="hang-up"),
        pytest.param(answer(WHOLE[:-2], then="close"), "disconnected", "the connection closed", id="cut-short"),
        pytest.param(
            answer(b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n"), "protocol_error", "invalid", id="garbage"
        ),
        pytest.param(answer(WHOLE + b"HTTP"), "completed", None, id="extra-bytes"),
    ],
)
def test_every_failure_has_its_outcome_and_its_error(respond: Respond, outcome: str, error: str | None) -> None:
    recorder, _ = lane_run(respond)
    assert_consistent(recorder, outcome)
    if error is not None:
        assert recorder.error_sample
        assert all(error in e["error"] for e in recorder.error_sample)
        assert sum(s.failed for s in recorder.series) == recorder.sets[KEY].requests


def test_a_peer_that_hangs_up_at_once_gives_disconnects_not_silence() -> None:
    async def main() -> Recorder:
        async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.close()

        server = await asyncio.start_server(hang_up, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        start = time.perf_counter_ns()
        recorder = Recorder(start)
        host = f"127.0.0.1:{port}"
        plan = LanePlan(
            Target("127.0.0.1", port, host), encode_request("GET", host, "/", {}, None), recorder, KEY,
            recorder.plain_batch(KEY, start), start, start + 200_000_000, 5.0,
        )  # fmt: skip
        await run_plain_vu(plan)
        server.close()
        recorder.flush()
        return recorder

    recorder = run(main())
    assert_consistent(recorder, "disconnected")


def test_a_stalled_response_times_out_and_the_lane_reconnects() -> None:
    recorder, connections = lane_run(answer(then="stall"), duration_s=0.2, timeout_s=0.05)
    metrics = assert_consistent(recorder, "timed_out")
    assert len(connections) == metrics.requests  # a timed-out connection is dropped, the next one is new


def test_a_refused_connect_is_a_connect_error_and_is_tried_again() -> None:
    recorder, _ = lane_run(None, duration_s=0.05)
    assert_consistent(recorder, "connect_error")
    assert all("connect to 127.0.0.1" in e["error"] for e in recorder.error_sample)


def test_requests_of_the_warmup_are_in_the_series_but_not_in_the_histograms() -> None:
    recorder, connections = lane_run(answer(WHOLE), warmup_s=10.0)
    assert sum(s.started for s in recorder.series) == sum(connections) > 0
    assert sum(s.succeeded for s in recorder.series) == sum(connections)
    assert KEY not in recorder.sets or recorder.sets[KEY].requests == 0


def test_a_batch_folds_on_its_own_once_full() -> None:
    async def main() -> tuple[int, int]:
        recorder = Recorder(time.perf_counter_ns())
        batch = recorder.plain_batch(KEY, 0)
        now = time.perf_counter_ns()
        for i in range(PLAIN_FOLD_EVERY + 5):
            batch.sent.append(now + i)
            batch.ends.append(now + i + 2_000_000)
            batch.statuses.append(200 if i % 2 else 201)
        batch.fold()
        metrics = recorder.sets[KEY]
        return metrics.requests, metrics.histograms["e2e"].get_value_at_percentile(50)

    requests, p50 = run(main())
    assert requests == PLAIN_FOLD_EVERY + 5
    assert 1995 <= p50 <= 2005  # 2 ms, in µs at 3 significant digits


@given(st.lists(st.integers(-5, 2047) | st.sampled_from([0, 1, 2047])))
def test_bulk_recording_of_first_bucket_values_equals_hdrh_record_value(values: list[int]) -> None:
    one_by_one, bulk = new_histogram(), new_histogram()
    for value in values:
        one_by_one.record_value(max(value, 1))
    record_many(bulk, values)
    assert bulk.encode() == one_by_one.encode()
    assert (bulk.get_min_value(), bulk.get_max_value()) == (one_by_one.get_min_value(), one_by_one.get_max_value())


spans = st.integers(0, 5_000_000) | st.integers(0, 2_000_000_000)


@given(st.lists(st.tuples(st.integers(1, 10**12), spans, st.sampled_from([200, 200, 201])), min_size=1))
def test_a_batch_records_what_timelines_of_the_same_requests_record(requests: list[tuple[int, int, int]]) -> None:
    """``add_plain`` is ``add`` for a request sent when intended whose head and end came in one read."""
    by_timeline, in_bulk = MetricSet(), MetricSet()
    for sent, span, status in requests:
        tl = Timeline(sent, GapBuffer())
        tl.sent_ns, tl.headers_ns, tl.status = sent, sent + span, status
        tl.finish(Outcome.COMPLETED, sent + span)
        by_timeline.add(tl)
    in_bulk.add_plain([r[0] for r in requests], [r[0] + r[1] for r in requests], [r[2] for r in requests])
    by_timeline.flush()
    assert in_bulk.outcomes == by_timeline.outcomes
    assert in_bulk.statuses == by_timeline.statuses
    for name, hist in by_timeline.histograms.items():
        assert in_bulk.histograms[name].encode() == hist.encode(), name


def test_a_plain_constant_vus_run_agrees_with_itself(tmp_path: Path) -> None:
    """End to end through the swarm: warmup left out, every figure of the result consistent."""
    with reference_server({}) as url:
        scenario = parse_scenario(
            f"""
target: {url}
scenarios:
  plain:
    executor: constant-vus
    vus: 4
    duration: 1500ms
    warmup: 500ms
    protocol: http
    request: {{path: /predict}}
""",
            source="plain.yaml",
        )
        result, code = run_scenario(scenario, out=tmp_path / "r.json")
    assert code == 0
    n = result["headline"]["succeeded"]
    assert n > 0
    assert result["total"]["outcomes"] == {"completed": n}
    assert result["total"]["summary"]["e2e"]["count"] == n
    assert result["total"]["summary"]["headers"]["count"] == n
    assert sum(s["started"] for s in result["series"]) > n  # the warmup's requests are in the series only
    assert result["headline"]["interrupted"] == 0


def test_ctrl_c_stops_plain_vus_and_still_writes_their_partial_result(tmp_path: Path) -> None:
    import signal
    import subprocess
    import sys

    import httpx

    with reference_server({}) as url:
        scenario = tmp_path / "long.yaml"
        scenario.write_text(f"""
target: {url}
scenarios:
  long: {{executor: constant-vus, vus: 3, duration: 60s, protocol: http, request: {{path: /predict}}}}
""")  # fmt: skip
        out = tmp_path / "partial.json"
        proc = subprocess.Popen(
            [sys.executable, "-m", "infer_bench.cli", "run", str(scenario), "-o", str(out), "-q"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:  # wait until requests are flowing (the server counts them)
                stats = httpx.get(url + "/stats", trust_env=False).json()["metrics"]["inferbench_requests_total"]
                if sum(e["value"] for e in stats) > 200:
                    break
                time.sleep(0.05)
            proc.send_signal(signal.SIGINT)
            _stdout, stderr = proc.communicate(timeout=30)
        finally:
            proc.kill()
    assert proc.returncode == 3, stderr
    result = json.loads(out.read_text())
    assert result["status"] == "interrupted"
    n = result["headline"]["succeeded"]
    assert n > 0
    assert result["total"]["summary"]["e2e"]["count"] == n  # the lanes' buffers were folded before the end
    assert result["headline"]["interrupted"] == 3  # each VU's request in flight
    assert "Traceback" not in stderr


def test_plain_vus_run_over_tls(tmp_path: Path) -> None:
    import ssl
    import subprocess

    from fakes import broken_server

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )  # fmt: skip
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    with broken_server(tls=context) as url:
        scenario = parse_scenario(
            f"""
target: {url}
scenarios:
  tls: {{executor: constant-vus, vus: 2, duration: 300ms, protocol: http, request: {{path: /server-error}}}}
""",
            source="tls.yaml",
        )
        result, code = run_scenario(scenario, out=tmp_path / "r.json", verify_tls=False)
    assert code == 0
    n = result["headline"]["requests"]
    assert n > 0
    assert result["total"]["outcomes"] == {"http_error": n}
    assert result["errors"][0]["error"] == "HTTP 500: no"
