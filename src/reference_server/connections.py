"""Connection-level protection, in uvicorn's HTTP and WebSocket protocol classes (subclassed): what a
client can cost before any request reaches the application.

Read deadline (``request_read_timeout_s``). uvicorn waits forever for a request that never ends: a
socket that sends nothing, half a head, or a head and half its body holds its descriptor and buffers
for good (slowloris). Here a request must arrive whole — head and body — within the deadline of its
start (the connection's opening, or its first byte after a keep-alive pause, which uvicorn's own
keep-alive timeout bounds); else the client gets ``408`` with ``{"error":"request_timeout"}`` and the
connection closes. One timer per request, armed at its start and cancelled once it is read.

Connection limit (``max_connections_per_client``). Stream leases (admission.py) bound what a client may
*run*; this bounds what it may *hold*: a client that opens thousands of idle sockets costs file
descriptors and memory before it sends a byte. It counts by peer address alone (a connection has no
``X-Client-Id`` before its first request; clients behind one proxy share its address, so size the limit
for that). A WebSocket upgrade hands the same transport from the HTTP protocol to the WebSocket
protocol (``connection_made`` is called again, the HTTP ``connection_lost`` never is), so the counter
tracks transports and counts each once, whichever protocol sees it first and last. A connection over
the limit is answered, not reset: its first request head gets ``429`` with
``{"error":"too_many_connections"}`` and ``Connection: close``; then the server shuts its side and drops
whatever else comes until the client closes, so the answer is not lost to a reset. With
``--workers N`` each worker process counts its own connections.
"""

from __future__ import annotations

import asyncio
import json
import logging
import weakref
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from uvicorn.server import ServerState as UvicornServerState

log = logging.getLogger("reference_server")

_HEAD_END = b"\r\n\r\n"
_MAX_REFUSED_HEAD = 64 << 10  # a refused client that never ends its head is cut off here
_REFUSED_HEAD_WAIT_S = 5.0  # how long a refused connection may take to send its first request head
_REFUSED_LINGER_S = 2.0  # how long a refused connection may take to close its side after the answer


