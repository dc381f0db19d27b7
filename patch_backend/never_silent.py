"""Never silent: a patch whose node never ran in its context's forwards raises at exit.

Each ``PatchState`` carries a ``RunLog`` (state.py) of what ran under it: which patched names
were in a graph that ran, how many graphs and forwards of each patched model ran, and which
calls of the model ran outside its compiled graphs. On a normal exit, ``pb.patch`` (and a
``pb.sweep`` chunk) calls ``raise_if_unapplied``, which raises ``PatchNotAppliedError`` for
every name it added whose node never ran although the model did.

Calls of the uncompiled model are seen by hooks that ``watch_eager_calls`` installs for the
length of a context that patches a model through its wrapper (``compiled.generate`` calls the
model itself, and Dynamo may run a forward it cannot trace eagerly).
"""

from __future__ import annotations

import functools
import threading
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import torch
from torch import nn

from ._torch_compat.frame import dynamo_wraps_top_frame
from .capture.index import RootIndex
from .patches import Patch
from .state import PatchState, RootPatches, RunLog, _active
from .validation import validate_names


class PatchNotAppliedError(RuntimeError):
    """A patch whose node never ran in its context's forwards (docs/errors.md, issue 9).

    Raised when a ``pb.patch`` block (or a ``pb.sweep`` chunk) exits normally; for a model
    patched through its torch.compile wrapper, also at the second call of the uncompiled model
    in a block where none of its compiled graphs ran yet (``compiled.generate``). A silently
    ignored patch would look like a patch that changed nothing.
    """


def raise_if_unapplied(
    log: RunLog, index: RootIndex, names: Mapping[str, Tuple[Patch, ...]], where: str = "this pb.patch context"
) -> None:
    """The exit check of one context: only its own names, only if the model ran in it."""
    log.settle()
    key = id(index)
    graphs = log.graph_calls.get(key, 0)
    if not graphs and not log.eager_calls.get(key, 0):
        return  # the model never ran in this context: nothing was expected to apply
    missing = {name: patches for name, patches in names.items() if (key, name) not in log.applied}
    if not missing:
        return
    if graphs:
        validate_names(index, missing)  # a name no graph holds is a KeyError, as on entry
    raise PatchNotAppliedError(unapplied_message(log, index, missing, where))


def _describe(patches_by_name: Mapping[str, Tuple[Patch, ...]]) -> str:
    return ", ".join(
        f"{name!r} ({', '.join(dict.fromkeys(type(patch).__name__ for patch in patches))})"
        for name, patches in patches_by_name.items()
    )


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" + ("" if number == 1 else "s")


def _model_name(index: RootIndex) -> str:
    root = index._root()
    return type(root).__name__ if root is not None else "the model"


_EAGER_HINT = (
    "The model itself was called, not its torch.compile result (e.g. `compiled.generate(...)` calls "
    "the uncompiled `forward`), or Dynamo ran the forward without compiling it. To generate, use "
    "`pb.PatchableGraph(model, example_ids).generate(...)`, or compile the forward "
    "(`model.forward = torch.compile(model.forward, backend=\"graphpatch\")`) and patch the model "
    "(docs/transformers.md); otherwise call the compiled model."
)


def unapplied_message(
    log: RunLog, index: RootIndex, missing: Mapping[str, Tuple[Patch, ...]], where: str = "this pb.patch context"
) -> str:
    """Names the nodes and patches, and says why they did not run."""
    key = id(index)
    model = _model_name(index)
    graphs = log.graph_calls.get(key, 0)
    eager = log.eager_calls.get(key, 0)
    head = f"{_describe(missing)} never ran in {where}: "
    if not graphs:
        ran = f"{model}'s forward ran {_count(eager, 'time')}, always outside its compiled graphs. "
        return head + ran + _EAGER_HINT
    forwards = log.forwards.get(key, 0)
    runs = _count(graphs, "graph call")
    if forwards:
        runs = f"{_count(forwards, 'forward')} ({runs})"
    its, was, node = ("its graph", "was", "node") if len(missing) == 1 else ("their graphs", "were", "nodes")
    message = (
        head + f"{its} {was} not entered in any of the {runs} of {model} that ran in it; the {node} {was} "
        "captured in another call (a branch, input shape or argument these forwards did not take)."
    )
    if eager:
        message += f" {_count(eager, 'call')} of {model} also ran outside its compiled graphs. " + _EAGER_HINT
    return message


# -- calls of the uncompiled model ----------------------------------------------------------

_watch_lock = threading.Lock()
#: id(module) → (hook handles, number of active contexts using them).
_watched: Dict[int, Tuple[List[Any], int]] = {}
#: ``calls``: this thread's watched wrapper calls in progress (``_wrapper_calls``).
_inside = threading.local()


