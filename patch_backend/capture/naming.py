"""Hierarchical node names for one graph occurrence (see docs/naming.md).

A *site* is a named place where patches apply: a producing fx node plus the set of its uses
that see the patched value. Op names patch every use; ``<scope>.output`` patches the uses
outside the scope; ``<scope>.input`` and ``<scope>.weight`` patch the uses inside it. So a value
flowing out of ``mlp`` into ``ln_2`` meets, in order, the op's patches, ``mlp.output``'s, then
``ln_2.input``'s: the path the value takes through the module hierarchy (``Site.rank``).
"""

from __future__ import annotations

import dis
import inspect
import math
import re
import weakref
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any, Dict, FrozenSet, Iterable, List, Optional, Sequence, Set, Tuple

import torch
import torch.fx
from torch import nn

from .._torch_compat.frame import ModuleReturn, assigned_locals, forward_code
from .._torch_compat.sources import module_stack, parse_source_path, stack_path
from .capture import GraphCapture

_CONTAINERS = (nn.ModuleList, nn.ModuleDict, nn.Sequential, nn.ParameterList, nn.ParameterDict)
_NON_IDENTIFIER = re.compile(r"[^0-9A-Za-z_]")


@dataclass(frozen=True)
class Site:
    """A named patch site inside one graph."""

    name: str
    node: str
    #: fx node names whose use of ``node`` sees the patched value; None means every use.
    consumers: Optional[FrozenSet[str]]
    #: Order among sites sharing ``node`` (see module docstring).
    rank: Tuple[int, int]
    kind: str
    #: Where the site sits in graph order (for listings: inputs before ops, outputs after).
    position: float
    shape: Optional[Tuple[int, ...]]
    dtype: Optional[torch.dtype]
    code: str


def sanitize(token: str) -> str:
    token = _NON_IDENTIFIER.sub("_", str(token))
    return token if token.isidentifier() else f"sub_{token}"


def module_at(root: Optional[nn.Module], segments: Sequence[str]) -> Optional[nn.Module]:
    module = root
    for segment in segments:
        if module is None:
            return None
        module = module._modules.get(segment)
    return module


def format_module_path(root: Optional[nn.Module], segments: Sequence[str]) -> str:
    """``('transformer', 'h', '17')`` → ``transformer.h_17`` (container children join with ``_``)."""
    return extend_scope("", root, segments)


def extend_scope(scope: str, module: Optional[nn.Module], segments: Sequence[str], called: bool = False) -> str:
    """The scope of ``module``'s descendant at ``segments``, given ``module``'s own scope.

    Containers that are not called themselves (``ModuleList``, ``ModuleDict``, a ``Sequential``
    only indexed) are flattened into their parent's scope with ``_``; ``called`` says that
    ``module`` was called, so its direct children keep the dot.
    """
    for position, segment in enumerate(segments):
        if scope and isinstance(module, _CONTAINERS) and not (called and position == 0):
            scope += "_" + _NON_IDENTIFIER.sub("_", segment)
        else:
            scope = join(scope, sanitize(segment))
        module = module._modules.get(segment) if module is not None else None
    return scope


def join(scope: str, leaf: str) -> str:
    return f"{scope}.{leaf}" if scope else leaf


def op_base_name(node: torch.fx.Node) -> str:
    if node.op == "call_method":
        base = str(node.target)
    elif node.op == "call_module":
        base = str(node.target).rsplit(".", 1)[-1]
    else:
        base = getattr(node.target, "__name__", None) or str(node.target)
    base = _NON_IDENTIFIER.sub("_", base).strip("_").lower() or "op"
    return base if base[0].isalpha() else f"op_{base}"


def forward_parameters(module: Optional[nn.Module]) -> Tuple[List[str], Optional[str], Optional[str]]:
    """(named positional/keyword parameters, *args name, **kwargs name) of ``module.forward``."""
    if module is None:
        return [], None, None
    try:
        signature = inspect.signature(module.forward)
    except (TypeError, ValueError):
        return [], None, None
    named, varargs, varkw = [], None, None
    for parameter in signature.parameters.values():
        if parameter.kind is inspect.Parameter.VAR_POSITIONAL:
            varargs = parameter.name
        elif parameter.kind is inspect.Parameter.VAR_KEYWORD:
            varkw = parameter.name
        else:
            named.append(parameter.name)
    return named, varargs, varkw


def source_line(node: torch.fx.Node) -> str:
    """The user source line that produced ``node`` (last frame of Dynamo's stack trace)."""
    trace = node.meta.get("stack_trace") or ""
    lines = [line for line in trace.rstrip().splitlines() if line.strip()]
    for index in range(len(lines) - 1, -1, -1):
        if lines[index].lstrip().startswith("File "):
            return lines[index + 1].strip() if index + 1 < len(lines) else ""
    return ""


def _tensor_meta(node: torch.fx.Node) -> Tuple[bool, Optional[Tuple[int, ...]], Optional[torch.dtype]]:
    value = node.meta.get("example_value", node.meta.get("val"))
    if isinstance(value, torch.Tensor):
        shape = tuple(int(s) if isinstance(s, int) else s for s in value.shape)
        return True, shape, value.dtype
    return False, None, None


