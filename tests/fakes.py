"""A deliberately broken HTTP server on loopback, for outcomes the reference server never produces.

Each path answers with canned bytes: a 429, a stream cut mid-way, bytes that break chunked encoding, a
stream that stalls. It runs its own asyncio loop in a background thread; only tests use it.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager

SSE_HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


TOKEN = _chunk(b'event: token\ndata: {"token":" x"}\n\n')

# /resumable: two tokens, then the connection drops; asked again with Last-Event-ID, the rest and done.
RESUMABLE_START = b"".join(_chunk(b'id: r:%d\nevent: token\ndata: {"token":" a"}\n\n' % i) for i in range(2))
RESUMED_TAIL = (
    b"".join(_chunk(b'id: r:%d\nevent: token\ndata: {"token":" b"}\n\n' % i) for i in range(2, 4))
    + _chunk(b'event: done\ndata: {"finish_reason":"stop"}\n\n')
    + b"0\r\n\r\n"
)

RESPONSES: dict[bytes, tuple[bytes, str]] = {
    # path: (bytes to send, then "close" | "reset" | "keep" | "stall")
    b"/rate-limited": (b'HTTP/1.1 429 Too Many Requests\r\ncontent-length: 24\r\n\r\n{"error":"rate_limited"}', "keep"),
    b"/server-error": (b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 2\r\n\r\nno", "keep"),
    b"/drop": (SSE_HEAD + TOKEN + TOKEN, "close"),
    b"/reset": (SSE_HEAD + TOKEN + TOKEN, "reset"),
    b"/garbage": (SSE_HEAD + TOKEN + b"zz\r\nnot a chunk\r\n", "keep"),
    b"/stall": (SSE_HEAD + TOKEN, "stall"),
    b"/no-done": (SSE_HEAD + TOKEN + b"0\r\n\r\n", "keep"),
    b"/ok": (
        SSE_HEAD + TOKEN + TOKEN + _chunk(b'event: done\ndata: {"finish_reason":"stop"}\n\n') + b"0\r\n\r\n",
        "keep",
    ),
}


async def _handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    served = 0  # requests answered on this connection
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            if length:
                await reader.readexactly(length)
            path = head.split(b" ", 2)[1]
            if path == b"/close-unanswered" or (path == b"/idle-close" and served):
                break  # as a server whose keep-alive timeout fires just as the request arrives
            served += 1
            if path == b"/idle-close":
                path = b"/ok"  # the first request on each connection is answered
            if path == b"/resumable":
                resumed = b"last-event-id:" in head.lower()
                writer.write(SSE_HEAD + (RESUMED_TAIL if resumed else RESUMABLE_START))
                await writer.drain()
                if not resumed:
                    break  # drop the connection mid-stream
                continue
            payload, then = RESPONSES.get(path, (b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n", "keep"))
            writer.write(payload)
            await writer.drain()
            if then == "close":
                break
            if then == "reset":  # SO_LINGER 0: the close sends a TCP reset, not a FIN
                sock = writer.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                break
            if then == "stall":
                await asyncio.sleep(3600)
    except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
        pass
    finally:
        writer.close()


@contextmanager
def broken_server(tls: ssl.SSLContext | None = None) -> Iterator[str]:
    """Serve the canned responses on 127.0.0.1 (over TLS with ``tls``); yield the base URL."""
    loop = asyncio.new_event_loop()
    started = threading.Event()
    holder: dict[str, object] = {}

    async def main() -> None:
        server = await asyncio.start_server(_handle, "127.0.0.1", 0, ssl=tls)
        holder["server"] = server
        holder["port"] = server.sockets[0].getsockname()[1]
        started.set()
        async with server:
            await server.serve_forever()

    task_holder: dict[str, asyncio.Task[None]] = {}

    def run() -> None:
        asyncio.set_event_loop(loop)
        task_holder["task"] = loop.create_task(main())
        try:
            loop.run_until_complete(task_holder["task"])
        except asyncio.CancelledError:
            pass
        finally:  # end every connection handler (a stalled one waits forever) before the loop goes
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.run_until_complete(asyncio.sleep(0.01))  # transports finish closing
            loop.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    if not started.wait(10):
        raise RuntimeError("the broken server did not start")
    try:
        yield f"{'https' if tls else 'http'}://127.0.0.1:{holder['port']}"
    finally:
        loop.call_soon_threadsafe(task_holder["task"].cancel)
        thread.join(10)
