"""The only module that reads Dynamo internals.

A backend receives a GraphModule and example inputs; two facts the names need are not in them:

* which frame the graph comes from (the module whose ``forward`` is being traced, and whether
  the frame is a graph-break resume function), and
* how the frame's return value is structured (``output|logits``): Dynamo returns a flat tuple
  from the graph and rebuilds the user's structure in bytecode.

There is no public API for either, so we read the instruction translator that is calling the
backend. Every access is guarded: if a torch release changes these internals, naming degrades
to the documented fallbacks (``input_<k>``, ``output|sub_<k>``) instead of failing.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch


@dataclass
class FrameInfo:
    """What the backend learns about the frame a graph was traced from."""

    code_name: str = ""
    #: id() of the frame's code object: recompiles of one frame share it.
    code_id: int = 0
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

    @property
    def self_module(self) -> Optional[torch.nn.Module]:
        return self.self_module_ref() if self.self_module_ref is not None else None

    @self_module.setter
    def self_module(self, module: Optional[torch.nn.Module]) -> None:
        self.self_module_ref = weakref.ref(module) if module is not None else None


def current_frame_info() -> FrameInfo:
    info = FrameInfo()
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        tx = InstructionTranslator.current_tx()
    except Exception:
        return info
    if tx is None:
        return info
    try:
        code = tx.f_code
        info.code_name = code.co_name
        info.code_id = id(code)
        info.is_resume = code.co_name.startswith("torch_dynamo_resume_in_")
        info.varargs_local, info.varkw_local = _star_locals(code)
        # ``fn``: torch.compile of a built-in module (``nn.Linear``, ``nn.Sequential``) traces
        # Dynamo's ``wrap_inline`` wrapper ``inner(*args, **kwargs)``, which calls ``fn``.
        candidates = ["self", "fn"]
        if code.co_argcount and not info.is_resume:
            candidates.insert(0, code.co_varnames[0])
        for local in candidates:
            value = tx.f_locals.get(local)
            if isinstance(value, torch.nn.Module):
                info.self_module, info.self_local = value, local
                break
        else:
            packed = tx.f_locals.get(info.varargs_local) if info.varargs_local and not info.is_resume else None
            if isinstance(packed, tuple) and packed and isinstance(packed[0], torch.nn.Module):
                info.self_module, info.self_local, info.self_prefix = packed[0], info.varargs_local, ("0",)
        if info.is_resume:
            info.original_code = _original_code(code)
    except Exception:
        pass
    try:
        reason = getattr(tx.output, "compile_subgraph_reason", None)
        info.returns = getattr(reason, "reason", None) == "return_value"
        if info.returns and tx.stack:
            _walk(tx.stack[-1], (), info.return_leaves, depth=0)
    except Exception:
        info.return_leaves = []
    return info


def _star_locals(code: Any) -> Tuple[Optional[str], Optional[str]]:
    import inspect

    position = code.co_argcount + code.co_kwonlyargcount
    varargs = varkw = None
    if code.co_flags & inspect.CO_VARARGS:
        varargs = code.co_varnames[position]
        position += 1
    if code.co_flags & inspect.CO_VARKEYWORDS:
        varkw = code.co_varnames[position]
    return varargs, varkw


def _original_code(code: Any) -> Any:
    """The user function a resume function continues (resume functions can nest)."""
    try:
        from torch._dynamo.resume_execution import ContinueExecutionCache

        metadata = ContinueExecutionCache.generated_code_metadata
        for _ in range(16):
            entry = metadata.get(code)
            if entry is None:
                return code
            code = entry.code
    except Exception:
        return None
    return code


def _walk(vt: Any, path: Tuple[str, ...], out: list, depth: int) -> None:
    """Collects tensor leaves of a returned VariableTracker with their structural path."""
    if depth > 8:
        return
    if hasattr(vt, "realize"):
        try:
            vt = vt.realize()
        except Exception:
            return
    from torch._dynamo.variables import ConstantVariable, SymNodeVariable, TensorVariable

    if isinstance(vt, TensorVariable):
        out.append((path, vt.as_proxy().node.name))
        return
    if isinstance(vt, (ConstantVariable, SymNodeVariable)):
        # A number, None or size in the result: no tensor to patch. Recorded (node None) so a
        # patch aimed at it is refused with that reason rather than as an unknown name.
        out.append((path, None))
        return
    items = getattr(vt, "items", None)
    if isinstance(items, (list, tuple)):
        for index, item in enumerate(items):
            _walk(item, path + (f"sub_{index}",), out, depth + 1)
        return
    if isinstance(items, dict):
        _walk_dict(items, path, out, depth)
        return
    dict_vt = getattr(vt, "_base_vt", None) or getattr(vt, "dict_vt", None)
    if dict_vt is not None and isinstance(getattr(dict_vt, "items", None), dict):
        _walk_dict(dict_vt.items, path, out, depth)


def _walk_dict(items: Dict[Any, Any], path: Tuple[str, ...], out: list, depth: int) -> None:
    for key_tracker, value in items.items():
        key_vt = getattr(key_tracker, "vt", key_tracker)
        try:
            key = key_vt.as_python_constant()
        except Exception:
            continue
        _walk(value, path + (str(key),), out, depth + 1)


def symbol_bindings(placeholder_values: Any, args: Any) -> Dict[Any, int]:
    """Symbol → int for this call, read off the args of a dynamic-shape graph.

    ``placeholder_values`` are the placeholders' ``example_value`` (FakeTensors with SymInt
    sizes, or SymInts); ``args`` the call's real values in the same order.
    """
    bindings: Dict[Any, int] = {}

    def bind(fake: Any, real: Any) -> None:
        expr = getattr(getattr(fake, "node", None), "expr", None)
        if expr is not None and getattr(expr, "is_Symbol", False):
            bindings[expr] = int(real)

    for fake, real in zip(placeholder_values, args):
        if isinstance(fake, torch.SymInt):
            bind(fake, real)
        elif isinstance(fake, torch.Tensor) and isinstance(real, torch.Tensor):
            for fake_size, real_size in zip(fake.shape, real.shape):
                if isinstance(fake_size, torch.SymInt):
                    bind(fake_size, real_size)
    return bindings


def concrete_shape(shape: Any, bindings: Dict[Any, int]) -> Tuple[int, ...]:
    """A (possibly symbolic) shape evaluated for one call."""
    out = []
    for size in shape:
        if isinstance(size, torch.SymInt):
            out.append(int(size.node.expr.xreplace(bindings)))
        else:
            out.append(int(size))
    return tuple(out)


def dynamo_wraps_top_frame() -> bool:
    """Whether Dynamo traces a compiled module's own ``__call__`` (and so its hooks) for every
    module: ``torch._dynamo.config.wrap_top_frame``, read here because it is private. Absent
    (older releases) means no."""
    return bool(getattr(torch._dynamo.config, "wrap_top_frame", False))
