"""``serve --workers N``: a worker process killed mid-stream takes only its own streams with it.

The streams are raw sockets, so each can be traced to the worker process that accepted it (its
server-side socket's inode, from /proc/net/tcp, among that process's descriptors). The worker holding
some of them is killed with SIGKILL; the other worker's streams must end complete, with every token,
and uvicorn's supervisor must start a new worker that serves requests.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest

from polling import wait_until
from test_cli import Served, serving

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="traces sockets to processes through Linux /proc"),
]

TOKENS = 60  # at 20 ms a step: ~1.2 s a stream, long enough to kill a worker in the middle
SETTINGS = {"models": [{"kind": "tokens", "base_ms": 20, "per_seq_ms": 0, "prefill_ms": 0}]}
BOUND_S = 30.0


def _workers(pid: int) -> set[int]:
    """The worker processes uvicorn's supervisor ``pid`` runs (not multiprocessing's resource tracker)."""
    workers: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            try:
                if b"spawn_main" in Path(f"/proc/{child}/cmdline").read_bytes():
                    workers.add(int(child))
            except OSError:
                continue  # gone meanwhile
    return workers


def _stop(served: Served) -> None:
    """SIGTERM, as an operator would: the supervisor stops its workers (SIGKILL would orphan them)."""
    workers = _workers(served.proc.pid) if served.proc.poll() is None else set()
    served.proc.send_signal(signal.SIGTERM)
    try:
        served.proc.wait(timeout=BOUND_S)
    except subprocess.TimeoutExpired:
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            link = os.readlink(fd)
        except OSError:
            continue  # closed meanwhile
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    return inodes


def _server_side_inode(server_port: int, client_port: int) -> str | None:
    """The inode of the server's end of the connection from ``client_port`` (IPv4 loopback)."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local_port = int(fields[1].rsplit(":", 1)[1], 16)
        remote_port = int(fields[2].rsplit(":", 1)[1], 16)
        if local_port == server_port and remote_port == client_port and fields[9] != "0":
            return fields[9]
    return None


def _open_stream(port: int, n: int) -> socket.socket:
    body = json.dumps({"prompt": f"stream {n}", "max_tokens": TOKENS}).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=BOUND_S)
    sock.sendall(
        b"POST /v1/stream HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\n"
        + f"content-length: {len(body)}\r\n\r\n".encode()
        + body
    )
    return sock


def _read_to_end(sock: socket.socket) -> bytes:
    data = b""
    try:
        while b"event: done" not in data and (chunk := sock.recv(65536)):
            data += chunk
    except ConnectionResetError:
        pass  # its worker died: the stream ends here
    return data


def _owner(workers: set[int], port: int, sock: socket.socket) -> int | None:
    inode = _server_side_inode(port, sock.getsockname()[1])
    return next((w for w in workers if inode is not None and inode in _socket_inodes(w)), None)


@pytest.fixture
def settings_file(tmp_path: Path) -> Path:
    path = tmp_path / "server.yaml"
    path.write_text(json.dumps(SETTINGS))  # JSON is YAML
    return path


def test_a_killed_worker_takes_only_its_own_streams_and_is_replaced(settings_file: Path) -> None:
    with serving("--workers", "2", "--config", str(settings_file)) as served, ExitStack() as stack:
        stack.callback(_stop, served)
        port = int(served.url.rsplit(":", 1)[1])
        wait_until(lambda: len(_workers(served.proc.pid)) == 2, BOUND_S)
        workers = _workers(served.proc.pid)
        with httpx.Client(trust_env=False, timeout=BOUND_S) as http:
            wait_until(lambda: all(http.get(served.url + "/readyz").status_code == 200 for _ in range(4)), BOUND_S)

        # Streams until both workers hold some (the kernel picks the accepting process), bounded.
        owners: dict[socket.socket, int] = {}
        for n in range(64):
            sock = stack.enter_context(_open_stream(port, n))
            wait_until(lambda s=sock: _owner(workers, port, s) is not None, BOUND_S)
            owners[sock] = _owner(workers, port, sock)  # type: ignore[assignment]
            if len(set(owners.values())) == 2 and n >= 3:
                break
        assert len(set(owners.values())) == 2, "every stream went to one worker"

        victim = next(iter(owners.values()))
        os.kill(victim, signal.SIGKILL)
        ends = {sock: _read_to_end(sock) for sock in owners}

        for sock, data in ends.items():
            if owners[sock] == victim:
                assert b"event: done" not in data  # cut off with its worker
            else:
                assert data.count(b"event: token") == TOKENS, data[-300:]
                assert b'"finish_reason":"length"' in data
        survivors = sum(1 for sock in owners if owners[sock] != victim)
        assert survivors >= 1

        # The supervisor replaces the dead worker, and the server answers as before.
        wait_until(lambda: len(_workers(served.proc.pid) - {victim}) == 2, BOUND_S)
        with httpx.Client(trust_env=False, timeout=BOUND_S) as http:
            for n in range(8):
                answer = http.post(served.url + "/v1/stream", json={"prompt": f"after {n}", "max_tokens": 3})
                assert answer.status_code == 200
                assert answer.text.count("event: token") == 3
