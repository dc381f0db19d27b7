"""Exploring names: ``PatchableGraph`` (graphpatch-style wrapper) and the navigable node tree.

The tree is drawn from the flat names (``a.b_0.c.linear.output``, ``output|sub_1.sub_0``) the
way graphpatch 0.2.3 draws its ``NodePath``: module scopes are ``CompiledGraphModule`` nodes, a
nested result is drawn level by level with container labels (``tuple(2)``, ``list(3)``,
``dict(1)``), tensors as ``Tensor(2, 4)`` with the concrete sizes of the example call.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from contextlib import contextmanager
from typing import Any, Callable, ContextManager, Dict, Iterator, List, Optional, Sequence, Set, Tuple, Union

import torch
from torch import nn

from ._torch_compat.symbolic import size_hint
from .capture.index import NamedSite, RootIndex, index_for, no_graph_error
from .capture.protected import KEY, SCOPE, VALUE, ProtectedNames, protected_name, split_name
from .capture.naming import sanitize
from .context import patch

#: Attributes of the explorer a node name must never shadow (graphpatch's reserved names).
#: How graphpatch labels a module's node (every scope, and the root).
MODULE_LABEL = "CompiledGraphModule"

_PART = re.compile(r"[.|]")
_ASSIGNED = re.compile(r"^\s*(\w+)\s*(?::[^=]*)?=\s")
_CLEANUP = re.compile(r";\s+[\w\s=]+= None\s*$")
_SUB_INDEX = re.compile(r"^sub_(\d+)$")

ShapeValue = Union[torch.Size, Tuple[Any, ...], "ShapeTree", None]


class Code(str):
    """Code text whose repr is the text itself, so the REPL prints it readably (graphpatch's
    ``WrappedCode``) while it stays a plain ``str`` for comparisons and ``in``."""

    def __repr__(self) -> str:
        return str(self)


def example_size(dim: Union[int, torch.SymInt]) -> Union[int, torch.SymInt]:
    """The concrete size behind a (possibly symbolic) dimension, as in the example call.

    When Dynamo traces with symbolic sizes (``mark_dynamic``, automatic dynamic shapes) the
    graph's example values carry SymInts whose *hint* is the size of the call that was traced
    (read in _torch_compat.symbolic). A size with no hint (data-dependent) stays symbolic.
    """
    return size_hint(dim)


def concrete_shape(shape: Sequence[Union[int, torch.SymInt]]) -> Union[torch.Size, Tuple[Any, ...]]:
    """A site's shape with example sizes; a tuple only if some size has no hint."""
    sizes = [example_size(dim) for dim in shape]
    ints = [size for size in sizes if isinstance(size, int)]
    if len(ints) == len(sizes):
        return torch.Size(ints)
    return tuple(sizes)


