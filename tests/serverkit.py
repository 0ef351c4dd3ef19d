"""Helpers for talking to a real reference server in tests: an SSE block reader and WebSocket messages.

The event stream is parsed here with a small WHATWG-SSE block reader rather than the probe's, so a
framing mistake in one cannot hide behind the same mistake in the other.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
from websockets.sync.client import ClientConnection, connect

from reference_server.serve import EmbeddedServer

Message = dict[str, Any]
RECV_TIMEOUT_S = 10.0


@dataclass
class SseBlock:
    """One blank-line-terminated block of an event stream, comments included (heartbeats are comments)."""

    event: str | None = None
    id: str | None = None
    data: list[str] = field(default_factory=list)
    retry: int | None = None
    comments: list[str] = field(default_factory=list)

    def json(self) -> Any:
        return json.loads("\n".join(self.data))


def _lines(chunks: Iterator[bytes]) -> Iterator[str]:
    """Lines of a byte stream; WHATWG SSE ends lines with CRLF, LF or CR (we send LF)."""
    buffer = b""
    for chunk in chunks:
        buffer += chunk
        *complete, buffer = buffer.split(b"\n")
        for line in complete:
            yield line.removesuffix(b"\r").decode()
    assert buffer == b"", f"the stream ended inside a line: {buffer!r}"


def sse_blocks(chunks: Iterator[bytes]) -> Iterator[SseBlock]:
    """Blocks of an event stream as they arrive; fails if the stream stops inside a block."""
    block, touched = SseBlock(), False
    for line in _lines(chunks):
        if not line:
            if touched:
                yield block
            block, touched = SseBlock(), False
            continue
        touched = True
        if line.startswith(":"):  # WHATWG SSE: a line starting with a colon is a comment
            block.comments.append(line[1:].removeprefix(" "))
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            block.event = value
        elif name == "data":
            block.data.append(value)
        elif name == "id":
            block.id = value
        elif name == "retry":
            block.retry = int(value)
    assert not touched, "the stream ended inside an event (no blank line after it)"


@dataclass
class Streamed:
    status: int
    headers: httpx.Headers
    blocks: list[SseBlock]

    @property
    def tokens(self) -> list[SseBlock]:
        return [b for b in self.blocks if b.event == "token"]

    @property
    def texts(self) -> list[str]:
        return [b.json()["token"] for b in self.tokens]

    @property
    def last(self) -> SseBlock:
        return self.blocks[-1]


def stream(http: httpx.Client, server: EmbeddedServer, body: dict[str, Any], **kwargs: Any) -> Streamed:
    """POST ``body`` to /v1/stream and read the whole event stream."""
    with http.stream("POST", server.url + "/v1/stream", json=body, **kwargs) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        return Streamed(r.status_code, r.headers, list(sse_blocks(r.iter_raw())))


def open_socket(server: EmbeddedServer) -> ClientConnection:
    # proxy=None: no proxy from the environment may take loopback traffic elsewhere.
    return connect(server.url.replace("http://", "ws://") + "/ws", open_timeout=5, close_timeout=2, proxy=None)


def send(ws: ClientConnection, message: Message) -> None:
    ws.send(json.dumps(message))


def recv(ws: ClientConnection) -> Message:
    raw = ws.recv(timeout=RECV_TIMEOUT_S)
    assert isinstance(raw, str), f"expected a text frame, got {raw!r}"
    message: Message = json.loads(raw)
    return message


def collect(ws: ClientConnection, ids: set[str]) -> dict[str, list[Message]]:
    """Every message for ``ids`` until each has its final ``done`` or ``error``; others are not expected."""
    got: dict[str, list[Message]] = {i: [] for i in ids}
    open_ids = set(ids)
    while open_ids:
        message = recv(ws)
        assert message.get("id") in ids, f"a message for no request of ours: {message}"
        got[message["id"]].append(message)
        if message["type"] in ("done", "error"):
            open_ids.discard(message["id"])
    return got
