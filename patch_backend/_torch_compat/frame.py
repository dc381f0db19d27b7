"""Frame and tracer facts: the Dynamo frame a graph comes from, read off the tracer.

A backend receives a GraphModule and example inputs; two facts the names need are not in them:

* which frame the graph comes from (the module whose ``forward`` is being traced, and whether
  the frame is a graph-break resume function), and
* how the frame's return value is structured (``output|logits``): Dynamo returns a flat tuple
  from the graph and rebuilds the user's structure in bytecode.

There is no public API for either, so we read the instruction translator that is calling the
backend. Every access is guarded: if a torch release changes these internals, naming degrades
(a result named ``output|sub_<k>``; at worst a frame whose graphs are not named at all) and
says so once with a ``PatchBackendWarning`` (gates.fallback), never failing or renaming silently.
"""

from __future__ import annotations

import contextlib
import dis
import inspect
import logging
import os
import sys
import threading
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Optional, Protocol, Tuple, Type, Union

import torch

from .eager_observer import _observe_eager_forward, code_parameters, forward_code
from .gates import fallback

if TYPE_CHECKING:
    from torch._dynamo.variables import TensorVariable

logger = logging.getLogger(__name__)

_FRAME_FALLBACK = (
    "cannot read the frame Dynamo is tracing ({reason}); its graphs are not tied to the module "
    "they run for, so that module's nodes cannot be named or patched"
)
_RETURN_FALLBACK = (
    "cannot read how the traced frame returns ({reason}); {effect}"
)
_NO_RESULT = "the frame's result gets no 'output' names"
_FLAT_RESULT = "a returned structure is named output|sub_<k> instead of after its keys"


#: A leaf of a returned structure: its path (``("sub_1", "sub_0")``, ``("logits",)``) and the fx
#: node holding it, or None for a non-tensor leaf (a number, None, a size).
ReturnLeaf = Tuple[Tuple[str, ...], Optional[str]]
#: A leaf of a module call's arguments: (position or keyword, path inside the argument, fx node
#: name or None).
ArgumentLeaf = Tuple[Union[int, str], Tuple[str, ...], Optional[str]]


@dataclass(frozen=True)
class ModuleReturn:
    """What one module call inlined into the traced frame returned, in return order.

    Dynamo inlines a module's call into its caller's graph and keeps only the ops, so which
    values the module *returned*, in which order, and which of them it passed through unchanged
    (an input, or a value computed before the call) is lost by the time the graph reaches the
    backend. The tracer knows it when the inlined call returns; this is read there.
    """

    #: The call's module stack, outermost first, as ``nn_module_stack`` spells it on the ops
    #: inside the call: (key, path text) pairs, the last being the called module.
    stack: Tuple[Tuple[str, str], ...]
    leaves: Tuple[ReturnLeaf, ...]
    #: Name of the graph's last node when the call returned ("" if the graph was empty): uses
    #: after it see the returned values, uses before it cannot.
    last_node: str
    #: The call's tensor arguments as the caller passed them: (position, or keyword name; path
    #: inside a structured argument; fx node name, or None for a non-tensor leaf). Dynamo keeps
    #: no record of which parameter a value was bound to once the call is inlined; the module's
    #: inputs are named from this (``c.inputs_2``), as for a forward compiled as its own frame.
    arguments: Tuple[ArgumentLeaf, ...] = ()
    #: When the call started and returned, in one sequence per traced frame: a value a module
    #: passes through meets the patches of each module it flows through in this order.
    call_order: int = 0
    return_order: int = 0


@dataclass
class FrameInfo:
    """What the backend learns about the frame a graph was traced from."""

    code_name: str = ""
    #: id() of the frame's code object: recompiles of one frame share it.
    code_id: int = 0
    #: The frame's code object itself (a module's forward, or whatever Dynamo was handed:
    #: a ``__call__`` override, a decorator's wrapper, a resume function).
    code: Any = field(default=None, repr=False)
    #: Name of the frame local holding the module (``self``; any name for the first argument).
    self_local: str = "self"
    #: Weak reference behind ``self_module``: Dynamo keeps a backend's result (and with it the
    #: capture holding this) for as long as the code stays cached, so a strong reference here
    #: would keep a deleted model, and all its patched variants, alive.
    self_module_ref: Optional["weakref.ref[torch.nn.Module]"] = field(default=None, repr=False)
    is_resume: bool = False
    #: For a resume function: the code object of the function it continues (e.g. a forward).
    original_code: Any = None
    #: True when the graph ends because the frame returned (not at a graph break).
    returns: bool = False
    #: Return-value leaves: (path inside the result, fx node name, or None for a non-tensor
    #: leaf); empty if unknown.
    return_leaves: List[Tuple[Tuple[str, ...], Optional[str]]] = field(default_factory=list)
    #: The frame code's ``*args`` / ``**kwargs`` local names (a decorator's ``wrapper(self,
    #: *args, **kwargs)`` or ``Module._call_impl`` when the traced frame is not ``forward``).
    varargs_local: Optional[str] = None
    varkw_local: Optional[str] = None
    #: Where the module sits inside ``self_local``: ``("0",)`` when a ``wrapper(*args, **kwargs)``
    #: decorator (transformers' ``deprecate_kwarg``) receives it as ``args[0]``.
    self_prefix: Tuple[str, ...] = ()
    #: The module calls Dynamo inlined into this graph, in the order they returned (empty when the
    #: tracer could not be read: module results are then named in graph order).
    module_returns: List[ModuleReturn] = field(default_factory=list)
    #: For a resume function: locals holding a module (``___stack0``: ``self.post`` loaded
    #: before the call that broke the graph, ``self.post(self.inner(x))``), weakly.
    stack_modules: Dict[str, "weakref.ref[torch.nn.Module]"] = field(default_factory=dict, repr=False)
    #: The same locals → the module's path below the forward's module (set by capture_graph):
    #: their parameters and ops belong to that module, as without the break.
    module_locals: Dict[str, Tuple[str, ...]] = field(default_factory=dict)

    @property
    def self_module(self) -> Optional[torch.nn.Module]:
        return self.self_module_ref() if self.self_module_ref is not None else None

    @self_module.setter
    def self_module(self, module: Optional[torch.nn.Module]) -> None:
        self.self_module_ref = weakref.ref(module) if module is not None else None


