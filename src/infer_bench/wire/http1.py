"""HTTP/1.1 responses: bytes in, events out, on httptools (the llhttp C parser that uvicorn uses).

One ``ResponseParser`` reads one connection, response after response (keep-alive and pipelining)::

    ResponseHead(status, headers, keep_alive)   the status line and headers (names lower-cased)
    BodyChunk(data)                             body bytes, de-chunked; consecutive pieces of one ``feed``
                                                are merged, so a read yields one chunk, not one per HTTP chunk
    ResponseEnd(keep_alive)                     the response is complete; if not ``keep_alive`` the peer
                                                closes (or the client must) and no response can follow
    Upgraded(rest)                              after the head of ``101 Switching Protocols``: the
                                                connection now speaks another protocol (WebSocket) and
                                                ``rest`` holds its first bytes; later ``feed`` calls return
                                                ``Upgraded(data)`` for whatever they are given

What llhttp cannot know is handled here: a response to HEAD has no body whatever its ``content-length``
(call ``expect_head_response`` before it arrives), and a response delimited by the closing of the connection
ends only at ``eof``. Interim responses (``100 Continue``, ``103 Early Hints``) are skipped (RFC 9110 §15.2:
a client may ignore them); the final response follows them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, TypeAlias

import httptools

from infer_bench.wire import ProtocolError

__all__ = [
    "DEFAULT_MAX_HEAD_BYTES",
    "BodyChunk",
    "ResponseEnd",
    "ResponseEvent",
    "ResponseHead",
    "ResponseParser",
    "SimpleResponses",
    "Upgraded",
    "encode_request",
    "request_with_body",
]

DEFAULT_MAX_HEAD_BYTES: Final = 64 * 1024

_CRLF: Final = b"\r\n"
_HEAD_END: Final = b"\r\n\r\n"


@dataclass(frozen=True, slots=True)
class ResponseHead:
    """A final response's status line and headers; header names are lower-cased, values as sent."""

    status: int
    headers: tuple[tuple[bytes, bytes], ...]
    keep_alive: bool

    def header(self, name: bytes) -> bytes | None:
        """The first value of header ``name`` (lower-case), or None."""
        for key, value in self.headers:
            if key == name:
                return value
        return None


@dataclass(frozen=True, slots=True)
class BodyChunk:
    data: bytes


@dataclass(frozen=True, slots=True)
class ResponseEnd:
    keep_alive: bool


@dataclass(frozen=True, slots=True)
class Upgraded:
    """The connection switched protocols after the last ``ResponseHead``; ``rest`` is not HTTP."""

    rest: bytes


ResponseEvent: TypeAlias = ResponseHead | BodyChunk | ResponseEnd | Upgraded

# A frozen dataclass's __init__ sets fields through object.__setattr__; setting the slot directly builds the
# same immutable BodyChunk in about half the time. One is made for every read of a streaming body.
_new_object = object.__new__
_set_body_data: Callable[[BodyChunk, bytes], None] = vars(BodyChunk)["data"].__set__


