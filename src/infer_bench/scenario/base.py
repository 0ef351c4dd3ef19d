"""The model base every scenario model shares, and the validated scalar types they are built from.

Numbers are strict: YAML already gives ints and floats, so a bool (``vus: yes``) or a quoted string
(``rate: "10"``) is a mistake to report rather than a value to coerce. An int is still a valid float.
"""

from __future__ import annotations

import difflib
import re
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, Strict, model_validator
from pydantic_core import PydanticCustomError

KeyPath = tuple[str | int, ...]
"""A path of keys and list indexes into the scenario document, e.g. ``("scenarios", "chat", "stages", 2)``."""

ALIASES: dict[str, str] = {
    "preAllocatedVUs": "pre_allocated_vus",
    "maxVUs": "max_vus",
    "timeUnit": "time_unit",
    "startTime": "start_time",
    "gracefulStop": "graceful_stop",
    "startVUs": "start_vus",
    "startRate": "start_rate",
    "maxDuration": "max_duration",
}
"""k6's camelCase option names, accepted in a scenario entry as spellings of ours."""


def show(value: Any) -> str:
    """A value as the user wrote it, for messages: ``'fast'``, ``-5``, ``true``, ``null``, ``a mapping``."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(value if len(value) <= 60 else value[:57] + "...")
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    return f"{type(value).__name__} {value}"


def invalid(message: str, at: str | int | KeyPath = ()) -> PydanticCustomError:
    """A validation error whose message is final; ``at`` is the key (path) below the model it concerns."""
    where = at if isinstance(at, tuple) else (at,)
    return PydanticCustomError("scenario", "{message}", {"message": message, "at": where})


def unknown_key_message(key: str, known: list[str], note: str = "") -> str:
    """``unknown key 'gracefull_stop' (did you mean 'graceful_stop'?)``; else ``note``, or the keys allowed."""
    squashed = {name.replace("_", "").lower(): name for name in known}
    match = squashed.get(key.replace("_", "").replace("-", "").lower())
    if match is None:
        close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
        match = close[0] if close else None
    if match is not None:
        return f"unknown key {key!r} (did you mean {match!r}?)"
    return f"unknown key {key!r}; {note or 'expected one of: ' + ', '.join(sorted(known))}"


class SpecModel(BaseModel):
    """Frozen, closed to unknown keys (reported with a did-you-mean hint), finite numbers only."""

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False, use_attribute_docstrings=True)

    @model_validator(mode="before")
    @classmethod
    def _reject_unknown_keys(cls, data: Any) -> Any:
        # pydantic's own extra="forbid" error carries no hint; this one names the likely key.
        if isinstance(data, dict):
            for key in data:
                if key not in cls.model_fields:
                    known = [*cls.model_fields, *(k for k, v in ALIASES.items() if v in cls.model_fields)]
                    raise invalid(unknown_key_message(str(key), known, cls._unknown_key_note(str(key))), at=key)
        return data

    @classmethod
    def _unknown_key_note(cls, key: str) -> str:
        """More to say about an unknown key; subclasses that know where it would belong override this."""
        return ""


_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


def _check_name(value: str) -> str:
    if not _NAME.fullmatch(value):
        raise invalid(f"expected a name of letters, digits, '_' and '-' (at most 64), got {show(value)}")
    return value


def _check_path(value: str) -> str:
    if not value.startswith("/") or any(c.isspace() for c in value):
        raise invalid(f"expected a URL path starting with '/', got {show(value)}")
    return value


Count = Annotated[int, Strict(), Field(ge=1)]
"""A whole number >= 1: VUs, iterations, tokens."""
WholeNumber = Annotated[int, Strict(), Field(ge=0)]
Seed = Annotated[int, Strict()]
PositiveNumber = Annotated[float, Strict(), Field(gt=0)]
NonNegativeNumber = Annotated[float, Strict(), Field(ge=0)]
Probability = Annotated[float, Strict(), Field(ge=0, le=1)]
Flag = Annotated[bool, Strict()]
Name = Annotated[str, AfterValidator(_check_name)]
"""A scenario or class name: it becomes a tag on every metric, so it is kept plain."""
UrlPath = Annotated[str, AfterValidator(_check_path)]