def _probe_current_tx() -> Optional[Callable[[], Any]]:
    """Dynamo's accessor for the instruction translator calling the backend (None if gone)."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        return InstructionTranslator.current_tx
    except (ImportError, AttributeError):
        return None


def _probe_return_reason(tx: Any) -> Optional[str]:
    """Why the graph was cut (``compile_subgraph_reason.reason``: "return_value" when the frame
    returned; "" when no reason is recorded), or None where the tracer does not say."""
    output = getattr(tx, "output", None)
    if output is None or not hasattr(output, "compile_subgraph_reason"):
        return None
    reason = output.compile_subgraph_reason
    if reason is None:
        return ""
    text = getattr(reason, "reason", None)
    return text if isinstance(text, str) else None


def current_frame_info() -> FrameInfo:
    """The facts about the frame Dynamo is compiling; call it from inside the backend."""
    info = FrameInfo()
    current_tx = _probe_current_tx()
    if current_tx is None:
        fallback("frame", _FRAME_FALLBACK.format(reason="InstructionTranslator.current_tx is missing"))
        return info
    try:
        tx = current_tx()
    except Exception as error:  # current_tx asserts a tracer is active in some releases
        tx = None
        logger.debug("no current instruction translator: %r", error)
    if tx is None:
        fallback("frame", _FRAME_FALLBACK.format(reason="the backend was called outside a Dynamo trace"))
        return info
    try:
        _read_frame(tx, info)
    except Exception as error:
        fallback("frame", _FRAME_FALLBACK.format(reason=f"{type(error).__name__}: {error}"))
        return FrameInfo()
    info.module_returns = [
        ModuleReturn(
            stack, tuple(_named(leaves)), getattr(last, "name", ""),
            tuple((key, path, node.name if node is not None else None) for key, path, node in arguments),
            call_order, return_order,
        )
        for stack, leaves, last, arguments, call_order, return_order in getattr(tx.output, _RETURNS_ATTRIBUTE, ())
    ]
    reason = _probe_return_reason(tx)
    if reason is None:
        fallback("frame_return", _RETURN_FALLBACK.format(reason="no compile_subgraph_reason on the tracer", effect=_NO_RESULT))
        return info
    try:
        info.returns = reason == "return_value"
        if info.returns and tx.stack:
            _walk(tx.stack[-1], (), info.return_leaves, depth=0)
            info.return_leaves = _named(info.return_leaves)
    except Exception as error:
        info.return_leaves = []
        fallback("frame_return", _RETURN_FALLBACK.format(reason=f"{type(error).__name__}: {error}", effect=_FLAT_RESULT))
    logger.debug("frame %s (resume=%s, returns=%s, self=%s)", info.code_name, info.is_resume, info.returns, info.self_local)
    return info


def _read_frame(tx: Any, info: FrameInfo) -> None:
    code = tx.f_code
    info.code_name = code.co_name
    info.code_id = id(code)
    info.code = code
    info.is_resume = code.co_name.startswith("torch_dynamo_resume_in_")
    _, info.varargs_local, info.varkw_local = code_parameters(code)
    # ``fn``: torch.compile of a built-in module (``nn.Linear``, ``nn.Sequential``) traces
    # Dynamo's ``wrap_inline`` wrapper ``inner(*args, **kwargs)``, which calls ``fn``.
    candidates = ["self", "fn"]
    if info.is_resume:
        # A resume function's locals keep the continued function's names: its first parameter
        # is the module whatever it is called (``def forward(s, x)``).
        info.original_code = _original_code(code)
        original = info.original_code
        if original is not None and int(getattr(original, "co_argcount", 0)) > 0:
            candidates.insert(0, original.co_varnames[0])
    elif code.co_argcount:
        candidates.insert(0, code.co_varnames[0])
    for local in candidates:
        value = tx.f_locals.get(local)
        if isinstance(value, torch.nn.Module):
            info.self_module, info.self_local = value, local
            break
    else:
        _read_varargs_self(tx, info)
    if info.is_resume:
        for local, value in tx.f_locals.items():
            if local != info.self_local and isinstance(value, torch.nn.Module):
                info.stack_modules[local] = weakref.ref(value)


def _read_varargs_self(tx: Any, info: FrameInfo) -> None:
    """The module as ``args[0]`` of a ``wrapper(*args, **kwargs)`` decorator."""
    varargs = info.varargs_local
    packed = tx.f_locals.get(varargs) if varargs and not info.is_resume else None
    if varargs and isinstance(packed, tuple) and packed and isinstance(packed[0], torch.nn.Module):
        info.self_module, info.self_local, info.self_prefix = packed[0], varargs, ("0",)


class _CodeTable(Protocol):
    """What is used of Dynamo's resume-code table (an ExactWeakKeyDictionary today)."""

    def get(self, code: Any, /) -> Any: ...


def _probe_resume_metadata() -> Optional[_CodeTable]:
    """Dynamo's table from a resume function's code to the code it continues (None if gone)."""
    try:
        from torch._dynamo.resume_execution import ContinueExecutionCache

        return ContinueExecutionCache.generated_code_metadata
    except (ImportError, AttributeError):
        return None


def _original_code(code: Any) -> Any:
    """The user function a resume function continues (resume functions can nest)."""
    metadata = _probe_resume_metadata()
    if metadata is None:
        fallback(
            "frame_resume",
            "cannot tell which function a graph-break resume function continues; a resume graph "
            "that uses no parameter is named as part of the model whose parameters ran last",
        )
        return None
    for _ in range(16):
        entry = metadata.get(code)
        if entry is None:
            return code
        code = entry.code
    return code


def _probe_variable_types() -> Optional[Tuple[Type["TensorVariable"], Tuple[type, ...]]]:
    """(tensor tracker type, non-tensor leaf tracker types) of Dynamo, or None if renamed."""
    try:
        from torch._dynamo.variables import ConstantVariable, SymNodeVariable, TensorVariable
    except ImportError:
        return None
    return TensorVariable, (ConstantVariable, SymNodeVariable)


def _named(leaves: List[Tuple[Tuple[str, ...], Any]]) -> List[ReturnLeaf]:
    """_walk's leaves with fx node names. Names are read at backend time, not while tracing:
    Dynamo renames a node after the local it is stored to (``logits = self.gate(x)``)."""
    return [(path, node.name if node is not None else None) for path, node in leaves]


