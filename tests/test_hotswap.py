"""Model versions, aliases, A/B routing, the admin API, and zero-downtime hot-swaps under load."""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from polling import wait_until
from reference_server.errors import ConfigError
from reference_server.registry import ab_fraction
from reference_server.serve import EmbeddedServer
from reference_server.settings import validate_settings
from serverkit import sse_blocks, stream

pytestmark = pytest.mark.slow

StartServer = Callable[..., EmbeddedServer]

TOKEN = "s3cret-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
ECHO = {"kind": "echo"}
FAST = {"kind": "tokens", "base_ms": 2}
PROMPT = "tell me about hot swaps"
BOUND_S = 20.0


@pytest.fixture(params=["direct", "queued"])
def start_server(request: pytest.FixtureRequest, start_server: StartServer) -> StartServer:
    """Every test here runs on both serving paths: the engines directly, and jobs on the in-process queue
    (routed at enqueue: each job runs the version its request was routed to)."""
    queue_url = None if request.param == "direct" else "memory://"
    return lambda **settings: start_server(**{"queue_url": queue_url, **settings})


@pytest.fixture
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=httpx.Timeout(BOUND_S), trust_env=False) as client:
        yield client


def serving(server: EmbeddedServer, name: str) -> str | None:
    return server.state.registry.entries[name].serving


# --- A/B assignment --------------------------------------------------------------------------------


def test_ab_assignment_is_stable_across_processes_and_follows_the_weights() -> None:
    code = "from reference_server.registry import ab_fraction; print(ab_fraction('tokens', 'id:alice'))"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=30)
    assert float(other.stdout) == ab_fraction("tokens", "id:alice")  # not Python's salted hash
    share = sum(ab_fraction("tokens", f"id:{i}") < 0.2 for i in range(5000)) / 5000
    assert 0.17 < share < 0.23


def test_traffic_splits_must_name_loaded_versions() -> None:
    models = [ECHO, {"kind": "tokens", "version": "1"}, {"kind": "tokens", "version": "2"}]
    validate_settings({"models": models, "traffic": {"tokens": {"1": 90, "2": 10}}})
    with pytest.raises(ConfigError, match=r"traffic\.tokens"):
        validate_settings({"models": models, "traffic": {"tokens": {"3": 1}}})


def test_ab_split_routes_each_client_to_one_version_every_time(http: httpx.Client, start_server: StartServer) -> None:
    server = start_server(
        models=[ECHO, {**FAST, "version": "1"}, {**FAST, "version": "2"}], traffic={"tokens": {"1": 50, "2": 50}}
    )
    seen: dict[str, set[str]] = collections.defaultdict(set)
    for i in range(12):
        for _ in range(2):
            got = stream(http, server, {"prompt": PROMPT, "max_tokens": 1}, headers={"X-Client-Id": f"c{i}"})
            seen[f"c{i}"].add(got.headers["x-model-version"])
    assert all(len(v) == 1 for v in seen.values())  # sticky per client
    assert set().union(*seen.values()) == {"1", "2"}  # and both arms get traffic


# --- versions and aliases --------------------------------------------------------------------------


def test_requests_can_pin_a_version_or_ask_for_latest(http: httpx.Client, start_server: StartServer) -> None:
    server = start_server(models=[ECHO, {**FAST, "version": "1"}, {**FAST, "version": "2"}])
    url = server.url + "/v1/stream"
    assert stream(http, server, {"prompt": PROMPT, "max_tokens": 1}).headers["x-model-version"] == "2"
    assert (
        stream(http, server, {"prompt": PROMPT, "max_tokens": 1, "model": "tokens@1"}).last.json()["model_version"]
        == "1"
    )
    assert (
        stream(http, server, {"prompt": PROMPT, "max_tokens": 1, "model": "tokens@latest"}).headers["x-model-version"]
        == "2"
    )
    missing = http.post(url, json={"prompt": PROMPT, "model": "tokens@9"})
    assert (missing.status_code, missing.json()["error"]) == (404, "unknown_model")
    predicted = http.post(server.url + "/predict", json={"input": 1})
    assert predicted.headers["x-model-version"] == predicted.json()["model_version"] == "1"


# --- the admin API ---------------------------------------------------------------------------------


def test_admin_routes_are_off_without_a_token_and_need_the_right_one(
    http: httpx.Client, start_server: StartServer
) -> None:
    off = start_server()
    assert http.get(off.url + "/admin/models", headers=AUTH).status_code == 404
    on = start_server(admin_token=TOKEN)
    assert http.get(on.url + "/admin/models").status_code == 401
    assert http.get(on.url + "/admin/models", headers={"Authorization": "Basic x"}).status_code == 401
    assert http.get(on.url + "/admin/models", headers={"Authorization": "Bearer wrong"}).status_code == 403
    listed = http.get(on.url + "/admin/models", headers=AUTH)
    assert listed.status_code == 200
    assert {m["name"]: m["serving"] for m in listed.json()["models"]} == {"echo": "1", "tokens": "1"}
    assert TOKEN not in http.get(on.url + "/stats").text


