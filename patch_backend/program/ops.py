"""Functional patch ops that the insertion pass puts in the graph and Inductor traces.

A slice becomes a mask built from runtime integers (``arange(n) == pos``, bounds compared
in-graph), so every position of a sweep runs the same compiled code. The ops agree with the
in-place reference semantics of patches.py: ``x[s] = v``, ``x[s] += v``, ``x[s] = 0``. The slice
forms and value references they read are spec.py's; ``PatchFunction`` binds one ``PatchOp`` so
that the graph node's arguments are only tensors.
"""

from __future__ import annotations

import hashlib
import inspect
import sys
import threading
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .spec import (
    AllDims,
    ConstantSlice,
    IndexTensor,
    IntIndex,
    MaskedElement,
    MaskedSlice,
    PatchKind,
    PatchOp,
    SliceForm,
    SliceRange,
    WholeTensor,
)


def _normalize(value: torch.Tensor, n: int, low: int, high: int) -> torch.Tensor:
    return torch.clamp(torch.where(value < 0, value + n, value), low, high)


@dataclass(frozen=True)
class _DimSelection:
    """What one slice element selects along its dim."""

    selected: torch.Tensor
    #: Per position of the dim, the position inside the patch value along it.
    where_in_value: Optional[torch.Tensor]
    #: An int index drops the dim: the value has no axis for it.
    dropped: bool