def _walk(vt: Any, path: Tuple[str, ...], out: list, depth: int, realize: bool = True) -> None:
    """Collects tensor leaves of a returned VariableTracker with their structural path (the fx
    node, or None for a non-tensor leaf).

    Raises where the tracker no longer looks as expected; current_frame_info turns that into
    the ``output|sub_<k>`` fallback with a warning.
    """
    if depth > 8:
        return
    if hasattr(vt, "realize"):
        if not realize and callable(getattr(vt, "is_realized", None)) and not vt.is_realized():
            # Realizing would make Dynamo guard on (or lift) a value nothing traced has used:
            # a name is never worth changing the graph or its guards.
            return
        vt = vt.realize()
    types = _probe_variable_types()
    if types is None:
        raise LookupError("torch._dynamo.variables lacks TensorVariable/ConstantVariable/SymNodeVariable")
    tensor_type, value_types = types
    if isinstance(vt, tensor_type):
        out.append((path, vt.as_proxy().node))
        return
    if isinstance(vt, value_types):
        # A number, None or size in the result: no tensor to patch. Recorded (node None) so a
        # patch aimed at it is refused with that reason rather than as an unknown name.
        out.append((path, None))
        return
    items = getattr(vt, "items", None)
    if isinstance(items, (list, tuple)):
        for index, item in enumerate(items):
            _walk(item, path + (f"sub_{index}",), out, depth + 1, realize)
        return
    if isinstance(items, dict):
        _walk_dict(items, path, out, depth, realize)
        return
    dict_vt = getattr(vt, "_base_vt", None) or getattr(vt, "dict_vt", None)
    if dict_vt is not None and isinstance(getattr(dict_vt, "items", None), dict):
        _walk_dict(dict_vt.items, path, out, depth, realize)


def _walk_dict(items: Dict[Any, Any], path: Tuple[str, ...], out: list, depth: int, realize: bool = True) -> None:
    for key_tracker, value in items.items():
        key_vt = getattr(key_tracker, "vt", key_tracker)
        try:
            key = key_vt.as_python_constant()
        except Exception:
            continue
        _walk(value, path + (str(key),), out, depth + 1, realize)


# -- module results, read as inlined module calls return -------------------------------------

#: Attribute set on Dynamo's OutputGraph (one per tracing attempt, shared by the frame's inlining
#: tracers) holding its ModuleReturn records: a restarted trace starts from a fresh OutputGraph,
#: so records of an abandoned attempt never reach the backend.
_RETURNS_ATTRIBUTE = "_patch_backend_module_returns"
#: Attribute on the same OutputGraph counting module call and return events (ModuleReturn orders).
_EVENTS_ATTRIBUTE = "_patch_backend_module_events"
_RETURNS_FALLBACK = (
    "cannot read what inlined module calls return ({reason}); a module's several results are "
    "named output|sub_<k> in graph order, and a result it passes through unchanged has no name"
)
#: Per thread: one slot per module call being traced, innermost last; the slot receives the
#: call's module stack when Dynamo pushes it (record_nn_module_stack).
_calls = threading.local()


def _call_slots() -> List[List[Any]]:
    slots = getattr(_calls, "slots", None)
    if slots is None:
        slots = _calls.slots = []
    return slots


def _probe_module_call_sites() -> Optional[Tuple[Any, List[type]]]:
    """(Dynamo's nn_module variables module, the tracker classes whose ``call_function`` calls a
    module), or None where either is gone."""
    try:
        from torch._dynamo.variables import nn_module
    except ImportError:
        return None
    classes = [getattr(nn_module, name, None) for name in ("NNModuleVariable", "UnspecializedNNModuleVariable")]
    if not callable(getattr(nn_module, "record_nn_module_stack", None)) or not all(classes):
        return None
    return nn_module, [cls for cls in classes if cls is not None]


def _ours(function: Any) -> bool:
    """Whether ``function`` is one of this module's wrappers (the installs are idempotent)."""
    return bool(getattr(function, "__wrapped_by_patch_backend__", False))


def _mark(wrapper: Any) -> Any:
    """Marks ``wrapper`` as ours (``_ours``) and returns it."""
    wrapper.__wrapped_by_patch_backend__ = True
    return wrapper


def _install(owner: Any, name: str, wrapper: Any) -> None:
    """Puts the marked ``wrapper`` in place of ``owner.name``."""
    setattr(owner, name, _mark(wrapper))


def _recording_stack(original: Callable[..., Any]) -> Callable[..., Any]:
    @contextlib.contextmanager
    def record_nn_module_stack(module_key: str, source: Any, tx: Any, mod: Any) -> Iterator[None]:
        with original(module_key, source, tx, mod):
            slots = _call_slots()
            # Only the push of this very call's module fills its slot (an explicit
            # ``self.sub.forward(x)`` inside it pushes too, without a call of its own).
            if slots and slots[-1][0] is None and slots[-1][1] in (None, id(mod)):
                try:
                    slots[-1][0] = tuple(
                        (key, value[0] if isinstance(value, tuple) else str(value))
                        for key, value in tx.nn_module_stack.items()
                    )
                except Exception as error:  # never break a trace for a name
                    fallback("module_returns", _RETURNS_FALLBACK.format(reason=f"{type(error).__name__}: {error}"))
            yield

    return _mark(record_nn_module_stack)


def _next_event(tx: Any) -> int:
    """The next number in the traced frame's sequence of module call and return events."""
    output = tx.output
    count = getattr(output, _EVENTS_ATTRIBUTE, 0)
    setattr(output, _EVENTS_ATTRIBUTE, count + 1)
    return int(count)


def _recording_call(original: Callable[..., Any]) -> Callable[..., Any]:
    def call_function(self: Any, tx: Any, args: Any, kwargs: Any) -> Any:
        slots = _call_slots()
        module = getattr(self, "value", None)
        slots.append([None, id(module) if isinstance(module, torch.nn.Module) else None])
        try:
            call_order = _next_event(tx)
        except Exception:  # never break a trace for a name
            call_order = 0
        try:
            result = original(self, tx, args, kwargs)
        finally:
            stack = slots.pop()[0]
        if stack is not None:
            try:
                _record_return(tx, stack, result, args, kwargs, call_order)
            except Exception as error:  # never break a trace for a name
                # Reading the result's structure is the frame result's reader too (_walk): one
                # cause, one warning (gate "frame_return").
                fallback("frame_return", _RETURN_FALLBACK.format(
                    reason=f"{type(error).__name__}: {error}",
                    effect=_FLAT_RESULT + "; a module's several results in graph order, a passed-through one unnamed",
                ))
        return result

    return _mark(call_function)


