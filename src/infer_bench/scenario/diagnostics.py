"""Problems found in a scenario file, and their rendering as located, readable lines.

    scenario.yaml:14 scenarios.chat.stages[2].target: expected a number >= 0, got -5

A problem carries the key path of the data that was validated; a ``Locator`` maps it back to what the
user wrote (an inline class or a value inherited from ``defaults`` lives elsewhere in the file than in
the validated data, and k6 spellings were renamed) and to the nearest line the document knows.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError
from pydantic_core import ErrorDetails

from infer_bench.scenario.base import KeyPath, show

MAX_SHOWN = 5


@dataclass(frozen=True)
class Problem:
    """One thing wrong, at a key path; ``line`` is set when the problem is not about a key (syntax, env)."""

    path: KeyPath
    message: str
    line: int | None = None
    column: int | None = None


class InvalidScenario(Exception):
    """Problems found by one stage of loading; the loader renders them into a ``ScenarioError``."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        super().__init__(problems)
        self.problems = list(problems)


Move = tuple[KeyPath, KeyPath]
"""A key path prefix in the validated data, and the prefix the same value has in the file."""


class Locator:
    """Turns problems into ``file:line path: message`` lines."""

    def __init__(self, source: str, lines: dict[KeyPath, int] | None = None, moves: Iterable[Move] = ()) -> None:
        self.source = source
        self.lines = lines or {}
        self.moves = sorted(moves, key=lambda move: len(move[0]), reverse=True)  # longest prefix first

    def in_file(self, path: KeyPath) -> KeyPath:
        """Where the value at ``path`` of the validated data was written."""
        for prefix, target in self.moves:
            if path[: len(prefix)] == prefix:
                return target + path[len(prefix) :]
        return path

    def line_of(self, path: KeyPath) -> int | None:
        """The line of ``path`` in the file, or of its nearest ancestor that has one."""
        for end in range(len(path), 0, -1):
            line = self.lines.get(path[:end])
            if line is not None:
                return line
        return None

    def render(self, problems: Iterable[Problem]) -> str:
        """One line per problem, sorted by line, at most ``MAX_SHOWN`` of them."""
        seen: set[tuple[KeyPath, str]] = set()
        located: list[tuple[int, str]] = []
        for problem in problems:
            path = self.in_file(problem.path)
            note = ""
            if path[:1] == ("defaults",) and problem.path[:1] == ("scenarios",):
                note = f" (as applied to {format_path(self.in_file(problem.path[:4]))})"
            if (path, problem.message) in seen:
                continue
            seen.add((path, problem.message))
            line = problem.line if problem.line is not None else self.line_of(path)
            where = self.source + (f":{line}" if line is not None else "")
            where += f":{problem.column}" if problem.column is not None and line is not None else ""
            text = f"{where} {format_path(path)}: {problem.message}" if path else f"{where}: {problem.message}"
            located.append((line or 0, text + note))
        located.sort(key=lambda item: item[0])
        shown = [text for _, text in located[:MAX_SHOWN]]
        if len(located) > MAX_SHOWN:
            shown.append(f"… and {len(located) - MAX_SHOWN} more")
        return "\n".join(shown)


_PLAIN_KEY = re.compile(r"[A-Za-z0-9_-]+")


def format_path(path: KeyPath) -> str:
    """``scenarios.chat.stages[2].target``; a key that is not plain is quoted: ``tags['a b']``."""
    text = ""
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
        elif _PLAIN_KEY.fullmatch(part):
            text += f".{part}" if text else part
        else:
            text += f"[{part!r}]"
    return text


def problems_from(
    exc: ValidationError, data: Any, base: KeyPath = (), tags: Mapping[str, Sequence[str]] | None = None
) -> list[Problem]:
    """The problems of a pydantic error, at key paths of ``data`` (the input that was validated).

    Args:
        exc: the error.
        data: the validated input, to tell its keys from pydantic's union tags in error locations;
            None to take locations as they are.
        base: the path of ``data`` in the document.
        tags: the values each union discriminator takes, named when one is missing.
    """
    problems = []
    for error in exc.errors(include_url=False):
        if error["type"] == "default_factory_not_called":
            continue  # a default computed from a field that failed: that field's problem is the one to report
        path = base + _data_path(error["loc"], data)
        context = error.get("ctx") or {}
        key = str(context.get("discriminator", "")).strip("'")
        if error["type"] == "union_tag_invalid":
            path += (key,)
        at = context.get("at")
        if isinstance(at, tuple):
            path += at
        message = explain(error)
        if error["type"] == "union_tag_not_found" and tags and key in tags:
            message += f"; one of: {', '.join(tags[key])}"
        problems.append(Problem(path, message))
    return problems


def _data_path(loc: tuple[int | str, ...], data: Any) -> KeyPath:
    # pydantic's loc also holds union tags ('constant-vus'), dict-key markers ('[key]') and the name of a
    # missing field; only steps that exist in the data are kept (a missing key is named in the message).
    path: list[str | int] = []
    node = data
    for part in loc:
        in_dict = isinstance(node, dict) and isinstance(part, str) and part in node
        if in_dict or (isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node)):
            node = node[part]
            path.append(part)
        elif data is None:
            path.append(part)
    return tuple(path)


_COMPARISONS = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}
_EXPECTED = {
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "an integer",
    "float_type": "a number",
    "float_parsing": "a number",
    "finite_number": "a finite number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "string_type": "a string",
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
    "list_type": "a list",
    "tuple_type": "a list",
}


def explain(error: ErrorDetails) -> str:
    """A pydantic error in the words of this file format: what was expected, and what was found."""
    kind = error["type"]
    context = error.get("ctx") or {}
    value = error.get("input")
    got = f"got {show(value)}"
    if kind == "scenario":  # ours (base.invalid): the message is final
        return str(context["message"])
    if kind == "missing":
        return f"missing required key {error['loc'][-1]!r}"
    if kind in _COMPARISONS:
        bound = next(iter(context.values()))
        return f"expected a number {_COMPARISONS[kind]} {show(bound).removesuffix('.0')}, {got}"
    if kind in _EXPECTED:
        return f"expected {_EXPECTED[kind]}, {got}"
    if kind == "literal_error":
        options = re.findall(r"'([^']*)'", str(context.get("expected", "")))
        return f"expected {context.get('expected')}, {got}{_did_you_mean(value, options)}"
    if kind == "union_tag_invalid":
        key = str(context.get("discriminator", "")).strip("'")
        options = re.findall(r"'([^']*)'", str(context.get("expected_tags", "")))
        tag = context.get("tag")
        return f"unknown {key} {show(tag)}{_did_you_mean(tag, options)}; expected one of: {', '.join(options)}"
    if kind == "union_tag_not_found":
        return f"missing required key {context.get('discriminator')}"
    if kind == "too_short":
        minimum = context.get("min_length")
        what = "entry" if isinstance(value, dict) else "item"
        return f"expected at least {minimum} {what}{'s' if minimum != 1 else ''}, got {len(value or ())}"
    if kind == "too_long":
        return f"expected at most {context.get('max_length')} items, got {len(value or ())}"
    if kind == "string_too_short":
        return f"expected a non-empty string, {got}"
    message = error["msg"].removeprefix("Value error, ")
    return f"{message[:1].lower()}{message[1:]}, {got}"


def _did_you_mean(value: Any, options: list[str]) -> str:
    close = difflib.get_close_matches(str(value), options, n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""
