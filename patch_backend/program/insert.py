"""FX pass: insert patch ops into a copy of the graph and compile it as a variant.

Patch values, slice integers and index tensors become extra graph inputs; probe and record
values become extra graph outputs. ``lower`` turns the selection into those inputs in a fixed
order, so the variant built for one selection runs any selection of the same structure.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Sequence, Tuple

import torch
import torch.fx

from . import ops as patch_ops
from ..capture.capture import GraphCapture
from .custom import CustomLowering, is_traceable, lower_custom, opaque_callables, warn_opaque, patch_function
from ..patches import AddPatch, Patch, ProbePatch, RecordPatch, ReplacePatch, ZeroPatch, normalize_slice
from .plan import Chain, Selection, chains, dangling, probe_positions


def masked_form(index: Tuple[Any, ...]) -> bool:
    advanced = 0
    for element in index:
        if isinstance(element, bool) or element is None:
            return False
        if isinstance(element, (list, torch.Tensor)):
            values = torch.as_tensor(element)
            if values.dim() != 1 or values.dtype == torch.bool or values.is_floating_point():
                return False
            advanced += 1
        elif isinstance(element, slice):
            if element.step == 0:
                return False
        elif not (isinstance(element, int) or element is Ellipsis):
            return False
    return advanced <= 1


@dataclass
class Lowered:
    """The runtime inputs of one call, in the order the variant's extra placeholders expect."""

    ints: List[int] = field(default_factory=list)
    scalars: List[float] = field(default_factory=list)
    tensors: List[torch.Tensor] = field(default_factory=list)
    #: Per (selection entry, patch): the op spec the graph was built with.
    specs: Dict[Tuple[int, int], Any] = field(default_factory=dict)
    customs: Dict[Tuple[int, int], CustomLowering] = field(default_factory=dict)


def _lower_slice(tensor_slice: Any, lowered: Lowered) -> Any:
    if tensor_slice is None:
        return None
    index = normalize_slice(tensor_slice)
    if not masked_form(index):
        elements = []
        for element in index:
            if isinstance(element, (list, torch.Tensor)):
                lowered.tensors.append(torch.as_tensor(element))
                elements.append(("tensor", len(lowered.tensors) - 1))
            else:
                elements.append(element)
        return ("fallback", tuple(elements))
    spec = []
    for element in index:
        if element is Ellipsis:
            spec.append(("ellipsis",))
        elif isinstance(element, int):
            lowered.ints.append(element)
            spec.append(("int", len(lowered.ints) - 1))
        elif isinstance(element, slice):
            keys = []
            for bound in (element.start, element.stop, element.step):
                if bound is None:
                    keys.append(None)
                else:
                    lowered.ints.append(int(bound))
                    keys.append(len(lowered.ints) - 1)
            spec.append(("slice", *keys, element.step is None or element.step > 0))
        else:
            lowered.tensors.append(torch.as_tensor(element))
            spec.append(("index", len(lowered.tensors) - 1))
    return tuple(spec)


def _lower_value(value: Any, lowered: Lowered) -> Tuple[str, int]:
    if isinstance(value, torch.Tensor):
        lowered.tensors.append(value)
        return ("tensor", len(lowered.tensors) - 1)
    lowered.scalars.append(float(value))
    return ("scalar", len(lowered.scalars) - 1)


def lower(selection: Selection) -> Lowered:
    lowered = Lowered()
    probe_values = probe_positions(selection)
    for entry_index, entry in enumerate(selection):
        for patch_index, patch in enumerate(entry.patches):
            key = (entry_index, patch_index)
            if isinstance(patch, (ProbePatch, RecordPatch)):
                continue
            if isinstance(patch, (ZeroPatch, AddPatch, ReplacePatch)):
                spec = _lower_slice(patch.slice, lowered)
                value = None if isinstance(patch, ZeroPatch) else _lower_value(patch.value, lowered)
                lowered.specs[key] = (type(patch).__name__, spec, value)
            else:
                lowered.customs[key] = lower_custom(patch, lowered.tensors, probe_values)
    return lowered


