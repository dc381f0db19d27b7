"""Prefix reuse for batched sweeps: run what no patch can reach once, then fan rows out.

A sweep chunk runs K cells as row blocks of one forward on inputs repeated K times, so every
row block computes the same values until the first patched site. ``fan_out`` builds the
chunk's program from two captures of the same code: the graph Dynamo traced at the base batch
B (``base``) for the part before the *cut*, and the slot program at K·B (``batched``, after the
insertion pass) for the rest. Each value crossing the cut is repeated K times along dim 0 if it
has the batch dimension, and passed as it is otherwise (parameters, masks without a batch).

Both graphs keep their own shape constants (a ``view(x, [K·B, T, 4, 64])`` stays right for its
side), so nothing is rewritten. The fan-out is refused, and the caller keeps the full-repeat
program, whenever the two graphs do not line up node for node before the cut, when a crossing
value's shape is not its base shape with K times the rows, or when an op before the cut makes
a batch dimension from nothing batched (``arange(batch)``: its K·B value is not K copies of its
B value). ``FanOutRefused`` says why.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Set, Tuple

import torch
import torch.fx

from .regions import find_blocks


class FanOutRefused(Exception):
    """The graphs do not allow an exact fan-out (the message says which node and why)."""


@dataclass(frozen=True)
class FanOut:
    gm: torch.fx.GraphModule
    #: The first node of the batched graph that runs at K·B.
    cut: str
    #: Values crossing the cut that were repeated K times (the others cross as they are).
    repeated: Tuple[str, ...]


#: Ops that may make a batch dimension from inputs without one and still give K equal row blocks
#: at K·B (a broadcast or a constant fill); any other such op refuses the fan-out.
_UNIFORM = frozenset({
    "expand", "expand_as", "broadcast_to", "zeros", "ones", "full", "empty", "new_zeros", "new_ones", "new_full",
    "new_empty", "zeros_like", "ones_like", "full_like", "empty_like", "contiguous", "clone", "to", "type",
    "float", "half", "bfloat16", "int", "long", "bool",
})


def repeat_rows(x: torch.Tensor, copies: int) -> torch.Tensor:
    """K copies of ``x`` stacked along dim 0 (a base value fanned out to the chunk's rows)."""
    return x.repeat(copies, *([1] * (x.dim() - 1)))


def cut_for(gm: torch.fx.GraphModule, node: str) -> Optional[str]:
    """Where a chunk whose earliest patched site is ``node`` fans out: the first node of that
    node's block (a region boundary, so blocks after it share compiled regions), or the node
    itself outside blocks; None when it is a graph input (nothing to reuse)."""
    nodes = {n.name: n for n in gm.graph.nodes}
    target = nodes.get(node)
    if target is None or target.op == "placeholder":
        return None
    _, blocks = find_blocks(gm)
    block = blocks.get(target)
    if block is None:
        return node
    for candidate in gm.graph.nodes:
        if candidate.op not in ("placeholder", "output") and blocks.get(candidate) == block:
            return candidate.name
    return node


def _value(node: torch.fx.Node) -> Any:
    return node.meta.get("example_value", node.meta.get("val"))


def _relation(batched: Any, base: Any, copies: int) -> str:
    """'same' (crosses as it is), 'rows' (K times the base rows) or 'other' (refused)."""
    if isinstance(batched, torch.Tensor) and isinstance(base, torch.Tensor):
        if tuple(batched.shape) == tuple(base.shape):
            return "same"
        if (
            batched.dim() == base.dim() > 0
            and batched.shape[0] == copies * base.shape[0]
            and tuple(batched.shape[1:]) == tuple(base.shape[1:])
        ):
            return "rows"
        return "other"
    if isinstance(batched, (tuple, list)) and isinstance(base, (tuple, list)) and len(batched) == len(base):
        kinds = {_relation(a, b, copies) for a, b in zip(batched, base)}
        return "rows" if kinds == {"rows"} or kinds == {"rows", "same"} else ("same" if kinds <= {"same"} else "other")
    if isinstance(batched, torch.Tensor) or isinstance(base, torch.Tensor):
        return "other"
    try:
        return "same" if batched == base else "other"
    except Exception:  # noqa: BLE001 - an uncomparable value: refuse rather than guess
        return "other"


def _same_args(a: Any, b: Any) -> bool:
    """Equal argument structure; ints may differ (each graph's own shape constants)."""
    if isinstance(a, torch.fx.Node) or isinstance(b, torch.fx.Node):
        return isinstance(a, torch.fx.Node) and isinstance(b, torch.fx.Node) and a.name == b.name
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same_args(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_args(a[k], b[k]) for k in a)
    if isinstance(a, slice) and isinstance(b, slice):
        return all(_same_args(x, y) for x, y in ((a.start, b.start), (a.stop, b.stop), (a.step, b.step)))
    if isinstance(a, int) and isinstance(b, int) and not isinstance(a, bool) and not isinstance(b, bool):
        return True
    return type(a) is type(b) and a == b


def _target_name(node: torch.fx.Node) -> str:
    target = node.target
    name = target if isinstance(target, str) else getattr(target, "__name__", str(target))
    return str(name).split(".")[-1]


def fan_out(batched: torch.fx.GraphModule, base: torch.fx.GraphModule, cut: str, copies: int) -> FanOut:
    """The program: ``base``'s nodes before ``cut`` at batch B, ``batched``'s from ``cut`` on.

    ``batched`` is the K·B graph after the insertion pass (its extra placeholders are the
    slots'); ``base`` the captured graph of the same code at B. The result takes ``batched``'s
    inputs: batched inputs reach the part before the cut as their first B rows (the sweep's
    inputs are K copies of the base inputs). Raises ``FanOutRefused``.
    """
    if copies < 2:
        raise FanOutRefused("one cell per chunk: nothing to reuse")
    nodes = list(batched.graph.nodes)
    position = {node.name: index for index, node in enumerate(nodes)}
    if cut not in position:
        raise FanOutRefused(f"cut node {cut!r} is not in the batched graph")
    start = position[cut]
    base_nodes = {node.name: node for node in base.graph.nodes}
    base_inputs = [node.name for node in base.graph.nodes if node.op == "placeholder"]
    inputs = [node for node in nodes if node.op == "placeholder"]
    if [node.name for node in inputs[: len(base_inputs)]] != base_inputs:
        raise FanOutRefused("the base graph's inputs differ from the batched graph's")
    before = [node for node in nodes[:start] if node.op != "placeholder"]
    relation: Dict[str, str] = {}
    #: ``arange(batch)`` and its reshapes: legal only as the leading index of a batched tensor.
    batch_index: Set[str] = set()
    for node in inputs[: len(base_inputs)]:
        relation[node.name] = _relation(_value(node), _value(base_nodes[node.name]), copies)
    for node in before:
        twin = base_nodes.get(node.name)
        if twin is None or twin.op != node.op or twin.target != node.target:
            raise FanOutRefused(f"node {node.name!r} differs between the base and the batched graph")
        if not _same_args(node.args, twin.args) or not _same_args(node.kwargs, twin.kwargs):
            raise FanOutRefused(f"node {node.name!r} has other arguments in the base graph")
        if node.op == "get_attr" and _attribute(batched, node.target) is not _attribute(base, node.target):
            raise FanOutRefused(f"constant {node.target!r} differs between the base and the batched graph")
        kind = _relation(_value(node), _value(twin), copies)
        relation[node.name] = kind
        if any(arg.name in batch_index for arg in node.all_input_nodes):
            if _indexes_rows(node, batch_index, relation) == "index":
                batch_index.add(node.name)
            continue
        if kind == "rows" and node.op in ("call_function", "call_method"):
            fed = [relation.get(arg.name) == "rows" for arg in node.all_input_nodes]
            if not any(fed) and _target_name(node) == "arange" and not node.kwargs.get("start"):
                # ``arange(batch)``: allowed only as the batch index of a batched tensor (the
                # mask code of transformers), where it selects every row in order.
                batch_index.add(node.name)
            elif not any(fed) and _target_name(node) not in _UNIFORM:
                raise FanOutRefused(
                    f"node {node.name!r} ({_target_name(node)}) makes a batch dimension from no batched input"
                )
    crossing: List[str] = []
    seen: Set[str] = set()
    for node in nodes[start:]:
        for arg in node.all_input_nodes:
            if position[arg.name] < start and arg.op != "placeholder" and arg.name not in seen:
                seen.add(arg.name)
                crossing.append(arg.name)
                if arg.name in batch_index:
                    raise FanOutRefused(f"batch index {arg.name!r} is used after the cut")
                if relation.get(arg.name) not in ("same", "rows") or (
                    relation[arg.name] == "rows" and not isinstance(_value(arg), torch.Tensor)
                ):
                    raise FanOutRefused(f"value {arg.name!r} crosses the cut with a shape that is not K x its base rows")
    graph = torch.fx.Graph()
    full: Dict[str, torch.fx.Node] = {}
    for node in inputs:
        full[node.name] = graph.node_copy(node, lambda arg: full[arg.name])
    part: Dict[str, torch.fx.Node] = {}

    def base_value(arg: torch.fx.Node) -> torch.fx.Node:
        if arg.name not in part:
            # Only inputs are resolved lazily (nodes before the cut are copied in order).
            value = full[arg.name]
            if relation[arg.name] == "rows":
                rows = _value(base_nodes[arg.name]).shape[0]
                value = graph.call_function(torch.narrow, (value, 0, 0, rows))
            part[arg.name] = value
        return part[arg.name]

    for node in before:
        part[node.name] = graph.node_copy(base_nodes[node.name], base_value)
    repeated = []
    for name in crossing:
        if relation[name] == "rows":
            full[name] = graph.call_function(repeat_rows, (part[name], copies))
            repeated.append(name)
        else:
            full[name] = part[name]
    for node in nodes[start:]:
        full[node.name] = graph.node_copy(node, lambda arg: full[arg.name])
    graph.lint()
    return FanOut(torch.fx.GraphModule(batched, graph), cut, tuple(repeated))


def _indexes_rows(node: torch.fx.Node, batch_index: Set[str], relation: Dict[str, str]) -> str:
    """How ``node`` uses a batch index: "index" (``b[:, None, None]``, still a batch index) or
    "rows" (``x[b, ...]`` on a batched ``x``: every row in order); refuses anything else."""
    if node.op == "call_function" and node.target is operator.getitem and len(node.args) == 2:
        source, index = node.args
        if isinstance(source, torch.fx.Node) and isinstance(index, tuple) and index:
            rest = index[1:]
            if source.name in batch_index and index[0] == slice(None) and all(e is None or e == slice(None) for e in rest):
                return "index"
            in_rest = any(isinstance(e, torch.fx.Node) and e.name in batch_index for e in rest)
            if (
                relation.get(source.name) == "rows"
                and isinstance(index[0], torch.fx.Node)
                and index[0].name in batch_index
                and not in_rest
            ):
                return "rows"
    raise FanOutRefused(f"node {node.name!r} uses a batch index (arange over the batch) in another way")


def _attribute(module: torch.nn.Module, target: Any) -> Any:
    value: Any = module
    for part in str(target).split("."):
        value = getattr(value, part, None)
    return value
