"""A streaming server whose time to first token is known: the truth infer-bench's TTFT is checked against.

Any ``POST`` gets ``200 text/event-stream`` (chunked) with its head at once; the first token event follows
``--delay-ms`` after the request arrived, and right after it (a second write) the other ``--tokens - 1``
token events, ``event: done`` and the last chunk. Events have the reference server's format
(docs/protocol.md), one HTTP chunk each::

    id: r:<seq>
    event: token
    data: {"token":" x","seq":<seq>}

    event: done
    data: {"finish_reason":"length"}

A ``GET`` with ``upgrade: websocket`` (any path) opens a WebSocket speaking the reference server's ``/ws``
protocol as far as infer-bench's client needs it: each ``generate`` message is answered, on the same
schedule, by ``token`` messages (``{"type":"token","id":…,"seq":…,"token":" x"}``) and a ``done`` with
``finish_reason: "length"``; many generations may share a socket; ``cancel`` is ignored (the client drops
what follows), pings are answered, a close is echoed. No extensions, no fragmented messages.

It is a bare ``asyncio.Protocol`` on uvloop that parses just enough HTTP/1.1 (keep-alive, ``content-length``
bodies, one request at a time per connection): the client must be the bottleneck, never this server.

Timing
    uvloop rounds timers to whole milliseconds and fires them late (measured on an idle core:
    ``loop.call_later(0.020)`` took 20.10 to 20.28 ms, p50 20.17, max 21.7). The delay is kept instead by
    a ``timerfd`` armed at an absolute CLOCK_MONOTONIC time (timer slack set to 1 ns) and read by the
    loop: p50 20.03 ms under load. Every request waits the same delay, so due times come in arrival order
    and one FIFO with one timer serves them all.

    For every first-token write the server records its actual delay: from the moment the kernel received
    the request's last bytes to just before the write. Connections are read with ``recvmsg`` and
    ``SO_TIMESTAMPNS``, so that moment is the kernel's receive stamp, not the later one at which this
    server's event loop got round to the read: under load that lateness is the server's, and counting it
    in the server's delay keeps it out of the client's error. A client's TTFT minus this delay is the
    client's own error (the send, the loopback hops, its own scheduling), free of the server's timer
    overshoot and read lateness.

Routes besides POST
    ``GET /healthz``          200 ``ok``, for readiness polling
    ``GET /stats``            JSON: requests streamed and the actual first-token delay (µs: min, mean,
                              p50, p90, p99, p99.9, max) since the last reset. ``skip_ms=N`` leaves out
                              the requests that arrived in the first N ms after the first one (a client's
                              warmup); ``reset=1`` clears the statistics after answering

    .venv/bin/python benchmarks/fixed_delay_server.py --port 8002 [--delay-ms 20] [--tokens 64]

Linux only (timerfd and the timer-slack ``prctl``); SIGTERM or SIGINT stop it with exit status 0.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import bisect
import collections
import contextlib
import ctypes
import ctypes.util
import hashlib
import os
import signal
import socket
import struct
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass

import orjson
import uvloop

_HEAD_END = b"\r\n\r\n"
_CONTENT_LENGTH = b"\r\ncontent-length:"
_STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
    b"transfer-encoding: chunked\r\n\r\n"
)
_LAST_CHUNK = b"0\r\n\r\n"
_MAX_HEAD_BYTES = 64 * 1024

# --- timerfd (Linux): os.timerfd_create only arrives in Python 3.13 --------------------------------------

_CLOCK_MONOTONIC = 1
_TFD_TIMER_ABSTIME = 1
_PR_SET_TIMERSLACK = 29
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


def _check(rc: int, call: str) -> int:
    if rc < 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{call}: {os.strerror(errno)}")
    return rc


class Alarm:
    """A one-shot alarm at an absolute ``time.monotonic_ns()``; its ``fd`` becomes readable when it rings."""

    def __init__(self) -> None:
        self.fd = _check(_libc.timerfd_create(_CLOCK_MONOTONIC, os.O_NONBLOCK | os.O_CLOEXEC), "timerfd_create")
        self._spec = _Itimerspec()  # reused: arming allocates nothing

    def arm(self, due_ns: int) -> None:
        """Ring at ``due_ns`` (at once if it has passed); replaces any earlier arming."""
        value = self._spec.it_value
        value.tv_sec, value.tv_nsec = divmod(max(due_ns, 1), 1_000_000_000)  # an all-zero value disarms
        _check(_libc.timerfd_settime(self.fd, _TFD_TIMER_ABSTIME, ctypes.byref(self._spec), None), "timerfd_settime")

    def acknowledge(self) -> None:
        with contextlib.suppress(BlockingIOError):  # already read, or re-armed into the future since it rang
            os.read(self.fd, 8)

    def close(self) -> None:
        os.close(self.fd)


def _minimise_timer_slack() -> None:
    """Linux lets a timer of an ordinary thread ring up to 50 µs late by default (prctl(2), PR_SET_TIMERSLACK)."""
    _check(_libc.prctl(_PR_SET_TIMERSLACK, 1, 0, 0, 0), "prctl(PR_SET_TIMERSLACK)")


# --- the stream -------------------------------------------------------------------------------------------


def _chunk(payload: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(payload), payload)


def _token_event(seq: int) -> bytes:
    data = orjson.dumps({"token": " x", "seq": seq})
    return b"id: r:%d\nevent: token\ndata: %s\n\n" % (seq, data)


@dataclass(frozen=True)
class StreamBytes:
    """The bytes of every answer, built once: all streams are alike."""

    first: bytes  # the first token event's chunk
    rest: bytes  # the other token events, the done event and the last chunk

    @classmethod
    def build(cls, tokens: int) -> StreamBytes:
        rest = [_chunk(_token_event(seq)) for seq in range(1, tokens)]
        rest.append(_chunk(b'event: done\ndata: {"finish_reason":"length"}\n\n'))
        rest.append(_LAST_CHUNK)
        return cls(first=_chunk(_token_event(0)), rest=b"".join(rest))

    @classmethod
    def build_ws(cls, tokens: int, request_id: str) -> StreamBytes:
        """The reference server's WebSocket messages (docs/protocol.md) for generation ``request_id``."""
        frames = [_ws_frame(orjson.dumps({"type": "token", "id": request_id, "seq": seq, "token": " x"}))
                  for seq in range(tokens)]  # fmt: skip
        frames.append(_ws_frame(orjson.dumps({"type": "done", "id": request_id, "finish_reason": "length"})))
        return cls(first=frames[0], rest=b"".join(frames[1:]))