#: Keys of one module invocation: its module stack, outermost first, as (stack key, module path
#: from the root) pairs. Dynamo marks a re-invocation at the same path with "@k" in the key, but
#: a module reached under several paths keeps one key: the path is part of the identity.
InvocationKeys = Tuple[Tuple[str, Tuple[str, ...]], ...]

@dataclass
class _Invocation:
    keys: InvocationKeys
    raw_path: Tuple[str, ...]
    scope: str
    depth: int


class ScopeCounters:
    """Per-forward counters, continued across the graphs of one forward.

    ``counts`` numbers ops per scope (``mul``, ``mul_1``); ``calls`` numbers the invocations of
    each module scope in run order (after a pass, the counts that pass found), and ``totals`` (how many invocations each scope has in the
    whole forward, from a counting pass) decides between the plain scope (called once) and
    ``<scope>_<k>``. Both continue across graph breaks, so a module called before and after a
    break is ``lin_0`` and ``lin_1`` exactly as without the break.
    """

    def __init__(self, totals: Optional[Dict[str, int]] = None) -> None:
        self.counts: Dict[str, Counter] = defaultdict(Counter)
        self.calls: Counter = Counter()
        self.totals: Dict[str, int] = dict(totals or {})
        #: Frame inputs named so far in the forward (a resume frame does not name them again).
        self.inputs: Set[str] = set()

    def take(self, scope: str, base: str, reserved: FrozenSet[str] = frozenset()) -> str:
        """The next ``base``, ``base_1``, ... in ``scope``, skipping ``reserved`` names (the
        scope's child modules: an op ``linear`` next to ``self.linear`` is ``linear_1``)."""
        while True:
            count = self.counts[scope][base]
            self.counts[scope][base] += 1
            name = base if count == 0 else f"{base}_{count}"
            if name not in reserved:
                return name

    def call(self, scope: str) -> str:
        """The scope of the next invocation of the module whose plain scope is ``scope``."""
        ordinal = self.calls[scope]
        self.calls[scope] += 1
        return f"{scope}_{ordinal}" if self.totals.get(scope, 1) > 1 else scope

    def snapshot(self) -> "ScopeCounters":
        copy = ScopeCounters(self.totals)
        copy.counts = defaultdict(Counter, {scope: Counter(c) for scope, c in self.counts.items()})
        copy.calls = Counter(self.calls)
        copy.inputs = set(self.inputs)
        return copy


def name_occurrence(
    capture: GraphCapture,
    root: nn.Module,
    prefix: Tuple[str, ...],
    counters: ScopeCounters,
    instance: Any = None,
    scope: Optional[str] = None,
    enclosing: Optional[Dict[Tuple[str, ...], str]] = None,
) -> List[Site]:
    """Names every tensor-valued node of ``capture`` running as the module at ``prefix`` (for
    the call recorded under ``instance``), in ``scope`` (by default the module path's; a call
    of a module called several times in the forward is ``block_1``); ``enclosing``: the scopes
    of the calls this one is made in, by module path (``block`` → ``block_1``)."""
    return _OccurrenceNamer(capture, root, tuple(prefix), counters, instance, scope, enclosing).name()


#: Ranks of module results named from what the module returned sort before every other result
#: (by return order); unrecorded results keep ``(1, -depth)`` and the frame's result ``(1, 0)``.
_RETURNED_RANK_BASE = -(10**6)


