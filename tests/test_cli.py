"""The ``infer-bench`` command as a user runs it: a subprocess, its output, its exit code, its signals.

Exit codes (README): 0 ok · 1 thresholds or gate failed · 2 usage, scenario or config error · 3 run
aborted or target unreachable. Every process started here is killed in a ``finally`` by its Popen.
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import httpx
import pytest

from polling import wait_until
from reference_server.serve import EmbeddedServer

pytestmark = pytest.mark.slow

_EXE = Path(sys.executable).with_name("infer-bench")
CLI = [str(_EXE)] if _EXE.exists() else [sys.executable, "-m", "infer_bench.cli"]
# A wide console so rich never wraps a message across lines; no colour codes in what we match.
ENV = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"}
STARTUP_TIMEOUT_S = 20.0
EXIT_TIMEOUT_S = 20.0
ANNOUNCE = re.compile(r"^infer-bench reference server on (http://127\.0\.0\.1:(\d+))$")


def run_cli(*args: str, timeout_s: float = 30.0) -> subprocess.CompletedProcess[str]:
    """Run ``infer-bench *args`` to completion; ``subprocess.run`` kills it if ``timeout_s`` passes."""
    return subprocess.run([*CLI, *args], capture_output=True, text=True, env=ENV, timeout=timeout_s, check=False)


def assert_no_traceback(*outputs: str) -> None:
    for output in outputs:
        assert "Traceback" not in output, output


@dataclass
class Served:
    proc: subprocess.Popen[str]
    url: str
    settings_line: str
    _stderr: list[str] = field(default_factory=list)
    _readers: list[threading.Thread] = field(default_factory=list)

    def stderr(self) -> str:
        """Everything the server wrote to stderr; call once the process has ended."""
        for reader in self._readers:
            reader.join(timeout=5)
        return "".join(self._stderr)


def _drain(stream: IO[str], sink: Callable[[str], None]) -> None:
    for line in stream:
        sink(line)


@contextmanager
def serving(*args: str) -> Iterator[Served]:
    """``infer-bench serve --port 0 *args``, once it has announced its URL; killed on exit if still running."""
    with subprocess.Popen(
        [*CLI, "serve", "--port", "0", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV
    ) as proc:
        assert proc.stdout is not None
        assert proc.stderr is not None
        lines: queue.Queue[str] = queue.Queue()
        stderr: list[str] = []
        readers = [
            threading.Thread(target=_drain, args=(proc.stdout, lines.put), daemon=True),
            threading.Thread(target=_drain, args=(proc.stderr, stderr.append), daemon=True),
        ]
        for reader in readers:
            reader.start()
        try:
            try:  # the announcement is printed once uvicorn listens: our readiness signal, no sleeping
                announce = lines.get(timeout=STARTUP_TIMEOUT_S).rstrip("\n")
                settings_line = lines.get(timeout=STARTUP_TIMEOUT_S).rstrip("\n")
            except queue.Empty:
                proc.kill()
                proc.wait(timeout=EXIT_TIMEOUT_S)
                pytest.fail(f"serve did not announce itself; exit {proc.returncode}, stderr: {''.join(stderr)}")
            match = ANNOUNCE.match(announce)
            assert match, announce
            yield Served(proc, match.group(1), settings_line, stderr, readers)
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=EXIT_TIMEOUT_S)


def http_client() -> httpx.Client:
    # trust_env=False: no proxy from the environment may take loopback traffic elsewhere.
    return httpx.Client(timeout=httpx.Timeout(10.0), trust_env=False)


def readiness(url: str) -> int | None:
    """The /readyz status on a fresh connection, or None when nothing accepts the connection any more."""
    try:
        with http_client() as http:
            return http.get(url + "/readyz").status_code
    except httpx.TransportError:
        return None


def sse_events(lines: Iterator[str]) -> Iterator[tuple[str, str]]:
    """(event, data) pairs; comments and ``retry`` are skipped (framing is tested in test_e2e_sse.py)."""
    event, data = "message", ""
    for line in lines:
        if not line:
            if data:
                yield event, data
            event, data = "message", ""
        elif line.startswith("event: "):
            event = line.removeprefix("event: ")
        elif line.startswith("data: "):
            data = line.removeprefix("data: ")


# --- serve ----------------------------------------------------------------------------------------


def test_serve_announces_its_url_and_settings_and_answers_health_checks() -> None:
    with serving("--max-num-seqs", "8") as served:
        assert int(served.url.rsplit(":", 1)[1]) > 0  # --port 0 picked a real port and printed it
        assert served.settings_line == (
            "models=echo,tokens default=tokens batch_size=32 batch_timeout_ms=0 max_num_seqs=8 max_queue=1024 "
            "workers=1 queue=memory://"
        )
        with http_client() as http:
            assert http.get(served.url + "/healthz").json() == {"status": "ok"}
            assert http.get(served.url + "/readyz").json() == {"status": "ready"}
            body = {"prompt": "hello there", "max_tokens": 3}
            events = list(sse_events(http.post(served.url + "/v1/stream", json=body).iter_lines()))
        assert [e for e, _ in events] == ["token", "token", "token", "done"]


def test_serve_direct_runs_without_a_queue_and_refuses_a_queue_beside_it() -> None:
    with serving("--direct") as served:
        assert served.settings_line.endswith(" queue=none (direct)")
        with http_client() as http:
            got = http.post(served.url + "/v1/stream", json={"prompt": "direct", "max_tokens": 2})
        ids = [line.removeprefix("id: ") for line in got.text.splitlines() if line.startswith("id: ")]
        assert ids == [got.headers["x-request-id"] + ":0", got.headers["x-request-id"] + ":1"]  # the engines' ids
    both = run_cli("serve", "--direct", "--queue", "memory://")
    assert both.returncode == 2
    assert "--direct and --queue exclude each other" in both.stderr


def test_serve_exits_0_on_sigterm() -> None:
    with serving() as served:
        served.proc.send_signal(signal.SIGTERM)
        returncode = served.proc.wait(timeout=EXIT_TIMEOUT_S)
        assert_no_traceback(served.stderr())
        assert returncode == 0


def test_serve_drains_an_in_flight_sse_stream_on_sigterm(tmp_path: Path) -> None:
    """SIGTERM turns readiness red and refuses new work, but a stream already running ends with ``done``."""
    config = tmp_path / "server.yaml"
    config.write_text("graceful_shutdown_s: 5\nmodels:\n  - kind: echo\n  - kind: tokens\n    base_ms: 25\n")
    with serving("--config", str(config)) as served, http_client() as http:
        body = {"prompt": "drain me", "max_tokens": 40, "request_id": "inflight"}
        with http.stream("POST", served.url + "/v1/stream", json=body) as r:
            assert r.status_code == 200
            events = sse_events(r.iter_lines())
            assert next(events)[0] == "token"  # generation is under way
            served.proc.send_signal(signal.SIGTERM)
            wait_until(lambda: readiness(served.url) != 200, timeout_s=10.0)
            assert readiness(served.url) in (503, None)  # red, or the listener is already closed
            try:
                with http_client() as other:
                    late = other.post(served.url + "/v1/stream", json={"prompt": "late", "max_tokens": 1})
                assert (late.status_code, late.json()["reason"]) == (503, "draining")
            except httpx.TransportError:
                pass  # uvicorn closed the listening socket first: refused at the door, equally fine
            rest = list(events)
        kinds = [kind for kind, _ in rest]
        assert kinds == ["token"] * 39 + ["done"], rest[-1]
        assert json.loads(rest[-1][1])["finish_reason"] == "length"
        served.proc.wait(timeout=EXIT_TIMEOUT_S)
        assert_no_traceback(served.stderr())


@pytest.mark.parametrize(
    ("config_text", "expected"),
    [
        pytest.param("batch_size: -3\n", "batch_size: Input should be greater than or equal to 1, got -3", id="range"),
        pytest.param("batchsize: 3\n", "batchsize: Extra inputs are not permitted", id="unknown-field"),
        pytest.param("models:\n  - kind: tokens\n    base_ms: -1\n", "base_ms", id="nested-field"),
        pytest.param("batch_size: [\n", "not valid YAML", id="bad-yaml"),
        pytest.param("- batch_size\n", "expected a mapping of settings, got list", id="not-a-mapping"),
    ],
)
def test_serve_with_an_invalid_config_exits_2_naming_the_file_and_field(
    tmp_path: Path, config_text: str, expected: str
) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(config_text)
    result = run_cli("serve", "--port", "0", "--config", str(config))
    assert result.returncode == 2, result.stderr
    assert f"{config}:" in result.stderr
    assert expected in result.stderr
    assert result.stdout == ""  # nothing was served
    assert_no_traceback(result.stdout, result.stderr)


def test_serve_with_a_missing_config_file_exits_2(tmp_path: Path) -> None:
    missing = tmp_path / "absent.yaml"
    result = run_cli("serve", "--port", "0", "--config", str(missing))
    assert result.returncode == 2, result.stderr
    assert f"{missing}: cannot read the settings file" in result.stderr
    assert_no_traceback(result.stdout, result.stderr)


def test_serve_with_an_invalid_flag_value_exits_2_naming_the_setting() -> None:
    result = run_cli("serve", "--port", "0", "--batch-size", "0")
    assert result.returncode == 2, result.stderr
    assert "batch_size" in result.stderr
    assert_no_traceback(result.stdout, result.stderr)


def test_serve_on_a_port_already_in_use_exits_2_saying_it_cannot_listen() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli("serve", "--port", str(port))
    assert_no_traceback(result.stdout, result.stderr)
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr


# --- probe ----------------------------------------------------------------------------------------


def test_probe_without_a_url_streams_from_the_embedded_server() -> None:
    result = run_cli("probe", "--max-tokens", "8")
    assert result.returncode == 0, result.stderr
    assert "started the embedded reference server on http://127.0.0.1:" in result.stdout
    assert "8 tokens" in result.stdout
    assert "TTFT" in result.stdout
    assert "finish length" in result.stdout
    assert_no_traceback(result.stdout, result.stderr)


@pytest.mark.parametrize("protocol", [pytest.param("sse", id="sse"), pytest.param("openai", id="openai")])
def test_probe_of_a_running_server_prints_tokens_and_timings(server: EmbeddedServer, protocol: str) -> None:
    result = run_cli("probe", server.url, "--protocol", protocol, "--max-tokens", "5")
    assert result.returncode == 0, result.stderr
    assert "5 tokens" in result.stdout
    assert "TTFT" in result.stdout
    assert "finish length" in result.stdout
    assert server.state.metrics.sequences.child("finished").value == 1


def test_probe_of_an_unreachable_target_exits_3_with_a_clear_error() -> None:
    result = run_cli("probe", "http://127.0.0.1:1")
    assert result.returncode == 3, result.stderr
    assert "error: cannot connect to http://127.0.0.1:1/v1/stream" in result.stderr
    assert_no_traceback(result.stdout, result.stderr)


def test_probe_of_a_server_that_refuses_exits_3_with_its_answer(server: EmbeddedServer) -> None:
    result = run_cli("probe", server.url, "--protocol", "openai", "--model", "gpt-9")
    assert result.returncode == 3, result.stderr
    assert "answered 404" in result.stderr
    assert "model_not_found" in result.stderr
    assert_no_traceback(result.stdout, result.stderr)


def test_probe_with_an_unknown_protocol_exits_2(server: EmbeddedServer) -> None:
    result = run_cli("probe", server.url, "--protocol", "carrier-pigeon")
    assert result.returncode == 2, result.stderr
    assert "--protocol: expected sse or openai, got 'carrier-pigeon'" in result.stderr
    assert_no_traceback(result.stdout, result.stderr)


def test_version_prints_the_package_version() -> None:
    from infer_bench import __version__

    result = run_cli("version")
    assert result.returncode == 0
    assert result.stdout.strip() == __version__
