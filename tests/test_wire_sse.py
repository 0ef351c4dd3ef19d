"""The SSE decoder against WHATWG HTML §9.2.6: a table of cases, a reference implementation, and chunk splits."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from infer_bench.wire import ProtocolError
from infer_bench.wire.sse import SSEDecoder, SSEEvent

FAST = settings(max_examples=200, deadline=None)


def decode(stream: bytes, **options: int) -> list[SSEEvent]:
    decoder = SSEDecoder(**options)
    return decoder.feed(stream) + decoder.finish()


def decode_in_chunks(chunks: list[bytes], **options: int) -> list[SSEEvent]:
    decoder = SSEDecoder(**options)
    events: list[SSEEvent] = []
    for chunk in chunks:
        events += decoder.feed(chunk)
    return events + decoder.finish()


def split_at(stream: bytes, cuts: list[int]) -> list[bytes]:
    bounds = [0, *sorted(cuts), len(stream)]
    return [stream[a:b] for a, b in itertools.pairwise(bounds)]


def message(data: str, event_id: str | None = None, event: str = "message") -> SSEEvent:
    return SSEEvent(event=event, data=data, id=event_id)


# --- the WHATWG rules, case by case ---------------------------------------------------------------------------

WHATWG_CASES = [
    pytest.param(b"data: a\n\n", [message("a")], id="lf"),
    pytest.param(b"data: a\r\n\r\n", [message("a")], id="crlf"),
    pytest.param(b"data: a\r\r", [message("a")], id="cr"),
    pytest.param(b"data: a\r\ndata: b\rdata: c\n\r\n", [message("a\nb\nc")], id="crlf-cr-lf-mixed"),
    pytest.param(b"data: a\n\r\n\rdata: b\r\r\n", [message("a"), message("b")], id="blank-lines-of-each-kind"),
    pytest.param(b"data: a\ndata: b\ndata: c\n\n", [message("a\nb\nc")], id="multi-line-data-joined-by-lf"),
    pytest.param(b"data: a\ndata:\ndata: c\n\n", [message("a\n\nc")], id="empty-data-line-inside"),
    pytest.param(b"data\n\n", [message("")], id="data-without-colon-is-empty-data"),
    pytest.param(b"data:\n\n", [message("")], id="data-colon-is-empty-data"),
    pytest.param(b"data: \n\n", [message("")], id="data-colon-space-is-empty-data"),
    pytest.param(b"data\ndata\n\n", [message("\n")], id="two-empty-data-lines"),
    pytest.param(b"data:x\n\n", [message("x")], id="no-space-after-colon"),
    pytest.param(b"data:  x \n\n", [message(" x ")], id="only-one-leading-space-stripped"),
    pytest.param(b"data: a:b: c\n\n", [message("a:b: c")], id="colons-in-value-kept"),
    pytest.param(b"data: a\tb\x00c\n\n", [message("a\tb\x00c")], id="tab-and-nul-in-data-kept"),
    pytest.param(b": ping\n\n", [], id="comment-only-dispatches-nothing"),
    pytest.param(b":\n\n", [], id="bare-colon-is-a-comment"),
    pytest.param(b"data: a\n: note\ndata: b\n\n", [message("a\nb")], id="comment-inside-event"),
    pytest.param(b"event: x\n\n", [], id="no-data-dispatches-nothing"),
    pytest.param(b"event: x\n\ndata: a\n\n", [message("a")], id="event-type-reset-by-empty-dispatch"),
    pytest.param(b"event: x\ndata: a\n\ndata: b\n\n", [message("a", event="x"), message("b")], id="event-type-reset"),
    pytest.param(b"event:\ndata: a\n\n", [message("a")], id="empty-event-type-is-message"),
    pytest.param(b"event: a\nevent: b\ndata: x\n\n", [message("x", event="b")], id="last-event-field-wins"),
    pytest.param(b"id: 1\ndata: a\n\ndata: b\n\n", [message("a", "1"), message("b", "1")], id="id-persists"),
    pytest.param(b"id: 1\ndata: a\n\nid\ndata: b\n\n", [message("a", "1"), message("b", "")], id="empty-id-clears"),
    pytest.param(b"id: 1\ndata: a\n\nid: 2\x003\ndata: b\n\n", [message("a", "1"), message("b", "1")], id="id-nul"),
    pytest.param(b"id: 7\n\ndata: a\n\n", [message("a", "7")], id="id-alone-carries-to-next-event"),
    pytest.param(b"data: a\nid: 9\n\n", [message("a", "9")], id="id-after-data-counts"),
    pytest.param(b"foo: bar\nDATA: x\n data: y\ndata: a\n\n", [message("a")], id="unknown-fields-ignored"),
    pytest.param(b"retry: 10\ndata: a\n\n", [message("a")], id="retry-is-not-data"),
    pytest.param(b"\xef\xbb\xbfdata: a\n\n", [message("a")], id="one-bom-stripped"),
    pytest.param(b"\xef\xbb\xbf\xef\xbb\xbfdata: a\n\n", [], id="second-bom-is-part-of-the-field-name"),
    pytest.param(b"data: \xef\xbb\xbfa\n\n", [message("\ufeffa")], id="bom-inside-the-stream-is-kept"),
    pytest.param(b"data: \xff\xfe\n\n", [message("\ufffd\ufffd")], id="invalid-utf8-replaced"),
    pytest.param("data: héllo €😀\n\n".encode(), [message("héllo €😀")], id="utf8"),
    pytest.param(b"data: a\n\ndata: b\n", [message("a")], id="event-without-blank-line-discarded-at-end"),
    pytest.param(b"data: a\n\ndata: b", [message("a")], id="line-without-end-discarded-at-end"),
    pytest.param(b"\n\n\ndata: a\n\n\n\n", [message("a")], id="extra-blank-lines"),
    pytest.param(b"", [], id="empty-stream"),
]


@pytest.mark.parametrize(("stream", "expected"), WHATWG_CASES)
def test_decodes_whatwg_cases(stream: bytes, expected: list[SSEEvent]) -> None:
    assert decode(stream) == expected


@pytest.mark.parametrize(("stream", "expected"), WHATWG_CASES)
def test_decodes_whatwg_cases_fed_byte_by_byte(stream: bytes, expected: list[SSEEvent]) -> None:
    assert decode_in_chunks([stream[i : i + 1] for i in range(len(stream))]) == expected


def test_crlf_split_between_chunks_is_one_line_end() -> None:
    """A CR ending one chunk and an LF starting the next end one line, not a line and a blank line."""
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\r") == []
    assert decoder.feed(b"\ndata: b\r") == []
    assert decoder.feed(b"\n\r") == [message("a\nb")]
    assert decoder.feed(b"\n") == []  # the LF of the blank line's CRLF: not a second blank line


def test_cr_then_empty_chunks_then_lf_is_one_line_end() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: a\r") == []
    assert decoder.feed(b"") == []
    assert decoder.feed(b"\xc3") == []  # half a character: decodes to nothing yet
    assert decoder.feed(b"\xa9\n\n") == [message("a")]  # the é starts a line with an unknown field name
    assert decoder.feed(b"data: b\n\n") == [message("b")]


def test_multibyte_character_split_across_chunks_decodes_whole() -> None:
    stream = "data: €😀\n\n".encode()
    for cut in range(len(stream) + 1):
        assert decode_in_chunks([stream[:cut], stream[cut:]]) == [message("€😀")], cut


def test_bom_split_across_chunks_is_stripped() -> None:
    assert decode_in_chunks([b"\xef", b"\xbb", b"\xbfdata: a\n\n"]) == [message("a")]


def test_comments_are_counted() -> None:
    decoder = SSEDecoder()
    decoder.feed(b": ping\n\n:\ndata: a\n: x\n\n")
    assert decoder.comments == 3


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        pytest.param(b"retry: 1500\n", 1500, id="digits"),
        pytest.param(b"retry:1500\n", 1500, id="no-space"),
        pytest.param(b"retry: 0\n", 0, id="zero"),
        pytest.param(b"retry: 0010\n", 10, id="leading-zeros"),
        pytest.param(b"retry: 100\nretry: 200\n", 200, id="last-wins"),
        pytest.param(b"retry: 100\nretry: x\n", 100, id="invalid-keeps-previous"),
        pytest.param(b"retry: 15x\n", None, id="trailing-letter"),
        pytest.param(b"retry: -1\n", None, id="negative"),
        pytest.param(b"retry: 1.5\n", None, id="decimal"),
        pytest.param(b"retry:  10\n", None, id="second-space-is-not-a-digit"),
        pytest.param(b"retry:\n", None, id="empty"),
        pytest.param(b"retry\n", None, id="no-colon"),
        pytest.param("retry: ١٢\n".encode(), None, id="non-ascii-digits"),
        pytest.param(b"retry: " + b"9" * 5000 + b"\n", 10**18 - 1, id="huge-clamped"),
    ],
)
def test_retry_is_set_only_by_ascii_digits(lines: bytes, expected: int | None) -> None:
    decoder = SSEDecoder()
    decoder.feed(lines)
    assert decoder.retry_ms == expected


def test_retry_is_set_without_waiting_for_dispatch() -> None:
    decoder = SSEDecoder()
    decoder.feed(b"retry: 3000\ndata: a\n")
    assert decoder.retry_ms == 3000


def test_last_event_id_is_set_by_the_blank_line_not_by_the_id_field() -> None:
    """WHATWG: an event source's last event ID changes on dispatch; an event cut off by the end never was."""
    decoder = SSEDecoder()
    decoder.feed(b"id: 1\ndata: a\n\nid: 2\ndata: b\n")
    assert decoder.last_event_id == "1"
    assert decoder.finish() == []
    assert decoder.last_event_id == "1"


