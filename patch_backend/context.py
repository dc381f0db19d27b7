"""The patch context: which patches are active, per root model, in this thread/task.

State lives in a ContextVar, so threads and asyncio tasks patching the same compiled model each
see only their own patches. Every ``patch()`` builds a new immutable ``PatchState`` (outer
patches first, then inner) and restores the previous one on exit, exception or not.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Mapping, Sequence, Tuple

from torch import nn

from .index import RootIndex, index_for
from .patches import Patch
from .validation import check_name_syntax, check_patch_kind, unknown_name_error

PatchMap = Mapping[Any, Any]


@dataclass(frozen=True)
class RootPatches:
    index: RootIndex
    by_name: Dict[str, Tuple[Patch, ...]]
    #: False until the names could be checked (a compiled model that has not run yet).
    validated: bool


@dataclass(frozen=True, eq=False)
class PatchState:
    roots: Tuple[RootPatches, ...] = ()
    #: Row-block patches of a running pb.sweep chunk (sweep.SweepSpec), else None.
    sweep: Any = None
    #: Per-state memo for the dispatcher: (capture uid, instance, index version) → selection.
    memo: Dict[Any, Any] = field(default_factory=dict)


_EMPTY = PatchState()
_active: contextvars.ContextVar[PatchState] = contextvars.ContextVar("patch_backend_patches", default=_EMPTY)


def active_state() -> PatchState:
    return _active.get()


def resolve_root(model: Any) -> nn.Module:
    """The module whose names a patch map uses: unwraps torch.compile and PatchableGraph."""
    from .graph import PatchableGraph

    if isinstance(model, PatchableGraph):
        return model.module
    original = getattr(model, "_orig_mod", None)
    if isinstance(original, nn.Module):
        return original
    if isinstance(model, nn.Module):
        return model
    raise TypeError(
        f"expected a torch.nn.Module, its torch.compile result or a PatchableGraph, got {type(model).__name__}"
    )


def normalize_map(patch_map: PatchMap) -> Dict[str, Tuple[Patch, ...]]:
    """Checks the map's shape (not its names): raises ValueError/KeyError before anything runs."""
    if not isinstance(patch_map, Mapping):
        raise ValueError(
            f"patch map must be a dict of node name -> Patch or list of Patches, got {type(patch_map).__name__}"
        )
    normalized: Dict[str, Tuple[Patch, ...]] = {}
    for key, value in patch_map.items():
        if not isinstance(key, str):
            if hasattr(key, "_name"):
                key = str(key)
            else:
                raise ValueError(f"patch map keys must be node names (str), got {key!r} of type {type(key).__name__}")
        check_name_syntax(key)
        patches = list(value) if isinstance(value, (list, tuple)) else [value]
        for patch in patches:
            if not isinstance(patch, Patch):
                raise ValueError(
                    f"patch map value for {key!r} must be a Patch or a list of Patches, got {type(patch).__name__}"
                )
        normalized[key] = normalized.get(key, ()) + tuple(patches)
    return normalized


def validate_names(index: RootIndex, by_name: Dict[str, Tuple[Patch, ...]], defer_unknown: bool = False) -> bool:
    """Raises KeyError for unknown names, ValueError for patches that cannot apply there whatever
    the shapes (non-tensor node, value type or dtype, custom_op not callable).

    Whether a patch fits its node (slice in range, value broadcasts, dtype) is checked per call,
    against that call's shapes, before the graph runs (``dynamic.check_call_shapes``): a name
    has one shape per captured graph (prompt lengths, prefill and decode), and the next call may
    bring a length not seen yet.

    With ``defer_unknown``, names not captured yet are skipped; returns whether all were found.
    """
    index.refresh()
    found_all = True
    for name, patches in by_name.items():
        named_sites = index.by_name.get(name)
        if not named_sites:
            if name in index.non_tensor:
                raise ValueError(
                    f"{type(patches[0]).__name__} at {name!r}: the node holds no tensor (a number, None or "
                    "size in the result, kept outside the graph); patch_backend patches tensor values only"
                )
            if defer_unknown:
                found_all = False
                continue
            raise unknown_name_error(name, index)
        for patch in patches:
            check_patch_kind(name, named_sites[0].site, patch)
    return found_all


def _check_reuse(roots: Sequence["RootPatches"]) -> None:
    """A patch object may stand in one place at a time, across nodes and across patched models:
    its state (``ProbePatch.activation``, a RecordPatch's list) would mix two places."""
    placed: Dict[int, Tuple[int, str]] = {}
    for position, entry in enumerate(roots):
        for name, patches in entry.by_name.items():
            for patch in patches:
                other = placed.setdefault(id(patch), (position, name))
                if other != (position, name):
                    where = repr(other[1]) if other[0] == position else f"{other[1]!r} of another patched model"
                    raise ValueError(
                        f"the same {type(patch).__name__} object is used at {where} and at {name!r}; "
                        "a patch object may stand in one place at a time (create one per node)"
                    )


@contextlib.contextmanager
def patch(model: Any, patch_map: PatchMap) -> Iterator[None]:
    """Activates ``patch_map`` on ``model`` for the body of the ``with`` block.

    Everything is checked on entry; for a compiled model that has not run yet, names are checked
    at its first call, still before any computation.
    """
    root = resolve_root(model)
    new_names = normalize_map(patch_map)
    index = index_for(root)
    previous = _active.get()
    roots: List[RootPatches] = []
    merged = None
    for entry in previous.roots:
        if entry.index is index:
            merged = {name: patches for name, patches in entry.by_name.items()}
            for name, patches in new_names.items():
                merged[name] = merged.get(name, ()) + patches
            roots.append(RootPatches(index, merged, entry.validated and bool(index.names)))
        else:
            roots.append(entry)
    if merged is None:
        roots.append(RootPatches(index, new_names, False))
        merged = new_names
    _check_reuse(roots)
    known = bool(index.names)
    if known:
        validate_names(index, new_names)
        roots = [RootPatches(r.index, r.by_name, True) if r.index is index else r for r in roots]
    token = _active.set(PatchState(tuple(roots)))
    try:
        yield
    finally:
        _active.reset(token)


def validate_pending(state: PatchState, occurrence: Any = None) -> bool:
    """Called by the dispatcher before a graph runs: checks maps entered before the model ran.

    In a model's very first forward, a graph break in the root's forward means later graphs are
    not captured yet, so a name still unknown is only an error once no graph can be missing:
    the graph about to run (``occurrence``) is the one returning from the root's forward
    (``RootIndex.root_returns``), or the forward started over (the graph this state ran first
    runs again). Until then names found so far are checked and patched, and this returns False
    so the next graph call checks again. (Only the graph about to run counts: a graph captured
    earlier for another instance of the class may not belong to this forward at all.)
    """
    first = state.memo.setdefault("first_occurrence", occurrence)
    if occurrence is not None and occurrence == first:
        state.memo["first_runs"] = state.memo.get("first_runs", 0) + 1
    restarted = state.memo.get("first_runs", 0) > 1
    done = True
    for entry in state.roots:
        if not entry.validated:
            strict = restarted or occurrence in entry.index.refresh().root_returns
            done = validate_names(entry.index, entry.by_name, defer_unknown=not strict) and done
    return done