class _OccurrenceNamer:
    """Names one graph occurrence. Each ``_name_*`` step adds one kind of site, in this order:
    ops, frame inputs, parameters, module boundaries (inputs and results), the frame's result;
    the order matters only through the shared per-scope counters (ops are counted first)."""

    def __init__(self, capture: GraphCapture, root: nn.Module, prefix: Tuple[str, ...], counters: ScopeCounters,
                 instance: Any = None, scope: Optional[str] = None,
                 enclosing: Optional[Dict[Tuple[str, ...], str]] = None) -> None:
        self.capture, self.root, self.prefix, self.counters = capture, root, prefix, counters
        self.instance = instance
        self.frame_scope = format_module_path(root, prefix) if scope is None else scope
        self.enclosing = enclosing or {}
        self.frame_module = module_at(root, prefix)
        self.nodes = list(capture.gm.graph.nodes)
        self.by_name = {node.name: node for node in self.nodes}
        self.order = {node.name: position for position, node in enumerate(self.nodes)}
        self.output_node = next(n for n in reversed(self.nodes) if n.op == "output")
        self.placeholders = {info.node_name: info for info in capture.placeholders}
        self.sites: List[Site] = []
        #: Module invocations seen in this graph, and per op node the invocations it runs in.
        self.invocations: Dict[InvocationKeys, _Invocation] = {}
        self.chains: Dict[str, List[_Invocation]] = {}
        self.members: Dict[InvocationKeys, List[torch.fx.Node]] = defaultdict(list)
        #: What an invocation returned (from the tracer), with the record's return ordinal.
        self.returns: Dict[InvocationKeys, Tuple[int, ModuleReturn]] = {}

    def name(self) -> List[Site]:
        self._find_invocations()
        self._name_ops()
        self._name_frame_inputs()
        self._name_parameters()
        self._name_module_boundaries()
        self._name_frame_result()
        return sorted(_dedupe(self.sites), key=lambda site: site.position)

    # -- helpers -----------------------------------------------------------------------------

    def _add(self, name: str, node: torch.fx.Node, consumers: Optional[FrozenSet[str]], rank: Tuple[int, int],
             kind: str, position: Optional[float] = None, depth: Optional[int] = None) -> None:
        """A site for ``node`` if it holds a tensor; ``position`` orders the listing (by default
        inputs and parameters just before their first consumer, results just after the node;
        ``depth``, by default ``rank[1]``, orders an invocation's before its inner ones')."""
        is_tensor, shape, dtype = _tensor_meta(node)
        if not is_tensor:
            return
        if position is None:
            depth = rank[1] if depth is None else depth
            order = self.order
            if kind in ("input", "param") and consumers:
                position = min(order[c] for c in consumers) - 0.5 + 0.001 * depth + (0.0005 if kind == "param" else 0)
            elif kind == "output":
                position = order[node.name] + 0.5 + 0.001 * depth
            else:
                position = order[node.name]
        self.sites.append(Site(name, node.name, consumers, rank, kind, position, shape, dtype, source_line(node)))

    def _add_value(self, name: str, position: float) -> None:
        """A non-tensor leaf of a result (kind "value", no node): not listed or patchable, only
        known so that a patch naming it is refused with the reason (index.non_tensor)."""
        self.sites.append(Site(name, "", None, (1, 0), "value", position, None, None, ""))

    def _stack_entries(self, stack: Iterable[Tuple[Any, str]]) -> List[Tuple[InvocationKeys, Tuple[str, ...]]]:
        """A module stack (``nn_module_stack`` pairs, paths relative to the frame's self) →
        (invocation keys, module path from the root) per level, outermost first."""
        entries = []
        keys: InvocationKeys = ()
        module_locals = self.capture.frame.module_locals
        for key, path_text in stack:
            parsed = parse_source_path(path_text) if module_locals else None
            if parsed is not None and parsed[0] in module_locals:
                # A module held on a resume function's stack (``L['___stack0']``): its path.
                relative: Optional[Tuple[str, ...]] = module_locals[parsed[0]] + parsed[1]
            else:
                relative = _stack_segments(path_text, self.capture.frame.self_prefix)
            if relative is None:
                continue
            raw = self.prefix + relative
            keys = keys + ((key, raw),)
            entries.append((keys, raw))
        return entries

    def _invocation(self, keys: InvocationKeys, raw: Tuple[str, ...]) -> _Invocation:
        """The invocation at ``keys`` (created, and its call counted, when first met)."""
        if keys in self.invocations:
            return self.invocations[keys]
        parent = self.invocations.get(keys[:-1]) if len(keys) > 1 else None
        parent_raw = parent.raw_path if parent else self.prefix
        parent_scope = parent.scope if parent else self.frame_scope
        if raw[: len(parent_raw)] == parent_raw and len(raw) > len(parent_raw):
            # The parent was called, so its children keep the dot even if it is a container
            # (a called ``nn.Sequential``'s children are ``seq.sub_0``, graphpatch's convention).
            called_parent = parent is not None or self.frame_module is not None
            scope = extend_scope(parent_scope, module_at(self.root, parent_raw), raw[len(parent_raw):], called_parent)
        else:
            scope = format_module_path(self.root, raw)
        result = _Invocation(keys, raw, self.counters.call(scope), len(keys))
        self.invocations[keys] = result
        return result

    def _marker_position(self, record: ModuleReturn, keys: InvocationKeys) -> int:
        """Graph position of the call's return: the last node when it returned (or, where dead
        code elimination removed that node, the last node known to precede the return)."""
        if record.last_node in self.order:
            return self.order[record.last_node]
        known = [self.order[n.name] for n in self.members.get(keys, [])]
        known += [self.order[leaf] for _, leaf in record.leaves if leaf in self.order]
        return max(known) if known else -1

    # -- steps -------------------------------------------------------------------------------

    def _find_invocations(self) -> None:
        """Module invocations, from nn_module_stack (paths relative to the frame's self), in call
        order: an op's stack when the op is met, a recorded module return after its last node
        (so a call with no op of its own, e.g. one returning its input, is counted too)."""
        frame_returns = self.capture.frame.module_returns
        after: Dict[str, List[int]] = defaultdict(list)
        for index, record in enumerate(frame_returns):
            after[record.last_node if record.last_node in self.order else ""].append(index)
        pending = [(index, frame_returns[index]) for index in after.pop("", [])]
        for node in self.nodes:
            self._add_returns(pending)
            if node.op in ("call_function", "call_method", "call_module"):
                self.chains[node.name] = [self._invocation(keys, raw) for keys, raw in self._stack_entries(module_stack(node))]
            pending = [(index, frame_returns[index]) for index in after.get(node.name, [])]
        self._add_returns(pending)
        for node_name, chain in self.chains.items():
            for inv in chain:
                self.members[inv.keys].append(self.by_name[node_name])

    def _add_returns(self, records: List[Tuple[int, ModuleReturn]]) -> None:
        for index, record in records:
            entries = self._stack_entries(record.stack)
            if not entries or entries[-1][1] == self.prefix:
                continue  # the frame's own module: its result is the frame's (_name_frame_result)
            for keys, raw in entries:
                self._invocation(keys, raw)
            self.returns[entries[-1][0]] = (index, record)

    def _name_ops(self) -> None:
        """Ops, counted per scope in graph order (never named like a child module of their scope)."""
        reserved: Dict[int, FrozenSet[str]] = {}
        for node in self.nodes:
            if node.name not in self.chains or not _tensor_meta(node)[0]:
                continue
            chain = self.chains[node.name]
            scope = chain[-1].scope if chain else self.frame_scope
            owner = module_at(self.root, chain[-1].raw_path) if chain else self.frame_module
            if id(owner) not in reserved:
                reserved[id(owner)] = _child_names(owner)
            name = self.counters.take(scope, op_base_name(node), reserved[id(owner)])
            self._add(join(scope, name), node, None, (0, 0), "op")

    def _name_frame_inputs(self) -> None:
        """Frame inputs. A resume frame's locals are mostly values of earlier graphs (not named
        again); a forward parameter that no earlier graph of the forward consumed (the code before
        the break had no tensor op on it, e.g. a ``warnings.warn`` first) is still the argument."""
        frame = self.capture.frame
        named_params, varargs, varkw = forward_parameters(self.frame_module)
        wrapped = _traced_through_wrapper(frame, self.frame_module)
        arguments = set(named_params) | {name for name in (varargs, varkw) if name}
        assigned = _assigned_in_forward(self.frame_module)
        for node in self.nodes:
            info = self.placeholders.get(node.name) if node.op == "placeholder" else None
            if info is None or info.kind != "input" or not info.local:
                continue
            local, path = info.local, info.path
            if wrapped:
                local, path = _unwrap_argument(frame, local, path, named_params, varargs)
            name = join(self.frame_scope, _input_name(local, path, varargs, varkw))
            held = self.capture.resume_held.get(self.instance) if frame.is_resume else None
            if held is not None and local in arguments and local in assigned:
                if info.local not in held:
                    continue  # reassigned before the break: a value of an earlier graph
            elif frame.is_resume and (local not in arguments or (name in self.counters.inputs and local in assigned)):
                # Named by an earlier graph of the forward, and the forward may have assigned
                # the local since. A parameter the forward never assigns is the argument in every
                # graph of it, so each graph names (and patches) its own uses.
                continue
            self.counters.inputs.add(name)
            self._add(name, node, None, (0, 0), "input")
        self._name_caller_arguments()

    def _name_caller_arguments(self) -> None:
        """A module forward compiled as its own frame holds, as its inputs, values its callers
        received as arguments (capture._link_caller_arguments): without the break a caller's
        graph would name them (the model's ``x``), so this frame names them too, before its own
        input names (the outermost caller's patch applies first, as in the callers' graphs)."""
        end = len(self.prefix)
        callers = []
        for link in self.capture.caller_links.get(self.instance, ()):
            for end in range(end - 1, -1, -1):
                if module_at(self.root, self.prefix[:end]) is link.module:
                    break
            else:
                break
            scope = self.enclosing.get(self.prefix[:end])
            if scope is None:
                scope = format_module_path(self.root, self.prefix[:end])
                if scope and self.counters.totals.get(scope, 1) > 1:
                    break  # which call of the caller this is, the frame does not say
            callers.append((link, end, scope))
        for link, end, scope in reversed(callers):
            for node in self.nodes:
                info = self.placeholders.get(node.name) if node.op == "placeholder" else None
                if info is None or info.kind != "input" or info.path or info.local not in link.arguments:
                    continue
                name = join(scope, sanitize(link.arguments[info.local]))
                self.counters.inputs.add(name)
                self._add(name, node, None, (0, end - len(self.prefix)), "input", self.order[node.name] - 0.25)

    def _name_parameters(self) -> None:
        """Parameters and buffers, named in the scope of the module invocation that uses them."""
        root = self.root
        for node in self.nodes:
            info = self.placeholders.get(node.name) if node.op == "placeholder" else None
            if info is None or info.kind != "param":
                continue
            owner_raw = self.prefix + info.path[:-1]
            owner = module_at(root, owner_raw)
            groups: Dict[Tuple[str, int], set] = defaultdict(set)
            for user in node.users:
                if user.op == "output":
                    continue
                groups[self._parameter_scope(user, owner, owner_raw, info.path[-1])].add(user.name)
            if not groups:
                groups[(format_module_path(root, owner_raw), 0)] = set()
            for (scope, depth), users in groups.items():
                self._add(join(scope, sanitize(info.path[-1])), node, frozenset(users), (2, depth), "param")

    def _parameter_scope(self, user: torch.fx.Node, owner: Optional[nn.Module], owner_raw: Tuple[str, ...],
                         leaf: str) -> Tuple[str, int]:
        """(scope, depth) of the invocation of the parameter's owner that ``user`` runs in."""
        for inv in reversed(self.chains.get(user.name, [])):
            module = module_at(self.root, inv.raw_path)
            if owner is not None and module is owner:
                return inv.scope, inv.depth
            if _holds_same(module, owner, leaf):
                # A tied parameter (GPT-2's lm_head.weight is transformer.wte.weight): Dynamo
                # passes it once, under the first path it met; each user names it as its own.
                return inv.scope, inv.depth
        if owner is not None and owner is self.frame_module:
            return self.frame_scope, 0
        return format_module_path(self.root, owner_raw), 0

    def _name_module_boundaries(self) -> None:
        """Each invocation's inputs (values from outside it that its ops use) and results."""
        for keys, inv in sorted(self.invocations.items(), key=lambda item: len(item[0])):
            inside = self.members[keys]
            inside_names = {n.name for n in inside}
            self._name_invocation_inputs(inv, inside, inside_names)
            if keys in self.returns:
                self._name_returned(inv, inside_names, *self.returns[keys])
            else:
                self._name_escaping(inv, inside, inside_names)

    def _name_invocation_inputs(self, inv: _Invocation, inside: List[torch.fx.Node], inside_names: Set[str]) -> None:
        """An invocation's inputs: values from outside it that its ops use, or that it returns
        unchanged. Named after the forward parameter the caller bound them to (``c.inputs_2``,
        ``foos.sub_0``, ``bars.a``: graphpatch's names, and the names the same module gets when
        its forward is its own frame), read off the tracer (ModuleReturn.arguments); a value the
        call did not receive as an argument (a closure, a global) is ``input_<k>``.

        A patch on an input reaches the uses inside the invocation and, for an input the module
        returns unchanged, what it returned (the uses after the call): as a forward pre-hook
        replacing the argument would."""
        external: List[torch.fx.Node] = []
        external_users: Dict[str, set] = defaultdict(set)
        for member in inside:
            for source in member.all_input_nodes:
                if source.name in inside_names or source.op == "get_attr":
                    continue
                info = self.placeholders.get(source.name)
                if info is not None and info.kind in ("param", "constant"):
                    continue
                if not _tensor_meta(source)[0]:
                    continue
                if source not in external:
                    external.append(source)
                external_users[source.name].add(member.name)
        module = module_at(self.root, inv.raw_path)
        parameter_names = forward_parameters(module)[0]
        recorded = self.returns.get(inv.keys)
        if recorded is None or not _has_arguments(recorded[1]):
            for position, source in enumerate(external):
                leaf = parameter_names[0] if position == 0 and parameter_names else f"input_{position}"
                self._add(join(inv.scope, leaf), source, frozenset(external_users[source.name]), (2, inv.depth), "input")
            return
        record = recorded[1]
        rank = (1, _RETURNED_RANK_BASE + record.call_order)
        bound = _bound_arguments(record, module)
        marker = self._marker_position(record, inv.keys)
        returned = {leaf for _, leaf in record.leaves if leaf is not None}
        argument_nodes = [
            node for node in dict.fromkeys(n for _, n in bound)
            if node in self.by_name and getattr(self.placeholders.get(node), "kind", "") not in ("param", "constant")
        ]
        # Listed together where the invocation starts (its first use of an input), in the
        # forward's parameter order.
        first_uses = [self.order[user] for users in external_users.values() for user in users]
        start = (min(first_uses) if first_uses else marker) - 0.5 + 0.001 * inv.depth
        for node_name in argument_nodes:
            node = self.by_name[node_name]
            users = set(external_users.get(node_name, ()))
            if node_name in returned and node_name not in inside_names:
                # Passed through: what the module returned is the input, so the patched input
                # is what the caller receives (the uses after the call).
                users |= {u.name for u in node.users if u.name not in inside_names and self.order[u.name] > marker}
            if not users:
                continue  # neither used nor returned by the module: nothing sees it
            for leaf, _ in (item for item in bound if item[1] == node_name):
                listed = start + 0.00001 * (bound.index((leaf, node_name)) + 1)
                self._add(join(inv.scope, leaf), node, frozenset(users), rank, "input", listed)
        for position, source in enumerate(external):
            if source.name not in argument_nodes:
                self._add(join(inv.scope, f"input_{position}"), source, frozenset(external_users[source.name]), rank, "input",
                          depth=inv.depth)

    def _name_returned(self, inv: _Invocation, inside_names: Set[str], index: int, record: ModuleReturn) -> None:
        """The invocation's results as it returned them: ``output`` for a single tensor, else
        ``output|<path>`` in return order, every element named, also one the module passed
        through unchanged (an input, or a value computed before the call). A patch there reaches
        the uses outside the module that come after the call returned."""
        marker = self._marker_position(record, inv.keys)
        count = len(self.capture.frame.module_returns) + 1
        rank = (1, _RETURNED_RANK_BASE + (record.return_order if _has_arguments(record) else index))
        for leaf_index, (path, leaf_node) in enumerate(record.leaves):
            name = join(inv.scope, _output_name(path))
            # Listed just after the return, before what follows it; inner calls return first.
            position = marker + 0.48 + 0.01 * (index + leaf_index / (len(record.leaves) + 1)) / count
            if leaf_node is None:
                self._add_value(name, position)
                continue
            node = self.by_name.get(leaf_node)
            if node is None:
                continue  # removed from the graph (dead code): nothing runs there
            outside = [user for user in node.users if user.name not in inside_names]
            if node.name not in inside_names:
                outside = [user for user in outside if self.order[user.name] > marker]
            self._add(name, node, frozenset(user.name for user in outside), rank, "output", position)

    def _name_escaping(self, inv: _Invocation, inside: List[torch.fx.Node], inside_names: Set[str]) -> None:
        """Results of an invocation whose return was not recorded: the values leaving its scope,
        ``output|sub_<k>`` in graph order when there are several."""
        escaping = [m for m in inside if any(u.name not in inside_names for u in m.users) and _tensor_meta(m)[0]]
        # Values that only leave through the graph output while another value flows on to
        # later ops are side results (e.g. a KV-cache update), not the module's result.
        flowing = [n for n in escaping if any(u.name not in inside_names and u.op != "output" for u in n.users)]
        if len(escaping) > 1 and flowing:
            escaping = flowing
        for position, member in enumerate(escaping):
            leaf = "output" if len(escaping) == 1 else f"output|sub_{position}"
            outside = frozenset(user.name for user in member.users if user.name not in inside_names)
            self._add(join(inv.scope, leaf), member, outside, (1, -inv.depth), "output")

    def _name_frame_result(self) -> None:
        """The frame's result: the model's ``output`` for the root frame, else ``<scope>.output``."""
        frame = self.capture.frame
        if not frame.returns:
            return
        returned = frame.return_leaves
        leaves = returned if any(n is not None for _, n in returned) else _flat_output_leaves(self.output_node)
        for path, leaf_node in leaves:
            name = join(self.frame_scope, _output_name(path))
            if leaf_node is None:
                self._add_value(name, float(len(self.nodes)))
                continue
            node = self.by_name.get(leaf_node)
            if node is not None:
                self._add(name, node, frozenset({self.output_node.name}), (1, 0), "output")
        for rank, scope in enumerate(self._returning_caller_scopes(), start=1):
            for path, leaf_node in leaves:
                name = join(scope, _output_name(path))
                node = self.by_name.get(leaf_node) if leaf_node is not None else None
                if leaf_node is None:
                    self._add_value(name, float(len(self.nodes)) + 0.01 * rank)
                elif node is not None:
                    self._add(name, node, frozenset({self.output_node.name}), (1, rank), "output",
                              self.order[node.name] + 0.5 + 0.01 * rank)

    def _returning_caller_scopes(self) -> List[str]:
        """Scopes of the callers returning this frame's result as it is (``return self.mlp(x)``
        in the model, where ``mlp``'s forward graph-breaks): no graph of theirs follows the
        call, so their ``output`` is this frame's result. Stops at a caller that is not an
        ancestor on this frame's path, or is called several times (which call, the frame does
        not say)."""
        scopes = []
        end = len(self.prefix)
        for reference in self.capture.returned_by.get(self.instance, ()):
            caller = reference()
            for candidate in range(end - 1, -1, -1):
                if module_at(self.root, self.prefix[:candidate]) is caller:
                    break
            else:
                break
            scope = format_module_path(self.root, self.prefix[:candidate])
            if scope and self.counters.totals.get(scope, 1) > 1:
                break
            scopes.append(scope)
            end = candidate
        return scopes


