"""Symbolic shapes: SymInt hints and symbols, fake inputs with Dynamo's dynamic dims, guards.

A dynamic-shape graph's example values carry ``torch.SymInt`` sizes. Reading their hint (the
size of the traced call) or their sympy symbol, building fake inputs that are symbolic exactly
where Dynamo's are, and checking a call against the guards a compile recorded all go through
Dynamo/FakeTensor APIs that are private or version-dependent; they live here, each behind a
probe (``_probe_*``) and, where the fallback changes behaviour, a ``PatchBackendWarning``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch

from .gates import TORCH_VERSION, fallback

logger = logging.getLogger(__name__)

Size = Union[int, torch.SymInt]
#: A call's args → whether a variant's shape guards hold for them.
GuardCheck = Callable[[Sequence[Any]], bool]


def is_symbolic(value: Any) -> bool:
    """A SymInt, or a tensor with at least one SymInt dim."""
    if isinstance(value, torch.SymInt):
        return True
    return isinstance(value, torch.Tensor) and any(isinstance(size, torch.SymInt) for size in value.shape)


def symbol_of(size: Any) -> Optional[Any]:
    """The sympy symbol a SymInt size stands for; None for an int or a compound expression
    (``s0 + 1``), which a call's bindings determine but do not bind."""
    expr = getattr(getattr(size, "node", None), "expr", None)  # SymNode.expr: not public API
    return expr if expr is not None and getattr(expr, "is_Symbol", False) else None


# --- hints ----------------------------------------------------------------------------------


def _probe_optimization_hint() -> Optional[Callable[[Any], int]]:
    """torch's public hint accessor (``symbolic_shapes.optimization_hint``, torch 2.13)."""
    try:
        from torch.fx.experimental.symbolic_shapes import optimization_hint
    except ImportError:
        return None
    return optimization_hint


def size_hint(size: Size) -> Size:
    """The concrete size behind a (possibly symbolic) dimension, as in the traced call.

    A SymInt's *hint* is the size Dynamo traced with. torch 2.13 reads it with the public
    ``optimization_hint``; older releases only have the private ``SymNode.hint`` (the same
    number), which is also the fallback, with a warning, if 2.13+ lacks the accessor. A size
    with no hint (data-dependent) stays symbolic.
    """
    if not isinstance(size, torch.SymInt):
        return size
    accessor = _probe_optimization_hint()
    if accessor is not None:
        try:
            return int(accessor(size))
        except Exception:  # no hint (an unbacked size): the private read below says so too
            pass
    elif TORCH_VERSION >= (2, 13):
        fallback("size_hint", "symbolic_shapes.optimization_hint is missing; reading SymNode.hint instead")
    node = getattr(size, "node", None)
    has_hint = getattr(node, "has_hint", None)
    if callable(has_hint) and not has_hint():
        return size
    hint = getattr(node, "hint", None)  # private: SymNode.hint
    return int(hint) if hint is not None else size


# --- marks ----------------------------------------------------------------------------------


def _probe_mark_static() -> Optional[Callable[..., None]]:
    """Dynamo's ``mark_static`` (no public alias in torch.compiler as of 2.13)."""
    mark = getattr(getattr(torch, "_dynamo", None), "mark_static", None)
    return mark if callable(mark) else None


def mark_static(tensor: torch.Tensor, dim: Optional[int] = None) -> None:
    """Asks Dynamo to keep ``tensor``'s size ``dim`` (all sizes when None) static.

    Only a hint for speed: without it Dynamo may compile a dynamic graph for a second size.
    """
    mark = _probe_mark_static()
    if mark is None:
        fallback("mark_static", "torch._dynamo.mark_static is missing; Dynamo may compile dynamic graphs for "
                 "sweep chunks (slower first compile, same results)")
        return
    mark(tensor, dim)


# --- a call's sizes -------------------------------------------------------------------------


def symbol_bindings(placeholder_values: Any, args: Any) -> Dict[Any, int]:
    """Symbol → int for this call, read off the args of a dynamic-shape graph.

    ``placeholder_values`` are the placeholders' ``example_value`` (FakeTensors with SymInt
    sizes, or SymInts); ``args`` the call's real values in the same order.
    """
    bindings: Dict[Any, int] = {}

    def bind(fake: Any, real: Any) -> None:
        symbol = symbol_of(fake)
        if symbol is not None:
            bindings[symbol] = int(real)

    for fake, real in zip(placeholder_values, args):
        if isinstance(fake, torch.SymInt):
            bind(fake, real)
        elif isinstance(fake, torch.Tensor) and isinstance(real, torch.Tensor):
            for fake_size, real_size in zip(fake.shape, real.shape):
                if isinstance(fake_size, torch.SymInt):
                    bind(fake_size, real_size)
    return bindings


def evaluate_shape(shape: Sequence[Size], bindings: Dict[Any, int]) -> Optional[Tuple[int, ...]]:
    """A (possibly symbolic) shape for one call; None where a size is not determined by
    ``bindings``."""
    out = []
    for size in shape:
        if isinstance(size, torch.SymInt):
            expr = size.node.expr  # SymNode.expr: not public API
            value = bindings.get(expr) if expr.is_Symbol else expr.xreplace(bindings)
            if value is None:
                return None
            try:
                out.append(int(value))
            except (TypeError, ValueError):
                return None
        else:
            out.append(int(size))
    return tuple(out)