class ResponseParser:
    """Parses the responses arriving on one connection; ``feed`` it what the socket reads, ``eof`` at close.

    Errors are sticky: after a ``ProtocolError`` every call raises it again. It is raised as soon as the bytes
    that break the protocol are fed (a peer that then goes quiet must not turn it into a timeout), so events
    completed earlier in the same ``feed`` are not returned.
    """

    __slots__ = (
        "_body",
        "_bytes_seen",
        "_chunked",
        "_error",
        "_events",
        "_finished",
        "_has_length",
        "_head_buffer",
        "_head_done",
        "_head_ended",
        "_head_fed",
        "_head_mode",
        "_headers",
        "_interim",
        "_max_head",
        "_message_open",
        "_parser",
        "_upgraded",
    )

    def __init__(self, *, max_head_bytes: int = DEFAULT_MAX_HEAD_BYTES) -> None:
        """Args:
        max_head_bytes: the longest response head (status line and headers) accepted.
        """
        self._max_head = max_head_bytes
        self._body: list[bytes] = []  # one list for the parser's life: llhttp appends to it directly
        self._parser = self._new_parser()
        self._events: list[ResponseEvent] = []
        self._headers: list[tuple[bytes, bytes]] = []
        self._message_open = False  # llhttp began a response and has not completed it
        self._head_done = False
        self._has_length = False
        self._chunked = False
        self._interim = False  # the current response is a 1xx we skip
        self._head_mode = False  # the next response answers a HEAD request
        self._head_ended = False  # a HEAD response was ended at its head; llhttp's own end is not a second one
        self._head_buffer = b""
        self._head_fed = 0
        self._upgraded = False
        self._finished: str | None = None  # why no more bytes may come, once none may
        self._error: ProtocolError | None = None
        self._bytes_seen = 0

    @property
    def idle(self) -> bool:
        """Between responses: nothing buffered or half-parsed, so the next byte starts a new response."""
        return not (self._message_open or self._head_buffer or self._head_mode or self._upgraded) and (
            self._finished is None and self._error is None
        )

    def expect_head_response(self) -> None:
        """Say that the next response answers a HEAD request, so it has no body whatever its headers say.

        Call it before the response's first byte is fed, with no response in progress (so a HEAD request
        can be pipelined only behind requests whose responses have been read).
        """
        if self._message_open or self._head_buffer:
            raise RuntimeError("expect_head_response() called while a response is being parsed")
        self._head_mode = True

    def feed(self, data: bytes) -> list[ResponseEvent]:
        """Parse the next bytes read from the connection into the events they complete.

        Raises:
            ProtocolError: the bytes are not a valid HTTP/1.1 response stream (the message says why and at
                which stream bytes), or arrived after the response that closes the connection.
        """
        if (error := self._error) is not None:
            raise error
        if self._upgraded:
            return [Upgraded(data)] if data else []
        if self._finished is not None:
            if not data:
                return []
            raise self._fail(f"{len(data)} bytes received after {self._finished}")
        events: list[ResponseEvent] = []
        self._events = events
        self._bytes_seen += len(data)
        if self._head_mode:
            self._feed_head_response(data)
        else:
            self._run(data)
        if self._body:
            self._flush_body()
        if self._message_open and not self._head_done:
            self._head_fed += len(data)
            if self._head_fed > self._max_head:
                raise self._fail(
                    f"response head longer than max_head_bytes={self._max_head} (by stream byte {self._bytes_seen})"
                )
        return events

    def eof(self) -> list[ResponseEvent]:
        """The peer closed the connection: end a response delimited by the close, or fail one cut short.

        Raises:
            ProtocolError: the connection closed inside a response head or before the end of a body whose
                length is known (``content-length`` or chunked).
        """
        if (error := self._error) is not None:
            raise error
        if self._finished == "end of stream" or self._upgraded:
            return []
        self._finished = "end of stream"
        where = f"at stream byte {self._bytes_seen}"
        if self._head_buffer.strip(_CRLF):  # empty lines before a response are no part of it (llhttp skips them)
            raise self._fail(f"connection closed in a response head ({len(self._head_buffer)} bytes, {where})")
        if not self._message_open:
            return []
        if not self._head_done:
            raise self._fail(f"connection closed in a response head ({where})")
        if self._has_length or self._chunked:
            framing = "chunked body" if self._chunked else "body of known content-length"
            raise self._fail(f"connection closed before the end of a {framing} ({where})")
        # RFC 9112 §6.3: with neither content-length nor chunked, the body ends when the connection closes.
        self._message_open = False
        return [ResponseEnd(keep_alive=False)]

    # --- llhttp callbacks ---------------------------------------------------------------------------------

    def _on_message_begin(self) -> None:
        self._message_open = True
        self._head_done = False
        self._headers = []
        self._has_length = False
        self._chunked = False
        self._head_fed = 0

    def _on_header(self, name: bytes, value: bytes) -> None:
        if self._head_done:
            return  # a trailer field of a chunked body: not part of the head
        name = name.lower()
        self._headers.append((name, value))
        if name == b"content-length":
            self._has_length = True
        elif name == b"transfer-encoding":
            # RFC 9112 §6.3: the body is chunked only when chunked is the final coding; otherwise it ends at close.
            self._chunked = value.rstrip().lower().endswith(b"chunked")

    def _on_headers_complete(self) -> None:
        self._head_done = True
        parser = self._parser
        status: int = parser.get_status_code()
        upgrade = parser.should_upgrade()
        if status < 200 and not upgrade:
            self._interim = True  # 1xx: llhttp completes it at once; the final response follows
            return
        head_mode = self._head_mode and not upgrade
        keep_alive = self._head_keep_alive() if head_mode else parser.should_keep_alive()
        self._events.append(ResponseHead(status, tuple(self._headers), keep_alive))
        if head_mode:
            # A response to HEAD ends with its head (RFC 9110 §9.3.2), whatever content-length it states.
            self._head_mode = False
            self._head_ended = True
            self._message_open = False
            self._events.append(ResponseEnd(keep_alive))
            if not keep_alive:
                self._finished = "a response to HEAD with Connection: close"

    def _on_message_complete(self) -> None:
        self._message_open = False
        if self._interim:
            self._interim = False
        elif self._head_ended:
            self._head_ended = False
        elif not self._parser.should_upgrade():  # an upgrade ends with Upgraded, added by _run
            if self._body:
                self._flush_body()
            self._events.append(ResponseEnd(self._parser.should_keep_alive()))

    # --- internals ----------------------------------------------------------------------------------------

    def _new_parser(self) -> httptools.HttpResponseParser:
        # A private callback object keeps the on_* names off this class's public surface.
        callbacks = _Callbacks(self)
        return httptools.HttpResponseParser(callbacks)

    def _run(self, data: bytes, after: bytes = b"") -> None:
        """Feed ``data`` to llhttp; on an upgrade, the bytes past the head and then ``after`` are not HTTP."""
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            offset: int = exc.args[0]
            self._upgraded = True
            self._head_buffer = b""
            self._events.append(Upgraded(data[offset:] + after))
        except httptools.HttpParserCallbackError as exc:
            if exc.__context__ is not None:  # one of our callbacks failed: a bug here, not the peer's doing
                raise exc.__context__ from None
            raise self._fail(f"invalid HTTP response: {exc} ({self._offsets(data, after)})") from None
        except httptools.HttpParserError as exc:
            reason = str(exc) or type(exc).__name__
            raise self._fail(f"invalid HTTP response: {reason} ({self._offsets(data, after)})") from None

    def _offsets(self, data: bytes, after: bytes) -> str:
        """Where ``data``, just fed to llhttp and followed only by ``after``, lies in the stream."""
        end = self._bytes_seen - len(after)
        return f"in the bytes at stream offsets {end - len(data)}..{end}"

    def _feed_head_response(self, data: bytes) -> None:
        """Feed llhttp exactly the head of the response to HEAD, then restart it on the bytes that follow."""
        buffered = self._head_buffer + data
        while self._head_mode:
            begin = 0
            while buffered.startswith(_CRLF, begin):  # llhttp skips empty lines between responses; so do we
                begin += 2
            end = buffered.find(_HEAD_END, begin)
            if end < 0:
                self._head_buffer = buffered
                if len(buffered) > self._max_head:
                    raise self._fail(
                        f"response head longer than max_head_bytes={self._max_head} (by stream byte {self._bytes_seen})"
                    )
                return
            self._head_buffer = b""
            head, buffered = buffered[: end + 4], buffered[end + 4 :]
            self._run(head, after=buffered)
            if self._upgraded:
                return
            if self._head_mode and self._message_open:  # defensive: llhttp ends every head at its blank line
                raise self._fail(f"response head not complete at its blank line (by stream byte {self._bytes_seen})")
            # Still in head mode: that was an interim 1xx response; the final one follows.
        # llhttp still expects the body that content-length announced: start afresh for the next response.
        self._parser = self._new_parser()
        self._head_ended = False
        if buffered:
            if self._finished is not None:
                raise self._fail(f"{len(buffered)} bytes received after {self._finished}")
            self._run(buffered)

    def _head_keep_alive(self) -> bool:
        """RFC 9112 §9.3 for a response whose length llhttp misjudges: HTTP/1.1 persists unless "close"."""
        tokens: set[bytes] = set()
        for name, value in self._headers:
            if name == b"connection":
                tokens.update(token.strip().lower() for token in value.split(b","))
        if b"close" in tokens:
            return False
        return self._parser.get_http_version() != "1.0" or b"keep-alive" in tokens

    def _flush_body(self) -> None:
        body = self._body
        chunk: BodyChunk = _new_object(BodyChunk)
        _set_body_data(chunk, body[0] if len(body) == 1 else b"".join(body))
        self._events.append(chunk)
        body.clear()

    def _fail(self, message: str) -> ProtocolError:
        self._error = ProtocolError(message)
        return self._error


