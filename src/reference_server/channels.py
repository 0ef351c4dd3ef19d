"""Token channels: the bounded hand-off from the scheduler to one stream's sender.

The scheduler only ever calls ``put_nowait``; it never waits for a reader, so one slow client cannot
slow a decode step for everybody else. A reader drains everything queued in one call, which lets a
sender write several tokens in one socket write when it falls behind.

A channel also keeps the last ``history`` tokens, read or not, so a client that reconnects can be sent
what it missed (SSE ``Last-Event-ID``, WebSocket ``resume``), and it raises a one-time warning flag when
its buffer passes 80 % full, for the sender to pass on to a slow client.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass

from reference_server.waiters import Waiter, WaiterFactory


@dataclass(frozen=True, slots=True)
class Token:
    seq: int  # 0-based position in the output
    text: str


class EndReason(enum.StrEnum):
    FINISHED = "finished"  # the model produced every token (finish_reason says length or stop)
    CANCELLED = "cancelled"  # the client cancelled or went away
    MODEL_ERROR = "model_error"  # injected or real model fault mid-stream
    SLOW_CONSUMER = "slow_consumer"  # the stream's buffer overflowed
    SHUTDOWN = "shutdown"  # the server stopped before the sequence finished
    TIMEOUT = "timeout"  # a time limit passed (StreamEnd.detail: first_token, inactivity or total)


@dataclass(frozen=True, slots=True)
class StreamEnd:
    reason: EndReason
    finish_reason: str | None  # OpenAI's "length" or "stop" when FINISHED
    prompt_tokens: int
    completion_tokens: int
    message: str = ""
    detail: str | None = None  # the timeout's kind

    @property
    def ok(self) -> bool:
        return self.reason is EndReason.FINISHED


class TokenChannel:
    """A bounded queue of tokens followed by exactly one ``StreamEnd``."""

    __slots__ = (
        "_capacity", "_end", "_items", "_new_waiter", "_waiter", "_warn_at", "history", "warned", "warning_pending",
    )  # fmt: skip

    def __init__(self, capacity: int, new_waiter: WaiterFactory, history: int = 0) -> None:
        self._capacity = capacity
        self._warn_at = max(1, capacity * 4 // 5)
        self._new_waiter = new_waiter
        self._items: deque[Token] = deque()
        self._end: StreamEnd | None = None
        self._waiter: Waiter | None = None
        # Never shorter than the buffer, so every unread token is also in the history (resume replays it).
        self.history: deque[Token] | None = deque(maxlen=max(history, capacity)) if history > 0 else None
        self.warned = False
        self.warning_pending = False

    @property
    def closed(self) -> bool:
        return self._end is not None

    @property
    def end(self) -> StreamEnd | None:
        return self._end

    @property
    def buffered(self) -> int:
        return len(self._items)

    @property
    def capacity(self) -> int:
        return self._capacity

    def put_nowait(self, token: Token) -> bool:
        """Queue a token; False when the buffer is full (the caller decides what that means)."""
        items = self._items
        if len(items) >= self._capacity:
            return False
        items.append(token)
        if self.history is not None:
            self.history.append(token)
        if len(items) >= self._warn_at and not self.warned:
            self.warned = self.warning_pending = True
        self._wake()
        return True

    def close(self, end: StreamEnd) -> None:
        if self._end is None:
            self._end = end
            self._wake()

    def reopen(self) -> None:
        """Accept tokens again after a ``close`` (a cancelled sequence that a client resumed)."""
        self._end = None

    def replay_after(self, seq: int) -> list[Token] | None:
        """Tokens after position ``seq`` from the history, for a new reader; None if some are gone.

        The unread buffer is dropped: its tokens are part of the replay, and the new reader goes on
        from there.
        """
        wanted = seq + 1
        history = self.history
        if not history:
            self._items.clear()
            return []
        if wanted < history[-1].seq + 1 and history[0].seq > wanted:
            return None
        self._items.clear()
        return [t for t in history if t.seq >= wanted]

    async def receive(self) -> tuple[list[Token], StreamEnd | None]:
        """Wait for tokens or the end; return all queued tokens, and the end once they are drained."""
        while not self._items and self._end is None:
            self._waiter = self._new_waiter()
            await self._waiter.wait()
        tokens = list(self._items)
        self._items.clear()
        return tokens, self._end

    def _wake(self) -> None:
        if self._waiter is not None:
            self._waiter.set()
            self._waiter = None
