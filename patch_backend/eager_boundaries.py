"""Patches on module boundaries no graph covers, applied through forward hooks.

A forward Dynamo gives up on (a graph break under a user context manager or inside ``try``)
runs eagerly: no graph holds its inputs, parameters or result, yet the unbroken model names
them, and the names must not change (docs/naming.md). ``index.eager_sites`` says which names
these are (observed on the forward's first run); while a ``pb.patch`` context patches one, a
forward pre-hook and a forward hook on that module apply the active patches there, exactly as a
hand-written hook would, and mark the name applied for the never-ran check. The hooks exist
only for the length of the contexts that need them (reference-counted per module, removed at
the last exit): a model with no eagerly run forward gets none, and no work per call.
"""

from __future__ import annotations

import functools
import threading
from typing import Any, Callable, Dict, List, Mapping, Optional, Set, Tuple

import torch
from torch import nn

from ._torch_compat.eager_observer import forward_code, observed_itself
from .capture.index import RootIndex
from .capture.naming import EagerSite, module_at
from .patches import Patch, ProbePatch, RecordPatch
from .state import RootPatches, _active

_lock = threading.Lock()
#: (id(index), module path) → (hook handles, number of contexts using them).
_installed: Dict[Tuple[int, Tuple[str, ...]], Tuple[List[Any], int]] = {}
#: Per thread: calls so far of each module path in the run of the eagerly run forward it sits in.
_counts = threading.local()


def install_boundary_hooks(index: RootIndex, names: Mapping[str, Tuple[Patch, ...]]) -> Callable[[], None]:
    """Hooks for the names of ``names`` that are eager boundaries of ``index``'s model; returns
    the function removing them (at the context's exit)."""
    sites = [index.eager_sites[name] for name in names if name in index.eager_sites]
    if not sites:
        return _nothing
    root = index.root
    paths = dict.fromkeys(path for site in sites for path in (site.frame, site.path))
    acquired = []
    with _lock:
        for path in paths:
            module = module_at(root, path)
            if module is None:
                continue
            key = (id(index), path)
            handles, users = _installed.get(key, (None, 0))
            if handles is None:
                handles = [
                    module.register_forward_pre_hook(functools.partial(_before, index, path), with_kwargs=True),
                    module.register_forward_hook(functools.partial(_after, index, path), always_call=True),
                ]
            _installed[key] = (handles, users + 1)
            acquired.append(key)
    return functools.partial(_release, acquired)


def hook_learnt_boundaries(
    index: RootIndex, names: Mapping[str, Tuple[Patch, ...]], hooked: Set[Tuple[int, str]]
) -> Optional[Callable[[], None]]:
    """Hooks for the names of ``names`` that became eager boundaries of ``index``'s model after
    the context was entered (``hooked``: those already hooked, updated), or None.

    A context entered before a model's first call knows no name yet; when that call's first
    graph runs, the model's name table holds the boundaries of a forward Dynamo runs eagerly
    for every instance of its class (another instance's observation, index.py), and hooks
    installed then are read by ``Module._call_impl`` when that forward is called later in the
    same call. Not those of a forward observed on this very instance: its first eager run, in
    this context, named them only once it had ended, so hooks now would patch the later calls
    of the context but not that one (the exit check says so, errors.md row 29)."""
    root = index.root
    fresh = {
        name: patches for name, patches in names.items()
        if name in index.eager_sites and (id(index), name) not in hooked
        and not observed_itself(module_at(root, index.eager_sites[name].frame))
    }
    if not fresh:
        return None
    hooked.update((id(index), name) for name in fresh)
    return install_boundary_hooks(index, fresh)


def boundary_hooked(index: RootIndex, name: str) -> bool:
    """Whether hooks patching the eager boundary ``name`` are on its module now (a context that
    patches it installed them on entry): the never-ran message tells a name learnt too late from
    a module that was not called."""
    site = index.eager_sites.get(name)
    if site is None:
        return False
    with _lock:
        return (id(index), site.path) in _installed


