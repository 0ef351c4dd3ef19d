"""The send watchdog: finds writes to clients that have been stuck longer than ``send_timeout_s``.

A deadline per write (a cancel scope each) measured ~15 µs, far too much at tens of thousands of events
a second. Instead each sender stamps ``send_started`` before a write and clears it after (~0.2 µs), and
the sweeper calls ``SendWatchdog.sweep`` periodically: a limit lands within one sweep interval.
"""

from __future__ import annotations

import time
from typing import Protocol


class StuckSender(Protocol):
    send_started: float | None  # ``time.monotonic()`` when the current write began; None between writes

    def send_stuck(self) -> None:
        """Called once when the current write has taken too long; the sender drops its client."""


class SendWatchdog:
    """The senders being watched; ``sweep`` tells each one stuck since ``timeout_s`` (once)."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._senders: set[StuckSender] = set()

    def __len__(self) -> int:
        return len(self._senders)

    def watch(self, sender: StuckSender) -> None:
        self._senders.add(sender)

    def unwatch(self, sender: StuckSender) -> None:
        self._senders.discard(sender)

    def sweep(self, _now: float | None = None) -> None:
        deadline = time.monotonic() - self.timeout_s
        stuck = [s for s in self._senders if s.send_started is not None and s.send_started <= deadline]
        for sender in stuck:
            self._senders.discard(sender)
            sender.send_stuck()
