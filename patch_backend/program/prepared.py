"""Declared site sets: one compiled variant in which every declared site is patchable.

``pb.prepare(model, sites)`` declares sites; each declared site gets a *slot*: two runtime
inputs of the site's shape, ``keep`` (bool) and ``fill``, and the op
``where(keep, x + fill, fill)``. Any list of Zero/Add/Replace patches composes into one
(keep, fill) pair on the host, so every patch map within the declared set — and every row of a
batched sweep (sweep.py) — runs the same compiled code. The slot's input and result are also
graph outputs, which serve ProbePatch/RecordPatch placed before or after the value patches.
The program is a slot spec (``spec.slot_spec``) built by the same insertion pass as any variant.

pb.sweep's programs (``build_sweep_program``) use *lean* slots instead: per slot a chunk ships
``(keep, fill, index)`` at the flat positions its cells patch (``ops.sparse_slot``), padded to a
per-sweep capacity so that every chunk runs one compiled program, and no slot outputs; and the
part of the forward before the chunk's earliest patched block runs once at the base batch
(program/fanout.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch

from .._torch_compat.symbolic import concrete_shape, symbol_bindings
from ..capture.capture import GraphCapture
from ..capture.naming import Site
from ..patches import PROBE_PATCHES, VALUE_PATCHES, AddPatch, Patch, ProbePatch, RecordPatch, ReplacePatch, ZeroPatch
from .fanout import FanOutRefused, fan_out
from .insert import OutputRef, SlotForm, SlotValue, insert
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


# -- lean slots: pb.sweep's programs -----------------------------------------------------------
@dataclass(frozen=True)
class CellEntries:
    """One cell's patches at one site, compacted: the flat positions (within one row block)
    they change, with the slot's keep and fill there. What a sweep ships scales with these."""

    index: torch.Tensor
    keep: torch.Tensor
    fill: torch.Tensor


def cell_entries(patches: Iterable[ValuePatch], shape: Tuple[int, ...], dtype: torch.dtype, device: torch.device) -> CellEntries:
    """Composes ``patches`` with the reference ops (``compose``) on one row block's (keep, fill)
    and keeps the positions they change: exact patch semantics, a per-cell-sized scratch only."""
    keep = torch.ones(shape, dtype=torch.bool, device=device)
    fill = torch.zeros(shape, dtype=dtype, device=device)
    compose(patches, keep, fill)
    keep, fill = keep.reshape(-1), fill.reshape(-1)
    changed = (~keep | (fill != 0)).nonzero().squeeze(1)
    return CellEntries(changed, keep[changed], fill[changed])


@dataclass(frozen=True)
class LeanSlot(SlotInfo):
    #: Length of the slot's (index, keep, fill): the most positions any chunk patches here.
    capacity: int