def test_last_event_id_is_set_even_when_nothing_is_dispatched() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"id: 5\n\n") == []
    assert decoder.last_event_id == "5"


def test_finish_prepares_for_a_reconnected_stream() -> None:
    """The id and retry carry over to the next stream, as for an EventSource; partial input does not."""
    decoder = SSEDecoder()
    decoder.feed(b"retry: 50\nid: 3\ndata: a\n\ndata: cut")
    decoder.finish()
    assert decoder.feed(b"\xef\xbb\xbfdata: b\n\n") == [message("b", "3")]
    assert (decoder.last_event_id, decoder.retry_ms) == ("3", 50)


# --- the memory guard -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "stream",
    [
        pytest.param(b"data: " + b"x" * 20, id="line-without-end"),
        pytest.param(b": " + b"x" * 20 + b"\n", id="long-comment-line"),
        pytest.param(b"data: 0123456789\ndata: 0123456789\n", id="event-data-over-several-lines"),
        pytest.param(b"data: 0123456789\ndata: 0123456789\n\n", id="event-data-dispatched-in-the-same-chunk"),
    ],
)
def test_oversized_line_or_event_is_a_protocol_error(stream: bytes) -> None:
    with pytest.raises(ProtocolError, match="max_event_bytes=16"):
        decode(stream, max_event_bytes=16)


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 64])
def test_oversized_input_in_small_chunks_is_a_protocol_error(chunk_size: int) -> None:
    stream = b"data: 0123456789\ndata: 0123456789\n" + b"data: x" * 10
    with pytest.raises(ProtocolError, match="max_event_bytes=16"):
        decode_in_chunks([stream[i : i + chunk_size] for i in range(0, len(stream), chunk_size)], max_event_bytes=16)


