"""Durations as k6 and Go write them (``500ms``, ``1m30s``, ``1.5s``, ``250us``), or plain seconds.

Inside the tool every duration is a float of seconds; these strings exist only at the edges.
"""

from __future__ import annotations

import math
import re
from functools import partial
from typing import Annotated, Any

from pydantic import BeforeValidator, WithJsonSchema

from infer_bench.scenario.base import invalid, show

_UNIT_SECONDS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}
_NUMBER = r"(?:\d+(?:\.\d*)?|\.\d+)"
_PART = re.compile(rf"({_NUMBER})(ms|us|µs|ns|h|m|s)")  # "ms" before "m": alternation takes the first match
_DURATION = re.compile(rf"(?:{_NUMBER}(?:ms|us|µs|ns|h|m|s))+")
_PLAIN = re.compile(_NUMBER)
_EXPECTED = "expected a duration like 500ms or 1m30s"


def parse_duration(value: str | float) -> float:
    """Seconds in ``value``: a duration string, or a number (or numeric string) of seconds.

    Raises:
        ValueError: ``value`` is negative, not finite, or not a duration; the message says what was expected.
    """
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ValueError(f"{_EXPECTED}, got {show(value)}")
    if not isinstance(value, str):
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"expected a duration >= 0, got {show(value)}")
        return float(value)
    text = value.strip()
    if _PLAIN.fullmatch(text):
        return float(text)
    if _DURATION.fullmatch(text):
        return sum(float(number) * _UNIT_SECONDS[unit] for number, unit in _PART.findall(text))
    if text.startswith("-") and (_PLAIN.fullmatch(text[1:]) or _DURATION.fullmatch(text[1:])):
        raise ValueError(f"expected a duration >= 0, got {show(value)}")
    raise ValueError(f"{_EXPECTED}, got {show(value)}")


def format_duration(seconds: float) -> str:
    """A spelling of ``seconds`` that parses back: ``0s``, ``250us``, ``500ms``, ``1.5s``, ``1m30s``, ``2h``."""
    if seconds < 0:
        return "-" + format_duration(-seconds)
    if seconds < 5e-10:  # below a nanosecond's resolution
        return "0s"
    if seconds < 1e-6:
        return f"{seconds * 1e9:g}ns"
    if seconds < 1e-3:
        return f"{seconds * 1e6:g}us"
    if seconds < 1:
        return f"{seconds * 1e3:g}ms"
    hours, rest = divmod(seconds, 3600.0)
    minutes, secs = divmod(rest, 60.0)
    parts = [f"{int(hours)}h" if hours else "", f"{int(minutes)}m" if minutes else ""]
    secs = round(secs, 6)
    if secs or not any(parts):
        parts.append(f"{secs:g}s")
    return "".join(parts)


def _validate(value: Any, *, positive: bool) -> float:
    try:
        seconds = parse_duration(value)
    except ValueError as exc:
        raise invalid(str(exc)) from None
    if positive and seconds <= 0:
        raise invalid(f"expected a duration > 0, got {show(value)}")
    return seconds


DURATION_JSON_SCHEMA: dict[str, Any] = {
    "anyOf": [
        {
            "type": "string",
            "pattern": r"^(\d+(\.\d*)?|\.\d+)((ms|us|µs|ns|h|m|s)((\d+(\.\d*)?|\.\d+)(ms|us|µs|ns|h|m|s))*)?$",
        },
        {"type": "number", "minimum": 0},
    ],
    "description": "seconds, or a duration like 500ms, 1.5s or 1m30s",
}

Duration = Annotated[float, BeforeValidator(partial(_validate, positive=False)), WithJsonSchema(DURATION_JSON_SCHEMA)]
"""Seconds >= 0, written as a duration string or a number of seconds."""
PositiveDuration = Annotated[
    float, BeforeValidator(partial(_validate, positive=True)), WithJsonSchema(DURATION_JSON_SCHEMA)
]
"""Seconds > 0: a zero would make the thing it bounds never happen, or never end."""
