"""``pb.prepare``: declares the sites a model will be patched at, so one compiled variant serves
every patch map within them (program/prepared.py builds it)."""

from __future__ import annotations

from typing import Any, List

from . import aliases
from .capture.index import index_for
from .context import resolve_root


def prepare(model: Any, sites: Any) -> List[str]:
    """``pb.prepare``: declares sites (names, NodePaths or glob patterns) of ``model``."""
    index = index_for(resolve_root(model))
    if not index.names:
        raise RuntimeError(
            f"pb.prepare needs the names of {type(index.root).__name__}: call the compiled model once first"
        )
    names = index.match_all(sites)
    index.declared = index.declared | frozenset(_native(index.root, name) for name in names)
    return names


def _native(root: Any, name: str) -> str:
    """The node a TransformerLens alias stands for (a per-head view declares its whole node)."""
    return aliases.lookup(root, name).native if aliases.is_alias_pattern(root, name) else name