def test_event_data_exactly_at_the_limit_is_accepted() -> None:
    assert decode(b"data: 0123456789\ndata: 01234\n\n", max_event_bytes=16) == [message("0123456789\n01234")]


def test_error_is_raised_by_the_feed_that_broke_the_limit_and_again_after() -> None:
    decoder = SSEDecoder(max_event_bytes=16)
    with pytest.raises(ProtocolError, match=r"event data of 20 characters .* stream bytes 0\.\.46") as caught:
        decoder.feed(b"data: a\n\ndata: " + b"x" * 20 + b"\n\ndata: b\n\n")
    for call in (lambda: decoder.feed(b"data: c\n\n"), decoder.finish):
        with pytest.raises(ProtocolError) as again:
            call()
        assert again.value is caught.value


def test_long_line_in_many_small_chunks_costs_linear_time() -> None:
    """A 1 MiB line in 1-byte chunks: each chunk must not re-copy or re-count what came before."""
    decoder = SSEDecoder()
    piece = b"x"
    for _ in range(200_000):
        decoder.feed(piece)
    assert decoder.feed(b"\n") == []


def test_max_event_bytes_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_event_bytes"):
        SSEDecoder(max_event_bytes=0)


# --- properties -----------------------------------------------------------------------------------------------

# Field values: any text without line ends (surrogates cannot be encoded as UTF-8).
values = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n"), max_size=12)
line_ends = st.sampled_from([b"\n", b"\r", b"\r\n"])


