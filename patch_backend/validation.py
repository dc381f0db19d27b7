"""Checks that run before the model does; every message names the node and the patch."""

from __future__ import annotations

from typing import Any, Tuple

import torch

from .patches import AddPatch, CustomPatch, Patch, ReplacePatch, ZeroPatch, normalize_slice


def check_name_syntax(name: str) -> None:
    parts = name.split("|")
    if not name or len(parts) > 2 or any(not part for part in parts):
        raise KeyError(
            f"malformed node name {name!r}: expected 'scope.node' or one '|' before a path inside a "
            "nested result (e.g. 'output|sub_0' or 'output|sub_1.sub_0')"
        )


def unknown_name_error(name: str, index: Any) -> KeyError:
    close = index.close_matches(name)
    hint = f"; close matches: {', '.join(close)}" if close else ""
    model = type(index.root).__name__
    return KeyError(f"no node named {name!r} in {model} ({len(index.names)} nodes; pb.nodes(model) lists them){hint}")


def sliced_shape(name: str, patch: Patch, shape: Tuple[int, ...]) -> Tuple[int, ...]:
    """The shape of ``target[patch.slice]``; raises IndexError naming the node if out of range."""
    if getattr(patch, "slice", None) is None:
        return tuple(shape)
    index = normalize_slice(patch.slice)
    meta_index = []
    for dim, element in enumerate(index):
        if isinstance(element, (list, torch.Tensor)):
            values = torch.as_tensor(element)
            if values.dtype != torch.bool and values.numel():
                size = shape[dim] if dim < len(shape) else None
                low, high = int(values.min()), int(values.max())
                if size is not None and (low < -size or high >= size):
                    raise IndexError(
                        f"{type(patch).__name__} at {name!r}: index {high if high >= size else low} is out "
                        f"of range for dimension {dim} of size {size} (target shape {tuple(shape)})"
                    )
            element = values.to("meta")
        meta_index.append(element)
    try:
        return tuple(torch.empty(shape, device="meta")[tuple(meta_index)].shape)
    except IndexError as error:
        raise IndexError(
            f"{type(patch).__name__} at {name!r}: slice {patch.slice!r} does not fit target shape "
            f"{tuple(shape)}: {error}"
        ) from None


def check_value(name: str, patch: Patch, target_shape: Tuple[int, ...], dtype: torch.dtype) -> None:
    value = patch.value
    kind = type(patch).__name__
    if isinstance(value, torch.Tensor):
        value_shape, value_dtype = tuple(value.shape), value.dtype
    elif isinstance(value, (bool, int, float)):
        value_shape, value_dtype = (), torch.tensor(value).dtype
    else:
        raise ValueError(f"{kind} at {name!r}: value must be a tensor or a number, got {type(value).__name__}")
    try:
        broadcast = torch.broadcast_shapes(value_shape, target_shape)
    except RuntimeError:
        broadcast = None
    if broadcast != tuple(target_shape):
        raise ValueError(
            f"{kind} at {name!r}: value of shape {value_shape} does not broadcast to the target "
            f"slice of shape {tuple(target_shape)}"
        )
    lossy = (value_dtype.is_floating_point or value_dtype.is_complex) and not (
        dtype.is_floating_point or dtype.is_complex
    )
    if lossy or (value_dtype.is_complex and not dtype.is_complex):
        raise ValueError(
            f"{kind} at {name!r}: value dtype {value_dtype} cannot be stored in the target's dtype {dtype} "
            "without losing information; convert it explicitly"
        )


def check_patch_for_site(name: str, site: Any, patch: Patch) -> None:
    if isinstance(patch, CustomPatch) and not callable(patch.custom_op):
        raise ValueError(f"CustomPatch at {name!r}: custom_op must be callable, got {type(patch.custom_op).__name__}")
    if not isinstance(patch, (ZeroPatch, AddPatch, ReplacePatch)):
        return
    if site.shape is None:
        raise ValueError(f"{type(patch).__name__} at {name!r}: the node does not hold a tensor")
    if not all(isinstance(s, int) for s in site.shape):
        return  # symbolic shape: checked when the patched graph runs
    target_shape = sliced_shape(name, patch, site.shape)
    if isinstance(patch, (AddPatch, ReplacePatch)):
        check_value(name, patch, target_shape, site.dtype)
