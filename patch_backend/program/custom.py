"""CustomPatch (and user Patch subclasses) inside compiled variants.

A callable is keyed by its code and by the *structure* of what it captures: captured tensors
become graph inputs, so ``lambda t: t + delta`` re-created in a loop with a new ``delta`` reuses
the variant; captured numbers and other objects are constants of the variant. A captured
ProbePatch from the same patch map reads this forward's value inside the graph. A callable that
cannot be traced runs as an opaque custom op (one warning per node), still without recompiles.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
import types
import weakref
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Set, Tuple, Union

import torch
from torch.fx.experimental.proxy_tensor import make_fx

from ..patches import CustomPatch, Patch, ProbePatch, RecordPatch
from .. import config

_CONSTANT_TYPES = (int, float, bool, str, bytes, type(None), torch.dtype, torch.device)


def patch_function(patch: Patch) -> Callable:
    """The callable a custom patch applies: ``custom_op``, or a Patch subclass's own ``op``."""
    return patch.custom_op if isinstance(patch, CustomPatch) else patch.op


def _cell_structure(value: Any, probe_positions: Dict[int, Any]) -> Any:
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.dtype, value.device, value.requires_grad)
    if isinstance(value, ProbePatch):
        position = probe_positions.get(id(value))
        if position is not None:
            return ("probe", position)
        return ("host-probe", _cell_structure(value.activation, probe_positions))
    if isinstance(value, RecordPatch):
        return ("record", tuple(_cell_structure(v, probe_positions) for v in value.activations))
    if isinstance(value, _CONSTANT_TYPES):
        return ("const", type(value), value)
    if isinstance(value, (tuple, list)) and len(value) < 64:
        return (type(value), tuple(_cell_structure(v, probe_positions) for v in value))
    return ("object", id(value))


def _parts(fn: Callable) -> Tuple[Optional[types.FunctionType], Optional[Any], Tuple[Any, ...]]:
    """(plain function, bound self or None, captured values) of a callable."""
    bound_self = None
    if isinstance(fn, types.MethodType):
        bound_self, fn = fn.__self__, fn.__func__
    if not isinstance(fn, types.FunctionType):
        return None, None, ()
    cells = tuple(cell.cell_contents for cell in (fn.__closure__ or ()))
    defaults = tuple(fn.__defaults__ or ())
    captured = cells + defaults
    if bound_self is not None:
        captured += tuple(vars(bound_self).values())
    return fn, bound_self, captured


def callable_structure(fn: Callable, probe_positions: Optional[Dict[int, Any]] = None) -> Any:
    function, bound_self, captured = _parts(fn)
    if function is None:
        return ("opaque-object", id(fn))
    probe_positions = probe_positions or {}
    return (
        function.__code__,
        type(bound_self),
        tuple(_cell_structure(value, probe_positions) for value in captured),
    )


class _ProbeStandIn:
    """What a captured ProbePatch looks like while the custom op is traced."""

    def __init__(self, activation: Any) -> None:
        self.activation = activation


class _RecordStandIn:
    def __init__(self, activations: List[Any]) -> None:
        self.activations = activations


@dataclass(frozen=True)
class CustomLowering:
    """How a custom callable enters the graph: ``call(value, probes, lifted)`` rebuilds it from
    the lifted tensors (``tensors``: runtime tensor slots) and the probes it reads."""

    call: Callable
    probes: Tuple[Any, ...]
    tensors: Tuple[int, ...]


@dataclass(frozen=True)
class _Lifted:
    """A captured tensor: ``lifted[position]`` of this callable (a graph input)."""

    position: int


@dataclass(frozen=True)
class _ProbeRead:
    """A captured ProbePatch of the same patch map: reads ``probes[position]`` of this forward."""

    position: int


@dataclass(frozen=True)
class _HostProbe:
    """A captured ProbePatch of another map: its activation as it was when captured."""

    activation: "_Captured"


@dataclass(frozen=True)
class _Record:
    activations: Tuple["_Captured", ...]


@dataclass(frozen=True)
class _Kept:
    """Any other captured value, used as it is (a constant of the variant)."""

    value: Any


_Captured = Union[_Lifted, _ProbeRead, _HostProbe, _Record, _Kept]


class _Lifter:
    """Flattens captured values into lifted tensors and referenced probes (same order always)."""

    def __init__(self, tensors: List[torch.Tensor], probe_positions: Dict[int, Any]) -> None:
        self.tensors = tensors
        self.start = len(tensors)
        self.probe_positions = probe_positions
        self.probes: List[Any] = []

    def lift(self, value: Any) -> _Captured:
        if isinstance(value, torch.Tensor):
            self.tensors.append(value)
            return _Lifted(len(self.tensors) - 1 - self.start)
        if isinstance(value, ProbePatch):
            position = self.probe_positions.get(id(value))
            if position is None:
                return _HostProbe(self.lift(value.activation))
            self.probes.append(position)
            return _ProbeRead(len(self.probes) - 1)
        if isinstance(value, RecordPatch):
            return _Record(tuple(self.lift(item) for item in value.activations))
        return _Kept(value)


def _rebuild(captured: _Captured, lifted: Sequence[Any], probes: Sequence[Any]) -> Any:
    if isinstance(captured, _Lifted):
        return lifted[captured.position]
    if isinstance(captured, _ProbeRead):
        return _ProbeStandIn(probes[captured.position])
    if isinstance(captured, _HostProbe):
        return _ProbeStandIn(_rebuild(captured.activation, lifted, probes))
    if isinstance(captured, _Record):
        return _RecordStandIn([_rebuild(item, lifted, probes) for item in captured.activations])
    return captured.value


