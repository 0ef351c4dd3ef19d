"""``${VAR}`` and ``${VAR:-default}`` in scenario text, resolved from a mapping (the CLI's env and ``-e``).

Substitution is textual, before YAML parsing, so a variable can stand for a number (``vus: ${VUS:-10}``)
and every line keeps its number for later messages: a value holding a line break is refused. ``$$`` is
a literal ``$``; a ``$`` not followed by ``{`` or ``$`` is left alone. As in a shell, ``:-`` also applies
when the variable is set but empty. Whole-line comments are left untouched, so a commented-out line
cannot fail on a variable it names.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from functools import partial

from infer_bench.scenario.diagnostics import InvalidScenario, Problem

_REFERENCE = re.compile(r"\$(?:(?P<dollar>\$)|\{(?P<body>[^}]*)(?P<close>\})?)")
_BODY = re.compile(r"(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?::-(?P<default>.*))?", re.DOTALL)


def substitute(text: str, env: Mapping[str, str]) -> str:
    """``text`` with its variables replaced from ``env``.

    Raises:
        InvalidScenario: a variable is undefined (and has no default), malformed, unclosed, or its value
            spans lines; each problem names the variable and its line.
    """
    problems: list[Problem] = []
    lines = text.splitlines(keepends=True)
    for index, line in enumerate(lines):
        if "$" in line and not line.lstrip().startswith("#"):
            lines[index] = _REFERENCE.sub(partial(_replace, env=env, line=index + 1, problems=problems), line)
    if problems:
        raise InvalidScenario(problems)
    return "".join(lines)


def _replace(match: re.Match[str], *, env: Mapping[str, str], line: int, problems: list[Problem]) -> str:
    if match["dollar"]:
        return "$"
    column = match.start() + 1
    if not match["close"]:
        problems.append(Problem((), "unclosed ${ (expected ${NAME} or ${NAME:-default})", line, column))
        return match[0]
    body = _BODY.fullmatch(match["body"])
    if body is None:
        problems.append(
            Problem((), f"bad substitution {match[0]!r}: expected ${{NAME}} or ${{NAME:-default}}", line, column)
        )
        return match[0]
    name, default = body["name"], body["default"]
    value = env.get(name)
    if not value and default is not None:
        value = default
    if value is None:
        hint = f"pass -e {name}=… or write ${{{name}:-default}}"
        problems.append(Problem((), f"variable {name} is not set; {hint}", line, column))
        return match[0]
    if "\n" in value or "\r" in value:
        problems.append(
            Problem((), f"variable {name} holds a line break; its value must fit on one line", line, column)
        )
        return match[0]
    return value