def watch_eager_calls(model: Any, root: nn.Module) -> Callable[[], None]:
    """While a context patches ``root`` through a wrapper (its torch.compile result or a
    PatchableGraph), hooks tell calls of the uncompiled ``root`` made outside the wrapper (such
    as ``compiled.generate``'s) from the wrapper's own; returns the function that stops watching.

    The wrapper's hooks count, per thread, the wrapper calls in progress; the root's pre-hook
    (hidden from Dynamo, so nothing is traced or recompiled for it) counts a call of the root
    made outside them. Not done for a plain module: it may be called inside another compiled
    function, whose trace would meet the hook (a graph break and a recompile per context), as
    would torch's own module classes compiled directly.
    """
    if model is root or not isinstance(model, nn.Module):
        return _nothing
    with _watch_lock:
        # Already watched by an enclosing or concurrent context: the check was made then.
        if id(model) not in _watched and not _hooks_run_outside_dynamo(root):
            return _nothing
        _acquire(root, lambda: [root.register_forward_pre_hook(_root_called)])
        _acquire(
            model,
            lambda: [
                model.register_forward_pre_hook(functools.partial(_enter_wrapper, root)),
                model.register_forward_hook(functools.partial(_leave_wrapper, root), always_call=True),
            ],
        )
    return functools.partial(_release, root, model)


def _hooks_run_outside_dynamo(root: nn.Module) -> bool:
    """torch.compile traces a torch.nn class's hooks (``wrap_inline``), a user class's not."""
    # The class first: the config flag is a slower read, and every pb.patch entry asks.
    return type(root).__module__.split(".")[0] != "torch" and not dynamo_wraps_top_frame()


def _acquire(module: nn.Module, register: Callable[[], List[Any]]) -> None:
    """Registers ``module``'s hooks for the first context using them (caller holds the lock)."""
    handles, users = _watched.get(id(module), (None, 0))
    _watched[id(module)] = (handles if handles is not None else register(), users + 1)


def _release(*modules: nn.Module) -> None:
    with _watch_lock:
        for module in modules:
            handles, users = _watched[id(module)]
            if users > 1:
                _watched[id(module)] = (handles, users - 1)
                continue
            for handle in handles:
                handle.remove()
            del _watched[id(module)]


def _nothing() -> None:
    return None


def _wrapper_calls() -> List[Optional[int]]:
    """This thread's wrapper calls in progress, innermost last: each holds the model's graph
    calls in the active context when it started (None: the model is not patched there)."""
    calls = getattr(_inside, "calls", None)
    if calls is None:
        calls = _inside.calls = []
    return calls


def _enter_wrapper(root: nn.Module, wrapper: nn.Module, args: Any) -> None:
    _wrapper_calls().append(_graph_calls_of(root))


def _leave_wrapper(root: nn.Module, wrapper: nn.Module, args: Any, output: Any) -> None:
    """Also runs when the call raised (``always_call``); pops nothing should a pre-hook
    registered before ``_enter_wrapper`` have raised.

    A wrapper call in which no graph of the model ran was a forward Dynamo ran eagerly (it gives
    up on a whole forward it cannot trace, e.g. around an ``nn.LSTM``): no patch applied in it,
    so it counts as a call outside the compiled graphs."""
    calls = _wrapper_calls()
    if calls:
        before = calls.pop()
        if before is not None and _graph_calls_of(root) == before:
            _note_eager_call(root)


def _entry_of(state: PatchState, root: nn.Module) -> Optional[RootPatches]:
    """The active context's patches on ``root``, if it is patched."""
    for entry in state.roots:
        if entry.index._root() is root:
            return entry
    return None


def _graph_calls_of(root: nn.Module) -> Optional[int]:
    """Graph calls of ``root`` so far in the active context (None when it is not patched)."""
    state = _active.get()
    entry = _entry_of(state, root)
    return None if entry is None else state.log.settle().graph_calls.get(id(entry.index), 0)


@torch.compiler.disable
def _root_called(module: nn.Module, args: Any) -> None:
    """Forward pre-hook on a watched root: a call outside every watched wrapper call ran the
    uncompiled model."""
    if _wrapper_calls():
        return None
    _note_eager_call(module)
    return None


def _note_eager_call(module: nn.Module) -> None:
    """Counts an uncompiled call of a patched model; raises at the second one if no compiled
    graph of the model ran in this context yet (``compiled.generate`` fails at its second step
    rather than after the whole generation)."""
    state = _active.get()
    entry = _entry_of(state, module)
    if entry is None:
        return
    key = id(entry.index)
    log = state.log.settle()
    if log.eager_calls.get(key, 0) and not log.graph_calls.get(key, 0):
        raise PatchNotAppliedError(
            f"{type(module).__name__} was called again outside its compiled graphs: its previous "
            f"forward in this pb.patch context ran none of them, so {_describe(entry.by_name)} did not "
            "apply there. " + _EAGER_HINT
        )
    log.eager_calls[key] = log.eager_calls.get(key, 0) + 1