@st.composite
def event_streams(draw: st.DrawFn) -> tuple[bytes, list[SSEEvent]]:
    """A valid stream written with random line endings, and the events WHATWG says it holds."""
    out = [b"\xef\xbb\xbf"] if draw(st.booleans()) else []
    expected: list[SSEEvent] = []
    end = b""
    last_id: str | None = None
    for _ in range(draw(st.integers(0, 6))):
        fields: list[tuple[str, str]] = []
        event_type = draw(st.none() | values)
        if event_type is not None:
            fields.append(("event", event_type))
        event_id = draw(st.none() | values)
        if event_id is not None:
            fields.append(("id", event_id))
            if "\0" not in event_id:
                last_id = event_id
        if draw(st.booleans()):
            fields.append(("", draw(values)))  # a comment
        fields += [("data", line) for line in draw(st.lists(values, max_size=3))]
        if draw(st.booleans()):
            fields.append(("retry", str(draw(st.integers(0, 10**6)))))
        draw(st.randoms()).shuffle(fields)
        lines = [f"{name}: {value}" for name, value in fields]
        data = [value for name, value in fields if name == "data"]
        for line in [*lines, ""]:
            # A CR, then an empty line ended by LF, would be one CRLF: end that blank line otherwise.
            end = draw(st.sampled_from([b"\r", b"\r\n"]) if end == b"\r" and not line else line_ends)
            out += [line.encode(), end]
        if data:
            expected.append(SSEEvent(event=event_type or "message", data="\n".join(data), id=last_id))
    return b"".join(out), expected


@FAST
@given(event_streams(), st.data())
def test_valid_stream_split_anywhere_decodes_to_its_events(
    stream_and_events: tuple[bytes, list[SSEEvent]], data: st.DataObject
) -> None:
    stream, expected = stream_and_events
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=12))
    assert decode(stream) == expected
    assert decode_in_chunks(split_at(stream, cuts)) == expected


def reference_decode(stream: bytes) -> tuple[list[SSEEvent], str | None, int | None, int]:
    """WHATWG §9.2.6 transcribed literally, a character at a time: slow and obviously right."""
    text = stream.decode("utf-8", errors="replace")
    if text.startswith("\ufeff"):
        text = text[1:]
    lines: list[str] = []
    current: list[str] = []
    i = 0
    while i < len(text):
        char = text[i]
        if char in "\r\n":
            lines.append("".join(current))
            current = []
            if char == "\r" and text[i + 1 : i + 2] == "\n":
                i += 1
        else:
            current.append(char)
        i += 1
    events: list[SSEEvent] = []
    data_buffer, event_type, id_buffer = "", "", None
    last_event_id: str | None = None
    retry: int | None = None
    comments = 0
    for line in lines:
        if line == "":
            last_event_id = id_buffer
            if data_buffer == "":
                event_type = ""
                continue
            if data_buffer.endswith("\n"):
                data_buffer = data_buffer[:-1]
            events.append(SSEEvent(event=event_type or "message", data=data_buffer, id=id_buffer))
            data_buffer, event_type = "", ""
            continue
        if line.startswith(":"):
            comments += 1
            continue
        if ":" in line:
            field, value = line.split(":", 1)
            if value.startswith(" "):
                value = value[1:]
        else:
            field, value = line, ""
        if field == "event":
            event_type = value
        elif field == "data":
            data_buffer += value + "\n"
        elif field == "id" and "\0" not in value:
            id_buffer = value
        elif field == "retry" and value and all(c in "0123456789" for c in value):
            retry = min(int(value), 10**18 - 1)  # the decoder clamps absurd values
    return events, last_event_id, retry, comments


# Pieces that make SSE-like noise: field names, colons, spaces, every line end, NUL, a BOM, split UTF-8.
noise = st.lists(
    st.sampled_from(
        [
            *(b"data", b"event", b"id", b"retry", b"foo", b":", b" ", b"x", b"1", b"\x00", b"\r", b"\n", b"\r\n"),
            *(b"\xef\xbb\xbf", b"\xc3", b"\xa9", b"\xff", b"\xe2\x82", b"\xac"),
        ]
    ),
    max_size=60,
).map(b"".join)


@FAST
@given(noise, st.data())
def test_matches_a_literal_reference_implementation_however_split(stream: bytes, data: st.DataObject) -> None:
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=8))
    expected_events, expected_id, expected_retry, expected_comments = reference_decode(stream)
    decoder = SSEDecoder()
    events: list[SSEEvent] = []
    for chunk in split_at(stream, cuts):
        events += decoder.feed(chunk)
    assert events == expected_events
    assert (decoder.last_event_id, decoder.retry_ms, decoder.comments) == (
        expected_id,
        expected_retry,
        expected_comments,
    )
    assert decoder.finish() == []


@FAST
@given(st.binary(max_size=300), st.data())
def test_arbitrary_bytes_decode_the_same_however_split(stream: bytes, data: st.DataObject) -> None:
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=8))
    assert decode_in_chunks(split_at(stream, cuts)) == decode(stream)


