"""Checks that run before the model does; every message names the node and the patch."""

from __future__ import annotations

import functools
import threading
import weakref
from typing import Any, Dict, Hashable, List, Optional, Set, Tuple, Union

import torch

from .patches import AddPatch, CustomPatch, Patch, ProbePatch, RecordPatch, ReplacePatch, ZeroPatch, normalize_slice

#: The built-in patches that index their target with ``slice`` (the shape checks apply to them).
SlicedPatch = Union[ZeroPatch, AddPatch, ReplacePatch]
#: The built-in patches that also carry a ``value`` (the value checks apply to them).
ValuePatch = Union[AddPatch, ReplacePatch]


def check_name_syntax(name: str) -> None:
    if name in _WELL_FORMED:
        return
    parts = name.split("|")
    if not name or len(parts) > 2 or any(not part for part in parts):
        raise KeyError(
            f"malformed node name {name!r}: expected 'scope.node' or one '|' before a path inside a "
            "nested result (e.g. 'output|sub_0' or 'output|sub_1.sub_0')"
        )
    if len(_WELL_FORMED) < 65536:
        _WELL_FORMED.add(name)


#: Names that passed ``check_name_syntax``: every pb.patch entry checks its names, mostly the same.
_WELL_FORMED: Set[str] = set()


def unknown_name_error(name: str, index: Any) -> KeyError:
    close = index.close_matches(name)
    hint = f"; close matches: {', '.join(close)}" if close else ""
    model = type(index.root).__name__
    return KeyError(f"no node named {name!r} in {model} ({len(index.names)} nodes; pb.nodes(model) lists them){hint}")


def sliced_shape(name: str, patch: SlicedPatch, shape: Tuple[int, ...]) -> Tuple[int, ...]:
    """The shape of ``target[patch.slice]``; raises IndexError naming the node if out of range."""
    if patch.slice is None:
        return tuple(shape)
    index = normalize_slice(patch.slice)
    meta_index: List[Any] = []
    # Meta tensors do not bounds-check index *values*, so tensor/list indices are checked here,
    # against the dim each one indexes: Ellipsis spans the dims no element names, None and bool
    # elements add a dim, a bool mask consumes as many dims as it has.
    named = sum(1 for e in index if e is not None and e is not Ellipsis and not isinstance(e, bool))
    dim = 0
    for element in index:
        if element is Ellipsis:
            dim += max(len(shape) - named, 0)
        elif isinstance(element, (list, torch.Tensor)):
            try:
                values = torch.as_tensor(element)
            except (ValueError, TypeError, RuntimeError) as error:
                raise ValueError(
                    f"{type(patch).__name__} at {name!r}: slice element {element!r} is not a valid index: {error}"
                ) from None
            if values.dtype != torch.bool and values.numel():
                size = shape[dim] if dim < len(shape) else None
                low, high = int(values.min()), int(values.max())
                if size is not None and (low < -size or high >= size):
                    raise IndexError(
                        f"{type(patch).__name__} at {name!r}: index {high if high >= size else low} is out "
                        f"of range for dimension {dim} of size {size} (target shape {tuple(shape)})"
                    )
            dim += max(values.dim(), 1) if values.dtype == torch.bool else 1
            element = values.to("meta")
        elif element is not None and not isinstance(element, bool):
            dim += 1
        meta_index.append(element)
    try:
        return tuple(torch.empty(shape, device="meta")[tuple(meta_index)].shape)
    except IndexError as error:
        raise IndexError(
            f"{type(patch).__name__} at {name!r}: slice {patch.slice!r} does not fit target shape "
            f"{tuple(shape)}: {error}"
        ) from None
    except (ValueError, TypeError, RuntimeError) as error:
        # Not an index torch accepts (a negative or zero step, a float, a string...): the same
        # error for both backends, naming the node, instead of torch's bare message mid-run.
        raise ValueError(
            f"{type(patch).__name__} at {name!r}: slice {patch.slice!r} is not a valid index for "
            f"target shape {tuple(shape)}: {error}"
        ) from None


def _value_meta(name: str, patch: ValuePatch) -> Tuple[Tuple[int, ...], torch.dtype]:
    value = patch.value
    if isinstance(value, torch.Tensor):
        return tuple(value.shape), value.dtype
    if isinstance(value, (bool, int, float)):
        return (), torch.tensor(value).dtype
    raise ValueError(f"{type(patch).__name__} at {name!r}: value must be a tensor or a number, got {type(value).__name__}")


def check_value_kind(name: str, patch: ValuePatch, dtype: Optional[torch.dtype]) -> None:
    """The value checks that do not depend on shapes: type, data, dtype."""
    kind = type(patch).__name__
    _, value_dtype = _value_meta(name, patch)
    if isinstance(patch.value, torch.Tensor) and patch.value.is_meta:
        raise ValueError(f"{kind} at {name!r}: value is a meta tensor, which holds no data")
    if isinstance(patch.value, int) and abs(patch.value) > 2**53:
        # Compiled variants take number values as float64 inputs (one variant for all values).
        raise ValueError(f"{kind} at {name!r}: integer value {patch.value} is too large to pass exactly; use a tensor")
    # Values are converted to the target's dtype (and device) before they apply; a conversion
    # to a lower kind (complex -> float -> int -> bool) would change the numbers, so it is refused.
    if dtype is not None and not _can_cast(value_dtype, dtype):
        raise ValueError(
            f"{kind} at {name!r}: value dtype {value_dtype} cannot be stored in the target's dtype {dtype} "
            "without losing information; convert it explicitly"
        )


