"""YAML text to plain data, keeping the line of every key and list item for error messages.

The document is composed (PyYAML's SafeLoader node graph, which keeps marks) and built by hand rather
than with ``safe_load``, for three reasons: to record lines by key path, to refuse duplicate keys (YAML
1.1 loaders keep the last one silently), and to keep keys as the text the user wrote (``on:`` is the key
'on', not True; ``200:`` is '200'). Merge keys (``<<: *base``) and anchors work as in YAML.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from infer_bench.scenario.base import KeyPath
from infer_bench.scenario.diagnostics import InvalidScenario, Problem

_MERGE_TAG = "tag:yaml.org,2002:merge"
_MAX_NODES = 1_000_000  # aliases can multiply a small file ("billion laughs"); no scenario needs this many


@dataclass
class Document:
    """The data of a YAML document, and the 1-based line of each key path in it."""

    data: Any
    lines: dict[KeyPath, int] = field(default_factory=dict)


def read_document(text: str) -> Document:
    """Parse ``text`` (one YAML document) into plain data with lines.

    Raises:
        InvalidScenario: the text is not YAML, or holds a duplicate key, a complex key or a recursive alias.
    """
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        return _Builder().build(root)
    except yaml.MarkedYAMLError as exc:
        raise InvalidScenario([_syntax_problem(exc, text)]) from None
    except yaml.YAMLError as exc:  # unmarked errors are rare (e.g. a reader error on control characters)
        raise InvalidScenario([Problem((), f"YAML error: {exc}")]) from None


def _syntax_problem(exc: yaml.MarkedYAMLError, text: str) -> Problem:
    mark = exc.problem_mark
    if exc.context_mark is not None and (mark is None or mark.index >= len(text.rstrip())):
        mark = exc.context_mark  # "found '<stream end>'": where the unclosed thing began says more
    line, column = (mark.line + 1, mark.column + 1) if mark else (None, None)
    problem = exc.problem or "invalid YAML"
    if "'\\t'" in problem:
        message = "a tab character; YAML indents (and separates keys from values) with spaces only"
        return Problem((), message, line=line, column=column)
    context = f" ({exc.context})" if exc.context else ""
    return Problem((), f"YAML syntax error: {problem}{context}", line=line, column=column)


class _Builder:
    def __init__(self) -> None:
        self._scalars = yaml.SafeLoader("")  # only its constructor is used, for scalars (ints, floats, bools…)
        self._active: set[int] = set()
        self._count = 0
        self.lines: dict[KeyPath, int] = {}

    def build(self, root: Node | None) -> Document:
        data = None if root is None else self._node(root, ())
        return Document(data, self.lines)

    def _node(self, node: Node, path: KeyPath) -> Any:
        self._count += 1
        if self._count > _MAX_NODES:
            raise InvalidScenario([Problem((), f"more than {_MAX_NODES} values once aliases are expanded")])
        if isinstance(node, ScalarNode):
            return self._scalars.construct_object(node, deep=True)
        if id(node) in self._active:
            message = "a recursive alias (it refers to a value that contains it)"
            raise InvalidScenario([Problem(path, message, line=self.lines.get(path))])
        self._active.add(id(node))
        try:
            if isinstance(node, SequenceNode):
                items = []
                for index, item in enumerate(node.value):
                    self.lines.setdefault((*path, index), item.start_mark.line + 1)
                    items.append(self._node(item, (*path, index)))
                return items
            if isinstance(node, MappingNode):
                return self._mapping(node, path)
            raise InvalidScenario([Problem(path, f"unsupported YAML node {node.tag}")])
        finally:
            self._active.discard(id(node))

    def _mapping(self, node: MappingNode, path: KeyPath) -> dict[str, Any]:
        result: dict[str, Any] = {}
        merged: list[Node] = []
        for key_node, value_node in node.value:
            line = key_node.start_mark.line + 1
            if key_node.tag == _MERGE_TAG:
                merged.extend(value_node.value if isinstance(value_node, SequenceNode) else [value_node])
                continue
            if not isinstance(key_node, ScalarNode):
                message = "a key must be a plain string, not a list or mapping"
                raise InvalidScenario([Problem(path, message, line=line)])
            key = key_node.value
            if key in result:
                first = self.lines.get((*path, key))
                message = f"duplicate key {key!r} (first given on line {first})"
                raise InvalidScenario([Problem((*path, key), message, line=line)])
            self.lines[(*path, key)] = line
            result[key] = self._node(value_node, (*path, key))
        # YAML merge keys: the mapping's own keys win, then earlier merged mappings win over later ones.
        for source in merged:
            if not isinstance(source, MappingNode):
                message = "a merge key (<<) takes a mapping or a list of mappings"
                raise InvalidScenario([Problem(path, message, line=source.start_mark.line + 1)])
            own_lines, self.lines = self.lines, {}
            try:
                values = self._mapping(source, path)
            finally:
                merged_lines, self.lines = self.lines, own_lines
            taken = {key for key in values if key not in result}
            for key in taken:
                result[key] = values[key]
            for key_path, line in merged_lines.items():
                if key_path[len(path)] in taken:
                    self.lines.setdefault(key_path, line)
        return result
