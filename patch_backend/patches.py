"""Patch classes, compatible with graphpatch 0.2.3's public API.

Each class's ``op`` is the *reference* semantics: ``graphpatch_eager`` calls it directly on the
(cloned) activation. The compiled backend does not call ``op`` for the built-in kinds; it lowers
them to functional graph ops (``program/spec.py`` says how, ``program/ops.py`` does it) that must
agree with ``op`` exactly, which is what the tests check. User-defined subclasses that override
``op`` are traced like CustomPatch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Generic, List, Optional, Tuple, TypeVar, Union

import torch

TensorSliceElement = Union[int, slice, torch.Tensor]
TensorSlice = Union[TensorSliceElement, List["TensorSlice"], Tuple["TensorSlice", ...]]
#: The value a patch operates on; ``Patch`` is generic in it, as graphpatch's is, so a custom
#: patch can be declared ``class RomePatch(Patch[torch.Tensor])``.
PatchTarget = TypeVar("PatchTarget")
#: What the built-in patches accept and return.
PatchableValue = Union[torch.Tensor, float, int, bool]

__all__ = [
    "Patch",
    "AddPatch",
    "CustomPatch",
    "ProbePatch",
    "RecordPatch",
    "ReplacePatch",
    "ZeroPatch",
    "TensorSlice",
    "TensorSliceElement",
    "PatchTarget",
    "PatchableValue",
    "normalize_slice",
]


def normalize_slice(tensor_slice: TensorSlice) -> Tuple[Any, ...]:
    """Turns a TensorSlice into the index tuple Python indexing would use.

    graphpatch's convention: the outer sequence (list or tuple) is the per-dimension index;
    a sequence *inside* it selects several rows along that dimension (an advanced index).
    """
    if isinstance(tensor_slice, (list, tuple)):
        elements = tensor_slice
    else:
        elements = (tensor_slice,)
    normalized: List[Any] = []
    for element in elements:
        if isinstance(element, (list, tuple)):
            normalized.append(list(element))
        else:
            normalized.append(element)
    return tuple(normalized)


@dataclass(kw_only=True)
class Patch(Generic[PatchTarget]):
    """Base class: an operation on the activation at one node.

    Subclasses are keyword-only dataclasses overriding ``op``, optionally parametrized by the
    value type (``Patch[torch.Tensor]``, graphpatch's spelling); ``requires_clone`` says whether
    ``op`` may modify its argument in place (the activation is then cloned once per node, so no
    patch ever mutates a parameter, buffer or input).
    """

    requires_clone: bool = field(default=True, init=False, repr=False)
    path: Optional[str] = field(default=None, init=False, repr=False)

    def op(self, original_output: PatchTarget) -> PatchTarget:
        raise NotImplementedError(f"{type(self).__name__} must override op()")


@dataclass(kw_only=True)
class _SlicedPatch(Patch[PatchableValue]):
    slice: Optional[TensorSlice] = None

    def _index(self) -> Any:
        return Ellipsis if self.slice is None else normalize_slice(self.slice)

    def _tensor(self, original_output: PatchableValue) -> torch.Tensor:
        """The target as a tensor, which indexing (``target[slice] = ...``) needs.

        Validation refuses these patches at nodes that hold no tensor, before the model runs;
        this is the same TypeError indexing a number would raise, with the patch named.
        """
        if not isinstance(original_output, torch.Tensor):
            raise TypeError(
                f"{type(self).__name__} needs a tensor target, got {type(original_output).__name__}"
            )
        return original_output


@dataclass(kw_only=True)
class ZeroPatch(_SlicedPatch):
    """Zeroes (a slice of) the target."""

    def op(self, original_output: PatchableValue) -> PatchableValue:
        target = self._tensor(original_output)
        target[self._index()] = 0
        return target


@dataclass(kw_only=True)
class AddPatch(_SlicedPatch):
    """Adds ``value`` to (a slice of) the target."""

    value: PatchableValue

    def op(self, original_output: PatchableValue) -> PatchableValue:
        target = self._tensor(original_output)
        target[self._index()] += _as_target(self.value, target)
        return target


@dataclass(kw_only=True)
class ReplacePatch(_SlicedPatch):
    """Replaces (a slice of) the target with ``value``."""

    value: PatchableValue

    def op(self, original_output: PatchableValue) -> PatchableValue:
        if not isinstance(original_output, torch.Tensor):
            return self.value
        original_output[self._index()] = _as_target(self.value, original_output)
        return original_output


@dataclass(kw_only=True)
class CustomPatch(Patch[PatchTarget]):
    """Replaces the target with ``custom_op(target)``."""

    requires_clone: bool = True
    custom_op: Callable[[PatchTarget], PatchTarget]

    def op(self, original_output: PatchTarget) -> PatchTarget:
        return self.custom_op(original_output)


@dataclass(kw_only=True)
class ProbePatch(Patch[PatchableValue]):
    """Keeps a detached copy of the target's latest activation in ``activation``."""

    requires_clone: bool = field(default=False, init=False, repr=False)
    activation: Optional[PatchableValue] = field(default=None, init=False)

    def op(self, original_output: PatchableValue) -> PatchableValue:
        self.activation = _detached_copy(original_output)
        return original_output


@dataclass(kw_only=True)
class RecordPatch(Patch[PatchableValue]):
    """Appends a detached copy of every activation of the target to ``activations``."""

    requires_clone: bool = field(default=False, init=False, repr=False)
    activations: List[PatchableValue] = field(default_factory=list)

    def op(self, original_output: PatchableValue) -> PatchableValue:
        self.activations.append(_detached_copy(original_output))
        return original_output


def _detached_copy(value: PatchableValue) -> PatchableValue:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    return value


def _as_target(value: PatchableValue, target: PatchableValue) -> PatchableValue:
    """A tensor value converted to the target's device and dtype before it is applied.

    Validation refuses values whose dtype the target cannot hold (float into int, ...); the rest
    are converted here, so the eager reference computes exactly what the compiled ops do (they
    convert first too) instead of depending on how each indexing path promotes dtypes
    (``x[[0, 1], [1, 0]] = float64_value`` on a float32 ``x`` raises, ``x[0] = ...`` does not).
    """
    if isinstance(value, torch.Tensor) and isinstance(target, torch.Tensor):
        if value.device != target.device or value.dtype != target.dtype:
            return value.to(device=target.device, dtype=target.dtype)
    return value


#: The value patches: lowered to masked graph ops, and composable into a declared site's slot.
VALUE_PATCHES = (ZeroPatch, AddPatch, ReplacePatch)
#: The patches that only read the value: extra graph outputs in a compiled variant.
PROBE_PATCHES = (ProbePatch, RecordPatch)