class NodePath:
    """One node of the name tree; ``str(node)`` is the name to use in a patch map.

    Children are reached as attributes (tab completion lists them) or with ``node["a.b.c"]``
    (a dotted path; ``|`` is accepted in place of a dot). ``_shape``, ``_code`` and ``_dtype``
    describe the node; node names never shadow ``_code`` or ``_shape`` (see ProtectedNames).
    """

    __slots__ = ("__name", "__role", "__children", "__named", "__type_name", "__code_source")

    def __init__(self, name: str, role: str, code_source: "CodeSource") -> None:
        self.__name = name
        self.__role = role
        self.__children: Dict[str, NodePath] = {}
        self.__named: Optional[NamedSite] = None
        self.__type_name: Optional[str] = None
        self.__code_source = code_source

    # Navigation.

    def __getattr__(self, attribute: str) -> Any:
        if attribute.startswith(("__", "_NodePath__")):
            raise AttributeError(attribute)  # unset slots (copy, pickle): never a node
        if attribute == "_shape":
            return self.__shape()
        if attribute == "_code":
            return self.__code()
        children = self.__children
        if attribute in children:
            return children[attribute]
        if attribute == "_dtype":
            return self.__named.site.dtype if self.__named is not None else None
        if attribute == "_name":
            return self.__name
        raise AttributeError(
            f"{self.__name or '<root>'} has no node {attribute!r}; children: {', '.join(children) or 'none'}"
        )

    def __getitem__(self, path: str) -> "NodePath":
        node = self
        for part in _PART.split(str(path)):
            children = node.__children
            if part not in children:
                raise KeyError(
                    f"no node {part!r} under {node.__name or '<root>'!r} (looking up {str(path)!r}); "
                    f"children: {', '.join(children) or 'none'}"
                )
            node = children[part]
        return node

    def __contains__(self, path: str) -> bool:
        try:
            self[path]
        except KeyError:
            return False
        return True

    def __iter__(self) -> Iterator["NodePath"]:
        return iter(list(self.__children.values()))

    def __dir__(self) -> List[str]:
        return list(self.__children) + ["_code", "_shape", "_dtype"]

    def __str__(self) -> str:
        return self.__name

    def __hash__(self) -> int:
        return hash(self.__name)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, NodePath) and other.__name == self.__name

    # Description.

    def __shape(self) -> ShapeValue:
        if self.__children:
            return ShapeTree(self)
        site = self.__named.site if self.__named is not None else None
        return concrete_shape(site.shape) if site is not None and site.shape is not None else None

    def __code(self) -> Code:
        if self.__children or self.__named is None:
            return self.__code_source.for_scope(self.__name, list(self.__leaves()))
        site = self.__named.site
        return Code(site.code or self.__code_source.line_of(self.__named))

    def __leaves(self) -> Iterator[NamedSite]:
        if self.__named is not None:
            yield self.__named
        for child in self.__children.values():
            yield from child.__leaves()

    def __label(self) -> str:
        """What the tree draws after the node's key (graphpatch's labels)."""
        if self.__role == SCOPE or (self.__children and self.__role == "root"):
            return MODULE_LABEL
        if self.__children:
            return f"{self.__type_name or _guess_container(self.__children)}({len(self.__children)})"
        site = self.__named.site if self.__named is not None else None
        if site is not None and site.shape is not None:
            return "Tensor(" + ", ".join(str(size) for size in concrete_shape(site.shape)) + ")"
        return self.__type_name or "value"

    # Drawing.

    def __repr__(self) -> str:
        lines = [f"{self.__name or '<root>'}: {self.__label()}"]
        self.__draw(lines, "")
        return "\n".join(lines)

    def __draw(self, lines: List[str], indent: str) -> None:
        children = list(self.__children.items())
        for position, (key, child) in enumerate(children):
            last = position == len(children) - 1
            lines.append(f"{indent}{'└─' if last else '├─'}{key}: {child.__label()}")
            child.__draw(lines, indent + ("  " if last else "│ "))

    # Building (used by build_tree only).

    def __child(self, part: str, role: str) -> "NodePath":
        if part not in self.__children:
            separator = "|" if self.__role == VALUE else "."
            name = f"{self.__name}{separator}{part}" if self.__name else part
            self.__children[part] = NodePath(name, role, self.__code_source)
        return self.__children[part]

    def __set_leaf(self, named: Optional[NamedSite], type_name: Optional[str]) -> None:
        self.__named = named if named is not None else self.__named
        self.__type_name = type_name or self.__type_name

    def __arrange(self, order: Dict[str, float], item_positions: Dict[str, int], types: Dict[str, str]) -> float:
        """Sorts children (scopes and values in graph order, a structure's items in its own
        order) and returns where this node sits: a scope at its first value, a nested result
        after its last item (it is complete only then, like graphpatch's output node)."""
        children = self.__children
        positions = {key: child.__arrange(order, item_positions, types) for key, child in children.items()}
        if self.__role in (VALUE, KEY) and children:
            self.__type_name = types.get(self.__name, self.__type_name)
            keys = sorted(children, key=lambda key: _item_order(children[key].__name, key, item_positions))
        else:
            keys = sorted(children, key=lambda key: positions[key])
        self.__children = {key: children[key] for key in keys}
        if not positions:
            return order.get(self.__name, math.inf)
        return max(positions.values()) if self.__role in (VALUE, KEY) else min(positions.values())


def _guess_container(children: Mapping[str, Any]) -> str:
    """A nested result whose real type is not known (a module's several results): ``tuple``
    when its items are ``sub_<k>``, else ``dict``."""
    return "tuple" if all(_SUB_INDEX.match(key) for key in children) else "dict"


def _item_order(name: str, key: str, item_positions: Dict[str, int]) -> Tuple[float, float]:
    """A structure's items in the example result's order, else ``sub_<k>`` by ``k``."""
    match = _SUB_INDEX.match(key)
    return (item_positions.get(name, math.inf), int(match.group(1)) if match else math.inf)


def _children(node: NodePath) -> Dict[str, NodePath]:
    # NodePath keeps its state in name-mangled slots so that no attribute shadows a child.
    return node._NodePath__children


