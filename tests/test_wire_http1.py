"""HTTP/1.1 response parsing on httptools: framing, keep-alive, HEAD, upgrades, the end of the connection."""

from __future__ import annotations

import itertools
from typing import Any

import httptools
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from infer_bench.wire import ProtocolError
from infer_bench.wire.http1 import (
    BodyChunk,
    ResponseEnd,
    ResponseEvent,
    ResponseHead,
    ResponseParser,
    SimpleResponses,
    Upgraded,
    encode_request,
    request_with_body,
)

FAST = settings(max_examples=200, deadline=None)


def parse(*chunks: bytes, head: bool = False, eof: bool = True) -> list[ResponseEvent]:
    parser = ResponseParser()
    if head:
        parser.expect_head_response()
    events: list[ResponseEvent] = []
    for chunk in chunks:
        events += parser.feed(chunk)
    return events + parser.eof() if eof else events


def merged(events: list[ResponseEvent]) -> list[ResponseEvent]:
    """Events with neighbouring body chunks (and upgraded bytes) joined: how they are split is not meaningful."""
    out: list[ResponseEvent] = []
    for event in events:
        if out and type(event) is BodyChunk and type(out[-1]) is BodyChunk:
            out[-1] = BodyChunk(out[-1].data + event.data)
        elif out and type(event) is Upgraded and type(out[-1]) is Upgraded:
            out[-1] = Upgraded(out[-1].rest + event.rest)
        else:
            out.append(event)
    return out


def split_at(stream: bytes, cuts: list[int]) -> list[bytes]:
    return [stream[a:b] for a, b in itertools.pairwise([0, *sorted(cuts), len(stream)])]


def head(status: int, *headers: tuple[bytes, bytes], keep_alive: bool = True) -> ResponseHead:
    return ResponseHead(status=status, headers=headers, keep_alive=keep_alive)


END = ResponseEnd(keep_alive=True)
CLOSED = ResponseEnd(keep_alive=False)
OK_5 = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
HEAD_OK_5 = head(200, (b"content-length", b"5"))


# --- framing --------------------------------------------------------------------------------------------------


def test_content_length_body() -> None:
    assert parse(OK_5) == [HEAD_OK_5, BodyChunk(b"hello"), END]


def test_chunked_body_of_one_read_is_one_body_chunk() -> None:
    stream = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    assert parse(stream) == [head(200, (b"transfer-encoding", b"chunked")), BodyChunk(b"hello world"), END]


def test_chunked_body_fed_byte_by_byte() -> None:
    stream = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    events = merged(parse(*(stream[i : i + 1] for i in range(len(stream)))))
    assert events == [head(200, (b"transfer-encoding", b"chunked")), BodyChunk(b"hello world"), END]


def test_pipelined_responses_in_one_buffer() -> None:
    stream = (
        OK_5
        + b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\n0\r\n\r\n"
        + b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"
    )
    assert parse(stream) == [
        HEAD_OK_5,
        BodyChunk(b"hello"),
        END,
        head(200, (b"transfer-encoding", b"chunked")),
        BodyChunk(b"ab"),
        END,
        head(404, (b"content-length", b"0")),
        END,
    ]


