"""YAML loading with bounded size, for every file or value a user hands us.

`yaml.safe_load` is safe from code execution but not from blow-ups: anchors and aliases
let a 600-byte "billion laughs" document stand for billions of values. PyYAML itself shares
the aliased objects, but everything downstream (pydantic validation, error messages that
show the value, `model_dump`) walks the expanded tree, so a small file took minutes and
gigabytes. Here the composed node graph is measured before anything is constructed: its
size *as expanded* is computed in linear time (each node once, memoised), and a document
that would expand past `MAX_EXPANDED_NODES`, nests deeper than `MAX_DEPTH`, refers to
itself, or is longer than `MAX_DOCUMENT_CHARS` is refused with the line where it happens.
A normal config with a few anchors is far below every limit.
"""

from __future__ import annotations

from typing import Any

import yaml

MAX_DOCUMENT_CHARS = 2_000_000
"""Longest document read (configs and SOPs are a few kB)."""
MAX_EXPANDED_NODES = 200_000
"""Most values (scalars, lists, mappings) a document may stand for with its aliases expanded."""
MAX_DEPTH = 200
"""Deepest nesting of lists and mappings."""


class YAMLLimitError(yaml.MarkedYAMLError):
    """The document is too large, too deep, or expands too far; `problem_mark` says where."""

    def __init__(self, problem: str, mark: Any = None) -> None:
        super().__init__(problem=problem, problem_mark=mark)


def safe_load(text: str) -> Any:
    """`yaml.safe_load` that refuses documents past the limits above (raises `YAMLLimitError`,
    a `yaml.MarkedYAMLError`, so callers' YAML error handling reports it with its line)."""
    if len(text) > MAX_DOCUMENT_CHARS:
        raise YAMLLimitError(f"the document is {len(text):,} characters long; the limit is {MAX_DOCUMENT_CHARS:,}")
    loader = yaml.SafeLoader(text)
    try:
        try:
            node = loader.get_single_node()
        except RecursionError:
            raise YAMLLimitError(f"the document nests too deeply (limit {MAX_DEPTH} levels)") from None
        if node is None:
            return None
        _check_expansion(node)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _check_expansion(root: yaml.Node) -> None:
    """Raise when `root`, with aliases expanded, exceeds the node or depth limits.

    Iterative post-order walk over the node graph: a node shared by several aliases is
    visited once and its expanded size reused, so the check is linear in the document."""
    sizes: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        if children_done:
            on_path.discard(key)
            size = 1 + sum(sizes[id(child)] for child in _children(node))
            if size > MAX_EXPANDED_NODES:
                raise YAMLLimitError(
                    f"this value expands to more than {MAX_EXPANDED_NODES:,} values through anchors and aliases "
                    "(an alias bomb?); write the values out or use fewer nested aliases", node.start_mark)
            sizes[key] = size
            continue
        if key in sizes:
            continue
        if key in on_path:
            raise YAMLLimitError("an alias refers to the value that contains it (a cycle)", node.start_mark)
        on_path.add(key)
        if len(on_path) > MAX_DEPTH:
            raise YAMLLimitError(f"the document nests deeper than {MAX_DEPTH} levels", node.start_mark)
        stack.append((node, True))
        for child in _children(node):
            if id(child) in on_path:
                raise YAMLLimitError("an alias refers to the value that contains it (a cycle)", child.start_mark)
            if id(child) not in sizes:
                stack.append((child, False))


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return []
