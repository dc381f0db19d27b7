"""Patched variants of dynamic-shape graphs: compiled once with symbolic shapes.

Dynamo hands the backend a graph with symbolic sizes (SymInt placeholders, example values with
SymInt dims) once a frame has run with a second distinct size, e.g. a second prompt length. A
patched variant is compiled lazily at call time; compiled from the call's real tensors it would
be specialized to that call's sizes, and running it for another length would be wrong.

So for a dynamic graph the variant is compiled from *fake* inputs whose dims are symbolic exactly
where Dynamo's are, in a fresh ``ShapeEnv`` (Dynamo's own has already produced its guards and
must not be changed after the fact). Whatever that compile had to assume about the sizes (for
example that a patch value's length equals the sequence length) is recorded as guards in the
fresh ShapeEnv; the program cache (runtime/cache.py) runs a variant only for calls where its
guards hold and compiles another specialization, counted like any variant, where they do not. A patch on a
variable-length graph thus costs one compile for all lengths.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch
import torch.fx

from .._torch_compat.symbolic import GuardCheck, evaluate_shape, shape_guard, symbol_of, symbolic_example
from ..validation import check_patch_for_site

logger = logging.getLogger(__name__)

#: Per placeholder: None (static: a parameter, a static tensor, any non-tensor), "symint", or a
#: tuple saying for each dim whether it is symbolic.
Layout = List[Any]


def symbolic_layout(gm: torch.fx.GraphModule) -> Optional[Layout]:
    """Which placeholder values Dynamo traced symbolically; None when the graph is static."""
    layout: Layout = []
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        value = node.meta.get("example_value", node.meta.get("val"))
        if isinstance(value, torch.SymInt):
            layout.append("symint")
        elif isinstance(value, torch.Tensor) and any(isinstance(s, torch.SymInt) for s in value.shape):
            layout.append(tuple(isinstance(s, torch.SymInt) for s in value.shape))
        else:
            layout.append(None)
    return layout if any(entry is not None for entry in layout) else None


class ShapeGuard:
    """The shape guards a variant's compile recorded, evaluated on a call's real values.

    ``check`` is torch's own guard evaluation (see _torch_compat.symbolic.shape_guard); where
    torch could not produce guards, ``sizes`` holds the exact sizes of the symbolic inputs the
    variant was compiled for instead. Neither: the compile assumed nothing (always runs).
    """

    def __init__(self, check: Optional[GuardCheck] = None, sizes: Optional[List[Tuple[int, Any]]] = None) -> None:
        self.check = check
        self.sizes = sizes

    def __call__(self, args: Sequence[Any]) -> bool:
        if self.sizes is not None:
            return all(_size_of(args[i]) == size for i, size in self.sizes)
        return self.check is None or self.check(args)

    def __repr__(self) -> str:
        return f"ShapeGuard({self.check if self.sizes is None else self.sizes!r})"


def _size_of(value: Any) -> Any:
    return tuple(value.shape) if isinstance(value, torch.Tensor) else value


def _exact_sizes(real: Sequence[Any], layout: Layout) -> ShapeGuard:
    return ShapeGuard(None, [(i, _size_of(real[i])) for i, entry in enumerate(layout) if entry is not None])


class SymbolicCompile:
    """A compile function for ``insert.build_variant``: compiles with symbolic example inputs.

    ``build_variant`` passes the call's real values (the graph's own inputs first, then the
    patch inputs); the first ``len(layout)`` become fakes with Dynamo's symbolic dims, the patch
    inputs static fakes. After compiling, ``guard`` holds what the compile assumed.
    """

    def __init__(self, layout: Layout, compile_fn: Callable[[torch.fx.GraphModule, Sequence[Any]], Callable]) -> None:
        self.layout = layout
        self.compile_fn = compile_fn
        self.guard: Optional[ShapeGuard] = None

    def __call__(self, gm: torch.fx.GraphModule, example: Sequence[Any]) -> Callable:
        count = len(self.layout)
        symbolic = symbolic_example(example, self.layout)
        if symbolic is None:
            # This torch cannot build symbolic fakes (warned): compile for the call's sizes.
            fn = self.compile_fn(gm, list(example))
            self.guard = _exact_sizes(example[:count], self.layout)
            return fn
        fn = self.compile_fn(gm, symbolic.values)
        check = shape_guard(symbolic)
        self.guard = ShapeGuard(check) if check is not None else _exact_sizes(example[:count], self.layout)
        logger.debug("symbolic compile of a patched variant: %r", self.guard)
        return fn


class SymbolicInputs:
    """The symbolic inputs of a dynamic graph, to read a call's sizes off its arguments."""

    def __init__(self, gm: torch.fx.GraphModule, layout: Layout) -> None:
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        #: (argument position, dim or None for a SymInt argument, sympy symbol)
        self.slots: List[Tuple[int, Optional[int], Any]] = []
        for position, (entry, node) in enumerate(zip(layout, placeholders)):
            value = node.meta.get("example_value", node.meta.get("val"))
            if entry == "symint":
                self._add(position, None, value)
            elif isinstance(entry, tuple):
                for dim, symbolic in enumerate(entry):
                    if symbolic:
                        self._add(position, dim, value.shape[dim])

    def _add(self, position: int, dim: Optional[int], size: Any) -> None:
        symbol = symbol_of(size)
        if symbol is not None:
            self.slots.append((position, dim, symbol))

    def bindings(self, args: Sequence[Any]) -> dict:
        """Symbol → this call's int."""
        return {
            symbol: int(args[position] if dim is None else args[position].shape[dim])
            for position, dim, symbol in self.slots
        }


def check_call_shapes(inputs: Optional[SymbolicInputs], capture: Any, selection: Any, args: Sequence[Any], memo: dict) -> None:
    """Checks each patch against the shape its node has in this call, before the graph runs.

    Once per patch context, graph occurrence and set of site shapes (``memo`` is the patch
    state's memo): a decode step whose patched node keeps its shape costs a dict lookup.
    """
    shapes: Any = None
    if inputs is not None:
        bindings = inputs.bindings(args)
        shapes = tuple(
            evaluate_shape(entry.site.shape, bindings) if entry.site.shape is not None else None for entry in selection
        )
    key = ("shapes", capture.uid, id(selection), shapes)
    if key in memo:
        return
    for position, entry in enumerate(selection):
        site = entry.site
        if shapes is not None and shapes[position] is not None:
            site = dataclasses.replace(site, shape=shapes[position])
        for patch in entry.patches:
            check_patch_for_site(site.name, site, patch)
    memo[key] = True