class ShapeTree(Mapping):
    """``node._shape`` of a module or a nested result: child name → shape, navigable like the
    node tree (``pg.graph._shape.linear.output`` is a ``torch.Size``; a subtree is another
    ShapeTree; a non-tensor item is None). Equal to a dict of the same shapes; draws as the
    node tree does."""

    __slots__ = ("__node",)

    def __init__(self, node: NodePath) -> None:
        self.__node = node

    def __getitem__(self, path: str) -> ShapeValue:
        return self.__node[path]._shape

    def __getattr__(self, attribute: str) -> ShapeValue:
        if attribute.startswith(("__", "_ShapeTree__")):
            raise AttributeError(attribute)
        try:
            return self[attribute]
        except KeyError as error:
            raise AttributeError(error.args[0]) from None

    def __iter__(self) -> Iterator[str]:
        return iter(list(_children(self.__node)))

    def __len__(self) -> int:
        return len(_children(self.__node))

    def __dir__(self) -> List[str]:
        return list(self)

    def __repr__(self) -> str:
        return repr(self.__node)


class CodeSource:
    """The generated (Dynamo FX) code behind the tree's nodes, read from the captured graphs."""

    def __init__(self, sites: Callable[[], List[NamedSite]]) -> None:
        self._sites = sites

    def for_scope(self, name: str, leaves: List[NamedSite]) -> Code:
        """The root: every captured graph's code, in first-run order. A scope or nested result:
        the lines of those graphs computing its values (one block per graph)."""
        root = not name
        if not root:  # inputs and parameters are computed outside the scope
            leaves = [named for named in leaves if named.site.kind in ("op", "output")]
        blocks: List[str] = []
        for capture, wanted in self._by_capture(self._sites() if root else leaves):
            lines = _code_lines(capture.gm.code) if root else _lines_defining(capture.gm.code, wanted)
            if lines:
                blocks.append("\n".join(lines))
        header = len(blocks) > 1
        return Code("\n\n".join(f"# graph {k}\n{block}" if header else block for k, block in enumerate(blocks)))

    def line_of(self, named: NamedSite) -> str:
        if named.capture is None:
            return ""  # a module boundary no graph covers (its forward ran eagerly): no code
        lines = _lines_defining(named.capture.gm.code, {named.site.node})
        return lines[0] if lines else ""

    @staticmethod
    def _by_capture(sites: List[NamedSite]) -> List[Tuple[Any, Set[str]]]:
        groups: Dict[int, Tuple[Any, Set[str]]] = {}
        for named in sites:
            if named.capture is not None:
                groups.setdefault(named.capture.uid, (named.capture, set()))[1].add(named.site.node)
        return list(groups.values())


def _code_lines(code: str) -> List[str]:
    return [line.rstrip() for line in code.strip("\n").splitlines() if line.strip()]


def _lines_defining(code: str, nodes: Set[str]) -> List[str]:
    lines = []
    for line in code.splitlines():
        match = _ASSIGNED.match(line)
        if match and match.group(1) in nodes:
            lines.append(_CLEANUP.sub("", line.strip()))
    return lines


def build_tree(index: RootIndex, types: Optional[Dict[str, str]] = None) -> NodePath:
    """The node tree of ``index``'s names (tensor nodes, and the non-tensor items of results so
    that containers show all their items), with protected names renamed (ProtectedNames)."""
    types = dict(types or {})
    names = list(index.names) + [name for name in index.non_tensor if name not in index.by_name]
    protected = ProtectedNames(names)
    root = NodePath("", "root", CodeSource(lambda: [index.by_name[name][0] for name in index.names]))
    order: Dict[str, float] = {}
    for position, name in enumerate(names):
        node = _insert(root, name, protected)
        named = index.by_name[name][0] if name in index.by_name else None
        node._NodePath__set_leaf(named, types.get(name))
        order[str(node)] = position
    renamed_types = {protected_name(name, protected): type_name for name, type_name in types.items()}
    positions = {name: position for position, name in enumerate(renamed_types)}
    root._NodePath__arrange(order, positions, renamed_types)
    return root


def _insert(root: NodePath, name: str, protected: ProtectedNames) -> NodePath:
    node = root
    raw: Tuple[str, ...] = ()
    for part, role in split_name(name):
        node = node._NodePath__child(protected.rename(raw, part, role), role)
        raw = raw + (part,)
    return node