@pytest.mark.parametrize(
    "response",
    [
        pytest.param(b"HTTP/1.1 204 No Content\r\n\r\n", id="204"),
        pytest.param(b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n", id="304-with-content-length"),
    ],
)
def test_response_without_body_is_followed_by_the_next(response: bytes) -> None:
    events = parse(response + OK_5)
    assert [type(event) for event in events] == [ResponseHead, ResponseEnd, ResponseHead, BodyChunk, ResponseEnd]
    assert events[-2:] == [BodyChunk(b"hello"), END]


def test_body_delimited_by_close_ends_at_eof() -> None:
    parser = ResponseParser()
    assert parser.feed(b"HTTP/1.1 200 OK\r\n\r\nabc") == [head(200, keep_alive=False), BodyChunk(b"abc")]
    assert parser.feed(b"def") == [BodyChunk(b"def")]
    assert parser.eof() == [CLOSED]


def test_transfer_coding_other_than_chunked_is_delimited_by_close() -> None:
    events = parse(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nzzz")
    assert events[1:] == [BodyChunk(b"zzz"), CLOSED]


def test_http10_response_does_not_keep_alive() -> None:
    assert parse(b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\nx") == [
        head(200, (b"content-length", b"1"), keep_alive=False),
        BodyChunk(b"x"),
        CLOSED,
    ]


def test_connection_close_response_does_not_keep_alive() -> None:
    assert parse(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\nx") == [
        head(200, (b"connection", b"close"), (b"content-length", b"1"), keep_alive=False),
        BodyChunk(b"x"),
        CLOSED,
    ]


def test_header_names_are_lower_cased_and_trailers_left_out() -> None:
    stream = (
        b"HTTP/1.1 200 OK\r\nX-Request-ID: Ab1\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n0\r\nX-Trailer: t\r\n\r\n"
    )
    first = parse(stream)[0]
    assert first == head(200, (b"x-request-id", b"Ab1"), (b"transfer-encoding", b"chunked"))
    assert isinstance(first, ResponseHead)
    assert (first.header(b"x-request-id"), first.header(b"x-trailer")) == (b"Ab1", None)


def test_header_split_across_feeds() -> None:
    assert parse(b"HTTP/1.1 200 OK\r\nX-Fo", b"o: b", b"ar\r\nContent-Length: 0\r\n\r\n") == [
        head(200, (b"x-foo", b"bar"), (b"content-length", b"0")),
        END,
    ]


@pytest.mark.parametrize(
    "interim", [b"HTTP/1.1 100 Continue\r\n\r\n", b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"]
)
def test_interim_responses_are_skipped(interim: bytes) -> None:
    assert parse(interim + OK_5) == [HEAD_OK_5, BodyChunk(b"hello"), END]


# --- HEAD -----------------------------------------------------------------------------------------------------


def test_head_response_has_no_body_whatever_its_content_length() -> None:
    stream = b"HTTP/1.1 200 OK\r\nContent-Length: 20\r\n\r\n" + OK_5
    assert parse(stream, head=True) == [
        head(200, (b"content-length", b"20")),
        END,
        HEAD_OK_5,
        BodyChunk(b"hello"),
        END,
    ]


def test_head_response_split_anywhere() -> None:
    stream = b"\r\nHTTP/1.1 200 OK\r\nContent-Length: 20\r\n\r\n" + OK_5
    for cut in range(len(stream) + 1):
        events = merged(parse(stream[:cut], stream[cut:], head=True))
        assert events == [head(200, (b"content-length", b"20")), END, HEAD_OK_5, BodyChunk(b"hello"), END], cut


@pytest.mark.parametrize(
    "response",
    [
        pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", id="length-0"),
        pytest.param(b"HTTP/1.1 204 No Content\r\n\r\n", id="204"),
    ],
)
def test_head_response_that_llhttp_also_ends_is_ended_once(response: bytes) -> None:
    events = parse(response + OK_5, head=True)
    assert [type(event) for event in events] == [ResponseHead, ResponseEnd, ResponseHead, BodyChunk, ResponseEnd]


def test_head_response_without_length_keeps_alive() -> None:
    assert parse(b"HTTP/1.1 200 OK\r\n\r\n", head=True) == [head(200), END]


@pytest.mark.parametrize(
    ("response", "keep_alive"),
    [
        pytest.param(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n", False, id="close"),
        pytest.param(b"HTTP/1.1 200 OK\r\nConnection: Keep-Alive, Close\r\n\r\n", False, id="close-among-tokens"),
        pytest.param(b"HTTP/1.0 200 OK\r\n\r\n", False, id="http10"),
        pytest.param(b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\n\r\n", True, id="http10-keep-alive"),
    ],
)
def test_head_response_keep_alive_follows_connection_header(response: bytes, keep_alive: bool) -> None:
    events = parse(response, head=True)
    assert events[-1] == ResponseEnd(keep_alive)


def test_head_response_with_interim_response_first() -> None:
    stream = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n"
    assert parse(stream, head=True) == [head(200, (b"content-length", b"9")), END]


def test_data_after_head_response_with_connection_close_is_an_error() -> None:
    parser = ResponseParser()
    parser.expect_head_response()
    assert parser.feed(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n") == [
        head(200, (b"connection", b"close"), keep_alive=False),
        CLOSED,
    ]
    assert parser.feed(b"") == []
    with pytest.raises(ProtocolError, match="5 bytes received after a response to HEAD with Connection: close"):
        parser.feed(b"HTTP/")


def test_data_after_head_response_with_connection_close_in_the_same_read_is_an_error() -> None:
    parser = ResponseParser()
    parser.expect_head_response()
    with pytest.raises(ProtocolError, match="after a response to HEAD with Connection: close"):
        parser.feed(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + OK_5)


def test_expect_head_response_mid_response_is_a_usage_error() -> None:
    parser = ResponseParser()
    parser.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhel")
    with pytest.raises(RuntimeError, match="while a response is being parsed"):
        parser.expect_head_response()


# --- upgrades -------------------------------------------------------------------------------------------------

SWITCH = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
SWITCH_HEAD = head(101, (b"upgrade", b"websocket"), (b"connection", b"Upgrade"))


def test_upgrade_hands_over_the_bytes_after_the_head() -> None:
    parser = ResponseParser()
    assert parser.feed(SWITCH + b"\x81\x02hi") == [SWITCH_HEAD, Upgraded(b"\x81\x02hi")]
    assert parser.feed(b"HTTP/1.1 200 OK\r\n") == [Upgraded(b"HTTP/1.1 200 OK\r\n")]
    assert parser.feed(b"") == []
    assert parser.eof() == []


def test_upgrade_with_nothing_after_the_head_still_says_upgraded() -> None:
    assert parse(SWITCH) == [SWITCH_HEAD, Upgraded(b"")]


def test_switching_protocols_without_upgrade_header_is_an_error() -> None:
    with pytest.raises(ProtocolError, match="Pause on CONNECT/Upgrade"):
        parse(b"HTTP/1.1 101 Switching Protocols\r\n\r\n")


# --- the end of the connection, and errors --------------------------------------------------------------------


@pytest.mark.parametrize(
    "stream",
    [
        pytest.param(b"", id="nothing"),
        pytest.param(OK_5, id="after-a-response"),
        pytest.param(OK_5 + b"\r\n", id="after-a-response-and-an-empty-line"),
    ],
)
def test_eof_between_responses_is_clean(stream: bytes) -> None:
    parser = ResponseParser()
    parser.feed(stream)
    assert parser.eof() == []
    assert parser.eof() == []


@pytest.mark.parametrize(
    ("stream", "reason"),
    [
        pytest.param(b"HTTP/1.1 200 O", "in a response head", id="in-status-line"),
        pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n", "in a response head", id="in-headers"),
        pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhel", "body of known content-length", id="cl"),
        pytest.param(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhe", "chunked body", id="chunked"),
        pytest.param(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n", "chunked body", id="no-last-crlf"),
    ],
)
def test_eof_inside_a_response_is_an_error(stream: bytes, reason: str) -> None:
    parser = ResponseParser()
    parser.feed(stream)
    with pytest.raises(ProtocolError, match=reason):
        parser.eof()


def test_eof_inside_a_head_response_is_an_error() -> None:
    parser = ResponseParser()
    parser.expect_head_response()
    parser.feed(b"HTTP/1.1 200 OK\r\n")
    with pytest.raises(ProtocolError, match="in a response head"):
        parser.eof()


@pytest.mark.parametrize(
    ("stream", "reason"),
    [
        pytest.param(b"GARBAGE\r\n\r\n", "Expected HTTP/", id="not-http"),
        pytest.param(b"HTTP/1.1 2000 OK\r\n\r\n", "status", id="bad-status"),
        pytest.param(b"HTTP/1.1 200 OK\nContent-Length: 0\n\n", "Missing expected CR", id="bare-lf"),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", "Duplicate Content-Length", id="dup"
        ),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
            "Transfer-Encoding can't be present with Content-Length",
            id="length-and-chunked",
        ),
        pytest.param(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "chunk size", id="bad-chunk"),
    ],
)
def test_invalid_response_is_a_protocol_error_with_llhttp_reason(stream: bytes, reason: str) -> None:
    with pytest.raises(ProtocolError, match=reason) as caught:
        parse(stream)
    assert f"stream offsets 0..{len(stream)}" in str(caught.value)


def test_error_is_raised_by_the_feed_that_broke_the_protocol_and_again_after() -> None:
    """Raised at once, not on a later call: a peer that sends junk and goes quiet must not look like a timeout."""
    parser = ResponseParser()
    with pytest.raises(ProtocolError, match="Data after `Connection: close`") as caught:
        parser.feed(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nhiXX")
    for call in (lambda: parser.feed(b""), parser.eof, lambda: parser.feed(OK_5)):
        with pytest.raises(ProtocolError) as again:
            call()
        assert again.value is caught.value


def test_broken_chunk_after_a_good_one_is_an_error_at_once() -> None:
    parser = ResponseParser()
    with pytest.raises(ProtocolError, match="Invalid character in chunk size"):
        parser.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\nzz\r\nnot a chunk\r\n")


def test_feed_after_eof_is_an_error() -> None:
    parser = ResponseParser()
    parser.eof()
    assert parser.feed(b"") == []
    with pytest.raises(ProtocolError, match="after end of stream"):
        parser.feed(OK_5)


@pytest.mark.parametrize("head_mode", [False, True])
@pytest.mark.parametrize("chunk_size", [1, 100, 5000])
def test_head_longer_than_the_limit_is_an_error(head_mode: bool, chunk_size: int) -> None:
    stream = b"HTTP/1.1 200 OK\r\n" + b"X-Long: " + b"a" * 5000 + b"\r\n\r\n"
    parser = ResponseParser(max_head_bytes=1024)
    if head_mode:
        parser.expect_head_response()
    with pytest.raises(ProtocolError, match="max_head_bytes=1024"):  # noqa: PT012 (the feeding is the subject)
        for i in range(0, len(stream), chunk_size):
            parser.feed(stream[i : i + chunk_size])


# --- encode_request -------------------------------------------------------------------------------------------


def test_encodes_get_without_body() -> None:
    assert encode_request("GET", "example.com:8000", "/health?x=1", {"Accept": "*/*"}, None) == (
        b"GET /health?x=1 HTTP/1.1\r\nHost: example.com:8000\r\nAccept: */*\r\n\r\n"
    )


def test_encodes_post_with_body_and_length() -> None:
    request = encode_request("POST", "h", "/v1/completions", [("Content-Type", "application/json")], b'{"a":1}')
    assert request == (
        b"POST /v1/completions HTTP/1.1\r\nHost: h\r\nContent-Type: application/json\r\n"
        b'Content-Length: 7\r\n\r\n{"a":1}'
    )


def test_empty_body_is_sent_with_zero_length() -> None:
    assert encode_request("POST", "h", "/", {}, b"").endswith(b"\r\nContent-Length: 0\r\n\r\n")


def test_encoded_request_parses_as_http() -> None:
    seen: dict[str, Any] = {"headers": []}

    class Receiver:
        def on_url(self, url: bytes) -> None:
            seen["url"] = url

        def on_header(self, name: bytes, value: bytes) -> None:
            seen["headers"].append((name, value))

        def on_body(self, body: bytes) -> None:
            seen["body"] = body

        def on_message_complete(self) -> None:
            seen["complete"] = True

    parser = httptools.HttpRequestParser(Receiver())
    parser.feed_data(encode_request("POST", "h:1", "/p", [("X-A", "1"), ("X-A", "2")], b"body"))
    assert seen == {
        "url": b"/p",
        "headers": [(b"Host", b"h:1"), (b"X-A", b"1"), (b"X-A", b"2"), (b"Content-Length", b"4")],
        "body": b"body",
        "complete": True,
    }
    assert parser.should_keep_alive()


@pytest.mark.parametrize(
    ("method", "host", "path", "headers"),
    [
        pytest.param("GET", "h", "/a\r\nX: 1", {}, id="crlf-in-path"),
        pytest.param("GET", "h\n", "/", {}, id="lf-in-host"),
        pytest.param("GET", "h", "/", {"X": "a\r\nEvil: 1"}, id="crlf-in-value"),
        pytest.param("GET", "h", "/", {"X\r\nEvil": "1"}, id="crlf-in-name"),
        pytest.param("GET", "h", "/", {"X": "a\x00"}, id="nul"),
        pytest.param("GET", "h", "/a b", {}, id="space-in-path"),
        pytest.param("", "h", "/", {}, id="no-method"),
        pytest.param("GET", "h", "/", {"": "x"}, id="empty-name"),
        pytest.param("GET", "h", "/", {"A:B": "x"}, id="colon-in-name"),
        pytest.param("GET", "h", "/", {"host": "x"}, id="host-given"),
        pytest.param("GET", "h", "/", {"Content-Length": "1"}, id="content-length-given"),
        pytest.param("GET", "h", "/", {"X": "€"}, id="not-latin-1"),
    ],
)
def test_encode_request_refuses_what_would_break_the_request(
    method: str, host: str, path: str, headers: dict[str, str]
) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 (each case has its own message)
        encode_request(method, host, path, headers, None)


# --- properties -----------------------------------------------------------------------------------------------

tokens = st.text("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-", min_size=1, max_size=10).filter(
    lambda name: name.lower() not in {"content-length", "transfer-encoding", "connection", "upgrade"}
)
header_values = st.text("abcXYZ0189-_.;=/ ", max_size=12).map(str.strip)


@st.composite
def response_streams(draw: st.DrawFn) -> tuple[bytes, list[ResponseEvent]]:
    """Several responses pipelined on one connection, the last maybe delimited by close; and their events."""
    out: list[bytes] = []
    expected: list[ResponseEvent] = []
    count = draw(st.integers(1, 4))
    for index in range(count):
        if draw(st.integers(0, 9)) == 0:
            out.append(b"HTTP/1.1 100 Continue\r\n\r\n")
        status = draw(st.sampled_from([200, 201, 204, 304, 404, 429, 500]))
        framing = "none" if status in (204, 304) else draw(st.sampled_from(["length", "chunked", "close"]))
        if framing == "close" and index < count - 1:
            framing = "length"
        headers = [(name.encode(), value.encode()) for name, value in draw(st.lists(st.tuples(tokens, header_values)))]
        body = b"" if framing == "none" else draw(st.binary(max_size=64))
        if framing == "length":
            headers.insert(draw(st.integers(0, len(headers))), (b"Content-Length", str(len(body)).encode()))
            payload = body
        elif framing == "chunked":
            headers.append((b"Transfer-Encoding", b"chunked"))
            cuts = sorted(draw(st.lists(st.integers(0, len(body)), max_size=4)))
            pieces = [piece for piece in split_at(body, cuts) if piece]
            payload = b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for piece in pieces) + b"0\r\n\r\n"
        else:
            payload = body
        lines = [b"HTTP/1.1 %d Reason\r\n" % status, *(name + b": " + value + b"\r\n" for name, value in headers)]
        out += [*lines, b"\r\n", payload]
        keep_alive = framing != "close"
        expected.append(ResponseHead(status, tuple((n.lower(), v) for n, v in headers), keep_alive))
        if body:
            expected.append(BodyChunk(body))
        expected.append(ResponseEnd(keep_alive))
    return b"".join(out), expected


@FAST
@given(response_streams(), st.data())
def test_pipelined_responses_split_anywhere_give_the_same_events(
    stream_and_events: tuple[bytes, list[ResponseEvent]], data: st.DataObject
) -> None:
    stream, expected = stream_and_events
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=10))
    assert parse(stream) == expected
    assert merged(parse(*split_at(stream, cuts))) == expected


http_noise = st.lists(
    st.sampled_from(
        [
            *(b"HTTP/1.1 ", b"HTTP/1.0 ", b"200 OK", b"101 S", b"100 C", b"204 N", b"\r\n", b"\r\n\r\n", b"\n"),
            *(b"Content-Length: ", b"Transfer-Encoding: chunked", b"Connection: close", b"Upgrade: x", b": "),
            *(b"0", b"5", b"f", b"abc", b" ", b"\x00", b"\xff"),
        ]
    ),
    max_size=40,
).map(b"".join)


@FAST
@given(st.lists(st.binary(max_size=40) | http_noise, max_size=6), st.booleans())
def test_arbitrary_bytes_give_events_or_protocol_error(chunks: list[bytes], head_mode: bool) -> None:
    parser = ResponseParser(max_head_bytes=64)
    if head_mode:
        parser.expect_head_response()
    try:
        for chunk in chunks:
            events = parser.feed(chunk)
            assert all(isinstance(event, ResponseHead | BodyChunk | ResponseEnd | Upgraded) for event in events)
        parser.eof()
    except ProtocolError:
        pass


# --- the fast path: SimpleResponses ---------------------------------------------------------------------------

NGINX_OK = (
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Tue, 24 Nov 2026 01:54:07 GMT\r\n"
    b"Content-Type: application/json\r\nContent-Length: 14\r\nConnection: keep-alive\r\n\r\n"
    b'{"output":[1]}'
)


def full_parse_of_one(data: bytes) -> tuple[int, bool] | None:
    """(status, keep_alive) when the full parser reads ``data`` as exactly one whole response and is then
    between responses; None otherwise."""
    parser = ResponseParser()
    try:
        events = parser.feed(data)
    except ProtocolError:
        return None
    if not parser.idle or not events or type(events[0]) is not ResponseHead or type(events[-1]) is not ResponseEnd:
        return None
    if sum(type(event) is ResponseHead for event in events) != 1:
        return None
    return events[0].status, events[-1].keep_alive


def assert_fast_path_agrees(matcher: SimpleResponses, data: bytes) -> int:
    """The property: whatever the fast path reads, the full parser reads the same way, a kept-alive 2xx."""
    status = matcher.match(data)
    if status:
        assert full_parse_of_one(data) == (status, True), data
        assert 200 <= status < 300
    return status


@pytest.mark.parametrize(
    ("response", "status"),
    [
        pytest.param(NGINX_OK, 200, id="nginx"),
        pytest.param(OK_5, 200, id="minimal"),
        pytest.param(b"HTTP/1.1 201 Created\r\ncontent-length: 0\r\n\r\n", 201, id="empty-body"),
        pytest.param(b"HTTP/1.1 200 OK\r\nCONTENT-LENGTH:  2 \r\nConnection: Keep-Alive\r\n\r\nhi", 200, id="cases"),
    ],
)
def test_the_fast_path_reads_a_whole_simple_response(response: bytes, status: int) -> None:
    matcher = SimpleResponses()
    assert assert_fast_path_agrees(matcher, response) == status
    assert assert_fast_path_agrees(matcher, response) == status  # again, from the remembered head


@pytest.mark.parametrize(
    "response",
    [
        pytest.param(NGINX_OK[:-1], id="partial-body"),
        pytest.param(NGINX_OK[:60], id="partial-head"),
        pytest.param(NGINX_OK + NGINX_OK, id="pipelined"),
        pytest.param(NGINX_OK.replace(b"keep-alive", b"close"), id="connection-close"),
        pytest.param(NGINX_OK.replace(b"HTTP/1.1", b"HTTP/1.0"), id="http-1.0"),
        pytest.param(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n", id="204"),
        pytest.param(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n", id="error-status"),
        pytest.param(b"HTTP/1.1 100 Continue\r\n\r\n" + OK_5, id="interim-first"),
        pytest.param(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n", id="chunked"),
        pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\nhello", id="both"),
        pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello", id="two-lengths"),
        pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: +5\r\n\r\nhello", id="signed-length"),
        pytest.param(b"HTTP/1.1 200 OK\r\n\r\nhello", id="no-length"),
        pytest.param(b"HTTP/1.1 200 OK\r\nX: a\r\n b\r\nContent-Length: 5\r\n\r\nhello", id="folded-header"),
        pytest.param(b"HTTP/1.1 200 OK\nContent-Length: 5\n\nhello", id="bare-lf"),
        pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length : 5\r\n\r\nhello", id="space-before-colon"),
        pytest.param(
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: keep-alive, upgrade\r\n\r\nhello", id="upgrade"
        ),
    ],
)
def test_the_fast_path_leaves_anything_else_to_the_full_parser(response: bytes) -> None:
    matcher = SimpleResponses()
    assert matcher.match(OK_5) == 200  # a remembered head must not make a different response look simple
    assert matcher.match(response) == 0


statuses_2xx = st.sampled_from([200, 201, 202, 204, 206, 299])
connection_values = st.sampled_from([b"keep-alive", b"Keep-Alive", b" keep-alive ", b"close", b"upgrade", b"x"])


@st.composite
def simple_responses(draw: st.DrawFn) -> bytes:
    return draw(shaped_responses())[0]


@st.composite
def shaped_responses(draw: st.DrawFn) -> tuple[bytes, bool]:
    """One response near the common shape, with variations at the edge of what the fast path reads; and
    whether it has the common shape (HTTP/1.1, not 204, no connection header other than keep-alive)."""
    status = draw(statuses_2xx)
    body = draw(st.binary(max_size=32))
    pairs = draw(st.lists(st.tuples(tokens, header_values), max_size=4))
    headers = [(name.encode(), value.encode()) for name, value in pairs]
    name = draw(st.sampled_from([b"Content-Length", b"content-length", b"CONTENT-LENGTH"]))
    length = draw(st.sampled_from([b"%d", b" %d", b"%d "])) % len(body)
    headers.insert(draw(st.integers(0, len(headers))), (name, length))
    connection = draw(st.none() | connection_values)
    if connection is not None:
        headers.append((b"Connection", connection))
    version = draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.1", b"HTTP/1.0"]))
    lines = [b"%s %d %s\r\n" % (version, status, draw(st.sampled_from([b"OK", b"", b"Fine Thanks"])))]
    lines += [name + b":" + value + b"\r\n" for name, value in headers]
    common = version == b"HTTP/1.1" and status != 204 and (connection or b"keep-alive").strip().lower() == b"keep-alive"
    return b"".join([*lines, b"\r\n", body]), common


@st.composite
def mutated(draw: st.DrawFn, responses: st.SearchStrategy[bytes]) -> bytes:
    """A response with a byte changed, cut short, or followed by more bytes."""
    data = draw(responses)
    how = draw(st.sampled_from(["byte", "cut", "extra"]))
    if how == "cut":
        return data[: draw(st.integers(0, len(data)))]
    if how == "extra":
        return data + draw(st.binary(min_size=1, max_size=8) | st.just(data))
    at = draw(st.integers(0, max(0, len(data) - 1)))
    return data[:at] + bytes([draw(st.integers(0, 255))]) + data[at + 1 :]


@FAST
@given(shaped_responses())
def test_the_fast_path_and_the_full_parser_agree_on_simple_responses(shaped: tuple[bytes, bool]) -> None:
    response, common = shaped
    status = assert_fast_path_agrees(SimpleResponses(), response)
    if common:
        assert status == int(response[9:12])  # the common shape is never left to the slow path


@FAST
@given(st.lists(simple_responses() | mutated(simple_responses()) | http_noise | st.binary(max_size=64), max_size=8))
def test_whatever_the_fast_path_reads_the_full_parser_reads_the_same(reads: list[bytes]) -> None:
    """One matcher over many reads (its remembered head included): a status only where the full parser agrees."""
    matcher = SimpleResponses()
    for data in reads:
        assert_fast_path_agrees(matcher, data)


@FAST
@given(response_streams(), st.data())
def test_the_fast_path_reads_no_part_of_a_stream_it_cannot_be_sure_of(
    stream_and_events: tuple[bytes, list[ResponseEvent]], data: st.DataObject
) -> None:
    stream, _ = stream_and_events
    matcher = SimpleResponses()
    for piece in [stream, *split_at(stream, data.draw(st.lists(st.integers(0, len(stream)), max_size=4)))]:
        assert_fast_path_agrees(matcher, piece)


@pytest.mark.parametrize("body", [b"", b"{}", b'{"prompt": "x"}' * 50])
def test_a_request_maker_builds_what_encode_request_builds(body: bytes) -> None:
    headers = {"content-type": "application/json", "accept": "text/event-stream"}
    make = request_with_body("POST", "127.0.0.1:8000", "/v1/stream", headers)
    assert make(body) == encode_request("POST", "127.0.0.1:8000", "/v1/stream", headers, body)


def test_a_request_maker_refuses_a_bad_head_at_once() -> None:
    with pytest.raises(ValueError, match="CR, LF or NUL"):
        request_with_body("POST", "h", "/p", {"x-evil": "a\r\nInjected: 1"})