class _Builder:
    """Emits the patched graph for one selection."""

    def __init__(
        self, gm: torch.fx.GraphModule, selection: Selection, lowered: Lowered, opaque: Dict[Tuple[int, int], int]
    ) -> None:
        self.opaque = opaque
        self.gm = torch.fx.GraphModule(gm, copy.deepcopy(gm.graph))
        self.graph = self.gm.graph
        self.selection = selection
        self.lowered = lowered
        self.nodes = {node.name: node for node in self.graph.nodes}
        self.probe_outputs: List[Tuple[Tuple[int, int], torch.fx.Node]] = []
        self.probe_nodes: Dict[Tuple[int, int], torch.fx.Node] = {}
        self.memo: Dict[Tuple[str, Chain], torch.fx.Node] = {}
        placeholders = [n for n in self.graph.nodes if n.op == "placeholder"]
        self.original_inputs = len(placeholders)
        with self.graph.inserting_after(placeholders[-1] if placeholders else None):
            self.ints = self.graph.placeholder("_patch_ints")
        with self.graph.inserting_after(self.ints):
            self.scalars = self.graph.placeholder("_patch_scalars")
        previous = self.scalars
        self.tensors: List[torch.fx.Node] = []
        for position in range(len(lowered.tensors)):
            with self.graph.inserting_after(previous):
                previous = self.graph.placeholder(f"_patch_tensor_{position}")
            self.tensors.append(previous)

    def build(self) -> torch.fx.GraphModule:
        use_chains = chains(self.graph, self.selection)
        for (producer, consumer), chain in sorted(use_chains.items(), key=lambda item: self._order(item[0][1])):
            user = self.nodes[consumer]
            with self.graph.inserting_before(user):
                patched = self._through(producer, chain)
            user.replace_input_with(self.nodes[producer], patched)
        output = next(n for n in self.graph.nodes if n.op == "output")
        for position in dangling(self.graph, self.selection, use_chains):
            with self.graph.inserting_before(output):
                self._through(self.selection[position].site.node, (position,))
        results = output.args[0]
        flat = tuple(results) if isinstance(results, (list, tuple)) else (results,)
        self.original_outputs = len(flat)
        output.args = (flat + tuple(node for _, node in self.probe_outputs),)
        self.graph.lint()
        self.gm.recompile()
        return self.gm

    def _order(self, name: str) -> int:
        for position, node in enumerate(self.graph.nodes):
            if node.name == name:
                return position
        return -1

    def _through(self, producer: str, chain: Chain) -> torch.fx.Node:
        key = (producer, chain)
        if key in self.memo:
            return self.memo[key]
        value = self._through(producer, chain[:-1]) if len(chain) > 1 else self.nodes[producer]
        entry_index = chain[-1]
        for patch_index, patch in enumerate(self.selection[entry_index].patches):
            value = self._apply(value, (entry_index, patch_index), patch)
        self.memo[key] = value
        return value

    def _apply(self, value: torch.fx.Node, key: Tuple[int, int], patch: Patch) -> torch.fx.Node:
        graph = self.graph
        if isinstance(patch, (ProbePatch, RecordPatch)):
            copy_node = graph.call_function(patch_ops.probe, (value,))
            self.probe_outputs.append((key, copy_node))
            self.probe_nodes[key] = copy_node
            return value
        if key in self.lowered.specs:
            kind, spec, value_ref = self.lowered.specs[key]
            tensors = tuple(self.tensors)
            if kind == "ZeroPatch":
                return graph.call_function(patch_ops.zero, (value, spec, self.ints, tensors))
            source, position = value_ref
            if source == "tensor":
                patch_value = self.tensors[position]
            else:
                patch_value = graph.call_function(torch.ops.aten.select.int, (self.scalars, 0, position))
            op = patch_ops.replace if kind == "ReplacePatch" else patch_ops.add
            return graph.call_function(op, (value, spec, self.ints, tensors, patch_value))
        if key in self.opaque:
            return graph.call_function(torch.ops.patch_backend.opaque_patch.default, (value, self.opaque[key]))
        if patch.requires_clone:
            # The callable may write in place; under functionalization that would write back
            # into a parameter or input, which patches must never modify.
            value = graph.call_function(torch.clone, (value,))
        custom = self.lowered.customs[key]
        probes = tuple(self.probe_nodes.get(position) for position in custom.probe_keys)
        lifted = tuple(self.tensors[position] for position in custom.tensor_positions)
        return graph.call_function(custom.traced_call, (value, probes, lifted))