def _record_return(
    tx: Any, stack: Tuple[Tuple[str, str], ...], result: Any, args: Any = (), kwargs: Any = None, call_order: int = 0
) -> None:
    """Keeps (stack, leaves with fx nodes, the graph's last node, the call's argument leaves,
    call and return order) on the OutputGraph; nodes, not names, because Dynamo renames nodes
    later (current_frame_info reads the final names). Arguments are read after the call, so an
    argument the module used is realized; one it never touched is not (and has no node)."""
    leaves: List[Tuple[Tuple[str, ...], Any]] = []
    _walk(result, (), leaves, depth=0, realize=False)
    arguments: List[Tuple[Union[int, str], Tuple[str, ...], Any]] = []
    keyed: List[Tuple[Union[int, str], Any]] = list(enumerate(args or ()))
    keyed += [(str(key), value) for key, value in (kwargs or {}).items()]
    for key, value in keyed:
        found: List[Tuple[Tuple[str, ...], Any]] = []
        try:
            _walk(value, (), found, depth=0, realize=False)
        except Exception as error:  # an argument that cannot be read stays unnamed (input_<k>)
            logger.debug("argument %r of a module call not read: %r", key, error)
            continue
        arguments.extend((key, path, node) for path, node in found)
    output = tx.output
    last = None
    for node in reversed(output.graph.nodes):
        last = node
        break
    records = getattr(output, _RETURNS_ATTRIBUTE, None)
    if records is None:
        records = []
        setattr(output, _RETURNS_ATTRIBUTE, records)
    records.append((stack, leaves, last, arguments, call_order, _next_event(tx)))


def install_return_recorder() -> bool:
    """Wraps Dynamo's module-call tracing so each inlined module call's result is recorded
    (ModuleReturn). Idempotent; the wrappers only read and never change what Dynamo traces.
    Returns False (after warning once) where this torch lacks the hooks."""
    probed = _probe_module_call_sites()
    if probed is None:
        fallback("module_returns", _RETURNS_FALLBACK.format(reason="torch._dynamo.variables.nn_module changed"))
        return False
    module, classes = probed
    if not _ours(module.record_nn_module_stack):
        module.record_nn_module_stack = _recording_stack(module.record_nn_module_stack)
    for cls in classes:
        original = cls.__dict__.get("call_function")
        if original is not None and not _ours(original):
            setattr(cls, "call_function", _recording_call(original))
    return True


# -- recurrent modules under this package's backends ------------------------------------------

_RNN_FALLBACK = (
    "cannot let Dynamo trace nn.RNN/GRU/LSTM for this package's backends ({reason}); Dynamo runs "
    "a forward calling one eagerly, so its modules have no names (a patch there raises "
    "PatchNotAppliedError when its context exits)"
)
#: Module prefix of the functions this package registers as Dynamo backends.
_BACKEND_MODULE = __name__.split(".")[0] + "."


def _probe_wrap_module() -> Optional[Tuple[type, Any]]:
    """(Dynamo's VariableBuilder, its config module) where ``wrap_module`` and ``allow_rnn`` exist."""
    try:
        from torch._dynamo import config
        from torch._dynamo.variables.builder import VariableBuilder
    except ImportError:
        return None
    if not callable(getattr(VariableBuilder, "wrap_module", None)) or not hasattr(config, "allow_rnn"):
        return None
    return VariableBuilder, config


def _compiling_for_this_package(tx: Any) -> bool:
    """Whether the frame being traced is compiled for ``graphpatch``/``graphpatch_eager`` (the
    backend Dynamo calls is a wrapper chain around ours)."""
    backend = getattr(getattr(tx, "output", None), "compiler_fn", None)
    for _ in range(8):
        if backend is None:
            return False
        if str(getattr(backend, "__module__", "") or "").startswith(_BACKEND_MODULE):
            return True
        backend = (
            getattr(backend, "compiler_fn", None)
            or getattr(backend, "func", None)
            or getattr(backend, "_torchdynamo_orig_backend", None)
            or getattr(backend, "__wrapped__", None)
        )
    return False


def install_rnn_tracing() -> bool:
    """Lets Dynamo trace ``nn.RNN``/``GRU``/``LSTM`` (``torch._dynamo.config.allow_rnn``) in frames
    compiled for this package's backends only. Without it Dynamo gives up on the whole forward
    that calls one and runs it eagerly, so no module of the model is named or patchable; traced,
    the recurrent module is one op (``lstm.output|sub_0``) and everything around it keeps its
    names. Other backends and other compiles see Dynamo's own setting."""
    probed = _probe_wrap_module()
    if probed is None:
        fallback("rnn", _RNN_FALLBACK.format(reason="VariableBuilder.wrap_module or config.allow_rnn is gone"))
        return False
    builder, config = probed
    original = builder.__dict__.get("wrap_module")
    if original is None or _ours(original):
        return original is not None

    def wrap_module(self: Any, value: Any) -> Any:
        if (
            isinstance(value, (torch.nn.RNNBase,))
            and not config.allow_rnn
            and _compiling_for_this_package(getattr(self, "tx", None))
        ):
            with config.patch(allow_rnn=True):
                return original(self, value)
        return original(self, value)

    _install(builder, "wrap_module", wrap_module)
    return True


# -- returned inputs leave through the graph --------------------------------------------------

_PASSTHROUGH_FALLBACK = (
    "cannot make a frame return its unchanged inputs through the graph ({reason}); a patch on "
    "a value a forward compiled as its own frame returns unchanged (an input, or a value of an "
    "earlier graph) does not reach what the forward returns"
)
#: Per thread: True while Dynamo generates the return of a frame compiled for this package.
_returning = threading.local()


def _probe_return_codegen() -> Optional[Tuple[type, type]]:
    """(Dynamo's OutputGraph, PyCodegen) where ``compile_subgraph`` and ``restore_stack`` with
    its ``value_from_source`` flag exist, else None."""
    try:
        from torch._dynamo.codegen import PyCodegen
        from torch._dynamo.output_graph import OutputGraph
    except ImportError:
        return None
    restore = PyCodegen.__dict__.get("restore_stack")
    if not callable(OutputGraph.__dict__.get("compile_subgraph")) or not callable(restore):
        return None
    if "value_from_source" not in inspect.signature(restore).parameters:
        return None
    return OutputGraph, PyCodegen


