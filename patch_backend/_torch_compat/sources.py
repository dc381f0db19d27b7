"""Source names: where Dynamo says a placeholder, or a module on the call stack, came from.

Dynamo records each graph input's origin as a ``Source`` on ``node.meta["grapharg"]``, whose
``name`` reads like Python (``L['self']._modules['h']._modules['0']._parameters['weight']``),
and each op's module call stack in ``node.meta["nn_module_stack"]`` (``{key: (path, type)}`` with
paths like ``L['self'].h[0].attn``). Neither is a public API; this module is the only reader.
Naming needs only (frame local, attribute path) pairs, so that is what it hands out.
"""

from __future__ import annotations

import functools
import logging
import re
from typing import Any, List, Optional, Tuple

import torch.fx

from .gates import fallback

logger = logging.getLogger(__name__)

_SOURCE_TOKEN = re.compile(r"\._modules\['([^']*)'\]|\._parameters\['([^']*)'\]|\._buffers\['([^']*)'\]"
                           r"|\.([A-Za-z_][A-Za-z0-9_]*)|\['([^']*)'\]|\[(\d+)\]")
_ROOT_LOCAL = re.compile(r"^L\['([^']+)'\]")
_STACK_LOCAL = re.compile(r"^L\['[^']+'\]")
_STACK_INDEX = re.compile(r"\.(\d+)(?=\.|\[|$)")

#: A frame local and the attribute/item path below it: ``('self', ('h', '0', 'weight'))``.
SourcePath = Tuple[str, Tuple[str, ...]]


@functools.lru_cache(maxsize=1 << 16)
def parse_source_path(source_name: str) -> Optional[SourcePath]:
    """``L['self']._modules['h']._modules['0']._parameters['weight']`` → ('self', ('h','0','weight')).

    Memoised: every node's module stack is parsed again by each pass that reads it (naming,
    regions, fan-out), and a model repeats a handful of paths thousands of times.
    None for a source that is not under a frame local (a global, a constant, a derived value).
    """
    match = _ROOT_LOCAL.match(source_name)
    if match is None:
        return None
    rest = source_name[match.end():]
    segments = []
    position = 0
    while position < len(rest):
        token = _SOURCE_TOKEN.match(rest, position)
        if token is None:
            return None
        segments.append(next(group for group in token.groups() if group is not None))
        position = token.end()
    return match.group(1), tuple(segments)


def _probe_grapharg(node: torch.fx.Node) -> Optional[Any]:
    """Dynamo's record of where a placeholder's value came from (``GraphArg``), if present."""
    return node.meta.get("grapharg")


def placeholder_source(node: torch.fx.Node) -> Optional[SourcePath]:
    """Where a Dynamo graph's placeholder comes from, parsed; None when it is not a frame local's
    attribute or item. A placeholder without Dynamo's ``grapharg`` (a torch release that moved
    it) takes the fallback, with a warning: it is not named after a frame local or parameter, only
    as an input of the modules using it."""
    grapharg = _probe_grapharg(node)
    if grapharg is None:
        fallback(
            "sources",
            "Dynamo graph placeholders carry no 'grapharg' source; frame inputs and parameters are "
            "not named after their local or module path, only as inputs of the modules using them "
            "(<scope>.input_<k>)",
        )
        return None
    source = getattr(grapharg, "source", None)
    name = getattr(source, "name", None)
    if callable(name):  # ``Source.name`` is a method in some releases, a property in others
        name = name()
    if not isinstance(name, str):
        return None
    parsed = parse_source_path(name)
    if parsed is None:
        logger.debug("placeholder %s: source %r is not under a frame local", node.name, name)
    return parsed


def module_stack(node: torch.fx.Node) -> List[Tuple[Any, str]]:
    """``(key, path text)`` of each module on ``node``'s call stack, outermost first.

    The key identifies an invocation (Dynamo marks a re-invocation with ``@k``); the path is
    the module's source text (``L['self'].h[0]``, or ``L['self'].h.0`` in some releases).
    """
    stack = node.meta.get("nn_module_stack") or {}
    return [(key, value[0] if isinstance(value, tuple) else str(value)) for key, value in stack.items()]


@functools.lru_cache(maxsize=1 << 16)
def stack_path(path_text: str) -> Optional[Tuple[str, ...]]:
    """A module-stack path text → its attribute path below the frame local (``('h', '0')``)."""
    match = _STACK_LOCAL.match(path_text)
    if match is None:
        return None
    rest = path_text[match.end():]
    parsed = parse_source_path("L['x']" + _STACK_INDEX.sub(r"[\1]", rest))
    return parsed[1] if parsed is not None else None