def _release(keys: List[Tuple[int, Tuple[str, ...]]]) -> None:
    with _lock:
        for key in keys:
            handles, users = _installed[key]
            if users > 1:
                _installed[key] = (handles, users - 1)
                continue
            for handle in handles:
                handle.remove()
            del _installed[key]


def _nothing() -> None:
    return None


def _entry(index: RootIndex) -> Optional[RootPatches]:
    for entry in _active.get().roots:
        if entry.index is index:
            return entry
    return None


def _call_state() -> Dict[Any, Any]:
    state = getattr(_counts, "state", None)
    if state is None:
        state = _counts.state = {}
    return state


def _patched(value: torch.Tensor, patches: Tuple[Patch, ...]) -> torch.Tensor:
    """The patches in list order; the value is cloned once first unless every patch only reads
    it, so no patch mutates a parameter, buffer, input or what the module computed with."""
    if not all(isinstance(patch, (ProbePatch, RecordPatch)) for patch in patches):
        value = value.clone()
    for patch in patches:
        value = patch.op(value)
    return value


def _sites_here(index: RootIndex, entry: RootPatches, path: Tuple[str, ...], ordinal: int, role: str):
    """The patched eager sites of this call in ``role``, in the order the unbroken model's graph
    applies them: inputs from the outermost caller's name in, results from the module's own
    ``output`` out."""
    here = []
    for name, patches in entry.by_name.items():
        site = index.eager_sites.get(name)
        if site is not None and site.path == path and site.role == role and site.ordinal in (None, ordinal):
            here.append((name, site, patches))
    if len(here) > 1:
        here.sort(key=lambda found: -found[1].through if role == "input" else found[1].through)
    return here


def _mark(index: RootIndex, name: str) -> None:
    _active.get().log.applied.add((id(index), name))


@torch.compiler.disable
def _before(index: RootIndex, path: Tuple[str, ...], module: nn.Module, args: Tuple[Any, ...], kwargs: Dict[str, Any]):
    state = _call_state()
    entry = _entry(index)
    if any(site.frame == path for site in index.eager_sites.values()):
        # A run of the eagerly run forward starts: its calls are counted afresh, and (in a
        # context patching the model) it counts as a forward for the never-ran check.
        for key in [key for key in state if key[0] == id(index) and key[1] == "count" and key[2][: len(path)] == path]:
            del state[key]
        if entry is not None:
            log = _active.get().log
            log.graph_calls[id(index)] = log.graph_calls.get(id(index), 0) + 1
            if path == ():
                log.forwards[id(index)] = log.forwards.get(id(index), 0) + 1
    count_key = (id(index), "count", path)
    ordinal = state.get(count_key, 0)
    state[count_key] = ordinal + 1
    state.setdefault((id(index), "open", path), []).append(ordinal)
    if entry is None:
        state.setdefault((id(index), "swapped", path), []).append([])
        return None
    swapped: List[Tuple[str, str, Any]] = []
    changed = False
    arguments, kwargs = list(args), dict(kwargs)
    for name, site, patches in _sites_here(index, entry, path, ordinal, "param"):
        table = "_parameters" if site.local in module._parameters else "_buffers"
        original = getattr(module, table)[site.local]
        swapped.append((table, site.local, original))
        getattr(module, table)[site.local] = _patched(original, patches)
        _mark(index, name)
    state.setdefault((id(index), "swapped", path), []).append(swapped)
    for name, site, patches in _sites_here(index, entry, path, ordinal, "input"):
        if _replace_argument(module, site, arguments, kwargs, patches):
            changed = True
            _mark(index, name)
    return (tuple(arguments), kwargs) if changed else None