class _Callbacks:
    """The protocol object httptools calls back (by these names); forwards to the parser's private methods."""

    __slots__ = ("on_body", "on_header", "on_headers_complete", "on_message_begin", "on_message_complete")

    def __init__(self, parser: ResponseParser) -> None:
        self.on_message_begin = parser._on_message_begin
        self.on_header = parser._on_header
        self.on_headers_complete = parser._on_headers_complete
        self.on_body = parser._body.append  # a C call per HTTP chunk, not a Python frame (64 a stream, often)
        self.on_message_complete = parser._on_message_complete


# A response head the fast path may read on its own: HTTP/1.1, a 2xx status, header lines of token names and
# printable values. Stricter than llhttp on purpose: whatever it refuses goes to the full parser.
_SIMPLE_HEAD: Final = re.compile(
    rb"HTTP/1\.1 2[0-9][0-9] [\t\x20-\x7e]*\r\n(?:[-!#$%&'*+.^_`|~0-9A-Za-z]+:[\t\x20-\x7e]*\r\n)*\r\n"
)


class SimpleResponses:
    """A fast path for the common response: one read holding exactly one whole HTTP/1.1 2xx response whose
    body has a ``content-length`` and whose connection stays open.

    ``match(data)`` returns its status, or 0 when it cannot be certain (chunked, partial, pipelined, close,
    1xx/204, odd framing or bytes), and then the caller must use ``ResponseParser``. Use it only while that
    parser is ``idle``. A server sends the same head again and again (nginx's changes with its ``Date``
    once a second), so the last validated head is remembered and a repeat costs one prefix comparison.
    """

    __slots__ = ("_head", "_status", "_total")

    def __init__(self) -> None:
        self._head = b"\0"  # no response starts with NUL
        self._total = -1
        self._status = 0

    def match(self, data: bytes) -> int:
        if len(data) == self._total and data.startswith(self._head):
            return self._status
        return self._learn(data)

    def _learn(self, data: bytes) -> int:
        end = data.find(_HEAD_END)
        if end < 0:
            return 0
        head = data[: end + 4]
        length = _simple_length(head.lower())
        # The framing first: a server that writes head and body apart fails it here, before the costlier regex.
        if length < 0 or len(data) != len(head) + length or _SIMPLE_HEAD.fullmatch(head) is None:
            return 0
        status = int(head[9:12])
        if status == 204:
            return 0
        self._head, self._total, self._status = head, len(data), status
        return status


