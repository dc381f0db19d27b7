"""Never silent: a patch whose node never ran in its context's forwards raises at exit.

Each ``PatchState`` carries a ``RunLog`` (state.py) of what ran under it: which patched names
were in a graph that ran, how many graphs and forwards of each patched model ran, and which
calls of the model ran outside its compiled graphs. On a normal exit, ``pb.patch`` (and a
``pb.sweep`` chunk) calls ``raise_if_unapplied``, which raises ``PatchNotAppliedError`` for
every name it added whose node never ran although the model did.

Calls of the uncompiled model are seen by hooks that ``watch_eager_calls`` installs when a
context patches a model through its wrapper (``compiled.generate`` calls the model itself, and
Dynamo may run a forward it cannot trace eagerly). They stay registered after the context, for
the next one, until the model is called outside every watching context (``Watch``).
"""

from __future__ import annotations

import functools
import threading
import weakref
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
from torch import nn

from ._torch_compat.frame import dynamo_wraps_top_frame
from .capture.index import RootIndex
from .eager_boundaries import eager_boundary_reason
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
    applied = log.applied
    for name in names:
        if (key, name) not in applied:
            break
    else:
        return  # the common case, without building the map of the missing
    missing = {name: patches for name, patches in names.items() if (key, name) not in applied}
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
    boundaries = {name: patches for name, patches in missing.items() if name in index.eager_sites}
    if boundaries and len(boundaries) == len(missing):
        return head + eager_boundary_reason(index, boundaries)
    its, was, node = ("its graph", "was", "node") if len(missing) == 1 else ("their graphs", "were", "nodes")
    message = (
        head + f"{its} {was} not entered in any of the {runs} of {model} that ran in it; the {node} {was} "
        "captured in another call (a branch, input shape or argument these forwards did not take)."
    )
    if boundaries:
        message += f" {_describe(boundaries)}: " + eager_boundary_reason(index, boundaries)
    if eager:
        message += f" {_count(eager, 'call')} of {model} also ran outside its compiled graphs. " + _EAGER_HINT
    return message


# -- calls of the uncompiled model ----------------------------------------------------------


class Watch:
    """The watching hooks of one wrapper and its root: registered by the first context that
    patches the root through the wrapper, and left in place when the last such context exits,
    so that a loop of contexts registers them once. The next call of the wrapper (or of the
    root) made outside every watching context removes them (``_unwatch_if_idle``): an unpatched
    loop pays one hooked call, then runs as if the model had never been patched.

    ``users`` counts the contexts (any thread) that hold the hooks; hooks are only removed when
    it is 0, under ``_watch_lock``. The root's hook is shared by the root's wrappers (``root``:
    a context holds both watches, so the root's is never removed while a wrapper's is held).
    """

    __slots__ = ("module", "handles", "users", "root", "live", "__weakref__")

    def __init__(self, module: nn.Module, handles: List[Any], root: Optional["Watch"]) -> None:
        key = id(module)
        self.module: "weakref.ref[nn.Module]" = weakref.ref(module, lambda ref: _drop_watch(key, ref))
        self.handles = handles
        self.users = 0
        #: The root's watch, for a wrapper's (None for the root's own).
        self.root = root
        #: False once its hooks are removed: a context holding this object registers anew.
        self.live = True

    def release(self) -> None:
        """A watching context exits: the hooks stay until a call outside every context."""
        with _watch_lock:
            self.users -= 1
            if self.root is not None:
                self.root.users -= 1


_watch_lock = threading.RLock()  # re-entrant: a weak reference callback may run under it
#: id(module) (a wrapper or a root) → its Watch while its hooks are registered (``_watch_of``).
_watches: Dict[int, Watch] = {}


def _watch_of(module: nn.Module) -> Optional[Watch]:
    """``module``'s Watch: by ``id``, the watch's weak reference telling the live module from a
    reused id (a WeakKeyDictionary lookup makes a weak reference per call)."""
    watch = _watches.get(id(module))
    return watch if watch is not None and watch.module() is module else None


def _drop_watch(key: int, ref: "weakref.ref[nn.Module]") -> None:
    """A watched module was deleted (its hooks went with it)."""
    with _watch_lock:
        watch = _watches.get(key)
        if watch is not None and watch.module is ref:
            watch.live = False
            del _watches[key]


#: ``calls``: this thread's watched wrapper calls in progress (``_enter_wrapper``).
_inside = threading.local()