def _plain(status: str, content_type: bytes, body: bytes) -> bytes:
    head = b"HTTP/1.1 %s\r\ncontent-type: %s\r\ncontent-length: %d\r\n\r\n" % (status.encode(), content_type, len(body))
    return head + body


def percentiles_us(delays_ns: list[int]) -> dict[str, float]:
    """Nearest-rank statistics of ``delays_ns`` in microseconds."""
    if not delays_ns:
        return {}
    ordered = sorted(delays_ns)
    last = len(ordered) - 1

    def at(q: float) -> float:
        return round(ordered[min(last, int(q * len(ordered)))] / 1000, 1)

    return {
        "min": round(ordered[0] / 1000, 1), "mean": round(sum(ordered) / len(ordered) / 1000, 1),
        "p50": at(0.50), "p90": at(0.90), "p99": at(0.99), "p999": at(0.999), "max": round(ordered[-1] / 1000, 1),
    }  # fmt: skip


class FixedDelayServer:
    """Holds the streams waiting for their first token, the alarm that releases them, and the statistics."""

    def __init__(self, loop: asyncio.AbstractEventLoop, delay_ms: float, tokens: int) -> None:
        self.delay_ns = int(delay_ms * 1_000_000)
        self.tokens = tokens
        self.stream = StreamBytes.build(tokens)
        # (due, received, connection, WebSocket request id or None for SSE)
        self.waiting: collections.deque[tuple[int, int, StreamProtocol, str | None]] = collections.deque()
        self._ws_streams: dict[str, StreamBytes] = {}  # by request id: ids repeat across sockets
        self.received_ns: list[int] = []  # per first token sent: when its request arrived ...
        self.delays_ns: list[int] = []  # ... and how long it waited
        self.alarm = Alarm()
        loop.add_reader(self.alarm.fd, self._ring)

    def close(self, loop: asyncio.AbstractEventLoop) -> None:
        loop.remove_reader(self.alarm.fd)
        self.alarm.close()

    def start_stream(self, protocol: StreamProtocol, received_ns: int, request_id: str | None = None) -> None:
        """Queue a stream: SSE (its head goes out now) or, with ``request_id``, a WebSocket generation."""
        if request_id is None:
            assert protocol.transport is not None
            protocol.transport.write(_STREAM_HEAD)
        due = received_ns + self.delay_ns
        if not self.waiting:
            self.alarm.arm(due)
        self.waiting.append((due, received_ns, protocol, request_id))  # one delay for all: due never goes back

    def stream_bytes(self, request_id: str | None) -> StreamBytes:
        if request_id is None:
            return self.stream
        found = self._ws_streams.get(request_id)
        if found is None:
            if len(self._ws_streams) >= _WS_CACHE:
                self._ws_streams.clear()
            found = self._ws_streams[request_id] = StreamBytes.build_ws(self.tokens, request_id)
        return found

    def _ring(self) -> None:
        self.alarm.acknowledge()
        waiting, receipts, delays = self.waiting, self.received_ns, self.delays_ns
        due: list[tuple[StreamProtocol, StreamBytes]] = []
        now = time.monotonic_ns()
        while waiting and waiting[0][0] <= now:
            _, received, protocol, request_id = waiting.popleft()
            transport = protocol.transport
            if transport is not None and not transport.is_closing():
                stream = self.stream_bytes(request_id)
                sent = time.monotonic_ns()
                transport.write(stream.first)
                receipts.append(received)
                delays.append(sent - received)
                due.append((protocol, stream))
            else:
                protocol.stream_done()
            if not (waiting and waiting[0][0] <= now):
                now = time.monotonic_ns()  # the writes took time: more may be due by now
        # Every first token of this wake-up goes out before any stream's rest, so that a burst of due
        # streams delays the first tokens of the later ones by one write each, not two.
        for protocol, stream in due:
            if protocol.transport is not None:
                protocol.transport.write(stream.rest)
            protocol.stream_done()
        if waiting:
            self.alarm.arm(waiting[0][0])

    def stats(self, skip_ms: float, reset: bool) -> bytes:
        # First tokens go out in arrival order, so the requests within the skipped span are a prefix.
        receipts = self.received_ns
        skipped = bisect.bisect_left(receipts, receipts[0] + int(skip_ms * 1_000_000)) if receipts else 0
        delays = self.delays_ns[skipped:]
        body = orjson.dumps({
            "requests": len(delays),
            "skipped": skipped,
            "delay_ms": self.delay_ns / 1e6,
            "tokens": self.tokens,
            "first_token_delay_us": percentiles_us(delays),
        })  # fmt: skip
        if reset:
            self.received_ns, self.delays_ns = [], []
        return _plain("200 OK", b"application/json", body)


