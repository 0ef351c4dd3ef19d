"""What happened to one request, stamped with one monotonic nanosecond clock.

Definitions (docs/metrics.md): TTFT runs to the first non-empty content token — not the headers, not a
comment, not a role-only chunk. ITL is every gap between consecutive tokens; an event carrying k tokens
contributes its gap once and k−1 zero gaps. Open-loop latencies run from the INTENDED start (the
schedule's time, as wrk2 does against coordinated omission); the ``*_sent`` variants run from the actual
send, and both are kept.
"""

from __future__ import annotations

import enum


class Outcome(enum.StrEnum):
    COMPLETED = "completed"  # the stream ended as the server meant it to
    TRUNCATED = "truncated"  # ended by a length limit (finish_reason "length"); still a success
    CANCELLED = "cancelled"  # the client cancelled on purpose (cancel_after_tokens)
    DISCONNECTED = "disconnected"  # the connection dropped mid-response
    CONNECT_ERROR = "connect_error"  # no connection could be made
    HTTP_ERROR = "http_error"  # a 4xx/5xx status other than 429
    RATE_LIMITED = "rate_limited"  # 429
    STREAM_ERROR = "stream_error"  # the server reported an error in-band, mid-stream
    TIMED_OUT = "timed_out"  # the request's timeout passed
    PROTOCOL_ERROR = "protocol_error"  # the bytes broke HTTP, SSE or the chunk format


SUCCESSES = frozenset({Outcome.COMPLETED, Outcome.TRUNCATED})


class GapBuffer:
    """Where one tag set's inter-token gaps wait for the recorder: each real gap (µs) in ``values``, the zero
    gaps of tokens that came in one read as a count. Most gaps of a batched stream are zeros (a read of 63
    tokens has one gap and 62 zeros), so counting them keeps the buffer, and its folding, 60x smaller."""

    __slots__ = ("values", "zeros")

    def __init__(self) -> None:
        self.values: list[int] = []
        self.zeros = 0

    def clear(self) -> None:
        self.values.clear()
        self.zeros = 0


class Timeline:
    """Stamps (ns, 0 = never) and counts for one request; filled in by a client as bytes arrive."""

    __slots__ = (
        "end_ns", "error", "first_token_ns", "gaps", "headers_ns", "intended_ns", "last_token_ns",
        "outcome", "reconnects", "sent_ns", "status", "tokens",
    )  # fmt: skip

    def __init__(self, intended_ns: int, gaps: GapBuffer) -> None:
        self.intended_ns = intended_ns
        self.sent_ns = 0
        self.headers_ns = 0
        self.first_token_ns = 0
        self.last_token_ns = 0
        self.end_ns = 0
        self.tokens = 0
        self.status = 0
        self.outcome: Outcome | None = None
        self.error: str | None = None
        self.reconnects = 0
        self.gaps = gaps  # where inter-token gaps go: the recorder's buffer, or a discarded one in warmup

    def on_tokens(self, now: int, count: int = 1) -> None:
        """``count`` tokens arrived at ``now`` in one event."""
        if count <= 0:
            return
        if self.first_token_ns == 0:
            self.first_token_ns = now
        else:
            self.gaps.values.append((now - self.last_token_ns) // 1000)  # µs: the recorder counts them as they are
        if count > 1:
            self.gaps.zeros += count - 1
        self.last_token_ns = now
        self.tokens += count

    def finish(self, outcome: Outcome, now: int, error: str | None = None) -> None:
        """Record how the request ended; the first call wins (a later error cannot overwrite it)."""
        if self.outcome is None:
            self.outcome = outcome
            self.end_ns = now
            self.error = error

    def resend(self) -> None:
        """The request goes again on a new connection: its first never reached the server."""
        self.outcome = None
        self.error = None
        self.end_ns = 0

    def reopen(self) -> None:
        """The client reconnects to resume the stream: the request is not over after all."""
        self.outcome = None
        self.error = None
        self.end_ns = 0
        self.reconnects += 1
