"""Server-sent events: bytes in, ``SSEEvent`` out, by WHATWG HTML §9.2.6 "Interpreting an event stream".

The decoder sits on the client's hot path (MEASUREMENTS.md: ~490k events/s per core), so it works a chunk at a
time with C-level string methods and no per-byte Python loop. Events of the shape servers nearly always send
(``id:``, ``event:``, one ``data:`` line, each with its space, in that order) are taken whole by one regular
expression; anything else (comments, ``retry``, multi-line data, another order) goes line by line through the
general WHATWG rules, which give the same events for the simple shape too. ``benchmarks/wire_decoders.py``
measures both.

Memory is bounded by ``max_event_bytes``, counted in decoded characters (equal to bytes for the ASCII that SSE
streams carry, and never more than the bytes): a line or an event's data longer than that is a
``ProtocolError``.
"""

from __future__ import annotations

import codecs
import re
from typing import Final, NamedTuple

from infer_bench.wire import ProtocolError

__all__ = ["DEFAULT_MAX_EVENT_BYTES", "SSEDecoder", "SSEEvent"]

DEFAULT_MAX_EVENT_BYTES: Final = 1 << 20

# A retry value with more digits than this is clamped: Python refuses to parse integers of more than 4300
# digits, and no reconnection delay needs more than 18 (about 31 million years in milliseconds).
_MAX_RETRY_DIGITS: Final = 18
_MAX_RETRY_MS: Final = 10**_MAX_RETRY_DIGITS - 1


class SSEEvent(NamedTuple):
    """One dispatched event: its type (``"message"`` unless an ``event:`` field said otherwise), its data, and
    the last-event-ID buffer when it was dispatched (``None`` until the stream sent an ``id:`` field)."""

    event: str
    data: str
    id: str | None


# A named tuple, because one is made for every event: ``tuple.__new__`` builds it in ~120 ns, where a frozen
# dataclass takes ~250 ns even with its slots set directly.
_new_tuple = tuple.__new__
_BOM: Final = b"\xef\xbb\xbf"

# One event of the common shape; an ``id`` holding NUL (which WHATWG ignores) or a missing space after a colon
# do not match, and leave the event to the general rules.
_SIMPLE_EVENT: Final = re.compile(r"(?:id: ([^\n\x00]*)\n)?(?:event: ([^\n]*)\n)?data: ([^\n]*)\n\n")
_find_simple_events = _SIMPLE_EVENT.finditer
# A run of simple events, matched in one C call: where ``feed_tally`` counts instead of building events.
_SIMPLE_RUN: Final = re.compile(r"(?:(?:id: [^\n\x00]*\n)?(?:event: [^\n]*\n)?data: [^\n]*\n\n)+")
_match_simple_run = _SIMPLE_RUN.match
_OTHER_STARTS: dict[str, re.Pattern[str]] = {}


def _other_starts(kind: str) -> re.Pattern[str]:
    """The blank lines (in a simple run) after which an event that is not of type ``kind`` starts: a literal
    ``\\n\\n`` first, so the regular expression engine skips ahead instead of trying every position."""
    pattern = _OTHER_STARTS.get(kind)
    if pattern is None:
        pattern = _OTHER_STARTS[kind] = re.compile(r"\n\n(?!(?:id: [^\n]*\n)?event: " + re.escape(kind) + r"\n)")
    return pattern


