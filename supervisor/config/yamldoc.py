"""YAML documents that remember where each value came from.

Config errors must name the file, the field and its line. PyYAML's node tree
keeps line marks; ``YamlDoc.line_of(loc)`` walks it along a pydantic-style
location such as ``("models", 1, "gguf")``. Duplicate mapping keys, which
PyYAML silently overwrites, are rejected with both line numbers.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

import yaml

# A pydantic-style location of a value: mapping keys and sequence indexes from the top, ``("models", 1, "gguf")``.
Loc = tuple[int | str, ...]


class YamlProblem(Exception):
    """The text is not valid YAML for us; ``line`` is 1-based or None."""

    def __init__(self, message: str, line: int | None = None):
        super().__init__(message)
        self.message = message
        self.line = line


class _StrictLoader(yaml.SafeLoader):
    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Hashable, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise YamlProblem(f"duplicate key '{key}' (first at line {seen[key]})", line)
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


@dataclass(frozen=True)
class YamlDoc:
    data: Any
    root: yaml.Node | None

    @classmethod
    def parse(cls, text: str) -> YamlDoc:
        try:
            root = yaml.compose(text, Loader=_StrictLoader)
            data = _StrictLoader(text).get_single_data() if root is not None else None
        except YamlProblem:
            raise
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            line = mark.line + 1 if mark else None
            raise YamlProblem(f"YAML syntax error: {exc.problem or exc.context}", line) from None
        except yaml.YAMLError as exc:
            raise YamlProblem(f"YAML error: {exc}") from None
        return cls(data=data, root=root)

    def line_of(self, loc: Loc) -> int | None:
        """Line (1-based) of the deepest node along ``loc`` that exists."""
        node = self.root
        line = node.start_mark.line + 1 if node is not None else None
        for part in loc:
            found = _child(node, part)
            if found is None:
                break
            where, node = found
            line = where.start_mark.line + 1
        return line


def _child(node: yaml.Node | None, part: Any) -> tuple[yaml.Node, yaml.Node] | None:
    """(node whose line names ``part``, node to descend into): a mapping entry is named by its key."""
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            if key_node.value == str(part):
                return key_node, value_node
        return None
    if isinstance(node, yaml.SequenceNode) and isinstance(part, int) and 0 <= part < len(node.value):
        return node.value[part], node.value[part]
    return None


def format_loc(loc: Loc) -> str:
    """``("models", 1, "gguf")`` -> ``models[1].gguf``."""
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text or "(top level)"
