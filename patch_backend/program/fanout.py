"""Prefix reuse for batched sweeps: run what no patch can reach once, then fan rows out.

A sweep chunk runs K cells as row blocks of one forward on inputs repeated K times, so every
row block computes the same values until the first patched site. ``fan_out`` builds the
chunk's program from two captures of the same code: the graph Dynamo traced at the base batch
B (``base``) for the part before the *cut*, and the slot program at K·B (``batched``, after the
insertion pass) for the rest. Each value crossing the cut is repeated K times along dim 0 if it
has the batch dimension, and passed as it is otherwise (parameters, masks without a batch).

Both graphs keep their own shape constants (a ``view(x, [K·B, T, 4, 64])`` stays right for its
side), so nothing is rewritten. The nodes before the cut are matched in graph order by op,
target and arguments (an int may be K times its base value: a size with the batch in it); a node absent at B is accepted only where it is the identity
there (Dynamo drops ``expand(1, -1)`` of a [1, T] tensor at batch 1, and later names shift).
The fan-out is refused, and the caller keeps the full-repeat program, whenever the two graphs
do not line up like that before the cut, when a crossing
value's shape is not its base shape with K times the rows, or when an op before the cut makes
a batch dimension from nothing batched (``arange(batch)``: its K·B value is not K copies of its
B value). ``FanOutRefused`` says why.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Set, Tuple, cast

import torch
import torch.fx

from .regions import find_blocks, mark_outside_blocks


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


def first_use(gm: torch.fx.GraphModule, node: str, consumers: Optional[frozenset]) -> Optional[torch.fx.Node]:
    """The first node (graph order) that reads a site's patched value (``consumers``: the site's
    consumers, None for every use); the output node where nothing else does."""
    nodes = list(gm.graph.nodes)
    target = next((n for n in nodes if n.name == node), None)
    if target is None:
        return None
    users = [user for user in target.users if consumers is None or user.name in consumers]
    if not users:
        return nodes[-1]
    order = {n: position for position, n in enumerate(nodes)}
    return min(users, key=order.__getitem__)


def cut_for_site(gm: torch.fx.GraphModule, node: str, consumers: Optional[frozenset]) -> Optional[str]:
    """Where rows must fan out for a site: at the block of the first node that reads its patched
    value (a block's output patched fans out at the next block, so the block itself runs at B)."""
    use = first_use(gm, node, consumers)
    if use is None:
        return None
    if use.op == "output":
        return use.name
    return cut_for(gm, use.name)


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


def _same_args(a: Any, b: Any, twin_of: Dict[str, torch.fx.Node], copies: int) -> bool:
    """Equal argument structure, nodes by their twins; an int of the batched graph may be K
    times the base graph's (each graph's own shape constants)."""
    if isinstance(a, torch.fx.Node) or isinstance(b, torch.fx.Node):
        return isinstance(a, torch.fx.Node) and twin_of.get(a.name) is b
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same_args(x, y, twin_of, copies) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_args(a[k], b[k], twin_of, copies) for k in a)
    if isinstance(a, slice) and isinstance(b, slice):
        return all(_same_args(x, y, twin_of, copies) for x, y in ((a.start, b.start), (a.stop, b.stop), (a.step, b.step)))
    if isinstance(a, int) and isinstance(b, int) and not isinstance(a, bool) and not isinstance(b, bool):
        # Equal, or a size with the batch in it (``view(x, [K·B·T, d])`` against ``[B·T, d]``).
        return a == b or a == copies * b
    return type(a) is type(b) and a == b


def target_name(node: torch.fx.Node) -> str:
    """An FX node's op as a bare name (``torch.addmm`` and ``Tensor.view`` alike: ``addmm``, ``view``)."""
    target = node.target
    name = target if isinstance(target, str) else getattr(target, "__name__", str(target))
    return str(name).split(".")[-1]


def fan_out(
    batched: torch.fx.GraphModule, base: torch.fx.GraphModule, cut: str, copies: int, check_only: bool = False
) -> Optional[FanOut]:
    """The program: ``base``'s nodes before ``cut`` at batch B, ``batched``'s from ``cut`` on.

    ``batched`` is the K·B graph after the insertion pass (its extra placeholders are the
    slots'); ``base`` the captured graph of the same code at B. The result takes ``batched``'s
    inputs: batched inputs reach the part before the cut as their first B rows (the sweep's
    inputs are K copies of the base inputs). Raises ``FanOutRefused``; with ``check_only``
    returns None once the checks pass, building nothing (a GraphModule's codegen is not free).
    """
    if copies < 2:
        raise FanOutRefused("one cell per chunk: nothing to reuse")
    nodes = list(batched.graph.nodes)
    start = _cut_position(nodes, cut)
    prefix = _match_prefix(nodes, start, base, batched, copies)
    crossing = _crossing(nodes, start, prefix)
    if check_only:
        return None
    return _build(batched, nodes, start, prefix, crossing, cut, copies)