def structure_types(value: Any, name: str = "output") -> Dict[str, str]:
    """Type names of a result and of everything nested in it, by node name (``output``,
    ``output|sub_1``, ``output|sub_1.sub_0``), in the result's own order: the tree's container
    labels (``tuple(2)``, ``CausalLMOutputWithPast(1)``). Keeps no reference to the values."""
    types = {name: type(value).__name__}
    if isinstance(value, (list, tuple)):
        items: List[Tuple[str, Any]] = [(f"sub_{index}", item) for index, item in enumerate(value)]
    elif isinstance(value, Mapping):
        items = [(sanitize(str(key)), item) for key, item in value.items()]
    else:
        return types
    for key, item in items:
        types.update(structure_types(item, f"{name}{'.' if '|' in name else '|'}{key}"))
    return types


class PatchableGraph(nn.Module):
    """Compiles ``module`` with the graphpatch backend and captures it on the example inputs.

    graphpatch's entry point, kept so its users can port unchanged: capture happens here, so
    ``pg.graph`` (the node tree) and ``pg.patch(map)`` work before any other call.

    Args:
        module: the model to capture; its parameters are shared, not copied.
        *example_args, **example_kwargs: one call's inputs, run once under ``torch.no_grad``.
        _backend: ``"graphpatch"`` (default, Inductor) or ``"graphpatch_eager"`` (reference).

    Raises:
        ValueError: the model rejected the example inputs (chained to its own error;
            docs/errors.md row 13).
        RuntimeError: Dynamo compiled no part of the forward, so nothing can be named
            (e.g. a forward calling ``nn.LSTM``; docs/errors.md row 18).

    Example::

        pg = pb.PatchableGraph(model, input_ids)
        print(pg.graph)                      # the node tree
        with pg.patch({"transformer.h_0.mlp.act.output": pb.ZeroPatch()}):
            logits = pg(input_ids)
    """

    def __init__(
        self, module: nn.Module, *example_args: Any, _backend: str = "graphpatch", **example_kwargs: Any
    ) -> None:
        super().__init__()
        self._module = module
        self._backend = _backend
        self._compiled = torch.compile(module, backend=_backend)
        self._generate_forward: Optional[Callable[..., Any]] = None
        try:
            with torch.no_grad():
                output = self._compiled(*example_args, **example_kwargs)
        except Exception as error:
            raise ValueError(
                f"PatchableGraph could not capture {type(module).__name__}: the model rejected the example "
                f"inputs ({type(error).__name__}: {error})"
            ) from error
        if not index_for(module).names:
            raise no_graph_error(module, f"PatchableGraph captured no graph for {type(module).__name__}", called=True)
        self._types = structure_types(output)
        self._tree: Optional[Tuple[List[str], int, NodePath]] = None

    @property
    def module(self) -> nn.Module:
        return self._module

    #: How roots.resolve_root unwraps a PatchableGraph to the module whose names it uses.
    _patch_backend_root = module

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._compiled(*args, **kwargs)

    @property
    def graph(self) -> NodePath:
        """The node tree (rebuilt when new graphs were captured, e.g. after a recompile)."""
        index = index_for(self._module)
        cached = self._tree
        if cached is None or cached[0] is not index.names or cached[1] != len(index.non_tensor):
            cached = self._tree = (index.names, len(index.non_tensor), build_tree(index, self._types))
        return cached[2]

    def patch(self, patch_map: Mapping[Any, Any]) -> ContextManager[None]:
        return patch(self, patch_map)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """Runs the wrapped model's ``generate`` (Hugging Face) with every forward it makes
        compiled by this graph's backend, so ``with pg.patch({...}): pg.generate(...)`` patches
        the prefill and every decode step.

        ``generate`` calls the model itself (``self(...)``), never this wrapper, so for the
        duration of the call the model's ``forward`` is temporarily replaced by a compiled
        version of its own forward (Dynamo compiles the prefill and decode graphs on first use,
        under the same names). The original is restored in a ``finally`` block: the model is
        left exactly as it was, even when ``generate`` raises.
        """
        generate = getattr(self._module, "generate", None)
        if not callable(generate):
            raise TypeError(
                f"{type(self._module).__name__} has no generate method: PatchableGraph.generate is for "
                "Hugging Face generation models (transformers' GenerationMixin)"
            )
        with self._compiled_forward_installed():
            return generate(*args, **kwargs)

    @contextmanager
    def _compiled_forward_installed(self) -> Iterator[None]:
        module = self._module
        had_own = "forward" in module.__dict__
        # Whatever the instance itself holds as ``forward`` (only restored when it had one).
        previous: Any = module.__dict__.get("forward")
        if self._generate_forward is None:
            self._generate_forward = torch.compile(module.forward, backend=self._backend)
        module.forward = self._generate_forward
        try:
            yield
        finally:
            if had_own:
                module.forward = previous
            else:
                del module.forward
