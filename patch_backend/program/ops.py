"""Functional patch ops that the rewrite inserts and Inductor traces into the compiled variant.

A slice becomes a mask built from runtime integers (``arange(n) == pos``, bounds compared
in-graph), so every position of a sweep runs the same compiled code. The ops agree with the
in-place reference semantics of patches.py: ``x[s] = v``, ``x[s] += v``, ``x[s] = 0``.

A *spec* is the slice as the compiled code sees it, one entry per index element:
``("int", k)``, ``("slice", start_k, stop_k, step_k, positive)`` (``k`` index into the runtime
int vector, or None), ``("index", t)`` (t: position in the runtime index tensors),
``("ellipsis",)`` — or ``("fallback", index)`` for forms masks cannot express (kept constant).
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple

import torch

Spec = Optional[Tuple[Any, ...]]


def _normalize(value: torch.Tensor, n: int, low: int, high: int) -> torch.Tensor:
    return torch.clamp(torch.where(value < 0, value + n, value), low, high)


def _dim_selection(n, element, ints, index_tensors, device):
    """(selected mask over the dim, position inside the value along the dim, dim dropped?)."""
    positions = torch.arange(n, device=device)
    kind = element[0]
    if kind == "int":
        target = ints[element[1]]
        target = torch.where(target < 0, target + n, target)
        return positions == target, None, True
    if kind == "slice":
        _, start_k, stop_k, step_k, positive = element
        step = ints[step_k] if step_k is not None else 1
        if positive:
            start = _normalize(ints[start_k], n, 0, n) if start_k is not None else 0
            stop = _normalize(ints[stop_k], n, 0, n) if stop_k is not None else n
            offset = positions - start
        else:
            start = _normalize(ints[start_k], n, -1, n - 1) if start_k is not None else n - 1
            stop = _normalize(ints[stop_k], n, -1, n - 1) if stop_k is not None else -1
            offset = start - positions
            step = -step
        inside = (offset >= 0) & (offset < (stop - start if positive else start - stop)) & (offset % step == 0)
        return inside, offset // step, False
    if kind == "index":
        rows = index_tensors[element[1]].to(device=device, dtype=torch.int64)
        rows = torch.where(rows < 0, rows + n, rows)
        where_in_value = torch.full((n,), -1, dtype=torch.int64, device=device)
        where_in_value = where_in_value.index_put((rows,), torch.arange(rows.numel(), device=device))
        return where_in_value >= 0, where_in_value, False
    raise ValueError(f"unknown slice element {element!r}")


def _expand_spec(spec: Tuple[Any, ...], rank: int) -> List[Any]:
    expanded: List[Any] = []
    explicit = sum(1 for e in spec if e[0] != "ellipsis")
    for element in spec:
        if element[0] == "ellipsis":
            expanded.extend([("full",)] * (rank - explicit))
        else:
            expanded.append(element)
    expanded.extend([("full",)] * (rank - len(expanded)))
    return expanded


def _mask_and_value(x, spec, ints, index_tensors, value):
    rank = x.dim()
    dims = _expand_spec(spec, rank)
    mask = None
    kept = []  # (x dim, position-in-value index or None)
    dropped = []
    for dim, element in enumerate(dims):
        if element[0] == "full":
            kept.append((dim, None))
            continue
        selected, where_in_value, is_dropped = _dim_selection(x.shape[dim], element, ints, index_tensors, x.device)
        shape = [1] * rank
        shape[dim] = x.shape[dim]
        selected = selected.reshape(shape)
        mask = selected if mask is None else mask & selected
        if is_dropped:
            dropped.append(dim)
        else:
            kept.append((dim, where_in_value))
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


def _fallback_index(index: Tuple[Any, ...], index_tensors: Sequence[torch.Tensor]) -> Tuple[Any, ...]:
    return tuple(index_tensors[e[1]] if isinstance(e, tuple) and e and e[0] == "tensor" else e for e in index)


def zero(x: torch.Tensor, spec: Spec, ints: torch.Tensor, index_tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    if spec is None:
        return torch.zeros_like(x)
    if spec[0] == "fallback":
        out = x.clone()
        out[_fallback_index(spec[1], index_tensors)] = 0
        return out
    mask, _ = _mask_and_value(x, spec, ints, index_tensors, None)
    return x.clone() if mask is None else x.masked_fill(mask, 0)


def replace(x, spec: Spec, ints, index_tensors, value: torch.Tensor) -> torch.Tensor:
    if spec is None:
        return value.to(x.dtype).expand(x.shape).clone()
    if spec[0] == "fallback":
        out = x.clone()
        out[_fallback_index(spec[1], index_tensors)] = value.to(x.dtype)
        return out
    mask, value = _mask_and_value(x, spec, ints, index_tensors, value)
    if mask is None:
        return value.expand(x.shape).clone()
    return torch.where(mask, value, x)


def add(x, spec: Spec, ints, index_tensors, value: torch.Tensor) -> torch.Tensor:
    if spec is None:
        return x + value.to(x.dtype)
    if spec[0] == "fallback":
        out = x.clone()
        index = _fallback_index(spec[1], index_tensors)
        out[index] = out[index] + value.to(x.dtype)
        return out
    mask, value = _mask_and_value(x, spec, ints, index_tensors, value)
    if mask is None:
        return x + value
    return x + torch.where(mask, value, torch.zeros((), dtype=x.dtype, device=x.device))


def probe(x: torch.Tensor) -> torch.Tensor:
    """A copy for ProbePatch/RecordPatch outputs, so they never alias inputs or parameters."""
    return x.clone()


def slot(x: torch.Tensor, keep: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """A declared site (prepared.py): kept positions get ``x + fill``, the others ``fill``."""
    return torch.where(keep, x + fill, fill)