class SweepProgram:
    """A sweep's compiled program: lean slots at its sites, fanned out after its cut (or not).

    Called with the batched graph's inputs and, per slot, ``(keep, fill, index)`` of the slot's
    capacity; ``index`` distinct flat positions of the K·B activation.
    """

    def __init__(self, slots: List[LeanSlot], original_outputs: int, cut: Optional[str], refused: Optional[str]) -> None:
        self.fn: Optional[Callable] = None
        self.slots = slots
        self.slot_index = {slot.key: position for position, slot in enumerate(slots)}
        self.original_outputs = original_outputs
        #: The first node run at the chunk's rows (None: every node runs at K·B).
        self.cut = cut
        #: Why the fan-out was refused, if it was tried and refused.
        self.refused = refused
        self._identity: Dict[int, Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def identity(self, position: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """An untouched slot's inputs: keep everything at positions 0..capacity-1."""
        if position not in self._identity:
            slot = self.slots[position]
            self._identity[position] = (
                torch.ones(slot.capacity, dtype=torch.bool, device=slot.device),
                torch.zeros(slot.capacity, dtype=slot.dtype, device=slot.device),
                torch.arange(slot.capacity, dtype=torch.int64, device=slot.device),
            )
        return self._identity[position]

    def call(self, args: Sequence[Any], slot_inputs: Dict[int, Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> List[Any]:
        extra: List[torch.Tensor] = []
        for position in range(len(self.slots)):
            extra.extend(slot_inputs.get(position) or self.identity(position))
        if self.fn is None:
            raise RuntimeError("patch_backend internal error: a SweepProgram was called before it was compiled")
        outputs = self.fn(*args, *extra)
        return list(outputs[: self.original_outputs])


def lean_inputs(slot: LeanSlot, parts: Sequence[Tuple[int, CellEntries]]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(keep, fill, index) of one slot for one chunk: each ``(offset, entries)`` at its row
    block's offset, padded to the capacity with untouched positions (kept, nothing added) that
    no entry uses, so that every index is distinct."""
    if parts:
        index = torch.cat([entries.index + offset for offset, entries in parts])
        keep = torch.cat([entries.keep for _, entries in parts])
        fill = torch.cat([entries.fill.to(slot.dtype) for _, entries in parts])
    else:
        index = torch.zeros(0, dtype=torch.int64, device=slot.device)
        keep = torch.zeros(0, dtype=torch.bool, device=slot.device)
        fill = torch.zeros(0, dtype=slot.dtype, device=slot.device)
    missing = slot.capacity - index.numel()
    if missing < 0:
        raise RuntimeError(f"patch_backend internal error: {index.numel()} patched positions exceed a slot of {slot.capacity}")
    if missing:
        # Among 0..capacity-1 at most index.numel() are taken: enough are free.
        candidates = torch.arange(slot.capacity, dtype=torch.int64, device=slot.device)
        free = candidates[~torch.isin(candidates, index)][:missing]
        index = torch.cat([index, free])
        keep = torch.cat([keep, torch.ones(missing, dtype=torch.bool, device=slot.device)])
        fill = torch.cat([fill, torch.zeros(missing, dtype=slot.dtype, device=slot.device)])
    return keep, fill, index


def slot_shapes(
    capture: GraphCapture, sites: Sequence[Site], args: Sequence[Any]
) -> Dict[SiteKey, Tuple[Tuple[int, ...], torch.dtype, torch.device]]:
    """Each site's concrete (shape, dtype, device) in this call of ``capture``'s graph."""
    nodes = {node.name: node for node in capture.gm.graph.nodes}
    placeholders = [n for n in capture.gm.graph.nodes if n.op == "placeholder"]
    bindings = symbol_bindings([n.meta.get("example_value") for n in placeholders], args)
    shapes = {}
    for site in sites:
        meta = nodes[site.node].meta.get("example_value")
        shapes[site_key(site)] = (concrete_shape(meta.shape, bindings), meta.dtype, meta.device)
    return shapes


def build_sweep_program(
    capture: GraphCapture,
    sites: List[Site],
    capacities: Dict[SiteKey, int],
    args: Sequence[Any],
    compile_fn: Callable,
    base: Optional[torch.fx.GraphModule] = None,
    cut: Optional[str] = None,
    copies: int = 1,
) -> SweepProgram:
    """The batched graph with a lean slot at every site, fanned out at ``cut`` from ``base``
    (the same code's graph at the base batch) when given and exact (program/fanout.py)."""
    spec = slot_spec(sites)
    inserted = insert(capture.gm, spec, slot_form=SlotForm(sparse=True, outputs=False))
    shapes = slot_shapes(capture, sites, args)
    keys = [SiteKey(site.node, site.consumers, site.rank) for site in spec.sites]
    slots = [LeanSlot(key, *shapes[key], capacities[key]) for key in keys]
    gm = inserted.gm
    refused = None
    used_cut = None
    if base is not None and cut is not None:
        try:
            fanned = fan_out(gm, base, cut, copies)
            assert fanned is not None
            gm, used_cut = fanned.gm, cut
        except FanOutRefused as error:
            refused = str(error)
    program = SweepProgram(slots, inserted.original_outputs, used_cut, refused)
    example_extra = [t for position in range(len(slots)) for t in program.identity(position)]
    program.fn = compile_fn(gm, list(args) + example_extra)
    return program
