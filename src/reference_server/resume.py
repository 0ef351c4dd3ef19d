"""Resumable streams: a dropped client reconnects and gets what it missed, then the live rest.

Every resumable stream is registered under its request id while a reader is attached. When the reader
goes away before the end, the generation is cancelled at the next step (nobody reads it), but the entry
stays for ``resume_ttl_s``: its channel still holds the last ``resume_buffer`` tokens. A resume replays
the tokens after the client's last seen position and, if the generation was cut short, lets it rejoin
the queue where it stopped (the models are deterministic, so the continuation is exactly the tokens
that would have come). A stream that ended and was written out in full is forgotten at once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from reference_server.errors import Conflict, RequestError
from reference_server.scheduler import ContinuousScheduler, Sequence

Clock = Callable[[], float]


class ResumeUnavailable(RequestError):
    """Nothing to resume: unknown or expired request id, another client's, or events no longer buffered.

    Sent in-band (an SSE ``error`` event, a WebSocket ``error`` message) rather than as an HTTP status, so
    a resuming client reads it where it reads every other end of a stream.
    """

    status = 404
    code = "resume_unavailable"


@dataclass(eq=False, slots=True)
class Resumable:
    key: str
    client: str
    scheduler: ContinuousScheduler
    seq: Sequence
    attached: bool = True
    expires_at: float = float("inf")


def parse_event_id(value: str) -> tuple[str, int] | None:
    """``<request_id>:<seq>`` from a ``Last-Event-ID``; None when it has another form."""
    key, sep, seq = value.rpartition(":")
    if not sep or not key or not seq.isdigit() or len(seq) > 12:
        return None
    return key, int(seq)


class ResumeTable:
    """Resumable streams by key, each kept ``ttl_s`` after its reader left."""

    def __init__(self, ttl_s: float, clock: Clock) -> None:
        self.ttl_s = ttl_s
        self._clock = clock
        self._entries: dict[str, Resumable] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def register(self, key: str, client: str, scheduler: ContinuousScheduler, seq: Sequence) -> Resumable:
        """Make a new stream resumable under ``key``.

        Raises:
            Conflict: a stream with that key has a reader attached right now.
        """
        old = self._entries.get(key)
        if old is not None and old.attached:
            raise Conflict(f"request id {key!r} is already streaming", field="request_id")
        entry = self._entries[key] = Resumable(key, client, scheduler, seq)
        return entry

    def detach(self, entry: Resumable, *, complete: bool) -> None:
        """The reader left: forget a stream written out in full, else keep it ``ttl_s``."""
        entry.attached = False
        if complete or self.ttl_s <= 0:
            self.forget(entry)
        else:
            entry.expires_at = self._clock() + self.ttl_s

    def attach(self, key: str, client: str) -> Resumable:
        """Take over a detached stream for a new reader.

        Raises:
            ResumeUnavailable: no such stream (never known, expired, or another client's).
            Conflict: its previous reader is still attached.
        """
        entry = self._entries.get(key)
        if entry is None or entry.client != client or entry.expires_at <= self._clock():
            raise ResumeUnavailable(f"no resumable stream {key!r}: unknown, expired, or not this client's")
        if entry.attached:
            raise Conflict(f"stream {key!r} still has a reader; retry once it is gone", field="request_id")
        entry.attached = True
        entry.expires_at = float("inf")
        return entry

    def forget(self, entry: Resumable) -> None:
        if self._entries.get(entry.key) is entry:
            del self._entries[entry.key]

    def sweep(self, now: float) -> int:
        """Drop entries whose time ran out; returns how many."""
        expired = [e for e in self._entries.values() if not e.attached and e.expires_at <= now]
        for entry in expired:
            del self._entries[entry.key]
        return len(expired)