def _has_arguments(record: ModuleReturn) -> bool:
    """Whether the record holds the call's arguments and event order (a recorder that read
    them); a call with no tensor argument still has its orders set."""
    return record.return_order > record.call_order


def _bound_arguments(record: ModuleReturn, module: Optional[nn.Module]) -> List[Tuple[str, str]]:
    """(input name, fx node) per tensor leaf of the call's arguments, the argument bound to
    the forward's parameter as Python binds it: ``foos.sub_0`` for ``*foos``, ``bars.a`` for
    ``**bars``, ``x|a.sub_0`` inside a structured argument. In the forward's parameter order
    (graphpatch lists inputs so), whatever order the caller passed keywords in."""
    named, varargs, varkw = forward_parameters(module)
    bound: List[Tuple[str, str]] = []
    order: List[Tuple[int, int]] = []
    for key, path, node in record.arguments:
        if node is None:
            continue
        if isinstance(key, int):
            if key < len(named):
                local, full = named[key], path
            elif varargs is not None:
                local, full = varargs, (str(key - len(named)),) + path
            else:
                continue
        elif key in named:
            local, full = key, path
        elif varkw is not None:
            local, full = varkw, (key,) + path
        else:
            continue
        position = named.index(local) if local in named else len(named) + (0 if local == varargs else 1)
        order.append((position, len(bound)))
        bound.append((_input_name(local, full, varargs, varkw), node))
    return [bound[index] for _, index in sorted(order)]


