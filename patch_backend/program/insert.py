"""The FX insertion pass: a captured graph plus a program spec → the patched graph.

``insert`` is the one pass behind every compiled program: the patched variant of a selection
(``build_variant`` here) and the slot variant of a declared site set (prepared.py). It is a pure
function over graphs: the captured graph is copied, never changed. The spec's runtime inputs
become extra placeholders after the graph's own (ints, scalars, tensors, then each slot's keep
and fill); probes and slots add extra outputs after the graph's own, listed in ``Inserted.extra``.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.fx

from . import ops as patch_ops
from .._torch_compat.symbolic import size_hint
from ..capture.capture import GraphCapture
from ..patches import ProbePatch, RecordPatch
from .custom import is_traceable, opaque_callables, patch_function, warn_opaque
from .plan import Selection
from .spec import (
    CustomOp,
    Entry,
    EntryRef,
    Lowered,
    OpaqueOp,
    PatchOp,
    ProbeOutput,
    ProgramSpec,
    Prefixes,
    RuntimeValues,
    ScalarValue,
    SlotOp,
    TensorValue,
    lower,
)


@dataclass(frozen=True)
class SlotValue:
    """An extra output of a slot: its input (``after`` False) or its result."""

    slot: int
    after: bool


#: What an extra output holds: a probe entry's value, or a slot's input or result.
OutputRef = Union[EntryRef, SlotValue]


@dataclass(frozen=True)
class Inserted:
    gm: torch.fx.GraphModule
    #: How many outputs the captured graph had; the extra outputs follow them.
    original_outputs: int
    extra: Tuple[OutputRef, ...]


@dataclass(frozen=True)
class _SlotInputs:
    keep: torch.fx.Node
    fill: torch.fx.Node
    #: Lean slots only (``SlotForm.sparse``): the flat positions ``keep``/``fill`` apply at.
    index: Optional[torch.fx.Node] = None


@dataclass(frozen=True)
class SlotForm:
    """How ``insert`` emits a spec's slots.

    ``sparse``: each slot takes ``(index, keep, fill)`` of one length, applied at the flat
    positions ``index`` (``ops.sparse_slot``: pb.sweep ships what its patches touch), instead
    of activation-sized ``(keep, fill)``. ``outputs``: each slot's input and result are extra
    graph outputs (pb.prepare's probes read them; a sweep has no probes and skips them).
    """

    sparse: bool = False
    outputs: bool = True


DENSE_SLOTS = SlotForm()


@dataclass(frozen=True)
class _Inputs:
    """The placeholders of the spec's runtime inputs, and the custom ops' traced calls."""

    ints: Optional[torch.fx.Node]
    scalars: Optional[torch.fx.Node]
    tensors: Tuple[torch.fx.Node, ...]
    slots: Tuple[_SlotInputs, ...]
    calls: Mapping[EntryRef, Callable]


@dataclass
class _Outputs:
    """Extra outputs in the order they are emitted, and the probe nodes custom ops may read."""

    nodes: List[torch.fx.Node] = field(default_factory=list)
    refs: List[OutputRef] = field(default_factory=list)
    probes: Dict[EntryRef, torch.fx.Node] = field(default_factory=dict)
    #: Whether slots' inputs and results become outputs (``SlotForm.outputs``).
    slot_outputs: bool = True

    def add(self, ref: OutputRef, node: torch.fx.Node) -> None:
        self.nodes.append(node)
        self.refs.append(ref)


def insert(
    gm: torch.fx.GraphModule,
    spec: ProgramSpec,
    calls: Optional[Mapping[EntryRef, Callable]] = None,
    slot_form: SlotForm = DENSE_SLOTS,
) -> Inserted:
    """Every use of a patched value passes through its chain of sites (``spec.uses``), each
    chain prefix emitted once, before the first user; a site no use passes through is emitted
    before the output so that its probes still report. ``calls`` are the traced stand-ins of
    the spec's custom ops (``Lowered.calls``); ``slot_form`` how slots are emitted."""
    graph = copy.deepcopy(gm.graph)
    nodes = {node.name: node for node in graph.nodes}
    inputs = _add_placeholders(graph, spec, calls or {}, slot_form)
    outputs = _Outputs(slot_outputs=slot_form.outputs)
    uses = spec.uses(graph)
    prefixes = Prefixes(nodes.__getitem__, lambda value, site: _emit_site(graph, spec, site, value, inputs, outputs))
    order = {name: position for position, name in enumerate(nodes)}
    for use, chain in sorted(uses.chains.items(), key=lambda item: order[item[0].consumer]):
        user = nodes[use.consumer]
        with graph.inserting_before(user):
            patched = prefixes.through(use.producer, chain)
        user.replace_input_with(nodes[use.producer], patched)
    output = graph.output_node()
    with graph.inserting_before(output):
        for site in uses.dangling:
            prefixes.through(spec.sites[site].node, (site,))
    results = output.args[0]
    flat = tuple(results) if isinstance(results, (list, tuple)) else (results,)
    output.args = (flat + tuple(outputs.nodes),)
    graph.lint()
    return Inserted(torch.fx.GraphModule(gm, graph), len(flat), tuple(outputs.refs))


def _add_placeholders(
    graph: torch.fx.Graph, spec: ProgramSpec, calls: Mapping[EntryRef, Callable], slot_form: SlotForm
) -> _Inputs:
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    last = placeholders[-1] if placeholders else None

    def placeholder(name: str) -> torch.fx.Node:
        nonlocal last
        with graph.inserting_after(last):
            last = graph.placeholder(name)
        return last

    ints = placeholder("_patch_ints") if spec.ints else None
    scalars = placeholder("_patch_scalars") if spec.scalars else None
    tensors = tuple(placeholder(f"_patch_tensor_{i}") for i in range(spec.tensors))
    if slot_form.sparse:
        slots = tuple(
            _SlotInputs(placeholder(f"_slot_keep_{i}"), placeholder(f"_slot_fill_{i}"), placeholder(f"_slot_index_{i}"))
            for i in range(spec.slots)
        )
    else:
        slots = tuple(
            _SlotInputs(placeholder(f"_slot_keep_{i}"), placeholder(f"_slot_fill_{i}")) for i in range(spec.slots)
        )
    return _Inputs(ints, scalars, tensors, slots, calls)


def _emit_site(
    graph: torch.fx.Graph, spec: ProgramSpec, site: int, value: torch.fx.Node, inputs: _Inputs, outputs: _Outputs
) -> torch.fx.Node:
    for position, entry in enumerate(spec.sites[site].entries):
        value = _emit(graph, entry, EntryRef(site, position), value, inputs, outputs)
    return value


def _emit(
    graph: torch.fx.Graph, entry: Entry, ref: EntryRef, value: torch.fx.Node, inputs: _Inputs, outputs: _Outputs
) -> torch.fx.Node:
    if isinstance(entry, PatchOp):
        args: Tuple[Any, ...] = (value, inputs.ints, inputs.tensors)
        if isinstance(entry.value, TensorValue):
            args += (inputs.tensors[entry.value.slot],)
        elif isinstance(entry.value, ScalarValue):
            args += (graph.call_function(torch.ops.aten.select.int, (inputs.scalars, 0, entry.value.slot)),)
        return graph.call_function(patch_ops.patch_function(entry), args)
    if isinstance(entry, ProbeOutput):
        copied = graph.call_function(patch_ops.probe, (value,))
        outputs.add(ref, copied)
        outputs.probes[ref] = copied
        return value
    if isinstance(entry, CustomOp):
        if entry.clone:
            # The callable may write in place; under functionalization that would write back
            # into a parameter or input, which patches must never modify.
            value = graph.call_function(torch.clone, (value,))
        probes = tuple(outputs.probes.get(p) for p in entry.probes)
        lifted = tuple(inputs.tensors[slot] for slot in entry.tensors)
        return graph.call_function(inputs.calls[ref], (value, probes, lifted))
    if isinstance(entry, OpaqueOp):
        return graph.call_function(torch.ops.patch_backend.opaque_patch.default, (value, entry.slot))
    assert isinstance(entry, SlotOp), entry
    slot = inputs.slots[entry.slot]
    if slot.index is not None:
        result = graph.call_function(patch_ops.sparse_slot, (value, slot.index, slot.keep, slot.fill))
    else:
        result = graph.call_function(patch_ops.slot, (value, slot.keep, slot.fill))
    before = SlotValue(entry.slot, False)
    if outputs.slot_outputs and before not in outputs.refs:
        # A slot's input is an output too (probes before the value patches); a graph input
        # is copied so that no output aliases it.
        outputs.add(before, graph.call_function(patch_ops.probe, (value,)) if value.op == "placeholder" else value)
        outputs.add(SlotValue(entry.slot, True), result)
    return result


# -- the patched variant of a selection --------------------------------------------------------
class CompiledVariant:
    """The compiled program of one spec; runs any selection whose spec equals it."""

    def __init__(self, fn: Callable, spec: ProgramSpec, inserted: Inserted, device: torch.device) -> None:
        self.fn = fn
        self.extra = inserted.extra
        self.original_outputs = inserted.original_outputs
        self.device = device
        #: slot → (site, entry) of the custom ops that run opaque.
        self.opaque = {
            entry.slot: EntryRef(site_index, position)
            for site_index, site in enumerate(spec.sites)
            for position, entry in enumerate(site.entries)
            if isinstance(entry, OpaqueOp)
        }

    def run(self, selection: Selection, args: Sequence[Any]) -> Any:
        return self.run_lowered(selection, lower(selection).values, args)

    def run_lowered(self, selection: Selection, values: RuntimeValues, args: Sequence[Any]) -> Any:
        """``run`` for a caller that already lowered the selection (to get its key): the walk
        is then done once per call instead of twice."""
        inputs = values.inputs(self.device)
        if self.opaque:
            callables = {
                slot: patch_function(selection[ref.site].patches[ref.entry]) for slot, ref in self.opaque.items()
            }
            with opaque_callables(callables):
                outputs = self.fn(*args, *inputs)
        else:
            outputs = self.fn(*args, *inputs)
        if len(outputs) == self.original_outputs:
            return list(outputs)
        for ref, value in zip(self.extra, outputs[self.original_outputs :]):
            # A selection's spec has no slots (prepared.py's have), so every extra output is a probe's.
            if not isinstance(ref, EntryRef):
                raise RuntimeError(f"patch_backend internal error: a patched variant has a slot output {ref}")
            patch = selection[ref.site].patches[ref.entry]
            if isinstance(patch, ProbePatch):
                patch.activation = value.detach()
            elif isinstance(patch, RecordPatch):
                patch.activations.append(value.detach())
            else:
                raise RuntimeError(
                    f"patch_backend internal error: extra output {ref} belongs to {type(patch).__name__}, "
                    "not a ProbePatch or RecordPatch"
                )
        return list(outputs[: self.original_outputs])


def graph_device(gm: torch.fx.GraphModule) -> torch.device:
    for node in gm.graph.nodes:
        value = node.meta.get("example_value")
        if isinstance(value, torch.Tensor):
            return value.device
    return torch.device("cpu")


_opaque_slots = itertools.count()


def _resolve_opaque(gm: torch.fx.GraphModule, lowered: Lowered) -> ProgramSpec:
    """The spec with every custom op that does not trace replaced by an opaque op (warns once
    per site)."""
    nodes = {node.name: node for node in gm.graph.nodes}
    tensors = lowered.values.tensors
    sites = []
    for site_index, site in enumerate(lowered.spec.sites):
        entries: List[Entry] = []
        for position, entry in enumerate(site.entries):
            if isinstance(entry, CustomOp):
                meta = nodes[site.node].meta.get("example_value")
                call = lowered.calls[EntryRef(site_index, position)]
                reason = is_traceable(call, len(entry.probes), tuple(tensors[s] for s in entry.tensors), _example(meta))
                if reason is not None:
                    warn_opaque(gm, site.name, reason)
                    entry = OpaqueOp(next(_opaque_slots))
            entries.append(entry)
        sites.append(replace(site, entries=tuple(entries)))
    return replace(lowered.spec, sites=tuple(sites))


def _example(meta: Any) -> torch.Tensor:
    """A real tensor like a node's example value, to try a callable on."""
    if not isinstance(meta, torch.Tensor):
        return torch.zeros(())
    # A dynamic graph's sizes are symbolic: try the callable at the sizes Dynamo traced with.
    shape = [size_hint(s) for s in meta.shape]
    return torch.zeros(shape, dtype=meta.dtype)


def build_variant(capture: GraphCapture, selection: Selection, args: Sequence[Any], compile_fn: Callable) -> CompiledVariant:
    lowered = lower(selection)
    spec = _resolve_opaque(capture.gm, lowered)
    inserted = insert(capture.gm, spec, lowered.calls)
    device = graph_device(capture.gm)
    fn = compile_fn(inserted.gm, [*args, *lowered.values.inputs(device)])
    return CompiledVariant(fn, spec, inserted, device)