@torch.compiler.disable
def _after(index: RootIndex, path: Tuple[str, ...], module: nn.Module, args: Any, output: Any):
    state = _call_state()
    opened = state.get((id(index), "open", path)) or [0]
    ordinal = opened.pop()
    for table, attribute, original in reversed((state.get((id(index), "swapped", path)) or [[]]).pop() or []):
        getattr(module, table)[attribute] = original
    entry = _entry(index)
    if entry is None:
        return None
    result, changed = output, False
    for name, site, patches in _sites_here(index, entry, path, ordinal, "output"):
        result, done = _replace_leaf(result, site.leaf, patches)
        if done:
            changed = True
            _mark(index, name)
    return result if changed else None


def _replace_argument(module: nn.Module, site: EagerSite, args: List[Any], kwargs: Dict[str, Any],
                      patches: Tuple[Patch, ...]) -> bool:
    """Replaces, in the call's arguments, the leaf ``site`` names (bound as Python binds it)."""
    leaf = site.leaf
    if site.local == site.varkw and site.local not in kwargs:
        key, leaf = leaf[0], leaf[1:]
        if key not in kwargs:
            return False
        kwargs[key], done = _replace_leaf(kwargs[key], leaf, patches)
        return done
    if site.local in kwargs:
        kwargs[site.local], done = _replace_leaf(kwargs[site.local], leaf, patches)
        return done
    named = _positional_names(module)
    if site.local == site.varargs:
        position, leaf = len(named) + int(leaf[0]), leaf[1:]
    elif site.local in named:
        position = named.index(site.local)
    else:
        return False
    if position >= len(args):
        return False
    args[position], done = _replace_leaf(args[position], leaf, patches)
    return done


def _positional_names(module: nn.Module) -> List[str]:
    """The forward's positional parameters after ``self``: those of its own code, under any
    decorator (a ``wrapper(*args, **kwargs)`` has none)."""
    code = forward_code(module)
    return list(code.co_varnames[1 : code.co_argcount]) if code is not None else []


def _replace_leaf(value: Any, leaf: Tuple[str, ...], patches: Tuple[Patch, ...]) -> Tuple[Any, bool]:
    """``value`` with the tensor at ``leaf`` (``sub_<k>`` items, dict keys) patched; rebuilt
    containers keep their type. (value, False) when the leaf is not there or not a tensor."""
    if not leaf:
        if isinstance(value, torch.Tensor):
            return _patched(value, patches), True
        return value, False
    head, rest = leaf[0], leaf[1:]
    if isinstance(value, (list, tuple)) and head.startswith("sub_") and head[4:].isdigit():
        position = int(head[4:])
        if position >= len(value):
            return value, False
        item, done = _replace_leaf(value[position], rest, patches)
        if not done:
            return value, False
        items = list(value)
        items[position] = item
        rebuilt = type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
        return rebuilt, True
    if isinstance(value, dict) and head in {str(key): None for key in value}:
        key = next(key for key in value if str(key) == head)
        item, done = _replace_leaf(value[key], rest, patches)
        if not done:
            return value, False
        value = type(value)(value) if type(value) is dict else value.copy()
        value[key] = item
        return value, True
    return value, False


def eager_boundary_reason(index: RootIndex, names: Mapping[str, Tuple[Patch, ...]]) -> str:
    """Why module boundaries of a forward Dynamo runs eagerly did not apply in a context.

    They are named from that forward's first run, once it has ended (which modules it called,
    how often: ``lin`` or ``lin_0``), and applied by hooks a context installs on entry. A context
    entered before that run had no hooks to install, and cannot apply them in it: a profile
    function cannot replace a return value, the forward's own call already passed the point
    where ``Module._call_impl`` reads hooks when Dynamo gave up on it, and a scope's ``_k``
    suffix is known only once the run ends (docs/naming.md, "Limits")."""
    if any(not boundary_hooked(index, name) for name in names):
        return (
            "module boundaries of a forward Dynamo runs eagerly (no graph holds them), named from that "
            "forward's first run once it ended; this context was entered before, so nothing could patch them "
            "in that run. Call the model once before entering the context (docs/naming.md, 'Limits')."
        )
    return (
        "module boundaries of a forward Dynamo runs eagerly; their modules were not called in the forwards "
        "that ran in this context (a branch or argument these forwards did not take)."
    )
