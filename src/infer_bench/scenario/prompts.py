"""Reading prompt files (JSON Lines, CSV, plain text) when a scenario loads, so runs do no file I/O."""

from __future__ import annotations

import csv
import difflib
import io
import json
from pathlib import Path
from typing import Literal

PromptFormat = Literal["jsonl", "csv", "txt"]
_EXTENSIONS: dict[str, PromptFormat] = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".txt": "txt"}
DEFAULT_FIELD = "prompt"


class PromptFileError(ValueError):
    """A prompt file is missing, unreadable, malformed or empty; the message names it as written."""


def read_prompts(
    written: str, base_dir: Path, fmt: PromptFormat | None = None, field: str | None = None
) -> tuple[str, ...]:
    """The prompts in the file ``written`` (relative to ``base_dir`` unless absolute).

    Args:
        written: the path as the scenario gives it, used in messages.
        base_dir: the scenario file's directory.
        fmt: jsonl, csv or txt; None to tell from the extension.
        field: the JSON field or CSV column holding the prompt (default ``prompt``).

    Raises:
        PromptFileError: the file cannot be read, is malformed, or holds no prompt.
    """
    path = base_dir / written
    if fmt is None:
        fmt = _EXTENSIONS.get(path.suffix.lower())
        if fmt is None:
            raise PromptFileError(
                f"cannot tell the format of {written!r} from its extension; add format: jsonl, csv or txt"
            )
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: spreadsheets often save CSV with a BOM
    except FileNotFoundError:
        raise PromptFileError(f"prompt file {written!r} not found (looked in {path.parent.resolve()})") from None
    except UnicodeDecodeError as exc:
        raise PromptFileError(f"prompt file {written!r} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise PromptFileError(f"cannot read prompt file {written!r} ({exc.strerror or exc})") from None
    if fmt == "jsonl":
        prompts = _jsonl(text, written, field or DEFAULT_FIELD)
    elif fmt == "csv":
        prompts = _csv(text, written, field or DEFAULT_FIELD)
    else:
        prompts = tuple(line for line in text.splitlines() if line.strip())
    if not prompts:
        raise PromptFileError(f"prompt file {written!r} holds no prompts")
    return prompts


def _jsonl(text: str, written: str, field: str) -> tuple[str, ...]:
    prompts = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PromptFileError(f"{written} line {number}: not valid JSON ({exc.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get(field), str):
            raise PromptFileError(f"{written} line {number}: expected a JSON object with a string {field!r} field")
        prompts.append(record[field])
    return tuple(prompts)


def _csv(text: str, written: str, field: str) -> tuple[str, ...]:
    reader = csv.DictReader(io.StringIO(text))
    columns = reader.fieldnames or []
    if columns and field not in columns:
        close = difflib.get_close_matches(field, columns, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise PromptFileError(f"{written} has no column {field!r}{hint}; its columns: {', '.join(columns)}")
    prompts = []
    try:
        for row in reader:
            value = row.get(field)
            if value is None:
                raise PromptFileError(f"{written} line {reader.line_num}: no {field!r} value")
            prompts.append(value)
    except csv.Error as exc:
        raise PromptFileError(f"{written} line {reader.line_num}: {exc}") from None
    return tuple(prompts)