class StreamProtocol(asyncio.Protocol):
    """One client connection. HTTP: one request at a time (one that arrives mid-stream waits its turn);
    after a WebSocket upgrade: any number of generations at once."""

    def __init__(self, server: FixedDelayServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self._buffer = b""
        self._streaming = False
        self._websocket = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports do not subclass asyncio's

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.data_received_at(data, time.monotonic_ns())

    def data_received_at(self, data: bytes, received_ns: int) -> None:
        """``data`` that the kernel received at ``received_ns`` (CLOCK_MONOTONIC)."""
        self._buffer = self._buffer + data if self._buffer else data
        if self._websocket:
            self._serve_websocket(received_ns)
        else:
            self._serve(received_ns)

    def stream_done(self) -> None:
        self._streaming = False
        if self._buffer and self.transport is not None and not self._websocket:
            self._serve(time.monotonic_ns())

    def _serve(self, received_ns: int) -> None:
        buffer = self._buffer
        while not self._streaming and self.transport is not None:
            end = buffer.find(_HEAD_END)
            if end < 0:
                if len(buffer) > _MAX_HEAD_BYTES:
                    self._refuse(b"431 Request Header Fields Too Large")
                    return
                break
            head = buffer[:end]
            body_start = end + 4
            length = _content_length(head)
            if length < 0:
                self._refuse(b"400 Bad Request")
                return
            if len(buffer) < body_start + length:
                break
            buffer = buffer[body_start + length :]
            self._respond(head, received_ns)
            if self._websocket:
                self._buffer = buffer
                self._serve_websocket(received_ns)
                return
        self._buffer = buffer

    def _respond(self, head: bytes, received_ns: int) -> None:
        transport = self.transport
        assert transport is not None
        method, _, rest = head.partition(b" ")
        target = rest.partition(b" ")[0]
        if method == b"POST":
            self._streaming = True
            self.server.start_stream(self, received_ns)
        elif (key := _websocket_key(head)) is not None:
            transport.write(_WS_HANDSHAKE % _ws_accept(key))
            self._websocket = True
        elif target == b"/healthz":
            transport.write(_plain("200 OK", b"text/plain", b"ok"))
        elif target.startswith(b"/stats"):
            query = urllib.parse.parse_qs(target.partition(b"?")[2].decode("latin-1"))
            skip_ms = float(query.get("skip_ms", ["0"])[0])
            transport.write(self.server.stats(skip_ms, reset=query.get("reset") == ["1"]))
        else:
            transport.write(_plain("404 Not Found", b"text/plain", b"POST anything to stream"))

    def _serve_websocket(self, received_ns: int) -> None:
        """RFC 6455 frames from the client: ``generate`` messages start streams; close and ping are answered."""
        transport = self.transport
        frames, self._buffer = _ws_parse(self._buffer)
        for opcode, payload in frames:
            if transport is None or transport.is_closing():
                return
            if opcode == _OP_TEXT:
                message = orjson.loads(payload)
                if message.get("type") == "generate":
                    self.server.start_stream(self, received_ns, str(message["id"]))
                # cancel (and anything else) is ignored: the stream runs out and the client drops it
            elif opcode == _OP_PING:
                transport.write(_ws_frame(payload, _OP_PONG))
            elif opcode == _OP_CLOSE:
                transport.write(_ws_frame(payload[:2], _OP_CLOSE))
                transport.close()
            elif opcode != _OP_PONG:  # continuation or binary frames: not what this server expects
                transport.write(_ws_frame(struct.pack("!H", 1003), _OP_CLOSE))
                transport.close()

    def _refuse(self, status: bytes) -> None:
        assert self.transport is not None
        self.transport.write(b"HTTP/1.1 %s\r\nconnection: close\r\ncontent-length: 0\r\n\r\n" % status)
        self.transport.close()
        self._buffer = b""


# --- WebSocket (RFC 6455): just enough for infer-bench's client --------------------------------------

_WS_CACHE = 100_000
_WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_WS_HANDSHAKE = (
    b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\nsec-websocket-accept: %s\r\n\r\n"
)
_SEC_WEBSOCKET_KEY = b"\r\nsec-websocket-key:"
_OP_TEXT, _OP_CLOSE, _OP_PING, _OP_PONG = 0x1, 0x8, 0x9, 0xA


def _websocket_key(head: bytes) -> bytes | None:
    """The ``sec-websocket-key`` of an upgrade request, or None."""
    lowered = head.lower()
    at = lowered.find(_SEC_WEBSOCKET_KEY)
    if at < 0 or b"upgrade: websocket" not in lowered:
        return None
    start = at + len(_SEC_WEBSOCKET_KEY)
    end = lowered.find(b"\r\n", start)
    return head[start : end if end >= 0 else len(head)].strip()


def _ws_accept(key: bytes) -> bytes:
    return base64.b64encode(hashlib.sha1(key + _WS_GUID).digest())


def _ws_frame(payload: bytes, opcode: int = _OP_TEXT) -> bytes:
    """One unmasked, unfragmented server frame."""
    size = len(payload)
    if size < 126:
        return bytes((0x80 | opcode, size)) + payload
    if size < 65536:
        return struct.pack("!BBH", 0x80 | opcode, 126, size) + payload
    return struct.pack("!BBQ", 0x80 | opcode, 127, size) + payload


def _ws_parse(buffer: bytes) -> tuple[list[tuple[int, bytes]], bytes]:
    """Complete frames at the start of ``buffer`` as (opcode, unmasked payload), and the bytes left over."""
    frames = []
    at = 0
    while len(buffer) - at >= 2:
        opcode, size = buffer[at] & 0x0F, buffer[at + 1] & 0x7F
        masked = buffer[at + 1] & 0x80
        start = at + 2
        if size >= 126:
            width = 2 if size == 126 else 8
            if len(buffer) < start + width:
                break
            size = int.from_bytes(buffer[start : start + width], "big")
            start += width
        mask = b""
        if masked:
            if len(buffer) < start + 4:
                break
            mask, start = buffer[start : start + 4], start + 4
        if len(buffer) < start + size:
            break
        payload = buffer[start : start + size]
        if mask and size:
            # XOR with the repeated 4-byte key, as one big integer (RFC 6455 §5.3)
            key = (mask * (size // 4 + 1))[:size]
            payload = (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(size, "big")
        frames.append((opcode, payload))
        at = start + size
    return frames, buffer[at:]


def _content_length(head: bytes) -> int:
    """The request's content-length (0 if none), or -1 when it is not a number."""
    lowered = head.lower()
    at = lowered.find(_CONTENT_LENGTH)
    if at < 0:
        return 0
    start = at + len(_CONTENT_LENGTH)
    end = lowered.find(b"\r\n", start)
    value = lowered[start : end if end >= 0 else len(lowered)].strip()
    return int(value) if value.isdigit() else -1


async def serve(host: str, port: int, delay_ms: float, tokens: int) -> None:
    loop = asyncio.get_running_loop()
    _minimise_timer_slack()
    server = FixedDelayServer(loop, delay_ms, tokens)
    stop: asyncio.Future[None] = loop.create_future()

    def request_stop() -> None:
        if not stop.done():
            stop.set_result(None)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, request_stop)
    listener = StampedListener(loop, host, port, lambda: StreamProtocol(server))
    print(f"fixed-delay server on http://{host}:{port} (delay {delay_ms:g} ms, {tokens} tokens)", flush=True)
    try:
        await stop
    finally:
        listener.close()
        server.close(loop)


# --- connections read with the kernel's receive time ---------------------------------------------------

SO_TIMESTAMPNS = 35  # Linux <asm-generic/socket.h>; its control message type SCM_TIMESTAMPNS is the same
_READ_SIZE = 256 * 1024


def _realtime_offset_ns() -> int:
    """CLOCK_REALTIME minus CLOCK_MONOTONIC: kernel receive stamps are realtime, our clock is monotonic."""
    samples = []
    for _ in range(5):
        before = time.monotonic_ns()
        real = time.time_ns()
        after = time.monotonic_ns()
        samples.append((after - before, real - (before + after) // 2))
    return min(samples)[1]  # the tightest bracket


class StampedConnection:
    """One accepted socket, read with ``recvmsg`` so each read carries its kernel receive time; written
    directly (with a buffer for what the socket does not take at once). Enough transport for
    ``StreamProtocol``: ``write``, ``close``, ``is_closing``."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, sock: socket.socket, protocol: StreamProtocol, offset_ns: int
    ) -> None:
        self.loop, self.sock, self.protocol, self.offset_ns = loop, sock, protocol, offset_ns
        self.fd = sock.fileno()
        self._out = bytearray()
        self._closing = False
        self._closed = False
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        loop.add_reader(self.fd, self._readable)
        protocol.connection_made(self)  # type: ignore[arg-type]  # duck-typed transport

    def _readable(self) -> None:
        try:
            data, ancillary, _, _ = self.sock.recvmsg(_READ_SIZE, 64)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._lost()
            return
        if not data:
            self._lost()
            return
        received = time.monotonic_ns()
        for level, kind, stamp in ancillary:
            if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(stamp) >= 16:
                seconds, nanos = struct.unpack("qq", stamp[:16])
                received = min(received, seconds * 1_000_000_000 + nanos - self.offset_ns)
        self.protocol.data_received_at(data, received)

    def write(self, data: bytes) -> None:
        if self._closed:
            return
        if self._out:
            self._out += data
            return
        try:
            sent = self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self._lost()
            return
        if sent < len(data):
            self._out += data[sent:]
            self.loop.add_writer(self.fd, self._writable)

    def _writable(self) -> None:
        try:
            sent = self.sock.send(self._out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._lost()
            return
        del self._out[:sent]
        if not self._out:
            self.loop.remove_writer(self.fd)
            if self._closing:
                self._lost()

    def is_closing(self) -> bool:
        return self._closing or self._closed

    def close(self) -> None:
        self._closing = True
        if not self._out:
            self._lost()

    def _lost(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.loop.remove_reader(self.fd)
        self.loop.remove_writer(self.fd)
        self.sock.close()
        self.protocol.connection_lost(None)


class StampedListener:
    """Accepts connections as ``StampedConnection``s (asyncio's transports cannot hand out ``recvmsg``'s
    control messages)."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, host: str, port: int, protocol_factory: Callable[[], StreamProtocol]
    ) -> None:
        self.loop, self.protocol_factory = loop, protocol_factory
        self.offset_ns = _realtime_offset_ns()
        self.sock = socket.create_server((host, port), backlog=4096, reuse_port=False)
        self.sock.setblocking(False)
        loop.add_reader(self.sock.fileno(), self._accept)

    def _accept(self) -> None:
        for _ in range(256):  # what is waiting now, bounded; the rest on the next wake-up
            try:
                client, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            StampedConnection(self.loop, client, self.protocol_factory(), self.offset_ns)

    def close(self) -> None:
        self.loop.remove_reader(self.sock.fileno())
        self.sock.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8002)
    parser.add_argument("--delay-ms", type=float, default=20.0, help="time to first token (default 20)")
    parser.add_argument("--tokens", type=int, default=64, help="token events per stream (default 64)")
    args = parser.parse_args()
    if args.delay_ms < 0 or args.tokens < 1:
        parser.error("--delay-ms must be >= 0 and --tokens >= 1")
    uvloop.run(serve(args.host, args.port, args.delay_ms, args.tokens))


if __name__ == "__main__":
    main()