def install_returned_inputs_through_graph() -> bool:
    """Makes a frame compiled for this package return tensors it did not compute (its inputs,
    passed through unchanged) as outputs of its graph, as ``torch.export`` does
    (``restore_stack(value_from_source=False)``), instead of reloading them from the frame's
    locals. Only so can a patch on such a value reach what the frame returns: a T5 block whose
    forward graph-breaks returns the ``position_bias`` it received, and ``block_1.output|sub_1``
    (or ``block_1.position_bias``) must change what the caller gets, exactly as when the block
    is inlined. Only frames returning (not graph breaks), only for this package's backends; an
    unpatched graph returns the input object itself (AOTAutograd keeps an output that is an
    input). Idempotent; False (after warning once) where this torch lacks the hooks."""
    probed = _probe_return_codegen()
    if probed is None:
        fallback("passthrough", _PASSTHROUGH_FALLBACK.format(reason="OutputGraph.compile_subgraph or "
                                                             "PyCodegen.restore_stack changed"))
        return False
    output_graph, codegen = probed
    compile_subgraph = output_graph.__dict__["compile_subgraph"]
    restore_stack = codegen.__dict__["restore_stack"]
    if _ours(compile_subgraph):
        return True

    def wrapped_compile_subgraph(self: Any, tx: Any, reason: Any, *args: Any, **kwargs: Any) -> Any:
        returning = False
        try:
            returning = getattr(reason, "reason", None) == "return_value" and _compiling_for_this_package(tx)
        except Exception as error:  # never break a trace for a name
            logger.debug("return codegen not adjusted: %r", error)
        previous = getattr(_returning, "active", False)
        _returning.active = returning
        try:
            return compile_subgraph(self, tx, reason, *args, **kwargs)
        finally:
            _returning.active = previous

    def wrapped_restore_stack(self: Any, stack_values: Any, *, value_from_source: bool = True) -> Any:
        if getattr(_returning, "active", False):
            value_from_source = False
        return restore_stack(self, stack_values, value_from_source=value_from_source)

    _install(codegen, "restore_stack", wrapped_restore_stack)
    _install(output_graph, "compile_subgraph", wrapped_compile_subgraph)
    return True


# -- a forward ending in ``return self.sub(x)`` keeps its result ------------------------------

_EMPTY_RETURN_FALLBACK = (
    "cannot let Dynamo compile the empty remainder of a forward that returns a submodule's "
    "result directly ({reason}); when that submodule's forward graph-breaks, the forward's own "
    "'output' is not named (the submodule's '<scope>.output' holds the same value)"
)


def _probe_frame_return() -> Optional[Tuple[type, Any]]:
    """(Dynamo's InstructionTranslator, its config) where ``_return`` and ``allow_empty_graphs``
    exist, else None."""
    try:
        from torch._dynamo import config
        from torch._dynamo.symbolic_convert import InstructionTranslator
    except ImportError:
        return None
    if not callable(InstructionTranslator.__dict__.get("_return")) or not hasattr(config, "allow_empty_graphs"):
        return None
    return InstructionTranslator, config


def _returns_a_tensor(tx: Any) -> bool:
    leaves: List[Tuple[Tuple[str, ...], Any]] = []
    if not getattr(tx, "stack", None):
        return False
    _walk(tx.stack[-1], (), leaves, depth=0, realize=False)
    return any(node is not None for _, node in leaves)


def install_empty_return_graphs() -> bool:
    """Lets Dynamo compile (``config.allow_empty_graphs``) the remainder of a module's forward
    that only returns what the call before it returned: ``return self.mlp(x)`` where ``mlp``'s
    forward graph-breaks leaves the caller a resume function with no op, which Dynamo would run
    eagerly, so the caller's (the model's) ``output`` would have no graph to be named in. The
    graph compiled instead has the returned tensors as inputs and outputs (the returned inputs
    leave through the graph: install_returned_inputs_through_graph), so ``output`` is named
    and a patch there reaches what the model returns. Only graph-break resume functions, only
    those returning a tensor, only for this package's backends."""
    probed = _probe_frame_return()
    if probed is None:
        fallback("empty_return", _EMPTY_RETURN_FALLBACK.format(reason="InstructionTranslator._return or "
                                                               "config.allow_empty_graphs is gone"))
        return False
    translator, config = probed
    original = translator.__dict__["_return"]
    if _ours(original):
        return True

    def _return(self: Any, inst: Any) -> Any:
        allow = False
        try:
            allow = (
                not config.allow_empty_graphs
                and str(getattr(getattr(self, "f_code", None), "co_name", "")).startswith("torch_dynamo_resume_in_")
                and _compiling_for_this_package(self)
                and _returns_a_tensor(self)
            )
        except Exception as error:  # never break a trace for a name
            logger.debug("empty return graph not allowed: %r", error)
        if allow:
            with config.patch(allow_empty_graphs=True):
                return original(self, inst)
        return original(self, inst)

    _install(translator, "_return", _return)
    return True


# -- forwards Dynamo runs eagerly ---------------------------------------------------------------

#: Modules whose forward Dynamo gave up on ("falling back to eager"), with Dynamo's reason.
_eager_forwards: "weakref.WeakKeyDictionary[torch.nn.Module, str]" = weakref.WeakKeyDictionary()
#: The same by forward code: Dynamo skips the code for every later instance without tracing it.
_eager_codes: "weakref.WeakKeyDictionary[Any, str]" = weakref.WeakKeyDictionary()
_eager_lock = threading.Lock()


