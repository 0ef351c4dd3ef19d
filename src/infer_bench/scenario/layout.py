"""Rearranging a scenario document into the shape the file models validate, remembering what moved.

The conveniences of the format are resolved here, on plain data, before validation:

- k6's camelCase options in a scenario entry (``preAllocatedVUs``) are renamed to ours;
- a scenario that gives one class's keys itself (``protocol``, ``request``…) gets them moved into
  ``classes: [{name: default, …}]``;
- ``defaults`` fill every class key a class leaves out, and ``protocol`` falls back to ``sse``;
- top-level keys starting with ``x-`` are dropped: they hold anchors for the rest of the file.

Doing it before validation means a class is validated once, complete, against its real protocol. Each
move is recorded so that a problem found at ``scenarios.chat.classes[0].timeout`` is reported where
the user wrote it: ``scenarios.chat.timeout``, or ``defaults.timeout``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from infer_bench.scenario.base import ALIASES, KeyPath
from infer_bench.scenario.diagnostics import Move, Problem
from infer_bench.scenario.fileformat import INLINE_KEYS, ClassDefaults

DEFAULT_PROTOCOL = "sse"
INLINE_CLASS_NAME = "default"
EXTENSION_PREFIX = "x-"
"""Top-level keys starting so are ignored (as in Docker Compose): a place for YAML anchors to live."""


@dataclass
class Arranged:
    data: Any
    moves: list[Move] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)


def arrange(document: Any) -> Arranged:
    """A rearranged deep copy of ``document``; parts of the wrong type are left for validation to report."""
    result = Arranged(copy.deepcopy(document))
    data = result.data
    if not isinstance(data, dict):
        return result
    for key in [key for key in data if key.startswith(EXTENSION_PREFIX)]:
        del data[key]
    defaults = data.get("defaults")
    inherited = (
        {key: value for key, value in defaults.items() if key in ClassDefaults.model_fields and value is not None}
        if isinstance(defaults, dict)
        else {}
    )
    scenarios = data.get("scenarios")
    if isinstance(scenarios, dict):
        for name, entry in scenarios.items():
            if isinstance(entry, dict):
                _arrange_entry(entry, ("scenarios", name), inherited, result)
    return result


def _arrange_entry(entry: dict[str, Any], path: KeyPath, inherited: dict[str, Any], result: Arranged) -> None:
    for spelled, ours in ALIASES.items():
        if spelled in entry:
            if ours in entry:
                result.problems.append(Problem((*path, spelled), f"{spelled!r} and {ours!r} are the same option"))
                continue
            entry[ours] = entry.pop(spelled)
            result.moves.append(((*path, ours), (*path, spelled)))
    inline = [key for key in INLINE_KEYS if key in entry]
    if inline and "classes" in entry:
        result.problems.append(
            Problem(
                (*path, inline[0]),
                f"give either classes or one class's keys ({', '.join(INLINE_KEYS)}) on the scenario, not both",
            )
        )
        return
    if "classes" not in entry:
        entry["classes"] = [{"name": INLINE_CLASS_NAME, **{key: entry.pop(key) for key in inline}}]
        result.moves.append(((*path, "classes", 0), path))
    classes = entry["classes"]
    if not isinstance(classes, list):
        return
    for index, user_class in enumerate(classes):
        if not isinstance(user_class, dict):
            continue
        for key, value in inherited.items():
            if key not in user_class:
                user_class[key] = copy.deepcopy(value)
                result.moves.append(((*path, "classes", index, key), ("defaults", key)))
        user_class.setdefault("protocol", DEFAULT_PROTOCOL)