@dataclass(frozen=True)
class _Prefix:
    """The batched graph's nodes before the cut, matched to the base graph (``_match_prefix``)."""

    #: The batched graph's inputs (the base graph's come first, then the slots).
    inputs: Tuple[torch.fx.Node, ...]
    #: The base graph's nodes other than inputs and output, in graph order.
    base_body: Tuple[torch.fx.Node, ...]
    #: How many of ``base_body`` matched a node before the cut (the prefix run at B).
    matched: int
    #: Batched node name → the base node computing its value at B (matched in graph order).
    twin_of: Dict[str, torch.fx.Node]
    #: Batched node name → ``_relation`` of its value to its twin's: 'same', 'rows' or 'other'.
    relation: Dict[str, str]
    #: ``arange(batch)`` and its reshapes: legal only as the leading index of a batched tensor.
    batch_index: Set[str]


def _cut_position(nodes: List[torch.fx.Node], cut: str) -> int:
    """Where the K·B part starts in the batched graph: at ``cut``, or before the patch ops the
    insertion pass put just before it (they read the patched value, so they run at K·B)."""
    position = {node.name: index for index, node in enumerate(nodes)}
    if cut not in position:
        raise FanOutRefused(f"cut node {cut!r} is not in the batched graph")
    start = position[cut]
    while start > 0 and nodes[start - 1].op != "placeholder" and not nodes[start - 1].meta:
        start -= 1
    return start


def _match_prefix(
    nodes: List[torch.fx.Node], start: int, base: torch.fx.GraphModule, batched: torch.fx.GraphModule, copies: int
) -> _Prefix:
    """Pairs each node before the cut with the base node that computes its value at B (graph
    order; an op the base graph elided as the identity pairs with its input's twin), and checks
    that none makes a batch dimension from nothing batched. Refuses where the graphs differ."""
    base_nodes = {node.name: node for node in base.graph.nodes}
    base_inputs = [node.name for node in base.graph.nodes if node.op == "placeholder"]
    base_body = tuple(node for node in base.graph.nodes if node.op not in ("placeholder", "output"))
    inputs = tuple(node for node in nodes if node.op == "placeholder")
    if [node.name for node in inputs[: len(base_inputs)]] != base_inputs:
        raise FanOutRefused("the base graph's inputs differ from the batched graph's")
    relation: Dict[str, str] = {}
    twin_of: Dict[str, torch.fx.Node] = {}
    batch_index: Set[str] = set()
    for node in inputs[: len(base_inputs)]:
        twin_of[node.name] = base_nodes[node.name]
        relation[node.name] = _relation(_value(node), _value(base_nodes[node.name]), copies)
    matched = 0
    for node in (node for node in nodes[:start] if node.op != "placeholder"):
        twin = base_body[matched] if matched < len(base_body) else None
        if twin is not None and _matches(node, twin, twin_of, batched, base, copies):
            matched += 1
        elif _elided(node, twin_of, copies):
            # At B this op is the identity (``expand(1, -1)`` of a [1, T] tensor): Dynamo left
            # it out of the base graph, whose later node names then shift.
            twin = twin_of[cast(torch.fx.Node, node.args[0]).name]  # _elided checked it is a node
        else:
            raise FanOutRefused(f"node {node.name!r} has no counterpart in the base graph")
        twin_of[node.name] = twin
        relation[node.name] = _relation(_value(node), _value(twin), copies)
        _check_batch_dimension(node, relation, batch_index)
    return _Prefix(inputs, base_body, matched, twin_of, relation, batch_index)