def _probe_graph_break_log() -> Optional[type]:
    """The tracer class whose ``log_graph_break`` reports why a frame is skipped, if any."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslatorBase
    except ImportError:
        return None
    for cls in InstructionTranslatorBase.__mro__:
        if callable(cls.__dict__.get("log_graph_break")):
            return cls
    return None


def _reason_line(exc: Any) -> str:
    """Dynamo's short name for the graph break (``gb_type``), else its message's first line."""
    kind = getattr(exc, "gb_type", None)
    if isinstance(kind, str) and kind:
        return kind
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def install_eager_fallback_log() -> bool:
    """Records which modules' forwards Dynamo runs eagerly, and why, so that a model with no
    graph gets an error saying so (eager_fallback_reason) rather than "call it once"."""
    cls = _probe_graph_break_log()
    if cls is None:
        fallback("eager_log", "cannot tell which forwards Dynamo runs eagerly; a model with no graph is "
                 "reported as not called yet")
        return False
    original = cls.__dict__["log_graph_break"]
    if _ours(original):
        return True

    def log_graph_break(self: Any, code_options: Any, reason: str, exc: Any) -> Any:
        try:
            if "falling back to eager" in reason:
                f_locals = getattr(self, "f_locals", {}) or {}
                code = getattr(self, "f_code", None)
                first = f_locals.get(code.co_varnames[0]) if code is not None and code.co_argcount else None
                module = first if isinstance(first, torch.nn.Module) else f_locals.get("self")
                if isinstance(module, torch.nn.Module):
                    with _eager_lock:
                        _eager_forwards[module] = _reason_line(exc)
                        if code is not None:
                            _eager_codes[code] = _reason_line(exc)
                    if code is not None and _compiling_for_this_package(self):
                        links = _eager_caller_links(module, f_locals) if code is forward_code(module) else ()
                        _observe_eager_forward(module, code, _reason_line(exc), returning_callers(module), links)
        except Exception as error:  # never break a trace for a message
            logger.debug("eager fallback not recorded: %r", error)
        return original(self, code_options, reason, exc)

    _install(cls, "log_graph_break", log_graph_break)
    return True


def eager_fallback_reason(module: torch.nn.Module) -> Optional[str]:
    """Dynamo's reason for running ``module``'s forward eagerly, if it did."""
    code = forward_code(module)
    with _eager_lock:
        reason = _eager_forwards.get(module)
        return reason if reason is not None or code is None else _eager_codes.get(code)


# -- the Python caller of a module frame ------------------------------------------------------

_TORCH_DIR = os.path.dirname(torch.__file__)
_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass(frozen=True)
class CallerFrame:
    """The module forward (or its graph-break resume function) that called a module whose
    forward Dynamo is compiling as its own frame."""

    module: torch.nn.Module
    #: The caller's locals right now (the frame is suspended in the call).
    locals: Dict[str, Any]
    #: The caller module's own ``forward`` code (not Dynamo's rewrite of it).
    forward_code: Any
    #: What the caller's forward received, per parameter (bound from the ``Module._call_impl``
    #: call that runs it), or None where that call is not on the stack.
    received: Optional[Dict[str, Any]] = None


@dataclass(frozen=True)
class CallerLink:
    """A calling forward whose own arguments a module's frame holds as inputs, unchanged (see
    ``GraphCapture.caller_links``): frame input local → the caller's parameter name."""

    module_ref: "weakref.ref[torch.nn.Module]" = field(repr=False)
    arguments: Dict[str, str]

    @property
    def module(self) -> Optional[torch.nn.Module]:
        return self.module_ref()


def find_callers(module: Optional[torch.nn.Module], forward: Any = None, depth: int = 64) -> List[CallerFrame]:
    """The forwards calling ``module`` (the call being compiled), the nearest first: each runs
    the forward of a module containing the one before, with no other Python frame outside torch
    and this package between them. ``module`` None: the module running ``forward`` in the
    nearest frame that runs it (a graph of that forward as it runs: one graph may serve several
    instances). Only plain Python frame introspection, while the callers are suspended in the
    call."""
    callers: List[CallerFrame] = []
    frame: Any = sys._getframe(1)
    if module is None:
        running = _running_module(frame, forward, depth)
        if running is None:
            return callers
        frame, module = running
    while True:
        found = _next_caller(frame, module, depth)
        if found is None:
            return callers
        frame, caller = found
        callers.append(caller)
        module = caller.module


def _next_caller(frame: Any, module: torch.nn.Module, depth: int) -> Optional[Tuple[Any, CallerFrame]]:
    """Above ``frame``: the nearest frame outside torch and this package running the forward
    of a module containing ``module``, with that forward's facts, or None. The frames of
    ``module``'s own forward (the original frame of a resume function) are passed over, and so
    are the frames of the call itself between the two (a decorator's wrapper around the
    forward, a ``__call__`` override: transformers' ``GradientCheckpointingLayer``); any other
    frame in between means the call was not made by the forward directly."""
    between: List[Any] = []
    for _ in range(depth):
        frame = frame.f_back
        if frame is None:
            return None
        filename = frame.f_code.co_filename
        if filename.startswith(_TORCH_DIR) or filename.startswith(_PACKAGE_DIR):
            continue
        code = frame.f_code
        if _forward_name(code.co_name) != "forward":
            # Not a module's forward. Its ``f_locals`` is read only once a forward above it is
            # found (it then ends with that forward's call): on a frame that outlives the model,
            # the snapshot of its locals would keep the model alive after a ``del model``.
            between.append(frame)
            continue
        if _runs(code, forward_code(module)):
            continue  # the forward itself, or the frame a resume function of it continues
        caller = _frame_module(frame)
        if caller is None or not any(child is module for child in caller.modules()):
            return None
        if any(_call_module(wrapper) is not module for wrapper in between):
            return None
        return frame, CallerFrame(caller, dict(frame.f_locals), forward_code(caller), _received_arguments(frame, caller))
    return None


def _call_module(frame: Any) -> Any:
    """The module a frame of a module call runs for: its first argument (``self`` of a
    ``__call__`` override), or ``args[0]`` of a decorator's ``wrapper(*args, **kwargs)``."""
    code = frame.f_code
    f_locals = frame.f_locals
    if code.co_argcount:
        return f_locals.get(code.co_varnames[0])
    _, varargs, _ = code_parameters(code)
    arguments = f_locals.get(varargs) if varargs else None
    return arguments[0] if isinstance(arguments, tuple) and arguments else None


def _forward_name(name: str) -> str:
    """A function's name, less Dynamo's resume prefixes (``torch_dynamo_resume_in_forward_at_12``,
    possibly nested, is ``forward``)."""
    while name.startswith("torch_dynamo_resume_in_"):
        name = name[len("torch_dynamo_resume_in_"):].rsplit("_at_", 1)[0]
    return name


def _frame_module(frame: Any) -> Optional[torch.nn.Module]:
    """The module whose forward ``frame`` runs (the forward, Dynamo's rewrite of it, or a
    graph-break resume function of it, whose arguments are the live locals in Dynamo's order),
    or None."""
    code = frame.f_code
    f_locals = frame.f_locals
    first = f_locals.get(code.co_varnames[0]) if code.co_argcount else None
    for value in (first, f_locals.get("self"), *f_locals.values()):
        if isinstance(value, torch.nn.Module) and _runs(code, forward_code(value)):
            return value
    if code.co_name.startswith("torch_dynamo_resume_in_"):
        # A resume function may hold only what its rest needs (``self.inner`` loaded before
        # the break, not ``self``): the frame it continues, which called it, holds the module.
        back = frame.f_back
        for _ in range(8):
            if back is None:
                break
            if back.f_code.co_filename == code.co_filename:
                module = _frame_module(back)
                return module if module is not None and _runs(code, forward_code(module)) else None
            back = back.f_back
    return None