def _assigned_in_forward(module: Optional[nn.Module]) -> FrozenSet[str]:
    """Locals the module's ``forward`` assigns (all, conservatively, where it has no code)."""
    code = forward_code(module) if module is not None else None
    if code is None:
        return _EVERYTHING
    return frozenset(assigned_locals(code))


class _Everything(frozenset):
    def __contains__(self, item: object) -> bool:
        return True


_EVERYTHING: FrozenSet[str] = _Everything()


def _child_names(module: Optional[nn.Module]) -> FrozenSet[str]:
    """Names a module's children take in its scope (containers flattened: ``h_0``)."""
    if module is None:
        return frozenset()
    names = set()
    for name, child in module._modules.items():
        names.add(sanitize(name))
        if isinstance(child, _CONTAINERS):
            names.update(f"{sanitize(name)}_{_NON_IDENTIFIER.sub('_', key)}" for key in child._modules)
    return frozenset(names)


def _stack_segments(path_text: str, self_prefix: Tuple[str, ...] = ()) -> Optional[Tuple[str, ...]]:
    """A module-stack path relative to the frame's module (``self_prefix`` stripped)."""
    path = stack_path(path_text)
    if path is not None and self_prefix and path[: len(self_prefix)] == self_prefix:
        return path[len(self_prefix):]
    return path