class CompiledVariant:
    def __init__(
        self,
        fn: Callable,
        probe_keys: List[Tuple[int, int]],
        original_outputs: int,
        device: torch.device,
        opaque: Dict[Tuple[int, int], int],
    ) -> None:
        self.fn = fn
        self.probe_keys = probe_keys
        self.original_outputs = original_outputs
        self.device = device
        self.opaque = opaque

    def run(self, selection: Selection, args: Sequence[Any]) -> Any:
        lowered = lower(selection)
        callables = {
            slot: patch_function(selection[entry_index].patches[patch_index])
            for (entry_index, patch_index), slot in self.opaque.items()
        }
        with opaque_callables(callables):
            outputs = self.fn(*args, *runtime_inputs(lowered, self.device))
        for (entry_index, patch_index), value in zip(self.probe_keys, outputs[self.original_outputs:]):
            patch = selection[entry_index].patches[patch_index]
            if isinstance(patch, ProbePatch):
                patch.activation = value.detach()
            else:
                patch.activations.append(value.detach())
        return list(outputs[: self.original_outputs])


def runtime_inputs(lowered: Lowered, device: torch.device) -> List[torch.Tensor]:
    ints = torch.tensor(lowered.ints or [0], dtype=torch.int64, device=device)
    scalars = torch.tensor(lowered.scalars or [0.0], dtype=torch.float64, device=device)
    tensors = [t if t.device == device else t.to(device) for t in lowered.tensors]
    return [ints, scalars, *tensors]


def graph_device(gm: torch.fx.GraphModule) -> torch.device:
    for node in gm.graph.nodes:
        value = node.meta.get("example_value")
        if isinstance(value, torch.Tensor):
            return value.device
    return torch.device("cpu")


_opaque_slots = itertools.count()


def _opaque_customs(capture: GraphCapture, selection: Selection, lowered: Lowered) -> Dict[Tuple[int, int], int]:
    """Custom patches that do not trace, each given an opaque-op slot (warns once per node)."""
    nodes = {node.name: node for node in capture.gm.graph.nodes}
    opaque = {}
    for key, lowering in lowered.customs.items():
        site = selection[key[0]].site
        meta = nodes[site.node].meta.get("example_value")
        # A dynamic graph's sizes are symbolic: try the callable at the sizes Dynamo traced with.
        shape = [int(s.node.hint) if isinstance(s, torch.SymInt) and s.node.has_hint() else s for s in meta.shape] \
            if isinstance(meta, torch.Tensor) else []
        example = torch.zeros(shape, dtype=meta.dtype) if isinstance(meta, torch.Tensor) else torch.zeros(())
        reason = is_traceable(lowering, example, lowered.tensors)
        if reason is not None:
            warn_opaque(site.name, reason)
            opaque[key] = next(_opaque_slots)
    return opaque


def build_variant(capture: GraphCapture, selection: Selection, args: Sequence[Any], compile_fn: Callable):
    lowered = lower(selection)
    opaque = _opaque_customs(capture, selection, lowered)
    builder = _Builder(capture.gm, selection, lowered, opaque)
    gm = builder.build()
    device = graph_device(capture.gm)
    example = list(args) + runtime_inputs(lowered, device)
    fn = compile_fn(gm, example)
    return CompiledVariant(fn, [key for key, _ in builder.probe_outputs], builder.original_outputs, device, opaque)