def lower_custom(fn: Callable, tensors: List[torch.Tensor], probe_positions: Dict[int, Any]) -> CustomLowering:
    """Lifts the tensors ``fn`` captures onto ``tensors`` (the runtime tensor list being built)."""
    function, bound_self, captured = _parts(fn)
    lifter = _Lifter(tensors, probe_positions)
    layout = [lifter.lift(value) for value in captured]
    tensor_positions = tuple(range(lifter.start, len(tensors)))

    if function is None:
        return CustomLowering(_direct_call(fn), tuple(lifter.probes), tensor_positions)

    closure_count = len(function.__closure__ or ())
    default_count = len(function.__defaults__ or ())
    attribute_names = list(vars(bound_self).keys()) if bound_self is not None else []
    # Only what rebuilding needs: holding ``function`` or ``bound_self`` would keep the patch's
    # captured tensors alive for as long as the compiled variant.
    code, globals_, name, kwdefaults = function.__code__, function.__globals__, function.__name__, function.__kwdefaults__
    self_type = type(bound_self)

    def traced_call(value, probes, lifted):
        rebuilt = [_rebuild(entry, lifted, probes) for entry in layout]
        cells = tuple(types.CellType(v) for v in rebuilt[:closure_count])
        defaults = tuple(rebuilt[closure_count : closure_count + default_count]) or None
        clone = types.FunctionType(code, globals_, name, defaults, cells or None)
        clone.__kwdefaults__ = kwdefaults
        if self_type is type(None):
            return clone(value)
        stand_in = object.__new__(self_type)
        stand_in.__dict__.update(zip(attribute_names, rebuilt[closure_count + default_count :]))
        return clone(stand_in, value)

    return CustomLowering(traced_call, tuple(lifter.probes), tensor_positions)


def _direct_call(fn: Callable) -> Callable:
    """The graph target of a callable with nothing to lift (not a plain function or method):
    called as is. Named ``traced_call`` like the rebuilding target, since FX names the node
    after it."""

    def traced_call(value, probes, lifted):
        return fn(value)

    return traced_call


# -- opaque fallback ---------------------------------------------------------------------------
#: slot -> callable, for the variant call running in this thread/task. Set around each call
#: (``opaque_callables``), not globally: two threads running one variant with their own
#: CustomPatch each see their own callable, and a callable (with whatever it captures) is not
#: kept alive after the call.
_OPAQUE_CALLABLES: contextvars.ContextVar[Dict[int, Callable]] = contextvars.ContextVar(
    "patch_backend_opaque_callables", default={}
)
#: Per captured graph, the sites whose opaque custom patch was warned about: once per site
#: and model, not once per process (another model's site of the same name warns again).
_WARNED: "weakref.WeakKeyDictionary[Any, Set[str]]" = weakref.WeakKeyDictionary()
_WARNED_LOCK = threading.Lock()


@contextlib.contextmanager
def opaque_callables(callables: Dict[int, Callable]) -> Iterator[None]:
    token = _OPAQUE_CALLABLES.set(callables)
    try:
        yield
    finally:
        _OPAQUE_CALLABLES.reset(token)


@torch.library.custom_op("patch_backend::opaque_patch", mutates_args=())
def opaque_patch(value: torch.Tensor, slot: int) -> torch.Tensor:
    """Runs an untraceable patch callable eagerly inside a compiled variant."""
    result = _OPAQUE_CALLABLES.get()[slot](value.clone())
    if not isinstance(result, torch.Tensor) or result.shape != value.shape:
        raise RuntimeError(
            "an untraceable CustomPatch must return a tensor of its input's shape when compiled "
            f"(got {type(result).__name__} {getattr(result, 'shape', '')}, expected {tuple(value.shape)})"
        )
    return result.to(value.dtype).clone()


@opaque_patch.register_fake
def _(value: torch.Tensor, slot: int) -> torch.Tensor:
    return torch.empty_like(value)


def _no_gradient(ctx, grad_output):
    # The callable ran outside autograd's view; gradients stop here (documented limitation).
    return None, None


opaque_patch.register_autograd(_no_gradient)


def is_traceable(call: Callable, probes: int, lifted: Tuple[torch.Tensor, ...], value_meta: torch.Tensor) -> Optional[str]:
    """None if ``call(value, probes, lifted)`` traces with fake tensors; else the reason it does not."""
    stand_ins = tuple(torch.zeros(()) for _ in range(probes))

    def run(value, lifted_values):
        return call(value, stand_ins, lifted_values)

    try:
        make_fx(run, tracing_mode="fake")(value_meta, lifted)
    except Exception as error:  # any failure means: do not trace this callable
        return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
    return None


def warn_opaque(graph: Any, site_name: str, reason: str) -> None:
    """Warns once per (captured graph, site) that a custom patch runs opaque."""
    if not config.warn_opaque_custom:
        return
    with _WARNED_LOCK:
        warned = _WARNED.setdefault(graph, set())
        if site_name in warned:
            return
        warned.add(site_name)
    warnings.warn(
        f"patch_backend: the CustomPatch at {site_name!r} could not be traced ({reason}); it runs as an "
        "opaque op (eagerly, between compiled kernels); gradients do not flow through it",
        stacklevel=4,
    )