def _holds_same(module: Optional[nn.Module], owner: Optional[nn.Module], leaf: str) -> bool:
    if module is None or owner is None or module is owner:
        return False
    for table in ("_parameters", "_buffers"):
        mine, theirs = getattr(module, table, {}).get(leaf), getattr(owner, table, {}).get(leaf)
        if mine is not None and mine is theirs:
            return True
    return False


def _traced_through_wrapper(frame: Any, module: Optional[nn.Module]) -> bool:
    """True when the traced frame is not the module's ``forward`` but a ``(self, *args,
    **kwargs)`` function calling it: a decorator's wrapper (transformers' ``can_return_tuple``),
    ``Module.__call__`` (``module.compile()``, transformers' compiled generate step)."""
    if module is None or frame.is_resume or (frame.varargs_local is None and frame.varkw_local is None):
        return False
    code = forward_code(module)
    return code is not None and id(code) != frame.code_id


def _unwrap_argument(
    frame: Any, local: str, path: Tuple[str, ...], named: List[str], varargs: Optional[str]
) -> Tuple[str, Tuple[str, ...]]:
    """A wrapper's ``args[k]`` / ``kwargs["name"]`` → the forward parameter it binds to."""
    if not path:
        return local, path
    if local == frame.varargs_local and path[0].isdigit():
        position = int(path[0]) - (len(frame.self_prefix) if frame.self_local == local else 0)
        if position < len(named):
            return named[position], path[1:]
        if varargs is not None:
            return varargs, (str(position - len(named)),) + path[1:]
    elif local == frame.varkw_local:
        return path[0], path[1:]
    return local, path