def concrete_shape(shape: Sequence[Size], bindings: Dict[Any, int]) -> Tuple[int, ...]:
    """A (possibly symbolic) shape evaluated for one call; every size must be bound."""
    out = []
    for size in shape:
        if isinstance(size, torch.SymInt):
            out.append(int(size.node.expr.xreplace(bindings)))  # SymNode.expr: not public API
        else:
            out.append(int(size))
    return tuple(out)


# --- fake inputs and shape guards -----------------------------------------------------------


class _FakeAPI(NamedTuple):
    local_source: Any
    fake_tensor_mode: Any
    shape_env: Any
    dim_dynamic: Any
    symbolic_context: Any


def _probe_fake_api() -> Optional[_FakeAPI]:
    """What building symbolic fakes needs; none of it is in a public namespace except ShapeEnv."""
    try:
        from torch._dynamo.source import LocalSource
        from torch._subclasses.fake_tensor import FakeTensorMode
        from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext
    except ImportError:
        return None
    return _FakeAPI(LocalSource, FakeTensorMode, ShapeEnv, DimDynamic, StatelessSymbolicContext)


@dataclass(frozen=True)
class SymbolicExample:
    """Fake example inputs whose dims are symbolic where Dynamo's are, in a fresh ShapeEnv
    (Dynamo's own has produced its guards and must not change after the fact)."""

    values: List[Any]
    #: How many leading values are the graph's own inputs (the rest are patch inputs).
    count: int
    shape_env: Any


def symbolic_example(example: Sequence[Any], layout: Sequence[Any]) -> Optional[SymbolicExample]:
    """Fakes for ``example`` following ``layout`` (per graph input: None static, "symint", or a
    tuple of per-dim "is symbolic"); values past the layout (patch inputs) are static fakes.

    None when this torch cannot build them: the caller then compiles for the call's exact
    sizes (one specialization per distinct size, still correct), as the warning says.
    """
    api = _probe_fake_api()
    if api is None:
        fallback("symbolic_example", "cannot build symbolic fake inputs; patched variants of a dynamic-shape graph "
                 "compile once per distinct input size")
        return None
    shape_env = api.shape_env()
    fake_mode = api.fake_tensor_mode(shape_env=shape_env)
    dynamic, static = api.dim_dynamic.DYNAMIC, api.dim_dynamic.STATIC
    count = len(layout)
    fakes: List[Any] = []
    for position, value in enumerate(example):
        entry = layout[position] if position < count else None
        # ``t<k>``: the names produce_guards_expression gives its placeholders, so the guard
        # text and evaluate_guards_expression agree on them.
        source = api.local_source(f"t{position}")
        if isinstance(value, torch.Tensor):
            if isinstance(entry, tuple) and value.dim() == len(entry):
                context = api.symbolic_context(
                    dynamic_sizes=[dynamic if symbolic else static for symbolic in entry],
                    constraint_sizes=[None] * value.dim(),
                )
                fakes.append(fake_mode.from_tensor(value, source=source, symbolic_context=context))
            else:
                fakes.append(fake_mode.from_tensor(value, static_shapes=True))
        elif entry == "symint" and isinstance(value, int) and not isinstance(value, bool):
            symbol = shape_env.create_symbol(value, source=source, dynamic_dim=dynamic)
            fakes.append(shape_env.create_symintnode(symbol, hint=value, source=source))
        else:
            fakes.append(value)
    return SymbolicExample(fakes, count, shape_env)


@dataclass(frozen=True)
class _GuardExpression:
    """The guards a compile recorded in its ShapeEnv, checked on a call's graph inputs.

    torch renders them as one Python expression over ``L['t<k>']``
    (``produce_guards_expression``) and evaluates it with ``evaluate_guards_expression``, its
    documented counterpart; the text never leaves torch's own pair, and no user text enters it.
    """

    shape_env: Any
    code: str
    count: int

    def __call__(self, args: Sequence[Any]) -> bool:
        return bool(self.shape_env.evaluate_guards_expression(self.code, list(args[: self.count])))

    def __repr__(self) -> str:
        return self.code


def _always(args: Sequence[Any]) -> bool:
    return True


def _probe_guard_api(shape_env: Any) -> Optional[Tuple[Callable[..., Optional[str]], Callable[..., bool]]]:
    produce = getattr(shape_env, "produce_guards_expression", None)
    evaluate = getattr(shape_env, "evaluate_guards_expression", None)
    return (produce, evaluate) if callable(produce) and callable(evaluate) else None


def shape_guard(example: SymbolicExample) -> Optional[GuardCheck]:
    """What a compile from ``example`` assumed about the graph inputs' sizes, as a check of a
    call's args; None when torch cannot say (the caller then guards on the exact sizes)."""
    api = _probe_guard_api(example.shape_env)
    if api is None:
        fallback("shape_guard", "ShapeEnv cannot produce and evaluate guard expressions; a patched variant of a "
                 "dynamic-shape graph is reused only for the exact sizes it was compiled for")
        return None
    produce, _ = api
    try:
        code = produce(list(example.values[: example.count]))
    except Exception as error:
        fallback("shape_guard", f"producing shape guards failed ({type(error).__name__}: {error}); a patched variant "
                 "of a dynamic-shape graph is reused only for the exact sizes it was compiled for")
        return None
    logger.debug("shape guards of a symbolic compile: %s", code)
    return _GuardExpression(example.shape_env, code, example.count) if code else _always
