"""Waiting for a condition in tests: poll with a bound, never sleep a guessed duration."""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_until(predicate: Callable[[], bool], timeout_s: float = 5.0, interval_s: float = 0.002) -> None:
    """Poll ``predicate`` until it holds; fail after ``timeout_s`` (a bound, not an expected duration)."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s} s")
        time.sleep(interval_s)