def _input_name(local: str, path: Tuple[str, ...], varargs: Optional[str], varkw: Optional[str]) -> str:
    """``x``; ``x|a.sub_0`` inside a structured argument; ``*foos`` → ``foos.sub_0`` and
    ``**bars`` → ``bars.a`` (graphpatch's names for variadic arguments)."""
    if local in (varargs, varkw) and path:
        head, rest = f"{sanitize(local)}.{sanitize(path[0])}", path[1:]
    else:
        head, rest = sanitize(local), path
    return head + ("|" + ".".join(sanitize(p) for p in rest) if rest else "")


def _flat_output_leaves(output_node: torch.fx.Node) -> List[Tuple[Tuple[str, ...], str]]:
    values = output_node.args[0]
    values = list(values) if isinstance(values, (list, tuple)) else [values]
    tensors = [(index, v) for index, v in enumerate(values) if isinstance(v, torch.fx.Node)]
    if len(values) == 1 and tensors:
        return [((), tensors[0][1].name)]
    return [((f"sub_{index}",), v.name) for index, v in tensors]


def _dedupe(sites: Iterable[Site]) -> List[Site]:
    seen: Dict[str, Site] = {}
    for site in sites:
        if site.name not in seen:
            seen[site.name] = site
    return list(seen.values())


# -- module boundaries no graph covers ---------------------------------------------------------


@dataclass(frozen=True)
class EagerSite:
    """A module-boundary name of a call that no graph covers: the module's forward ran eagerly
    (Dynamo gave up on it, or on its caller's), so the value exists only in Python. Patched
    through forward hooks while a context patches it (eager_boundaries.py)."""

    #: The called module's path from the root, and the path of the module whose forward Dynamo
    #: ran eagerly (the call counter restarts at each of its calls).
    path: Tuple[str, ...]
    frame: Tuple[str, ...]
    #: Which call of the module in one run of that forward; None when it is called once.
    ordinal: Optional[int]
    #: "input" (``local`` is the forward parameter, ``leaf`` the path inside it, an item of
    #: ``*args``/``**kwargs`` first), "param" (``local`` is the attribute) or "output".
    role: str
    local: str
    leaf: Tuple[str, ...]
    varargs: Optional[str] = None
    varkw: Optional[str] = None
    #: Where the name is listed among the graphs' (their first runs' clock, see
    #: ``EagerCall.start``): a call's inputs and parameters as it starts, its result as it
    #: returns; infinity when unknown (another instance's observation): listed last.
    order: float = math.inf
    #: The same clock's stamp in the observed run, whichever instance ran it: among themselves,
    #: another instance's boundary names are listed in the order that run had them.
    stamp: float = math.inf
    #: For a result: 0 for the module's own ``output``; k for the ``output`` of the k-th caller
    #: returning it as it is (``EagerForward.returned_through``): patched after the k-1 before.
    through: int = 0


_LOADS = frozenset({"LOAD_FAST", "LOAD_FAST_CHECK", "LOAD_FAST_AND_CLEAR", "LOAD_DEREF", "LOAD_CLOSURE",
                    "LOAD_FAST_LOAD_FAST", "LOAD_FAST_BORROW", "LOAD_FAST_BORROW_LOAD_FAST_BORROW"})
_reads: "weakref.WeakKeyDictionary[Any, FrozenSet[str]]" = weakref.WeakKeyDictionary()


def read_locals(code: Any) -> Optional[FrozenSet[str]]:
    """Local names a function's code reads (None when unknown). A forward parameter it never
    reads gets no node in a graph (Dynamo drops the unused input), so an eagerly run forward's
    observed argument there is not named either."""
    if code is None:
        return None
    if code not in _reads:
        names: Set[str] = set()
        for instruction in dis.get_instructions(code):
            if instruction.opname in _LOADS:
                value = instruction.argval
                names.update(str(v) for v in value) if isinstance(value, tuple) else names.add(str(value))
        _reads[code] = frozenset(names)
    return _reads[code]


