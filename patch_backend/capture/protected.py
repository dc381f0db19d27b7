"""graphpatch's rule for names that would shadow the explorer's ``_code`` and ``_shape``.

Applied to the flat names (index.py) and to the tree (graph.py), so a name drawn in
``pg.graph`` is the name ``pb.patch`` accepts.
"""

from __future__ import annotations

import re
from typing import Dict, FrozenSet, List, Sequence, Set, Tuple

RESERVED_NAMES: FrozenSet[str] = frozenset({"_code", "_shape"})
# A part's role in a name: a module scope, the value a scope holds (leaf or top of a nested
# result), or a key inside a nested result (after the one ``|``).
SCOPE, VALUE, KEY = "scope", "value", "key"
RawPath = Tuple[str, ...]


def split_name(name: str) -> List[Tuple[str, str]]:
    """``a.b.output|sub_1.sub_0`` → [(a, scope), (b, scope), (output, value), (sub_1, key),
    (sub_0, key)]: every part with its role (see ``SCOPE``/``VALUE``/``KEY``)."""
    head, _, tail = name.partition("|")
    head_parts = head.split(".")
    parts = [(part, SCOPE) for part in head_parts[:-1]] + [(head_parts[-1], VALUE)]
    return parts + [(part, KEY) for part in tail.split(".")] if tail else parts


class ProtectedNames:
    """graphpatch's rule for names that would shadow the explorer's ``_code`` and ``_shape``.

    A module scope part is suffixed with ``_`` (``_code`` → ``_code_``). Any other part (an
    input, op, parameter, or a key inside a result) gets a ``sub`` prefix (``_shape`` →
    ``sub_shape``), and when that is taken by another child of the same parent, the FX-style
    counter ``sub_shape_1``, ``sub_shape_2``, ... (the first one free).
    """

    def __init__(self, names: Sequence[str]) -> None:
        self._siblings: Dict[RawPath, Set[str]] = {}
        for name in names:
            raw = [part for part, _ in split_name(name)]
            for depth, part in enumerate(raw):
                self._siblings.setdefault(tuple(raw[:depth]), set()).add(part)
        self._assigned: Dict[Tuple[RawPath, str], str] = {}

    def rename(self, parent: RawPath, part: str, role: str) -> str:
        if part not in RESERVED_NAMES:
            return part
        if role == SCOPE:
            return part + "_"
        if (parent, part) not in self._assigned:
            self._assigned[(parent, part)] = self._free_name(parent, "sub" + part)
        return self._assigned[(parent, part)]

    def _free_name(self, parent: RawPath, base: str) -> str:
        taken = self._siblings.get(parent, set()) | {
            new for (where, _), new in self._assigned.items() if where == parent
        }
        candidate, counter = base, 0
        while candidate in taken:
            counter += 1
            candidate = f"{base}_{counter}"
        return candidate


def protected_name(name: str, protected: ProtectedNames) -> str:
    """``name`` as the tree spells it (the flat name with protected parts renamed)."""
    out = ""
    raw: Tuple[str, ...] = ()
    for part, role in split_name(name):
        new = protected.rename(raw, part, role)
        out = new if not out else out + ("|" if role == KEY and "|" not in out else ".") + new
        raw = raw + (part,)
    return out


def glob_regex(pattern: str) -> "re.Pattern[str]":
    """``*`` matches within one name part (and the ``|`` path after it), ``**`` across parts,
    ``?`` one character."""
    parts = []
    position = 0
    while position < len(pattern):
        if pattern.startswith("**", position):
            parts.append(".*")
            position += 2
        elif pattern[position] == "*":
            # Within one name part, and across a ``|``: ``h_*.output*`` matches ``h_0.output|sub_1.sub_0``.
            parts.append(r"[^.|]*(?:\|.*)?")
            position += 1
        elif pattern[position] == "?":
            parts.append(r"[^.|]")
            position += 1
        else:
            parts.append(re.escape(pattern[position]))
            position += 1
    return re.compile("".join(parts))
