"""Declared site sets: one compiled variant in which every declared site is patchable.

``pb.prepare(model, sites)`` declares sites; each declared site gets a *slot*: two runtime
inputs of the site's shape, ``keep`` (bool) and ``fill``, and the op
``where(keep, x + fill, fill)``. Any list of Zero/Add/Replace patches composes into one
(keep, fill) pair on the host, so every patch map within the declared set — and every row of a
batched sweep (sweep.py) — runs the same compiled code. The slot's input and result are also
graph outputs, which serve ProbePatch/RecordPatch placed before or after the value patches.
The program is a slot spec (``spec.slot_spec``) built by the same insertion pass as any variant.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch

from .._torch_compat.symbolic import concrete_shape, symbol_bindings
from ..capture.capture import GraphCapture
from ..capture.naming import Site
from ..patches import PROBE_PATCHES, VALUE_PATCHES, AddPatch, Patch, ProbePatch, RecordPatch, ReplacePatch, ZeroPatch
from .insert import OutputRef, SlotValue, insert
from .plan import Selection
from .spec import slot_spec


#: What ``isinstance(patch, VALUE_PATCHES)`` / ``PROBE_PATCHES`` narrow a patch to.
ValuePatch = Union[ZeroPatch, AddPatch, ReplacePatch]
ProbingPatch = Union[ProbePatch, RecordPatch]


@dataclass(frozen=True)
class SiteKey:
    """A declared site, as patch maps and sweeps find it again."""

    node: str
    consumers: Optional[frozenset]
    rank: Tuple[int, int]


def site_key(site: Site) -> SiteKey:
    return SiteKey(site.node, site.consumers, site.rank)


def split_probes(
    patches: Sequence[Patch],
) -> Optional[Tuple[List[ProbingPatch], List[ValuePatch], List[ProbingPatch]]]:
    """(probes before, value patches, probes after), or None if the list does not fit a slot."""
    before: List[ProbingPatch] = []
    values: List[ValuePatch] = []
    after: List[ProbingPatch] = []
    for patch in patches:
        if isinstance(patch, PROBE_PATCHES):
            (after if values else before).append(patch)
        elif isinstance(patch, VALUE_PATCHES) and not after:
            values.append(patch)
        else:
            return None
    return before, values, after


def fits(selection: Selection, declared: Dict[SiteKey, int]) -> bool:
    return all(site_key(e.site) in declared and split_probes(e.patches) is not None for e in selection)


def compose(
    patches: Iterable[ValuePatch], keep: torch.Tensor, fill: torch.Tensor, rows: Optional[slice] = None
) -> None:
    """Writes Zero/Add/Replace patches (in order) into ``keep``/``fill`` (restricted to ``rows``).

    ``fill`` takes each patch's own ``op`` (the reference semantics, dtype conversion included);
    a Zero or Replace also clears ``keep`` where it writes, so the slot drops ``x`` there.
    """
    keep_view = keep if rows is None else keep[rows]
    fill_view = fill if rows is None else fill[rows]
    for patch in patches:
        if not isinstance(patch, AddPatch):
            ZeroPatch(slice=patch.slice).op(keep_view)
        patch.op(fill_view)


@dataclass(frozen=True)
class SlotInfo:
    key: SiteKey
    shape: Tuple[int, ...]
    dtype: torch.dtype
    device: torch.device


class PreparedVariant:
    """Compiled once per graph and declared site set; fed (keep, fill) per slot per call."""

    def __init__(
        self, fn: Optional[Callable], slots: List[SlotInfo], original_outputs: int, extra: Sequence[OutputRef]
    ) -> None:
        #: None until ``build_prepared`` compiles the graph (which needs ``identity``'s inputs).
        self.fn = fn
        self.slots = slots
        self.slot_index = {slot.key: position for position, slot in enumerate(slots)}
        self.original_outputs = original_outputs
        #: Position of each slot's input and result among the extra outputs.
        self.extra = {ref: position for position, ref in enumerate(extra)}
        self._identity: Dict[int, Tuple[torch.Tensor, torch.Tensor]] = {}

    def identity(self, position: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """The (keep, fill) of an unpatched slot; cached, since inputs are never written."""
        if position not in self._identity:
            slot = self.slots[position]
            self._identity[position] = (
                torch.ones(slot.shape, dtype=torch.bool, device=slot.device),
                torch.zeros(slot.shape, dtype=slot.dtype, device=slot.device),
            )
        return self._identity[position]

    def fresh(self, position: int) -> Tuple[torch.Tensor, torch.Tensor]:
        keep, fill = self.identity(position)
        return keep.clone(), fill.clone()

    def call(self, args: Sequence[Any], slot_inputs: Dict[int, Tuple[torch.Tensor, torch.Tensor]]):
        """Runs with explicit (keep, fill) per slot position; returns (outputs, [(pre, post)])."""
        extra: List[torch.Tensor] = []
        for position in range(len(self.slots)):
            extra.extend(slot_inputs.get(position) or self.identity(position))
        if self.fn is None:
            raise RuntimeError("patch_backend internal error: a PreparedVariant was called before it was compiled")
        outputs = self.fn(*args, *extra)
        probes = outputs[self.original_outputs :]
        pairs = [
            (probes[self.extra[SlotValue(p, False)]], probes[self.extra[SlotValue(p, True)]]) for p in range(len(self.slots))
        ]
        return list(outputs[: self.original_outputs]), pairs

    def run(self, selection: Selection, args: Sequence[Any]) -> Any:
        inputs: Dict[int, Tuple[torch.Tensor, torch.Tensor]] = {}
        probes_at: List[Tuple[int, List[ProbingPatch], List[ProbingPatch]]] = []
        for entry in selection:
            position = self.slot_index[site_key(entry.site)]
            split = split_probes(entry.patches)
            if split is None:
                # prepare.py runs a selection here only if it ``fits`` the declared sites.
                raise RuntimeError(
                    f"patch_backend internal error: the patches at {entry.site.name!r} do not fit a declared "
                    "site's slot (probes, then Zero/Add/Replace patches, then probes)"
                )
            before, values, after = split
            if values:
                keep, fill = self.fresh(position)
                compose(values, keep, fill)
                inputs[position] = (keep, fill)
            probes_at.append((position, before, after))
        outputs, pairs = self.call(args, inputs)
        for position, before, after in probes_at:
            pre, post = pairs[position]
            for patch in before:
                record(patch, pre)
            for patch in after:
                record(patch, post)
        return outputs


def record(patch: ProbingPatch, value: torch.Tensor) -> None:
    if isinstance(patch, ProbePatch):
        patch.activation = value.detach().clone()
    else:
        patch.activations.append(value.detach().clone())


def build_prepared(
    capture: GraphCapture, sites: List[Site], args: Sequence[Any], compile_fn: Callable
) -> PreparedVariant:
    """The graph with a slot at every declared site, compiled once."""
    spec = slot_spec(sites)
    inserted = insert(capture.gm, spec)
    nodes = {node.name: node for node in capture.gm.graph.nodes}
    placeholders = [n for n in capture.gm.graph.nodes if n.op == "placeholder"]
    # The variant is compiled for this call's concrete shapes (the dispatcher keys it by them).
    bindings = symbol_bindings([n.meta.get("example_value") for n in placeholders], args)
    slots = []
    for site in spec.sites:
        meta = nodes[site.node].meta.get("example_value")
        key = SiteKey(site.node, site.consumers, site.rank)
        slots.append(SlotInfo(key, concrete_shape(meta.shape, bindings), meta.dtype, meta.device))
    variant = PreparedVariant(None, slots, inserted.original_outputs, inserted.extra)
    example_extra = [t for position in range(len(slots)) for t in variant.identity(position)]
    variant.fn = compile_fn(inserted.gm, list(args) + example_extra)
    return variant