def _check_batch_dimension(node: torch.fx.Node, relation: Dict[str, str], batch_index: Set[str]) -> None:
    """Refuses a node before the cut whose K·B value is not K copies of its B value: one that
    makes a batch dimension from no batched input (other than a broadcast or a fill, or an
    ``arange(batch)`` used only as a batch index); records batch indices in ``batch_index``."""
    if any(arg.name in batch_index for arg in node.all_input_nodes):
        if _indexes_rows(node, batch_index, relation) == "index":
            batch_index.add(node.name)
        return
    if relation[node.name] == "rows" and node.op in ("call_function", "call_method"):
        fed = [relation.get(arg.name) == "rows" for arg in node.all_input_nodes]
        if not any(fed) and target_name(node) == "arange" and not node.kwargs.get("start"):
            # ``arange(batch)``: allowed only as the batch index of a batched tensor (the
            # mask code of transformers), where it selects every row in order.
            batch_index.add(node.name)
        elif not any(fed) and target_name(node) not in _UNIFORM:
            raise FanOutRefused(
                f"node {node.name!r} ({target_name(node)}) makes a batch dimension from no batched input"
            )


def _crossing(nodes: List[torch.fx.Node], start: int, prefix: _Prefix) -> Tuple[str, ...]:
    """The values computed before the cut and read after it (first-use order), each checked to
    cross as it is or as K times its base rows."""
    position = {node.name: index for index, node in enumerate(nodes)}
    crossing: List[str] = []
    seen: Set[str] = set()
    relation = prefix.relation
    for node in nodes[start:]:
        for arg in node.all_input_nodes:
            if position[arg.name] < start and arg.op != "placeholder" and arg.name not in seen:
                seen.add(arg.name)
                crossing.append(arg.name)
                if arg.name in prefix.batch_index:
                    raise FanOutRefused(f"batch index {arg.name!r} is used after the cut")
                if relation.get(arg.name) not in ("same", "rows") or (
                    relation[arg.name] == "rows" and not isinstance(_value(arg), torch.Tensor)
                ):
                    raise FanOutRefused(f"value {arg.name!r} crosses the cut with a shape that is not K x its base rows")
    return tuple(crossing)


def _build(
    batched: torch.fx.GraphModule, nodes: List[torch.fx.Node], start: int, prefix: _Prefix,
    crossing: Tuple[str, ...], cut: str, copies: int,
) -> FanOut:
    """The fanned-out graph: the batched inputs, the base prefix on their first B rows, each
    crossing value repeated K times where it has the rows, then the batched graph from the cut."""
    graph = torch.fx.Graph()
    full: Dict[str, torch.fx.Node] = {}
    for node in prefix.inputs:
        full[node.name] = graph.node_copy(node, lambda arg: full[arg.name])
    part: Dict[str, torch.fx.Node] = {}

    def base_value(arg: torch.fx.Node) -> torch.fx.Node:
        """The new graph's node for a base node (an input's first B rows on first use)."""
        if arg.name not in part:
            value = full[arg.name]
            if prefix.relation[arg.name] == "rows":
                value = graph.call_function(torch.narrow, (value, 0, 0, _value(arg).shape[0]))
            part[arg.name] = value
        return part[arg.name]

    for node in prefix.base_body[: prefix.matched]:
        part[node.name] = graph.node_copy(node, base_value)
    repeated = []
    for name in crossing:
        value = base_value(prefix.twin_of[name])
        if prefix.relation[name] == "rows":
            full[name] = mark_outside_blocks(graph.call_function(repeat_rows, (value, copies)))
            repeated.append(name)
        else:
            full[name] = value
    for node in nodes[start:]:
        full[node.name] = graph.node_copy(node, lambda arg: full[arg.name])
    graph.lint()
    return FanOut(torch.fx.GraphModule(batched, graph), cut, tuple(repeated))


#: Ops Dynamo leaves out where they are the identity (same shape in, same shape out).
_ELIDABLE = frozenset({"expand", "expand_as", "broadcast_to", "view", "reshape", "contiguous", "to"})


def _elided(node: torch.fx.Node, twin_of: Dict[str, torch.fx.Node], copies: int) -> bool:
    if node.op not in ("call_function", "call_method") or target_name(node) not in _ELIDABLE or not node.args:
        return False
    source = node.args[0]
    if not isinstance(source, torch.fx.Node) or source.name not in twin_of:
        return False
    return _relation(_value(node), _value(twin_of[source.name]), copies) in ("same", "rows")


def _matches(
    node: torch.fx.Node, twin: torch.fx.Node, twin_of: Dict[str, torch.fx.Node],
    batched: torch.fx.GraphModule, base: torch.fx.GraphModule, copies: int,
) -> bool:
    if twin.op != node.op or twin.target != node.target:
        return False
    if not _same_args(node.args, twin.args, twin_of, copies) or not _same_args(node.kwargs, twin.kwargs, twin_of, copies):
        return False
    return node.op != "get_attr" or _attribute(batched, node.target) is _attribute(base, node.target)


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
