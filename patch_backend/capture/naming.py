"""Hierarchical node names for one graph occurrence (see docs/naming.md).

A *site* is a named place where patches apply: a producing fx node plus the set of its uses
that see the patched value. Op names patch every use; ``<scope>.output`` patches the uses
outside the scope; ``<scope>.input`` and ``<scope>.weight`` patch the uses inside it. So a value
flowing out of ``mlp`` into ``ln_2`` meets, in order, the op's patches, ``mlp.output``'s, then
``ln_2.input``'s: the path the value takes through the module hierarchy (``Site.rank``).
"""

from __future__ import annotations

import inspect
import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any, Dict, FrozenSet, Iterable, List, Optional, Sequence, Set, Tuple

import torch
import torch.fx
from torch import nn

from .._torch_compat.sources import module_stack, stack_path
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


@dataclass
class _Invocation:
    keys: Tuple[str, ...]
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
) -> List[Site]:
    """Names every tensor-valued node of ``capture`` running as the module at ``prefix``."""
    graph = capture.gm.graph
    frame_scope = format_module_path(root, prefix)
    frame_module = module_at(root, prefix)
    nodes = list(graph.nodes)
    output_node = next(n for n in reversed(nodes) if n.op == "output")
    placeholders = {info.node_name: info for info in capture.placeholders}
    sites: List[Site] = []

    order = {node.name: position for position, node in enumerate(nodes)}

    def add(name, node, consumers, rank, kind):
        is_tensor, shape, dtype = _tensor_meta(node)
        if not is_tensor:
            return
        depth = rank[1]
        if kind in ("input", "param") and consumers:
            position = min(order[c] for c in consumers) - 0.5 + 0.001 * depth + (0.0005 if kind == "param" else 0)
        elif kind == "output":
            position = order[node.name] + 0.5 + 0.001 * depth
        else:
            position = order[node.name]
        sites.append(Site(name, node.name, consumers, rank, kind, position, shape, dtype, source_line(node)))

    # Module invocations, from nn_module_stack (paths relative to the frame's self).
    chains: Dict[str, List[_Invocation]] = {}
    raw_stacks: Dict[str, List[Tuple[Tuple[str, ...], Tuple[str, ...]]]] = {}
    for node in nodes:
        if node.op not in ("call_function", "call_method", "call_module"):
            continue
        entries = []
        keys: Tuple[Any, ...] = ()
        for key, path_text in module_stack(node):
            relative = _stack_segments(path_text, capture.frame.self_prefix)
            if relative is None:
                continue
            raw = tuple(prefix) + relative
            # Dynamo marks a re-invocation at the same path with "@k" in the key, but a module
            # reached under several paths keeps one key: the path is part of the identity.
            keys = keys + ((key, raw),)
            entries.append((keys, raw))
        raw_stacks[node.name] = entries

    invocations: Dict[Tuple[str, ...], _Invocation] = {}

    def invocation(keys: Tuple[str, ...], raw: Tuple[str, ...]) -> _Invocation:
        if keys in invocations:
            return invocations[keys]
        parent = invocations.get(keys[:-1]) if len(keys) > 1 else None
        parent_raw = parent.raw_path if parent else tuple(prefix)
        parent_scope = parent.scope if parent else frame_scope
        if raw[: len(parent_raw)] == parent_raw and len(raw) > len(parent_raw):
            # The parent was called, so its children keep the dot even if it is a container
            # (a called ``nn.Sequential``'s children are ``seq.sub_0``, graphpatch's convention).
            called_parent = parent is not None or frame_module is not None
            scope = extend_scope(parent_scope, module_at(root, parent_raw), raw[len(parent_raw):], called_parent)
        else:
            scope = format_module_path(root, raw)
        result = _Invocation(keys, raw, counters.call(scope), len(keys))
        invocations[keys] = result
        return result

    for node_name, entries in raw_stacks.items():
        chains[node_name] = [invocation(keys, raw) for keys, raw in entries]

    # Ops (never named like a child module of their scope).
    reserved: Dict[int, FrozenSet[str]] = {}
    members: Dict[Tuple[str, ...], List[torch.fx.Node]] = defaultdict(list)
    for node in nodes:
        if node.name not in chains:
            continue
        chain = chains[node.name]
        scope = chain[-1].scope if chain else frame_scope
        for inv in chain:
            members[inv.keys].append(node)
        if _tensor_meta(node)[0]:
            owner = module_at(root, chain[-1].raw_path) if chain else frame_module
            if id(owner) not in reserved:
                reserved[id(owner)] = _child_names(owner)
            add(join(scope, counters.take(scope, op_base_name(node), reserved[id(owner)])), node, None, (0, 0), "op")

    # Frame inputs. A resume frame's locals are mostly values of earlier graphs (not named
    # again); a forward parameter that no earlier graph of the forward consumed (the code before
    # the break had no tensor op on it, e.g. a ``warnings.warn`` first) is still the argument.
    named_params, varargs, varkw = forward_parameters(frame_module)
    wrapped = _traced_through_wrapper(capture.frame, frame_module)
    arguments = set(named_params) | {name for name in (varargs, varkw) if name}
    for node in nodes:
        info = placeholders.get(node.name) if node.op == "placeholder" else None
        if info is None or info.kind != "input" or not info.local:
            continue
        local, path = info.local, info.path
        if wrapped:
            local, path = _unwrap_argument(capture.frame, local, path, named_params, varargs)
        name = join(frame_scope, _input_name(local, path, varargs, varkw))
        if capture.frame.is_resume and (local not in arguments or name in counters.inputs):
            continue
        counters.inputs.add(name)
        add(name, node, None, (0, 0), "input")

    # Parameters and buffers, named in the scope of the module that owns them.
    for node in nodes:
        info = placeholders.get(node.name) if node.op == "placeholder" else None
        if info is None or info.kind != "param":
            continue
        owner_raw = tuple(prefix) + info.path[:-1]
        owner = module_at(root, owner_raw)
        groups: Dict[Tuple[str, int], set] = defaultdict(set)
        for user in node.users:
            if user.op == "output":
                continue
            scope, depth = format_module_path(root, owner_raw), 0
            chain = chains.get(user.name, [])
            for inv in reversed(chain):
                if owner is not None and module_at(root, inv.raw_path) is owner:
                    scope, depth = inv.scope, inv.depth
                    break
                if _holds_same(module_at(root, inv.raw_path), owner, info.path[-1]):
                    # A tied parameter (GPT-2's lm_head.weight is transformer.wte.weight): Dynamo
                    # passes it once, under the first path it met; each user names it as its own.
                    scope, depth = inv.scope, inv.depth
                    break
            else:
                if owner is not None and owner is frame_module:
                    scope = frame_scope
            groups[(scope, depth)].add(user.name)
        if not groups:
            groups[(format_module_path(root, owner_raw), 0)] = set()
        for (scope, depth), users in groups.items():
            add(join(scope, sanitize(info.path[-1])), node, frozenset(users), (2, depth), "param")

    # Module inputs and outputs of each invocation.
    for keys, inv in sorted(invocations.items(), key=lambda item: len(item[0])):
        inside = members[keys]
        inside_names = {n.name for n in inside}
        external: List[torch.fx.Node] = []
        external_users: Dict[str, set] = defaultdict(set)
        escaping: List[torch.fx.Node] = []
        for member in inside:
            for source in member.all_input_nodes:
                if source.name in inside_names or source.op == "get_attr":
                    continue
                info = placeholders.get(source.name)
                if info is not None and info.kind == "param":
                    continue
                if not _tensor_meta(source)[0]:
                    continue
                if source not in external:
                    external.append(source)
                external_users[source.name].add(member.name)
            if any(user.name not in inside_names for user in member.users):
                escaping.append(member)
        module = module_at(root, inv.raw_path)
        parameter_names = forward_parameters(module)[0]
        for position, source in enumerate(external):
            leaf = parameter_names[0] if position == 0 and parameter_names else f"input_{position}"
            add(join(inv.scope, leaf), source, frozenset(external_users[source.name]), (2, inv.depth), "input")
        escaping = [n for n in escaping if _tensor_meta(n)[0]]
        # Values that only leave through the graph output while another value flows on to
        # later ops are side results (e.g. a KV-cache update), not the module's result.
        flowing = [
            n for n in escaping
            if any(u.name not in inside_names and u.op != "output" for u in n.users)
        ]
        if len(escaping) > 1 and flowing:
            escaping = flowing
        for position, member in enumerate(escaping):
            leaf = "output" if len(escaping) == 1 else f"output|sub_{position}"
            outside = frozenset(user.name for user in member.users if user.name not in inside_names)
            add(join(inv.scope, leaf), member, outside, (1, -inv.depth), "output")

    # The frame's result: the model's ``output`` for the root frame, else ``<scope>.output``.
    if capture.frame.returns:
        returned = capture.frame.return_leaves
        leaves = returned if any(n is not None for _, n in returned) else _flat_output_leaves(output_node)
        by_name = {n.name: n for n in nodes}
        for path, leaf_node in leaves:
            leaf = "output" + ("|" + ".".join(sanitize(p) for p in path) if path else "")
            if leaf_node is None:
                # A non-tensor leaf (kind "value", no node): not listed or patchable, only known
                # so that a patch naming it is refused with the reason (index.non_tensor).
                sites.append(Site(join(frame_scope, leaf), "", None, (1, 0), "value", float(len(nodes)), None, None, ""))
                continue
            node = by_name.get(leaf_node)
            if node is None:
                continue
            add(join(frame_scope, leaf), node, frozenset({output_node.name}), (1, 0), "output")
    return sorted(_dedupe(sites), key=lambda site: site.position)


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
    forward = inspect.unwrap(getattr(type(module), "forward", None) or (lambda: None))
    code = getattr(forward, "__code__", None)
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