@FAST
@given(st.lists(st.binary(max_size=40) | noise, max_size=8), st.integers(1, 32))
def test_arbitrary_bytes_raise_nothing_but_protocol_error(chunks: list[bytes], max_event_bytes: int) -> None:
    reason = ""
    try:
        decode_in_chunks(chunks, max_event_bytes=max_event_bytes)
    except ProtocolError as exc:
        reason = str(exc)
    assert reason == "" or "max_event_bytes" in reason


# Whole lines of the shape the fast path takes (``id: ``, ``event: ``, one ``data: ``, a blank line) mixed
# with lines it must leave to the general rules: the two paths must agree wherever they hand over.
stream_lines = st.lists(
    st.sampled_from(
        [
            *(b"id: 7\n", b"id: r:12\n", b"id: \n", b"id: a\x00b\n", b"event: token\n", b"event: \n", b"event: done\n"),
            *(b"data: {}\n", b"data: \n", b"data:x\n", b"data:  two\n", b"\n", b"\n", b"\n", b": ping\n"),
            *(b"retry: 5\n", b"id:9\n", b"\r\n", b"\r", b"data: \xc3\xa9\n", b"foo: bar\n", b"event: tokens\n"),
        ]
    ),
    max_size=40,
).map(b"".join)


@FAST
@given(stream_lines, st.data())
def test_fast_and_general_paths_agree_with_the_reference_however_split(stream: bytes, data: st.DataObject) -> None:
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=8))
    expected_events, expected_id, expected_retry, expected_comments = reference_decode(stream)
    decoder = SSEDecoder()
    events: list[SSEEvent] = []
    for chunk in split_at(stream, cuts):
        events += decoder.feed(chunk)
    assert events == expected_events
    assert (decoder.last_event_id, decoder.retry_ms, decoder.comments) == (
        expected_id,
        expected_retry,
        expected_comments,
    )


def test_a_stream_of_simple_events_after_a_retry_field_keeps_every_id() -> None:
    stream = b"retry: 1000\n\n" + b"".join(b"id: r:%d\nevent: token\ndata: {}\n\n" % i for i in range(5)) + b"id: r:5\n"
    decoder = SSEDecoder()
    events = decoder.feed(stream)
    assert [e.id for e in events] == [f"r:{i}" for i in range(5)]
    assert {e.event for e in events} == {"token"}
    assert decoder.retry_ms == 1000
    assert decoder.last_event_id == "r:4"  # the id of an event not yet ended does not count
    assert decoder.feed(b"data: x\n\n") == [SSEEvent(event="message", data="x", id="r:5")]


def decode_tallied(chunks: list[bytes], kind: str) -> tuple[int, list[SSEEvent], SSEDecoder]:
    decoder = SSEDecoder()
    count, events = 0, []
    for chunk in chunks:
        found, others = decoder.feed_tally(chunk, kind)
        count += found
        events += others
    return count, events, decoder


@FAST
@given(stream_lines, st.data(), st.sampled_from(["token", "message", "done"]))
def test_tallying_counts_exactly_the_events_feed_would_return(stream: bytes, data: st.DataObject, kind: str) -> None:
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=8))
    expected_events, expected_id, expected_retry, expected_comments = reference_decode(stream)
    count, others, decoder = decode_tallied(split_at(stream, cuts), kind)
    assert count == sum(1 for e in expected_events if e.event == kind)
    assert others == [e for e in expected_events if e.event != kind]  # in order, with their ids
    assert (decoder.last_event_id, decoder.retry_ms, decoder.comments) == (
        expected_id,
        expected_retry,
        expected_comments,
    )


@FAST
@given(noise, st.data())
def test_tallying_noise_matches_the_reference(stream: bytes, data: st.DataObject) -> None:
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=8))
    expected_events, expected_id, _, _ = reference_decode(stream)
    count, others, decoder = decode_tallied(split_at(stream, cuts), "message")
    assert count == sum(1 for e in expected_events if e.event == "message")
    assert others == [e for e in expected_events if e.event != "message"]
    assert decoder.last_event_id == expected_id


def test_a_native_stream_is_tallied_without_building_its_token_events() -> None:
    tokens = b"".join(b'id: r:%d\nevent: token\ndata: {"seq":%d}\n\n' % (i, i) for i in range(63))
    stream = b"retry: 3000\n\n" + tokens + b'event: done\ndata: {"finish_reason":"length"}\n\n'
    count, others, decoder = decode_tallied([stream], "token")
    assert count == 63
    assert others == [SSEEvent("done", '{"finish_reason":"length"}', "r:62")]
    assert decoder.last_event_id == "r:62"
    assert decoder.retry_ms == 3000
