"""Never silent: a patch whose node never ran in its context's forwards raises at exit.

Each ``PatchState`` carries a ``RunLog`` (state.py) of what ran under it: which patched names
were in a graph that ran, how many graphs and forwards of each patched model ran, and which
calls of the model ran outside its compiled graphs. On a normal exit, ``pb.patch`` (and a
``pb.sweep`` chunk) calls ``raise_if_unapplied``, which raises ``PatchNotAppliedError`` for
every name it added whose node never ran although the model did.

Calls of the uncompiled model are seen by a hook that ``watch_eager_calls`` installs when a
context patches a model through its wrapper (``compiled.generate`` calls the model itself, and
Dynamo may run a forward it cannot trace eagerly). It stays registered after the context, for
the next one, until the model is called outside every watching context (``Watch``).
"""

from __future__ import annotations

import threading
import weakref
from typing import Any, Dict, List, Mapping, Optional, Tuple

from torch import nn

from ._torch_compat.calls import available as dynamo_calls_known
from ._torch_compat.calls import dynamo_callback, skip_frame, skip_frame_and_calls
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
        "captured in another call (a branch, input shape or argument these forwards did not take), or Dynamo ran "
        "that code without its graphs (past its recompile limit: TORCH_LOGS=recompiles says so)."
    )
    if boundaries:
        message += f" {_describe(boundaries)}: " + eager_boundary_reason(index, boundaries)
    if eager:
        message += f" {_count(eager, 'call')} of {model} also ran outside its compiled graphs. " + _EAGER_HINT
    return message


# -- calls of the uncompiled model ----------------------------------------------------------


class Watch:
    """The watching hook of one root: registered by the first context that patches the root
    through a wrapper, and left in place when the last such context exits, so that a loop of
    contexts registers it once. The next call of the root made outside every watching context
    removes it (``_unwatch_if_idle``): an unpatched loop pays one hooked call, then runs as if
    the model had never been patched.

    ``holders`` has one item per context (any thread) holding the hook; it is only removed when
    it is empty, under ``_watch_lock``. Holding and releasing take no lock (every ``pb.patch``
    entry and exit does both): a list's ``append`` and ``pop`` are atomic, and a holder appends
    *before* it reads ``live`` while the remover clears ``live`` *before* it reads ``holders``
    (``hold``, ``_unwatch_if_idle``), so one of the two always sees the other.
    """

    __slots__ = ("module", "handle", "holders", "live", "__weakref__")

    def __init__(self, module: nn.Module, handle: Any) -> None:
        key = id(module)
        self.module: "weakref.ref[nn.Module]" = weakref.ref(module, lambda ref: _drop_watch(key, ref))
        self.handle = handle
        self.holders: List[None] = []
        #: False once its hook is removed: a context holding this object registers anew.
        self.live = True

    def hold(self) -> bool:
        """A context holds the hook, if it is still registered (else False, holding nothing)."""
        holders = self.holders
        holders.append(None)
        if self.live:
            return True
        holders.pop()
        return False

    def release(self) -> None:
        """A watching context exits: the hook stays until a call outside every context."""
        self.holders.pop()


_watch_lock = threading.RLock()  # re-entrant: a weak reference callback may run under it
#: id(root) → its Watch while its hook is registered (``_watch_of``).
_watches: Dict[int, Watch] = {}


def _watch_of(module: nn.Module) -> Optional[Watch]:
    """``module``'s Watch: by ``id``, the watch's weak reference telling the live module from a
    reused id (a WeakKeyDictionary lookup makes a weak reference per call)."""
    watch = _watches.get(id(module))
    return watch if watch is not None and watch.module() is module else None


def _drop_watch(key: int, ref: "weakref.ref[nn.Module]") -> None:
    """A watched module was deleted (its hook went with it)."""
    with _watch_lock:
        watch = _watches.get(key)
        if watch is not None and watch.module is ref:
            watch.live = False
            del _watches[key]