def _dim_selection(n, element: MaskedElement, ints, index_tensors, device) -> _DimSelection:
    positions = torch.arange(n, device=device)
    if isinstance(element, IntIndex):
        target = ints[element.slot]
        target = torch.where(target < 0, target + n, target)
        return _DimSelection(positions == target, None, True)
    if isinstance(element, SliceRange):
        step = ints[element.step] if element.step is not None else 1
        if element.positive:
            start = _normalize(ints[element.start], n, 0, n) if element.start is not None else 0
            stop = _normalize(ints[element.stop], n, 0, n) if element.stop is not None else n
            offset = positions - start
            length = stop - start
        else:
            start = _normalize(ints[element.start], n, -1, n - 1) if element.start is not None else n - 1
            stop = _normalize(ints[element.stop], n, -1, n - 1) if element.stop is not None else -1
            offset = start - positions
            length = start - stop
            step = -step
        inside = (offset >= 0) & (offset < length) & (offset % step == 0)
        return _DimSelection(inside, offset // step, False)
    assert isinstance(element, IndexTensor), element
    rows = index_tensors[element.slot].to(device=device, dtype=torch.int64)
    rows = torch.where(rows < 0, rows + n, rows)
    where_in_value = torch.full((n,), -1, dtype=torch.int64, device=device)
    where_in_value = where_in_value.index_put((rows,), torch.arange(rows.numel(), device=device))
    return _DimSelection(where_in_value >= 0, where_in_value, False)


def _expand(form: MaskedSlice, rank: int) -> List[Optional[MaskedElement]]:
    """One element per dim, None for a full dim (``...`` and the trailing dims)."""
    expanded: List[Optional[MaskedElement]] = []
    explicit = sum(1 for e in form.elements if not isinstance(e, AllDims))
    for element in form.elements:
        if isinstance(element, AllDims):
            expanded.extend([None] * (rank - explicit))
        else:
            expanded.append(element)
    expanded.extend([None] * (rank - len(expanded)))
    return expanded


def _mask_and_value(x, form: MaskedSlice, ints, index_tensors, value):
    rank = x.dim()
    mask = None
    kept: List[Tuple[int, Optional[torch.Tensor]]] = []  # (x dim, position-in-value index or None)
    dropped = []
    for dim, element in enumerate(_expand(form, rank)):
        if element is None:
            kept.append((dim, None))
            continue
        selection = _dim_selection(x.shape[dim], element, ints, index_tensors, x.device)
        shape = [1] * rank
        shape[dim] = x.shape[dim]
        selected = selection.selected.reshape(shape)
        mask = selected if mask is None else mask & selected
        if selection.dropped:
            dropped.append(dim)
        else:
            kept.append((dim, selection.where_in_value))
    if value is None:
        return mask, None
    value = value.to(x.dtype)
    if value.dim() < len(kept):
        value = value.reshape((1,) * (len(kept) - value.dim()) + tuple(value.shape))
    for axis, (dim, where_in_value) in enumerate(kept):
        if value.shape[axis] == 0:
            # An empty value only fits an empty selection (validation checked it broadcasts), so
            # the mask is all False along this dim; gathering from it would index out of bounds.
            value = value.new_zeros(value.shape[:axis] + (1,) + value.shape[axis + 1:])
        elif where_in_value is not None and value.shape[axis] != 1:
            # Positions outside the selection are masked out, but their gather index must still
            # be in bounds (a slice ending early puts them past the value's end).
            value = value.index_select(axis, torch.clamp(where_in_value, 0, value.shape[axis] - 1))
    for dim in dropped:
        value = value.unsqueeze(dim)
    return mask, value


def _constant_index(form: ConstantSlice, index_tensors: Sequence[torch.Tensor]) -> Tuple[Any, ...]:
    # Any: a ConstantIndex holds whatever Python indexing takes (None, bool, int, slice, ...).
    return tuple(index_tensors[e.slot] if isinstance(e, IndexTensor) else e.value for e in form.elements)


def zero(x: torch.Tensor, form: SliceForm, ints: Optional[torch.Tensor], index_tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    if isinstance(form, WholeTensor):
        return torch.zeros_like(x)
    if isinstance(form, ConstantSlice):
        out = x.clone()
        out[_constant_index(form, index_tensors)] = 0
        return out
    mask, _ = _mask_and_value(x, form, ints, index_tensors, None)
    return x.clone() if mask is None else x.masked_fill(mask, 0)


def replace(
    x: torch.Tensor, form: SliceForm, ints: Optional[torch.Tensor], index_tensors: Sequence[torch.Tensor], value: torch.Tensor
) -> torch.Tensor:
    if isinstance(form, WholeTensor):
        return value.to(x.dtype).expand(x.shape).clone()
    if isinstance(form, ConstantSlice):
        out = x.clone()
        out[_constant_index(form, index_tensors)] = value.to(x.dtype)
        return out
    mask, value = _mask_and_value(x, form, ints, index_tensors, value)
    if mask is None:
        return value.expand(x.shape).clone()
    return torch.where(mask, value, x)


def add(
    x: torch.Tensor, form: SliceForm, ints: Optional[torch.Tensor], index_tensors: Sequence[torch.Tensor], value: torch.Tensor
) -> torch.Tensor:
    if isinstance(form, WholeTensor):
        return x + value.to(x.dtype)
    if isinstance(form, ConstantSlice):
        out = x.clone()
        index = _constant_index(form, index_tensors)
        out[index] = out[index] + value.to(x.dtype)
        return out
    mask, value = _mask_and_value(x, form, ints, index_tensors, value)
    if mask is None:
        return x + value
    return x + torch.where(mask, value, torch.zeros((), dtype=x.dtype, device=x.device))


#: ``(x, form, ints, index_tensors[, value]) -> patched x``: only zero takes no value.
_BY_KIND: Dict[PatchKind, Callable[..., torch.Tensor]] = {
    PatchKind.ZERO: zero,
    PatchKind.ADD: add,
    PatchKind.REPLACE: replace,
}


@dataclass(frozen=True)
class PatchFunction:
    """The graph target of one ``PatchOp``: ``(x, ints, index_tensors[, value]) -> patched x``.

    The op's form is bound here rather than passed as a node argument, since FX codegen can
    only spell plain Python values as arguments; FX names the target after ``__name__``.
    """

    op: PatchOp

    @property
    def __name__(self) -> str:
        return self.op.kind.value

    def __call__(self, x: torch.Tensor, ints: Optional[torch.Tensor], index_tensors, *value: torch.Tensor):
        return _BY_KIND[self.op.kind](x, self.op.form, ints, index_tensors, *value)


#: Every ``PatchFunction`` that ``patch_function`` made, by op. Each is also a global of this
#: module, ``_patch_<kind>_<digest of its op>``: AOTAutograd's on-disk cache keys a graph by its
#: code *and* an import line for every global it calls, which it builds with torch.package's
#: importer, and the importer must find the object again under ``module.__qualname__``. A
#: PatchFunction is an instance; without its own name the importer found the function
#: ``ops.add`` under its ``__name__``, refused the mismatch, and every graph holding a
#: zero/add/replace op bypassed the cache, in every process.
_interned: Dict[PatchOp, PatchFunction] = {}
_interned_lock = threading.Lock()


def patch_function(op: PatchOp) -> PatchFunction:
    """The one ``PatchFunction`` of ``op`` in this process, importable from this module as
    ``_patch_<kind>_<digest>`` (its ``__qualname__``).

    The digest is of ``repr(op)`` (kinds, slice forms, value slots, shapes, dtypes: plain data
    whose repr is the same in every process), so the import line, and with it the cache key,
    tells two forms apart and is the same for the same form in another process. One object per
    op: the importer checks identity, not equality."""
    with _interned_lock:
        function = _interned.get(op)
        if function is None:
            function = PatchFunction(op)
            name = f"_patch_{op.kind.value}_{hashlib.sha256(repr(op).encode()).hexdigest()[:24]}"
            module = sys.modules[__name__]
            if getattr(module, name, None) is None:  # an equal repr of an unequal op: left unnamed
                setattr(module, name, function)
                # An instance attribute: the class's own __qualname__ stays "PatchFunction".
                object.__setattr__(function, "__qualname__", name)
            _interned[op] = function
    return function


def probe(x: torch.Tensor) -> torch.Tensor:
    """A copy for ProbePatch/RecordPatch outputs, so they never alias inputs or parameters."""
    return x.clone()


def slot(x: torch.Tensor, keep: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """A declared site (prepared.py): kept positions get ``x + fill``, the others ``fill``."""
    return torch.where(keep, x + fill, fill)


def sparse_slot(x: torch.Tensor, index: torch.Tensor, keep: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """A lean slot (pb.sweep): ``slot`` applied only at the flat positions ``index`` of ``x``.

    ``index`` holds distinct positions (the sweep pads with untouched positions, never with
    repeats: a gather and a scatter of one position fused in place must not see it twice), so
    what a chunk ships scales with its patches, not with the activation.
    """
    flat = x.reshape(-1)
    values = torch.where(keep, flat[index] + fill, fill)
    return flat.index_put((index,), values).view(x.shape)


def cache_keys() -> Dict[str, str]:
    """The patch ops a variant graph calls, each with a key that changes when their code does
    (a hash of this module's source and the torch version), for torch's on-disk compile caches
    (``_torch_compat.inductor.compile_inductor``'s ``cacheable``)."""
    if not _cache_keys:
        digest = hashlib.sha256(inspect.getsource(sys.modules[__name__]).encode()).hexdigest()[:16]
        for function in (zero, replace, add, probe, slot, sparse_slot):
            _cache_keys[f"{function.__module__}.{function.__name__}"] = f"{digest}-{torch.__version__}"
    return _cache_keys


_cache_keys: Dict[str, str] = {}