def watch_eager_calls(model: Any, root: nn.Module, known: Optional[Watch] = None) -> Optional[Watch]:
    """While a context patches ``root`` through a wrapper (its torch.compile result or a
    PatchableGraph), hooks tell calls of the uncompiled ``root`` made outside the wrapper (such
    as ``compiled.generate``'s) from the wrapper's own; returns the watch the context holds
    (``Watch.release`` at exit), or None where nothing is watched.

    The wrapper's hooks keep, per thread, the wrapper calls in progress; the root's pre-hook
    (hidden from Dynamo, so nothing is traced or recompiled for it) counts a call of the root
    made outside them. Not done for a plain module: it may be called inside another compiled
    function, whose trace would meet the hook (a graph break and a recompile per context), as
    would torch's own module classes compiled directly.

    ``known`` is the watch an earlier call returned for this wrapper: while its hooks are still
    registered, it is held again without looking anything up.
    """
    if known is not None:
        with _watch_lock:
            root_watch = known.root
            if known.live and root_watch is not None and root_watch.live:
                known.users += 1
                root_watch.users += 1
                return known
    if model is root or not isinstance(model, nn.Module):
        return None
    with _watch_lock:
        watch = _watch_of(model)
        root_watch = _watch_of(root)
        if watch is None or root_watch is None:
            # Registered or left registered by an earlier context: the check was made then.
            if watch is None and not _hooks_run_outside_dynamo(root):
                return None
            if root_watch is None:  # never registered, or removed by a call of the root alone
                root_watch = _watches[id(root)] = Watch(root, [root.register_forward_pre_hook(_root_called)], None)
            if watch is None:
                watch = _watches[id(model)] = Watch(
                    model,
                    [
                        model.register_forward_pre_hook(functools.partial(_enter_wrapper, root)),
                        model.register_forward_hook(functools.partial(_leave_wrapper, root), always_call=True),
                    ],
                    root_watch,
                )
            watch.root = root_watch
        watch.users += 1
        root_watch.users += 1
    return watch


def _hooks_run_outside_dynamo(root: nn.Module) -> bool:
    """torch.compile traces a torch.nn class's hooks (``wrap_inline``), a user class's not."""
    # The class first: the config flag is a slower read.
    return type(root).__module__.split(".")[0] != "torch" and not dynamo_wraps_top_frame()


def _unwatch_if_idle(module: nn.Module) -> None:
    """Removes ``module``'s watching hooks if no context holds them (a call outside every
    watching context). Removing them from inside one of them is safe: torch iterates a copy of
    the pre-hooks, and reads the forward hooks only after the forward, so they do not run for
    this call (``_enter_wrapper`` pushes nothing then)."""
    with _watch_lock:
        watch = _watch_of(module)
        if watch is None or watch.users:
            return
        for handle in watch.handles:
            handle.remove()
        watch.live = False
        del _watches[id(module)]


def watching_hooks(module: nn.Module) -> Optional[int]:
    """The number of contexts holding ``module``'s watching hooks (0: left in place until the
    next call outside them), or None when it has none. For tests."""
    with _watch_lock:
        watch = _watch_of(module)
        return None if watch is None else watch.users


def _enter_wrapper(root: nn.Module, wrapper: nn.Module, args: Any) -> None:
    """Pushes this call, with the root's graph calls so far, when this thread's context watches
    the wrapper (its context holds the hooks until the call ends, so ``_leave_wrapper`` runs);
    else the hooks are idle and are removed."""
    state = _active.get()
    if wrapper not in state.watching:
        _unwatch_if_idle(wrapper)
        return
    try:
        calls = _inside.calls
    except AttributeError:  # this thread's first
        calls = _inside.calls = []
    calls.append((wrapper, state, state.log.runs, None if len(state.roots) == 1 else _graph_calls_of(state, root)))


def _leave_wrapper(root: nn.Module, wrapper: nn.Module, args: Any, output: Any) -> None:
    """Also runs when the call raised (``always_call``); pops only the entry its
    ``_enter_wrapper`` pushed.

    A wrapper call in which no graph of the model ran was a forward Dynamo ran eagerly (it gives
    up on a whole forward it cannot trace, e.g. around an ``nn.LSTM``): no patch applied in it,
    so it counts as a call outside the compiled graphs."""
    calls = getattr(_inside, "calls", None)
    if not calls:
        return
    entry_wrapper, state, runs, graph_calls = calls[-1]
    if entry_wrapper is not wrapper or state is not _active.get():
        return
    calls.pop()
    if state.log.runs == runs:
        _note_eager_call(state, root)  # no graph of a patched model ran: not one of the root's
    elif graph_calls is not None and _graph_calls_of(state, root) == graph_calls:
        _note_eager_call(state, root)  # several patched models: the graphs were another's


def _entry_of(state: PatchState, root: nn.Module) -> Optional[RootPatches]:
    """The active context's patches on ``root``, if it is patched."""
    for entry in state.roots:
        if entry.index._root() is root:
            return entry
    return None


def _graph_calls_of(state: PatchState, root: nn.Module) -> Optional[int]:
    """Graph calls of ``root`` so far in ``state`` (None when it is not patched there)."""
    entry = _entry_of(state, root)
    return None if entry is None else state.log.settle().graph_calls.get(id(entry.index), 0)


@torch.compiler.disable
def _root_called(module: nn.Module, args: Any) -> None:
    """Forward pre-hook on a watched root: a call outside every watched wrapper call ran the
    uncompiled model (counted where this thread's context watches a wrapper of it)."""
    if getattr(_inside, "calls", None):
        return None  # inside a wrapper call
    state = _active.get()
    if module in state.watched_roots:
        _note_eager_call(state, module)
    else:
        _unwatch_if_idle(module)
    return None


def _note_eager_call(state: PatchState, module: nn.Module) -> None:
    """Counts an uncompiled call of a patched model; raises at the second one if no compiled
    graph of the model ran in this context yet (``compiled.generate`` fails at its second step
    rather than after the whole generation)."""
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