def watch_eager_calls(model: Any, root: nn.Module, known: Optional[Watch] = None) -> Optional[Watch]:
    """While a context patches ``root`` through a wrapper (its torch.compile result or a
    PatchableGraph), a forward pre-hook on ``root`` tells the wrapper's calls from calls of the
    uncompiled ``root`` (such as ``compiled.generate``'s); returns the watch the context holds
    (``Watch.release`` at exit), or None where nothing is watched.

    The wrapper's calls run the hook under Dynamo's frame callback, the root's own calls do not
    (``_torch_compat/calls.py``), so the hook alone tells them apart, and a wrapper call is
    left as it is: no hooks on it. Not done for a plain module: it may be called inside another
    compiled function, whose trace would meet the hook (a graph break), as would torch's own
    module classes compiled directly.

    ``known`` is the watch an earlier call returned for this root: while its hook is still
    registered, it is held again without looking anything up.
    """
    if known is not None and known.hold():
        return known
    if model is root or not isinstance(model, nn.Module):
        return None
    with _watch_lock:
        watch = _watch_of(root)
        if watch is None:
            if not _hooks_run_outside_dynamo(root) or not dynamo_calls_known():
                return None
            watch = _watches[id(root)] = Watch(root, root.register_forward_pre_hook(_root_called))
        # Under the lock no remover runs, so a registered watch is live here.
        watch.holders.append(None)
    return watch


def _hooks_run_outside_dynamo(root: nn.Module) -> bool:
    """torch.compile traces a torch.nn class's hooks (``wrap_inline``), a user class's not."""
    # The class first: the config flag is a slower read.
    return type(root).__module__.split(".")[0] != "torch" and not dynamo_wraps_top_frame()


def _unwatch_if_idle(module: nn.Module) -> None:
    """Removes ``module``'s watching hook if no context holds it (a call outside every watching
    context). Removing it from inside the hook is safe: torch iterates a copy of the pre-hooks."""
    with _watch_lock:
        watch = _watch_of(module)
        if watch is None or watch.holders:
            return
        watch.live = False  # before reading holders again: see Watch
        if watch.holders:  # a context took it meanwhile: it stays
            watch.live = True
            return
        watch.handle.remove()
        del _watches[id(module)]


def watching_hooks(module: nn.Module) -> Optional[int]:
    """The number of contexts holding ``module``'s watching hook (0: left in place until the
    next call outside them), or None when it has none. For tests."""
    with _watch_lock:
        watch = _watch_of(module)
        return None if watch is None else len(watch.holders)


@skip_frame
def _root_called(module: nn.Module, args: Any) -> None:
    """Forward pre-hook on a watched root. Its frame runs under Dynamo's callback in a wrapper
    call, so it calls only a builtin and ``_on_root_call`` (skipped by Dynamo with its calls)."""
    _on_root_call(module, dynamo_callback() is not None)


@skip_frame_and_calls
def _on_root_call(module: nn.Module, in_wrapper: bool) -> None:
    """A call of a watched root: ``in_wrapper`` when Dynamo runs it (the wrapper's call), else
    a call of the uncompiled model, counted where this thread's context watches it.

    A wrapper call is checked when the root's next call starts or the context exits
    (``close_wrapper_calls``): if no graph of the model ran since it started, Dynamo ran the
    forward eagerly (it gives up on a whole forward it cannot trace, e.g. past its recompile
    limit), so no patch applied in it: it counts as a call outside the compiled graphs.
    """
    state = _active.get()
    key = state.watched.get(module)
    if key is None:
        _unwatch_if_idle(module)
        return
    log = state.log
    if key in log.open_calls:
        _close_wrapper_call(state, key, module)
    if in_wrapper:
        log.open_calls[key] = log.runs.get(key, 0)
    else:
        _note_eager_call(state, module)


def close_wrapper_calls(state: PatchState) -> None:
    """The context exits: its wrapper calls still open are checked (``_on_root_call``)."""
    log = state.log
    open_calls, runs = log.open_calls, log.runs
    for key, start in open_calls.items():
        if runs.get(key, 0) == start:
            break  # one ran no graph: see which model it was
    else:
        open_calls.clear()  # the common case: every call ran a graph of its model
        return
    for root, key in state.watched.items():
        if key in open_calls:
            _close_wrapper_call(state, key, root)


def _close_wrapper_call(state: PatchState, key: int, module: nn.Module) -> None:
    log = state.log
    if log.open_calls.pop(key) == log.runs.get(key, 0):
        _note_eager_call(state, module)


def _entry_of(state: PatchState, root: nn.Module) -> Optional[RootPatches]:
    """The active context's patches on ``root``, if it is patched."""
    for entry in state.roots:
        if entry.index._root() is root:
            return entry
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