def _running_module(frame: Any, forward: Any, depth: int) -> Optional[Tuple[Any, torch.nn.Module]]:
    """Above ``frame``: the nearest frame running ``forward``, and its module (the forward's
    first argument)."""
    for _ in range(depth):
        frame = frame.f_back
        if frame is None:
            return None
        code = frame.f_code
        if _runs(code, forward):
            module = _call_module(frame)  # ``self``, or a decorator's ``args[0]``
            if not isinstance(module, torch.nn.Module):
                module = _frame_module(frame)  # a resume function: its arguments are live locals
            return (frame, module) if isinstance(module, torch.nn.Module) else None
    return None


def _continued_by(code: Any, resume: Any) -> bool:
    """Whether a frame running ``code`` is one that the graph-break resume function ``resume``
    continues (Dynamo's rewrite of the same function, or an outer resume function of it; the
    rewrite covers only the lines up to its break, so its own line range cannot tell)."""
    return (
        resume.co_name.startswith("torch_dynamo_resume_in_")
        and code.co_filename == resume.co_filename
        and _forward_name(code.co_name) == _forward_name(resume.co_name)
        and code.co_firstlineno <= resume.co_firstlineno
    )


def _runs(code: Any, forward: Any) -> bool:
    """Whether a frame's ``code`` runs ``forward``: the forward itself, Dynamo's rewrite of it,
    or a graph-break resume function of it (the same file, starting within its lines)."""
    if forward is None or code.co_filename != forward.co_filename:
        return False
    first, last = _line_range(forward)
    return first <= code.co_firstlineno <= last


def _unchanged_arguments(caller: CallerFrame) -> List[str]:
    """The caller's parameters that hold, at the call, the tensor the caller received."""
    code = caller.forward_code
    parameters = code.co_varnames[1 : code.co_argcount + code.co_kwonlyargcount]
    local_values = caller.locals
    if caller.received is None:
        assigned = assigned_locals(code)
        return [name for name in parameters if name not in assigned and isinstance(local_values.get(name), torch.Tensor)]
    return [
        name for name in parameters
        if isinstance(local_values.get(name), torch.Tensor) and caller.received.get(name) is local_values[name]
    ]


def passed_arguments(
    callers: List[CallerFrame], values: Dict[str, Any]
) -> List[Tuple[torch.nn.Module, Dict[str, str]]]:
    """Per calling forward up the call chain (``callers``, the nearest first), which of the
    called forward's arguments (``values``: parameter or input local → the tensor) are that
    caller's own arguments, passed on unchanged (local → the caller's parameter); stops at the
    first caller that passed none of them on."""
    links: List[Tuple[torch.nn.Module, Dict[str, str]]] = []
    for caller in callers:
        pairs: Dict[str, str] = {}
        for name in _unchanged_arguments(caller):
            for local, value in values.items():
                if value is caller.locals[name] and local not in pairs:
                    pairs[local] = name
        if not pairs:
            break
        links.append((caller.module, pairs))
        values = {local: values[local] for local in pairs}
    return links


def _eager_caller_links(
    module: torch.nn.Module, arguments: Dict[str, Any]
) -> Tuple[Tuple[torch.nn.Module, Tuple[Tuple[str, str], ...]], ...]:
    """For a forward Dynamo gave up on, about to run eagerly with ``arguments``: per calling
    forward up the call chain (the nearest first), which of its own arguments it passed on
    unchanged, as (forward parameter, caller's parameter) pairs; see ``GraphCapture.caller_links``
    for the same on a compiled frame."""
    values = {name: value for name, value in arguments.items() if isinstance(value, torch.Tensor) and name != "self"}
    return tuple((caller, tuple(pairs.items())) for caller, pairs in passed_arguments(find_callers(module), values))


def _received_arguments(frame: Any, module: torch.nn.Module, depth: int = 16) -> Optional[Dict[str, Any]]:
    """The arguments ``module``'s forward was called with, bound to its parameters: read from
    the ``Module._call_impl`` frame that called it (above ``frame``, the forward or a resume
    function of it), whose ``args``/``kwargs`` still hold them after the forward reassigned its
    own locals. None where no such frame is found or the arguments do not bind."""
    for _ in range(depth):
        frame = frame.f_back
        if frame is None:
            return None
        if frame.f_code.co_name != "_call_impl" or not frame.f_code.co_filename.startswith(_TORCH_DIR):
            continue
        f_locals = frame.f_locals
        if f_locals.get("self") is not module:
            continue
        try:
            bound = inspect.signature(module.forward).bind(*f_locals.get("args", ()), **f_locals.get("kwargs", {}))
        except (TypeError, ValueError):
            return None
        return dict(bound.arguments)
    return None


#: A place in the code calling a module: (file, line, column), the call's own position.
CallSite = Tuple[str, Optional[int], Optional[int]]

_code_lines: "weakref.WeakKeyDictionary[Any, Tuple[int, int]]" = weakref.WeakKeyDictionary()
_code_positions: "weakref.WeakKeyDictionary[Any, Tuple[Tuple[Optional[int], Optional[int]], ...]]" = (
    weakref.WeakKeyDictionary()
)


def _line_range(code: Any) -> Tuple[int, int]:
    found = _code_lines.get(code)
    if found is None:
        lines = [line for _, _, line in code.co_lines() if line is not None]
        found = _code_lines[code] = (code.co_firstlineno, max(lines, default=code.co_firstlineno))
    return found


def _position(code: Any, offset: int) -> Tuple[Optional[int], Optional[int]]:
    """(line, column) of the instruction at byte ``offset`` of ``code``."""
    positions = _code_positions.get(code)
    if positions is None:
        positions = _code_positions[code] = tuple((line, column) for line, _, column, _ in code.co_positions())
    index = offset // 2
    return positions[index] if 0 <= index < len(positions) else (None, None)