class ReferenceConfig(uvicorn.Config):
    """uvicorn's config plus our connection settings (a subclass, so that ``--workers N`` pickles it)."""

    def __init__(
        self,
        app: Any,
        *,
        max_connections_per_client: int | None = None,
        request_read_timeout_s: float | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(app, **kwargs)
        self.max_connections_per_client = max_connections_per_client
        self.request_read_timeout_s = request_read_timeout_s


@dataclass(slots=True)
class ConnectionCounter:
    """Open connections per peer address, each transport counted once."""

    limit: int
    by_peer: dict[str, int] = field(default_factory=dict)
    peers: dict[int, str] = field(default_factory=dict)  # id(transport) -> the peer it counts for
    refused: int = 0

    def admit(self, transport: asyncio.BaseTransport) -> bool:
        """Count a new connection: False when its address already holds ``limit`` of them."""
        key = id(transport)
        if key in self.peers:
            return True  # the same transport after a WebSocket upgrade
        peer = peer_address(transport)
        held = self.by_peer.get(peer, 0)
        if held >= self.limit:
            self.refused += 1
            return False
        self.by_peer[peer] = held + 1
        self.peers[key] = peer
        return True

    def leave(self, transport: asyncio.BaseTransport) -> None:
        peer = self.peers.pop(id(transport), None)
        if peer is None:
            return  # refused, or already counted out
        held = self.by_peer[peer] - 1
        if held:
            self.by_peer[peer] = held
        else:
            del self.by_peer[peer]

    def held(self, peer: str) -> int:
        return self.by_peer.get(peer, 0)


def peer_address(transport: asyncio.BaseTransport) -> str:
    peer = transport.get_extra_info("peername")
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return "unknown"  # a Unix socket: one client as far as this limit is concerned


_COUNTERS: weakref.WeakKeyDictionary[UvicornServerState, ConnectionCounter] = weakref.WeakKeyDictionary()


def counter_for(config: uvicorn.Config, server_state: UvicornServerState) -> ConnectionCounter | None:
    """The counter of one server (one per process), or None when the limit is off."""
    limit = getattr(config, "max_connections_per_client", None)
    if limit is None:
        return None
    counter = _COUNTERS.get(server_state)
    if counter is None:
        counter = _COUNTERS[server_state] = ConnectionCounter(limit)
    return counter


def close_response(status: str, error: str, detail: str) -> bytes:
    """A whole JSON error response that closes the connection, written straight to the transport."""
    body = json.dumps({"error": error, "detail": detail}).encode()
    head = (
        f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
        "connection: close\r\n\r\n"
    ).encode()
    return head + body


def refusal_response(limit: int) -> bytes:
    return close_response(
        "429 Too Many Requests",
        "too_many_connections",
        f"this address already holds {limit} open connections (the server's limit); "
        "close one or reuse a keep-alive connection",
    )


class ReferenceHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a read deadline per request and the per-address connection limit."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._counter = counter_for(self.config, self.server_state)
        self._refused: _Refusal | None = None
        self._read_timeout_s: float | None = getattr(self.config, "request_read_timeout_s", None)
        self._read_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        counter = self._counter
        if counter is not None and not counter.admit(transport):
            self._refused = _Refusal(transport, counter.limit)
            return
        self._arm_read_deadline()  # the first request is under way from the start

    def data_received(self, data: bytes) -> None:
        if self._refused is not None:
            self._refused.data_received(data)
            return
        super().data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_read_deadline()
        if self._refused is not None:
            self._refused.cancel()
        elif self._counter is not None and self.transport is not None:
            self._counter.leave(self.transport)
        super().connection_lost(exc)

    # --- the read deadline ------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._read_deadline is None:
            self._arm_read_deadline()

    def on_message_complete(self) -> None:
        self._disarm_read_deadline()
        super().on_message_complete()

    def on_response_complete(self) -> None:
        self._disarm_read_deadline()  # answered before it was read whole (a 413, say): nothing to wait for
        super().on_response_complete()

    def handle_websocket_upgrade(self) -> None:
        self._disarm_read_deadline()
        super().handle_websocket_upgrade()

    def _arm_read_deadline(self) -> None:
        if self._read_timeout_s is not None:
            self._read_deadline = self.loop.call_later(self._read_timeout_s, self._read_timed_out)

    def _disarm_read_deadline(self) -> None:
        if self._read_deadline is not None:
            self._read_deadline.cancel()
            self._read_deadline = None

    def _read_timed_out(self) -> None:
        self._read_deadline = None
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        cycle = self.cycle
        if cycle is None or not cycle.response_started:  # nothing written yet: the client gets a reason
            detail = f"the request did not arrive whole within {self._read_timeout_s:g} s"
            transport.write(close_response("408 Request Timeout", "request_timeout", detail))
        transport.close()  # the application, if it was reading the body, hears a disconnect


class ReferenceWebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's sans-I/O WebSocket protocol, counting out the upgraded connection when it ends."""

    def __init__(
        self, config: uvicorn.Config, server_state: UvicornServerState, app_state: dict[str, Any], **kwargs: Any
    ) -> None:
        super().__init__(config, server_state, app_state, **kwargs)
        self._counter = counter_for(config, server_state)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._counter is not None and self.transport is not None:
            self._counter.leave(self.transport)
        super().connection_lost(exc)


class _Refusal:
    """Answer a refused connection's first request head with 429, then linger until the client closes."""

    def __init__(self, transport: asyncio.Transport, limit: int) -> None:
        self.transport = transport
        self.limit = limit
        self.head = b""
        self.answered = False
        # A refused client that never sends its request is not kept waiting for one.
        self.timer: asyncio.TimerHandle | None = asyncio.get_running_loop().call_later(
            _REFUSED_HEAD_WAIT_S, transport.close
        )

    def data_received(self, data: bytes) -> None:
        if self.answered:
            return  # the rest of a body, or more requests: dropped until the client closes
        self.head += data
        if _HEAD_END not in self.head and len(self.head) < _MAX_REFUSED_HEAD:
            return
        self.answered = True
        self.head = b""
        self.cancel()
        transport = self.transport
        transport.write(refusal_response(self.limit))
        if transport.can_write_eof():
            transport.write_eof()  # our side is done; closing outright could reset the answer away
            self.timer = asyncio.get_running_loop().call_later(_REFUSED_LINGER_S, transport.close)
        else:
            transport.close()

    def cancel(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