class SSEDecoder:
    """Decodes one event stream; ``feed`` it chunks as they arrive, then call ``finish`` at end of stream.

    Attributes:
        last_event_id: the event source's last event ID string: the ``id:`` buffer as of the last blank line
            (WHATWG: set on every dispatch, even of an empty event), so an ``id:`` in an event cut off by the
            end of the stream does not count. ``None`` until an ``id:`` field arrived. This is what a
            reconnecting client sends as ``Last-Event-ID``.
        retry_ms: the last valid ``retry:`` field (reconnection time), or ``None``.
        comments: the number of comment lines (``: ping``) seen; servers send them as heartbeats.
    """

    __slots__ = (
        "_after_cr",
        "_bom_decided",
        "_bytes_seen",
        "_data",
        "_data_len",
        "_decoder",
        "_decoder_busy",
        "_error",
        "_event_type",
        "_id_buffer",
        "_max",
        "_tail",
        "_tail_len",
        "comments",
        "last_event_id",
        "retry_ms",
    )

    def __init__(self, *, max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES) -> None:
        """Args:
        max_event_bytes: the longest line, and the longest event data, accepted (in decoded characters).
        """
        if max_event_bytes < 1:
            raise ValueError(f"max_event_bytes must be >= 1, got {max_event_bytes}")
        self._max = max_event_bytes
        # WHATWG: the stream is UTF-8 with errors replaced, and one leading BOM is ignored; the "utf-8-sig"
        # incremental decoder does both, also when a character or the BOM is split across chunks.
        self._decoder: codecs.IncrementalDecoder | None = None  # made on need: most streams never need it
        self._bom_decided = False
        # While the decoder holds part of a character (or has not yet seen whether a BOM starts the stream)
        # every chunk goes through it; otherwise a chunk of whole, valid UTF-8 takes C's bytes.decode.
        self._decoder_busy = True
        self._after_cr = False  # the last chunk ended in CR: an LF starting the next one ends no new line
        self._tail: list[str] = []  # the incomplete last line, in pieces (joined once its end arrives)
        self._tail_len = 0
        self._data: list[str] = []  # data buffer, one entry per data line (joined with "\n" on dispatch)
        self._data_len = 0  # the length of the WHATWG data buffer (each line and its "\n") at the last check
        self._event_type = ""
        self._id_buffer: str | None = None
        self._bytes_seen = 0
        self._error: ProtocolError | None = None
        self.last_event_id: str | None = None
        self.retry_ms: int | None = None
        self.comments = 0

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        """Decode the next chunk of the stream into the events it completes (often none, often several).

        Raises:
            ProtocolError: a line or an event's data is longer than ``max_event_bytes`` (events completed
                earlier in the same chunk are not returned).
        """
        return self._feed(chunk, None)[1]

    def feed_tally(self, chunk: bytes, kind: str) -> tuple[int, list[SSEEvent]]:
        """As ``feed``, but events of type ``kind`` are only counted: ``(how many, the other events)``.

        A client that needs just the number of token events in a read (their data unread) is spared
        building one object per token: in runs of simple events they are counted in C (``str.count``),
        and only the other events (a ``done``, an ``error``) are built. ``last_event_id`` and every other
        state end as ``feed`` leaves them; the other events keep their order.
        """
        return self._feed(chunk, kind)

    def _feed(self, chunk: bytes, tally: str | None) -> tuple[int, list[SSEEvent]]:
        if (error := self._error) is not None:
            raise error
        start = self._bytes_seen
        self._bytes_seen = start + len(chunk)
        if self._decoder_busy:
            text = self._decode_slowly(chunk)
        else:
            try:
                text = chunk.decode()
            except UnicodeDecodeError:  # a character split by the chunk's end, or invalid bytes to replace
                text = self._decode_slowly(chunk)
        if self._after_cr and text:
            self._after_cr = False
            if text[0] == "\n":  # the LF of a CRLF split between chunks: the line already ended at the CR
                text = text[1:]
        if "\r" in text:
            # WHATWG: lines end in CRLF, LF or CR. Normalise to LF, remembering a final CR whose LF may come.
            self._after_cr = text[-1] == "\r"
            text = text.replace("\r\n", "\n").replace("\r", "\n")
        tail = self._tail
        if "\n" not in text:
            if text:
                tail.append(text)
                self._tail_len += len(text)
                if self._tail_len > self._max:
                    raise self._fail(
                        f"SSE line longer than max_event_bytes={self._max} (no line end by {self._where()})"
                    )
            return 0, []
        if tail:
            tail.append(text)
            text = "".join(tail)
            tail.clear()
        self._tail_len = 0
        events: list[SSEEvent] = []
        counted = 0
        if len(text) > self._max:  # a line may be over the limit: every line goes through the checks
            self._apply_lines(text, events, start)
            return self._tallied(tally, counted, events)
        # Simple events where they are (at event boundaries), the general rules from a break in them to the next
        # blank line (an event boundary again), and so on: a stream that opens with ``retry`` or sends a
        # ``: ping`` now and then still takes its tokens the fast way.
        pos, end = 0, len(text)
        while pos < end:
            if not self._data and not self._event_type:
                if tally is None:
                    pos = self._take_simple_events(text, pos, events)
                else:
                    pos, found = self._count_simple_events(text, pos, events, tally)
                    counted += found
                if pos == end:
                    break
            boundary = text.find("\n\n", pos)
            if boundary < 0:
                self._apply_lines(text[pos:] if pos else text, events, start)
                break
            self._apply_lines(text[pos : boundary + 2], events, start)
            pos = boundary + 2
        return self._tallied(tally, counted, events)

    @staticmethod
    def _tallied(tally: str | None, counted: int, events: list[SSEEvent]) -> tuple[int, list[SSEEvent]]:
        """Events the general rules built that ``tally`` counts are counted too (and not returned)."""
        if tally is None or not events:
            return counted, events
        others = [event for event in events if event[0] != tally]
        return counted + len(events) - len(others), others

    def _count_simple_events(self, text: str, pos: int, events: list[SSEEvent], kind: str) -> tuple[int, int]:
        """At an event boundary: the run of simple events from ``pos``, its ``kind`` events counted and the
        others built; returns where the run ends and the count."""
        if kind == "message":  # data-only events are messages too: no event line to count them by
            return self._take_simple_events(text, pos, events), 0
        run = _match_simple_run(text, pos)
        if run is None:
            return pos, 0
        end = run.end()
        total = text.count("\n\n", pos, end)  # one blank line ends each event of a simple run
        needle = "\nevent: " + kind + "\n"  # in a simple run only the event field starts with "event: "
        counted = text.count(needle, pos - 1 if pos else 0, end)
        if not pos and text.startswith(needle[1:]):
            counted += 1
        id_buffer = self._id_buffer
        if counted < total:
            starts = [pos] if not text.startswith(needle[1:], pos) else []
            starts += [m.end() for m in _other_starts(kind).finditer(text, pos, end)]
            append, new_tuple = events.append, _new_tuple
            for event_start in starts:
                match = _SIMPLE_EVENT.match(text, event_start, end) if event_start < end else None
                if match is None:
                    continue
                event_id, event_type, payload = match.groups()
                if event_type == kind:  # the event at ``pos``, checked here rather than by the lookahead
                    continue
                if event_id is None:
                    event_id = _last_id(text, pos, event_start, id_buffer)
                append(new_tuple(SSEEvent, (event_type or "message", payload, event_id)))
        self._id_buffer = self.last_event_id = _last_id(text, pos, end, id_buffer)
        return end, counted

    def _take_simple_events(self, text: str, pos: int, events: list[SSEEvent]) -> int:
        """Dispatch the simple events that follow each other from ``pos``; returns where they stop."""
        append, new_tuple = events.append, _new_tuple
        id_buffer = self._id_buffer
        taken = pos
        for match in _find_simple_events(text, pos):
            if match.start() != taken:
                break
            event_id, event_type, payload = match.groups()
            if event_id is not None:
                id_buffer = event_id
            append(new_tuple(SSEEvent, (event_type or "message", payload, id_buffer)))
            taken = match.end()
        if taken != pos:
            self._id_buffer = self.last_event_id = id_buffer
        return taken

    def _apply_lines(self, text: str, events: list[SSEEvent], start: int) -> None:
        """The WHATWG field rules, a line at a time; an incomplete last line waits in the tail."""
        lines = text.split("\n")
        last = lines.pop()
        if last:
            self._tail.append(last)
        self._tail_len = len(last)
        limit = self._max
        append, new_tuple = events.append, _new_tuple
        # Locals stand in for attributes, saved back after the loop.
        data = data_before = self._data
        data_lines_before = len(data)
        event_type = self._event_type
        id_buffer = self._id_buffer
        last_event_id = self.last_event_id
        comments = self.comments
        for line in lines:
            if not line:
                # WHATWG "dispatch the event": the last event ID string is set even when nothing is dispatched.
                last_event_id = id_buffer
                if data:
                    joined = data[0] if len(data) == 1 else "\n".join(data)
                    if len(joined) > limit:
                        raise self._fail(
                            f"SSE event data of {len(joined)} characters is longer than max_event_bytes={limit} "
                            f"(event ends in {self._span(start)})"
                        )
                    append(new_tuple(SSEEvent, (event_type or "message", joined, id_buffer)))
                    data = []
                event_type = ""
                continue
            if line[:6] == "data: ":  # the commonest line, and the only one in OpenAI streams: a short cut
                data.append(line[6:])
                continue
            name, colon, value = line.partition(":")
            if colon:
                if not name:  # WHATWG: a line starting with a colon is a comment
                    comments += 1
                    continue
                if value[:1] == " ":  # WHATWG: one leading space of the value is not part of it
                    value = value[1:]
            # else WHATWG: a line with no colon is a field named by the whole line, with an empty value.
            if name == "data":
                data.append(value)
            elif name == "event":
                event_type = value
            elif name == "id":
                if "\0" not in value:  # WHATWG: an id containing NULL is ignored
                    id_buffer = value
            # WHATWG: only a retry value of ASCII digits sets the reconnection time; anything else is ignored.
            elif name == "retry" and value.isdigit() and value.isascii():
                digits = value.lstrip("0")
                self.retry_ms = int(digits or "0") if len(digits) <= _MAX_RETRY_DIGITS else _MAX_RETRY_MS
            # WHATWG: any other field is ignored.
        self._data = data
        self._event_type = event_type
        self._id_buffer = id_buffer
        self.last_event_id = last_event_id
        self.comments = comments

        # Sizes: no line of a text within the limit can be over it, so only a long text or an open event costs.
        if data or len(text) > limit:
            self._check_sizes(text, lines, last, data_before, data_lines_before, start)

    def finish(self) -> list[SSEEvent]:
        """End of stream: WHATWG discards an event not ended by a blank line, so this returns ``[]``.

        The decoder is then ready for a new stream (a reconnection): ``last_event_id`` and ``retry_ms`` carry
        over, as they do for an ``EventSource``; a leading BOM is ignored again.

        Raises:
            ProtocolError: the one ``feed`` raised before, again.
        """
        if (error := self._error) is not None:
            raise error
        if self._decoder is not None:
            self._decoder.reset()
        self._bom_decided = False
        self._decoder_busy = True
        self._after_cr = False
        self._tail.clear()
        self._tail_len = 0
        self._data = []
        self._event_type = ""
        self._bytes_seen = 0
        return []

    # --- internals ----------------------------------------------------------------------------------------

    def _check_sizes(
        self, text: str, lines: list[str], last: str, data_before: list[str], data_lines_before: int, start: int
    ) -> None:
        limit = self._max
        if len(last) > limit:
            raise self._fail(f"SSE line longer than max_event_bytes={limit} (no line end by {self._where()})")
        if len(text) > limit and max(map(len, lines), default=0) > limit:
            raise self._fail(f"SSE line longer than max_event_bytes={limit} (in {self._span(start)})")
        if data := self._data:
            # The data of an event not yet ended, counted incrementally so that a long event costs O(its size).
            if data is data_before and data_lines_before:
                added = data[data_lines_before:]
                self._data_len += sum(map(len, added)) + len(added)
            else:
                self._data_len = sum(map(len, data)) + len(data)
            if self._data_len - 1 > limit:
                raise self._fail(
                    f"SSE event data longer than max_event_bytes={limit} (no blank line by {self._where()})"
                )

    def _decode_slowly(self, chunk: bytes) -> str:
        if not self._bom_decided and self._decoder is None and len(chunk) >= 3:
            # A first chunk long enough to tell whether the stream opens with a BOM: usually whole UTF-8.
            self._bom_decided = True
            if chunk[:3] == _BOM:
                chunk = chunk[3:]
            try:
                text = chunk.decode()
            except UnicodeDecodeError:
                pass  # the incremental decoder takes it, told that the BOM question is settled
            else:
                self._decoder_busy = False
                return text
        decoder = self._decoder
        if decoder is None:
            decoder = self._decoder = codecs.getincrementaldecoder("utf-8-sig")(errors="replace")
            if self._bom_decided:
                decoder.setstate((b"", 0))
        text = decoder.decode(chunk)
        pending, bom_undecided = decoder.getstate()
        self._bom_decided = not bom_undecided
        self._decoder_busy = bool(pending) or bool(bom_undecided)
        return text

    def _fail(self, message: str) -> ProtocolError:
        self._error = ProtocolError(message)
        return self._error

    def _where(self) -> str:
        return f"stream byte {self._bytes_seen}"

    def _span(self, start: int) -> str:
        return f"the chunk at stream bytes {start}..{self._bytes_seen}"


def _last_id(text: str, start: int, end: int, before: str | None) -> str | None:
    """The value of the last ``id:`` line of the simple events in ``text[start:end]``, else ``before``."""
    at = text.rfind("\nid: ", start - 1 if start else 0, end)
    if at < 0:
        if start == 0 and text.startswith("id: "):
            at = -1  # the id line that opens the text
        else:
            return before
    value_start = at + 5
    return text[value_start : text.index("\n", value_start)]