def eager_boundary_sites(
    root: nn.Module, frame_path: Tuple[str, ...], observed: Any, timed: bool = True
) -> List[Tuple[Site, Optional[EagerSite]]]:
    """Names of the boundaries of the module calls observed in a forward Dynamo ran eagerly
    (``_torch_compat.eager_observer.EagerForward``), as the unbroken model names them: ``<scope>.<forward parameter>``
    (``x``, ``foos.sub_0``, ``bars.a``, ``x|a.sub_0``), ``<scope>.<parameter or buffer>`` and
    ``<scope>.output`` / ``<scope>.output|<path>`` in return order; a module called several
    times in the forward gets ``<scope>_<k>``. ``timed``: the observation is of this very
    instance, so its clock places the names among the graphs' (EagerSite.order). The sites have no graph node (``node`` is "");
    a non-tensor result leaf comes back without an EagerSite (a "value" site, refused as a
    patch target). Ops inside the eagerly run body are not named: they ran in no graph."""
    counts = dict(observed.counts)
    recorded = set(counts)
    scopes: Dict[Tuple[str, ...], str] = {}

    def scope_of(relative: Tuple[str, ...]) -> str:
        if relative in scopes:
            return scopes[relative]
        full = frame_path + relative
        if relative and relative[:-1] in recorded:
            # The parent was called: its children keep the dot (``seq.sub_0``), as in a graph.
            parent = relative[:-1]
            plain = extend_scope(scope_of(parent), module_at(root, frame_path + parent), relative[-1:], True)
        else:
            plain = format_module_path(root, full)
        scopes[relative] = plain
        return plain

    sites: List[Tuple[Site, Optional[EagerSite]]] = []
    position = 1e9
    for call in sorted(observed.calls, key=lambda c: (len(c.path), c.path, c.ordinal)):
        several = counts.get(call.path, 1) > 1
        scope = scope_of(call.path) + (f"_{call.ordinal}" if several else "")
        ordinal = call.ordinal if several else None
        full = frame_path + call.path
        module = module_at(root, full)
        if module is None:
            continue

        def add(name: str, facts: Any, role: str, local: str, leaf: Tuple[str, ...], through: int = 0) -> None:
            nonlocal position
            position += 1
            stamp = call.end if role == "output" else call.start
            # A caller's name on the same value: its input listed before the callee's, its
            # output after, as the unbroken model lists them.
            observed_at = float(stamp) + (through if role == "output" else -through) * 1e-3 if stamp >= 0 else math.inf
            order = observed_at if timed else math.inf
            if facts is None:
                if role == "output":
                    sites.append((Site(name, "", None, (1, 0), "value", position, None, None, ""), None))
                return
            shape, dtype = facts
            site = Site(name, "", None, (0, 0), role, position, tuple(shape), dtype, "")
            sites.append((site, EagerSite(
                full, frame_path, ordinal, role, local, leaf, call.varargs, call.varkw, order, observed_at, through
            )))

        read = read_locals(forward_code(module))
        for local, leaf, facts in call.arguments:
            if read is not None and local not in read:
                continue  # never read by the forward: the unbroken model has no node to name
            add(join(scope, _input_name(local, leaf, call.varargs, call.varkw)), facts, "input", local, leaf)
        for table in ("_parameters", "_buffers"):
            for attribute, value in getattr(module, table, {}).items():
                if isinstance(value, torch.Tensor):
                    add(join(scope, sanitize(attribute)), (tuple(value.shape), value.dtype), "param", attribute, ())
        for leaf, facts in call.result:
            add(join(scope, _output_name(leaf)), facts, "output", "", leaf)
        if call.path == ():
            # Callers that passed the forward their own arguments unchanged, or return its
            # result as it is: their inputs and ``output`` are these values, which no graph
            # holds, patched through the same hooks (inputs: the outermost caller's first;
            # results: after the module's own).
            facts_of = {(local, leaf): facts for local, leaf, facts in call.arguments}
            for through, (caller_scope, pairs) in enumerate(_callers(root, frame_path, observed.passed_through), 1):
                for local, caller_parameter in pairs:
                    if (local, ()) in facts_of and (read is None or local in read):
                        add(join(caller_scope, sanitize(caller_parameter)), facts_of[(local, ())], "input", local, (), through)
            returned = [(relative, ()) for relative in observed.returned_through]
            for through, (caller_scope, _) in enumerate(_callers(root, frame_path, returned), 1):
                for leaf, facts in call.result:
                    add(join(caller_scope, _output_name(leaf)), facts, "output", "", leaf, through)
    return sites


def _output_name(leaf: Tuple[str, ...]) -> str:
    """``output``, or ``output|sub_1.a`` for a leaf inside a structured result."""
    return "output" + ("|" + ".".join(sanitize(p) for p in leaf) if leaf else "")


def _callers(root: nn.Module, path: Tuple[str, ...], chain: Iterable[Tuple[Tuple[str, ...], Any]]) -> List[Tuple[str, Any]]:
    """(scope, payload) per caller of the module at ``path`` up a recorded call chain (each
    entry: the path from that caller to the one before, and a payload), while ``path`` ends
    with those relative paths (another instance, elsewhere in its model, may not)."""
    found = []
    for relative, payload in chain:
        if not relative or path[len(path) - len(relative):] != relative:
            break
        path = path[: len(path) - len(relative)]
        found.append((format_module_path(root, path), payload))
    return found
