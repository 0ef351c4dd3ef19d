"""Token channels: the bounded hand-off from the scheduler to one stream's sender.

The scheduler only ever calls ``put_nowait``; it never waits for a reader, so one slow client cannot
slow a decode step for everybody else. A reader drains everything queued in one call, which lets a
sender write several tokens in one socket write when it falls behind.
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


@dataclass(frozen=True, slots=True)
class StreamEnd:
    reason: EndReason
    finish_reason: str | None  # OpenAI's "length" or "stop" when FINISHED
    prompt_tokens: int
    completion_tokens: int
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.reason is EndReason.FINISHED


class TokenChannel:
    """A bounded queue of tokens followed by exactly one ``StreamEnd``."""

    __slots__ = ("_capacity", "_end", "_items", "_new_waiter", "_waiter")

    def __init__(self, capacity: int, new_waiter: WaiterFactory) -> None:
        self._capacity = capacity
        self._new_waiter = new_waiter
        self._items: deque[Token] = deque()
        self._end: StreamEnd | None = None
        self._waiter: Waiter | None = None

    @property
    def closed(self) -> bool:
        return self._end is not None

    def put_nowait(self, token: Token) -> bool:
        """Queue a token; False when the buffer is full (the caller decides what that means)."""
        if len(self._items) >= self._capacity:
            return False
        self._items.append(token)
        self._wake()
        return True

    def close(self, end: StreamEnd) -> None:
        if self._end is None:
            self._end = end
            self._wake()

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