def _simple_length(head: bytes) -> int:
    """The one content-length of a lower-cased head with no transfer-encoding and no connection header
    other than keep-alive; -1 otherwise."""
    if b"\r\ntransfer-encoding:" in head:
        return -1
    at = head.find(b"\r\nconnection:")
    if at >= 0:
        if head.find(b"\r\nconnection:", at + 1) >= 0:
            return -1
        value = head[at + 13 : head.index(_CRLF, at + 2)]
        if value.strip(b" \t") != b"keep-alive":
            return -1
    at = head.find(b"\r\ncontent-length:")
    if at < 0 or head.find(b"\r\ncontent-length:", at + 1) >= 0:
        return -1
    value = head[at + 17 : head.index(_CRLF, at + 2)].strip(b" \t")
    return int(value) if value.isdigit() and len(value) < 16 else -1


def encode_request(
    method: str,
    host: str,
    path: str,
    headers: Mapping[str, str] | Sequence[tuple[str, str]],
    body: bytes | None,
) -> bytes:
    """One HTTP/1.1 request as a single bytes object (one write, one segment where it fits).

    ``Host`` comes first; ``Content-Length`` is added when there is a body (``b""`` gives ``Content-Length: 0``).
    No ``Connection`` header is added: HTTP/1.1 connections persist by default.

    Raises:
        ValueError: a CR, LF or NUL in any part (header injection), a space in the method or path, a
            ``Host`` or ``Content-Length`` header given (this function sets them), or a character that
            latin-1 cannot encode.
    """
    items = headers.items() if isinstance(headers, Mapping) else headers
    if not method or not path or " " in method or " " in path:
        raise ValueError(f"invalid request line: {method!r} {path!r}")
    given = [method, host, path]
    parts = [f"{method} {path} HTTP/1.1\r\nHost: {host}\r\n"]
    for name, value in items:
        if not name or ":" in name or " " in name:
            raise ValueError(f"invalid header name {name!r}")
        if name.lower() in ("host", "content-length"):
            raise ValueError(f"header {name!r} is set by encode_request")
        given += (name, value)
        parts.append(f"{name}: {value}\r\n")
    joined = "".join(given)
    if "\r" in joined or "\n" in joined or "\0" in joined:
        raise ValueError(f"CR, LF or NUL in a request line or header: {given!r}")
    if body is not None:
        parts.append(f"Content-Length: {len(body)}\r\n")
    parts.append("\r\n")
    head = "".join(parts).encode("latin-1")
    return head + body if body else head


def request_with_body(method: str, host: str, path: str, headers: Mapping[str, str]) -> Callable[[bytes], bytes]:
    """A maker of requests that differ only in their body: the head is checked and encoded once.

    ``make(body)`` equals ``encode_request(method, host, path, headers, body)`` (~0.3 µs, where encoding
    the whole request takes ~2.7 µs: a load generator builds one per request).

    Raises:
        ValueError: as ``encode_request``, at once.
    """
    head = encode_request(method, host, path, headers, b"")
    prefix = head[: -len(b"Content-Length: 0\r\n\r\n")]

    def make(body: bytes) -> bytes:
        return b"%sContent-Length: %d\r\n\r\n%s" % (prefix, len(body), body)

    return make