def call_path(
    forward: Any, module: Optional[torch.nn.Module] = None,
    callers: Optional[List[Optional[torch.nn.Module]]] = None, depth: int = 48,
) -> Optional[Tuple[CallSite, ...]]:
    """Where the running call of a module's forward (code ``forward``) was made, as the
    positions of the calls on the way to it: the call in the nearest Python frame outside torch
    and this package that is not a frame of that forward (Dynamo's rewrite of it, or a
    graph-break resume function of it), then the call in each enclosing frame that runs a
    module's forward (so ``inner`` called from ``block``'s forward is told apart between
    ``block``'s two calls). Dynamo keeps the original instructions' positions in its rewrites
    and resume functions, so one call in the source is one site however the callers' frames
    were split. The frames of the call itself between the caller and the forward (a
    decorator's wrapper, a ``__call__`` override) are passed over: ``module`` is the module
    called (read off the forward's own frame where not given: while it is compiled, the frame
    does not run yet). Only plain Python frame introspection; ``callers``, if given, receives
    per site the module whose forward made that call (None where unknown), for a new path
    only. None if not found."""
    sites: List[CallSite] = []
    frame: Any = sys._getframe(1)
    last = forward  # the code of the frame the latest site is in
    given = module is not None
    for _ in range(depth):
        frame = frame.f_back
        if frame is None:
            break
        code = frame.f_code
        if code.co_filename.startswith(_TORCH_DIR) or code.co_filename.startswith(_PACKAGE_DIR):
            continue
        if sites:
            if _continued_by(code, last):
                continue  # the same forward: the frame a resume function continues
            if _forward_name(code.co_name) != "forward":
                break  # not a module's forward (the user's code calling the model, for one)
        elif _runs(code, forward):
            if not given:  # the outermost frame of the forward (not a resume function) tells
                found = _call_module(frame)
                module = found if isinstance(found, torch.nn.Module) else module
            continue
        elif module is not None and _forward_name(code.co_name) != "forward" and _call_module(frame) is module:
            continue  # a wrapper of the call itself
        line, column = _position(code, frame.f_lasti)
        sites.append((code.co_filename, line, column))
        last = code
        if callers is not None:
            callers.append(_frame_module(frame) if _forward_name(code.co_name) == "forward" else None)
    return tuple(sites) or None


def continued_frame_locals(original_code: Any, depth: int = 64) -> Optional[Dict[str, Any]]:
    """The locals of the suspended frame that a graph-break resume function continues: the
    frame running (Dynamo's rewrite of) ``original_code``, which called the resume function.

    Dynamo passes the live values to the resume function as arguments and leaves the original
    frame's own slots as the call bound them, so a forward parameter there still holds the
    argument the forward received. None when no such frame is on the stack. Only plain Python
    frame introspection, called from the backend while the frame is suspended."""
    if original_code is None:
        return None
    frame = sys._getframe(1)
    for _ in range(depth):
        frame = frame.f_back  # type: ignore[assignment]
        if frame is None:
            return None
        code = frame.f_code
        if (
            code.co_name == original_code.co_name
            and code.co_filename == original_code.co_filename
            and code.co_firstlineno == original_code.co_firstlineno
        ):
            return dict(frame.f_locals)
    return None


#: Instructions that may stand between a call and the ``RETURN_VALUE`` returning its result
#: (Dynamo's code for a frame that breaks at a call and then only returns pops what is below
#: the result): anything else uses the result or returns something else.
_STACK_ONLY = frozenset({"NOP", "CACHE", "SWAP", "POP_TOP", "EXTENDED_ARG"})


def _returns_call_result(frame: Any) -> bool:
    """Whether the frame, suspended in a call, returns that call's result as it is."""
    code, lasti = frame.f_code, frame.f_lasti
    found = False
    for instruction in dis.get_instructions(code):
        if not found:
            found = instruction.offset == lasti
            continue
        if instruction.opname == "RETURN_VALUE":
            return True
        if instruction.opname not in _STACK_ONLY:
            return False
    return False


def returning_callers(module: Optional[torch.nn.Module] = None, depth: int = 96) -> List[torch.nn.Module]:
    """The modules whose forward returns, as it is, what ``module``'s forward returns: its
    caller if that forward's statement is ``return self.<module>(...)``, that caller's caller if
    it does the same, and so on. Without a graph break in ``module``'s forward its result and the
    callers' are one value in one graph; with the break, Dynamo compiles nothing after the call
    in the callers (no op is left), so only ``module``'s last graph holds the callers' results.
    Only plain Python frame introspection, called while the callers are suspended in the call:
    from the backend (``module`` is the one whose forward is being compiled), or from a graph
    of that forward as it runs (None: the innermost module forward on the stack is ``module``).
    """
    chain: List[torch.nn.Module] = []
    between: List[Any] = []
    current = module
    frame = sys._getframe(1)
    for _ in range(depth):
        frame = frame.f_back  # type: ignore[assignment]
        if frame is None:
            break
        filename = frame.f_code.co_filename
        if filename.startswith(_TORCH_DIR) or filename.startswith(_PACKAGE_DIR):
            continue
        code = frame.f_code
        if _forward_name(code.co_name) != "forward" or not code.co_argcount:
            between.append(frame)  # a frame of the call itself, if a forward is found above
            continue
        owner = _frame_module(frame)
        if owner is None:
            break
        if current is None:
            current = owner
        if owner is current:
            continue  # the forward being compiled (or its rewrite calling the resume function)
        if not any(child is current for child in owner.modules()):
            break
        if any(_call_module(wrapper) is not current or not _returns_call_result(wrapper) for wrapper in between):
            break  # not made by the forward directly, or a wrapper that does not return it as is
        if not _returns_call_result(frame):
            break
        between.clear()
        chain.append(owner)
        current = owner
    return chain


_stores_cache: "weakref.WeakKeyDictionary[Any, frozenset]" = weakref.WeakKeyDictionary()


def assigned_locals(code: Any) -> frozenset:
    """Local names a function's code assigns or deletes (a parameter not among them holds the
    argument everywhere in the function)."""
    try:
        return _stores_cache[code]
    except (KeyError, TypeError):
        pass
    stores = frozenset(
        str(instruction.argval)
        for instruction in dis.get_instructions(code)
        if instruction.opname in ("STORE_FAST", "STORE_DEREF", "DELETE_FAST", "DELETE_DEREF", "STORE_NAME",
                                  "STORE_FAST_STORE_FAST", "STORE_FAST_LOAD_FAST")
    )
    # Python 3.13 packs two stores in one instruction; its argval is a pair.
    for instruction in dis.get_instructions(code):
        if instruction.opname == "STORE_FAST_STORE_FAST" and isinstance(instruction.argval, tuple):
            stores |= frozenset(str(name) for name in instruction.argval)
    try:
        _stores_cache[code] = stores
    except TypeError:
        pass
    return stores


def dynamo_wraps_top_frame() -> bool:
    """Whether Dynamo traces a compiled module's own ``__call__`` (and so its hooks) for every
    module: ``torch._dynamo.config.wrap_top_frame``, read here because it is private. Absent
    means no without a warning: releases before the flag never wrapped the top frame, which is
    what the flag's default (False) keeps."""
    return bool(getattr(torch._dynamo.config, "wrap_top_frame", False))


install_return_recorder()
install_rnn_tracing()
install_returned_inputs_through_graph()
install_empty_return_graphs()
install_eager_fallback_log()