@functools.lru_cache(maxsize=None)
def _can_cast(source: torch.dtype, target: torch.dtype) -> bool:
    """``torch.can_cast``, memoised: a few dtype pairs, checked at every pb.patch entry."""
    return torch.can_cast(source, target)


def check_value(name: str, patch: ValuePatch, target_shape: Tuple[int, ...], dtype: torch.dtype) -> None:
    value_shape, _ = _value_meta(name, patch)
    try:
        broadcast = torch.broadcast_shapes(value_shape, target_shape)
    except RuntimeError:
        broadcast = None
    if broadcast != tuple(target_shape):
        raise ValueError(
            f"{type(patch).__name__} at {name!r}: value of shape {value_shape} does not broadcast to the target "
            f"slice of shape {tuple(target_shape)}"
        )
    check_value_kind(name, patch, dtype)


def check_patch_kind(name: str, site: Any, patch: Patch) -> None:
    """What can be checked without the call's shapes; runs when ``patch()`` is entered."""
    if isinstance(patch, CustomPatch) and not callable(patch.custom_op):
        raise ValueError(f"CustomPatch at {name!r}: custom_op must be callable, got {type(patch.custom_op).__name__}")
    if not isinstance(patch, (ZeroPatch, AddPatch, ReplacePatch)):
        return
    if site.shape is None:
        raise ValueError(f"{type(patch).__name__} at {name!r}: the node does not hold a tensor")
    if isinstance(patch, (AddPatch, ReplacePatch)):
        check_value_kind(name, patch, site.dtype)


def check_patch_for_site(name: str, site: Any, patch: Patch) -> None:
    check_patch_kind(name, site, patch)
    if not isinstance(patch, (ZeroPatch, AddPatch, ReplacePatch)):
        return
    if not all(isinstance(s, int) for s in site.shape):
        return  # symbolic shape: checked when the patched graph runs
    target_shape = sliced_shape(name, patch, site.shape)
    if isinstance(patch, (AddPatch, ReplacePatch)):
        check_value(name, patch, target_shape, site.dtype)


def validate_names(index: Any, by_name: Dict[str, Tuple[Patch, ...]], defer_unknown: bool = False) -> bool:
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


def validate_entered(
    index: Any, by_name: Dict[str, Tuple[Patch, ...]], structure: Optional[Hashable] = None
) -> None:
    """``validate_names`` for a map entered once the model's names are known, done once per
    model, name-table version and map structure: a loop of ``pb.patch`` contexts that differ
    only in their values checks the first map. The structure holds everything the checks read
    (names, patch types, value kinds and dtypes, whether a number fits float64); a map it cannot
    stand for (a custom patch's callable, an unusual value) is checked every time.

    ``structure``: the map's ``map_structure``, where the caller read it already."""
    index.refresh()
    if structure is None:
        structure = map_structure(by_name)
    if structure is not None and entered_before(index, structure):
        return
    validate_names(index, by_name)
    if structure is not None:
        with _PASSED_LOCK:
            found = _PASSED.get(id(index))
            if found is None or found[0]() is not index:
                found = _PASSED[id(index)] = (weakref.ref(index, functools.partial(_forget, id(index))), set())
            if len(found[1]) >= 1024:
                found[1].clear()
            found[1].add((index._version, structure))


def entered_before(index: Any, structure: Hashable) -> bool:
    """Whether a map of this ``map_structure`` passed ``validate_entered`` on ``index``'s
    current name table (the caller refreshed it)."""
    found = _PASSED.get(id(index))
    key = (index._version, structure)
    return found is not None and found[0]() is index and key in found[1]


#: Per name table (by ``id``, with a weak reference that tells a live table from a reused id,
#: and whose callback drops the entry with the table), the entry structures that passed.
_PASSED: Dict[int, Tuple["weakref.ref[Any]", Set[Hashable]]] = {}
_PASSED_LOCK = threading.RLock()  # re-entrant: a weak reference callback may run under it


def _forget(key: int, ref: "weakref.ref[Any]") -> None:
    with _PASSED_LOCK:
        found = _PASSED.get(key)
        if found is not None and found[0] is ref:
            del _PASSED[key]


def map_structure(by_name: Dict[str, Tuple[Patch, ...]]) -> Optional[Hashable]:
    """What ``validate_names`` reads of a normalized map, as a key (None: not expressible)."""
    parts = []
    for name, patches in by_name.items():
        kinds = patches_structure(patches)
        if kinds is None:
            return None
        parts.append((name, kinds))
    return tuple(parts)


def patches_structure(patches: Tuple[Patch, ...]) -> Optional[Tuple[Any, ...]]:
    """One name's part of ``map_structure``: per patch its type, and for a value its dtype
    (tensor) or type and whether it fits float64 (number); None for anything else."""
    kinds: List[Any] = []
    for patch in patches:
        kind = type(patch)
        if kind is AddPatch or kind is ReplacePatch:
            value = patch.value  # type: ignore[attr-defined]
            if isinstance(value, _Tensor):
                kinds.append((kind, value.dtype, value.is_meta))
            elif type(value) in _NUMBERS:
                kinds.append((kind, type(value), type(value) is int and abs(value) > 2**53))
            else:
                return None
        elif kind in _VALUELESS:
            kinds.append(kind)
        else:
            return None
    return tuple(kinds)


_Tensor = torch.Tensor
_NUMBERS = (bool, int, float)
_VALUELESS = (ZeroPatch, ProbePatch, RecordPatch)