def test_a_failed_load_keeps_the_old_version_serving_and_is_reported(
    http: httpx.Client, start_server: StartServer
) -> None:
    server = start_server(models=[ECHO, FAST], admin_token=TOKEN)
    url = server.url + "/admin/models/tokens/load"
    started = http.post(url, json={"version": "2", "fail_load": True, "load_ms": 50}, headers=AUTH)
    assert started.status_code == 202
    assert started.json()["state"] == "loading"
    metrics = server.state.metrics
    wait_until(lambda: metrics.model_loads.child("tokens", "failed").value == 1, BOUND_S)
    (tokens,) = [
        m for m in http.get(server.url + "/admin/models", headers=AUTH).json()["models"] if m["name"] == "tokens"
    ]
    assert tokens["serving"] == "1"
    assert tokens["failed_loads"][0]["state"] == "failed"
    assert "injected" in tokens["failed_loads"][0]["error"]
    assert stream(http, server, {"prompt": PROMPT, "max_tokens": 2}).last.event == "done"
    bad = http.post(url, json={"version": "3", "base_ms": -1}, headers=AUTH)
    assert (bad.status_code, bad.json()["field"]) == (400, "base_ms")
    dup = http.post(url, json={"version": "1"}, headers=AUTH)
    assert dup.status_code == 409


def test_unload_drains_a_version_but_never_the_last_one(http: httpx.Client, start_server: StartServer) -> None:
    server = start_server(models=[ECHO, {**FAST, "version": "1"}, {**FAST, "version": "2"}], admin_token=TOKEN)
    url = server.url + "/admin/models/tokens/unload"
    assert http.post(url, json={"version": "2"}, headers=AUTH).status_code == 202
    wait_until(lambda: list(server.state.registry.entries["tokens"].versions) == ["1"], BOUND_S)
    assert serving(server, "tokens") == "1"
    last = http.post(url, json={"version": "1"}, headers=AUTH)
    assert (last.status_code, last.json()["error"]) == (409, "conflict")


# --- zero downtime ---------------------------------------------------------------------------------


def test_repeated_hot_swaps_under_streaming_load_fail_no_request(http: httpx.Client, start_server: StartServer) -> None:
    server = start_server(models=[ECHO, {**FAST, "version": "1"}], admin_token=TOKEN, graceful_shutdown_s=2)
    stop = threading.Event()
    failures: list[str] = []
    versions: collections.Counter[str] = collections.Counter()

    def sse_client() -> None:
        with httpx.Client(timeout=httpx.Timeout(BOUND_S), trust_env=False) as own:
            while not stop.is_set():
                with own.stream("POST", server.url + "/v1/stream", json={"prompt": PROMPT, "max_tokens": 20}) as r:
                    if r.status_code != 200:
                        failures.append(f"status {r.status_code}")
                        continue
                    blocks = [b for b in sse_blocks(r.iter_raw()) if b.event]
                header = r.headers["x-model-version"]
                last = blocks[-1]
                if [b.event for b in blocks] != ["token"] * 20 + ["done"] or last.json()["model_version"] != header:
                    failures.append(f"stream {[b.event for b in blocks][-3:]} on {header}")
                versions[header] += 1

    def predict_client() -> None:
        with httpx.Client(timeout=httpx.Timeout(BOUND_S), trust_env=False) as own:
            while not stop.is_set():
                r = own.post(server.url + "/predict", json={"input": [1.0]})
                if r.status_code != 200 or r.json()["output"] != [1.0]:
                    failures.append(f"predict {r.status_code}")

    threads = [threading.Thread(target=sse_client) for _ in range(4)] + [threading.Thread(target=predict_client)]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: versions["1"] > 0, BOUND_S)
        for version in ["2", "3", "4", "5"]:
            before = versions[version]
            answer = http.post(
                server.url + "/admin/models/tokens/load", json={**FAST, "version": version, "load_ms": 30}, headers=AUTH
            )
            assert answer.status_code == 202
            wait_until(lambda v=version: serving(server, "tokens") == v, BOUND_S)  # type: ignore[misc]
            wait_until(lambda v=version, b=before: versions[v] > b, BOUND_S)  # type: ignore[misc]
        echo = http.post(server.url + "/admin/models/echo/load", json={"version": "2"}, headers=AUTH)
        assert echo.status_code == 202
        wait_until(lambda: serving(server, "echo") == "2", BOUND_S)
    finally:
        stop.set()
        for t in threads:
            t.join(BOUND_S)
    assert failures == []
    assert set(versions) == {"1", "2", "3", "4", "5"}
    wait_until(lambda: list(server.state.registry.entries["tokens"].versions) == ["5"], BOUND_S)  # old ones drained
    assert server.state.metrics.model_swaps.child("tokens").value == 4


# --- SIGHUP ----------------------------------------------------------------------------------------


def test_sighup_rereads_the_settings_file_and_swaps_in_new_versions(tmp_path: Path, http: httpx.Client) -> None:
    config = tmp_path / "server.yaml"
    config.write_text("port: 0\nmodels:\n  - {kind: echo}\n  - {kind: tokens, version: '1'}\n")
    cmd = [sys.executable, "-m", "infer_bench.cli", "serve", "--config", str(config)]
    env = {k: v for k, v in os.environ.items() if k != "INFERBENCH_ADMIN_TOKEN"}
    log = tmp_path / "server.log"
    with log.open("w") as err, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env) as proc:
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            assert "reference server on" in line, line + log.read_text()
            url = line.split(" on ", 1)[1].strip()

            def version() -> str:
                models: list[dict[str, Any]] = http.get(url + "/v1/models").json()["data"]
                return next(str(m["version"]) for m in models if m["id"] == "tokens")

            assert version() == "1"
            config.write_text(config.read_text() + "  - {kind: tokens, version: '2'}\n")
            proc.send_signal(signal.SIGHUP)
            wait_until(lambda: version() == "2", BOUND_S)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=BOUND_S)
    assert "Traceback" not in log.read_text()
