"""Declared site sets: one compiled variant in which every declared site is patchable.

``pb.prepare(model, sites)`` declares sites; each declared site gets a *slot*: two runtime
inputs of the site's shape, ``keep`` (bool) and ``fill``, and the op
``where(keep, x + fill, fill)``. Any list of Zero/Add/Replace patches composes into one
(keep, fill) pair on the host, so every patch map within the declared set — and every row of a
batched sweep (sweep.py) — runs the same compiled code. The slot's input and result are also
graph outputs, which serve ProbePatch/RecordPatch placed before or after the value patches.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.fx

from . import ops as patch_ops
from .._torch_compat.frame import concrete_shape, symbol_bindings
from ..capture.capture import GraphCapture
from ..capture.naming import Site
from ..patches import AddPatch, Patch, ProbePatch, RecordPatch, ReplacePatch, ZeroPatch, normalize_slice
from .plan import Selection, chains

_VALUE_PATCHES = (ZeroPatch, AddPatch, ReplacePatch)
_PROBES = (ProbePatch, RecordPatch)

SiteKey = Tuple[str, Optional[frozenset], Tuple[int, int]]


def site_key(site: Site) -> SiteKey:
    return (site.node, site.consumers, site.rank)


def split_probes(patches: Sequence[Patch]) -> Optional[Tuple[List[Patch], List[Patch], List[Patch]]]:
    """(probes before, value patches, probes after), or None if the list does not fit a slot."""
    before: List[Patch] = []
    values: List[Patch] = []
    after: List[Patch] = []
    for patch in patches:
        if isinstance(patch, _PROBES):
            (after if values else before).append(patch)
        elif isinstance(patch, _VALUE_PATCHES) and not after:
            values.append(patch)
        else:
            return None
    return before, values, after


def fits(selection: Selection, declared: Dict[SiteKey, int]) -> bool:
    return all(site_key(e.site) in declared and split_probes(e.patches) is not None for e in selection)


def compose(
    patches: Iterable[Patch], keep: torch.Tensor, fill: torch.Tensor, rows: Optional[slice] = None
) -> None:
    """Writes Zero/Add/Replace patches (in order) into ``keep``/``fill`` (restricted to ``rows``)."""
    keep_view = keep if rows is None else keep[rows]
    fill_view = fill if rows is None else fill[rows]
    for patch in patches:
        index = Ellipsis if patch.slice is None else normalize_slice(patch.slice)
        if isinstance(patch, ZeroPatch):
            keep_view[index] = False
            fill_view[index] = 0
        elif isinstance(patch, ReplacePatch):
            keep_view[index] = False
            fill_view[index] = _as_value(patch.value, fill)
        else:
            fill_view[index] += _as_value(patch.value, fill)


def _as_value(value: Any, like: torch.Tensor) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device=like.device, dtype=like.dtype)
    return value


@dataclass
class SlotInfo:
    key: SiteKey
    shape: Tuple[int, ...]
    dtype: torch.dtype
    device: torch.device


class PreparedVariant:
    """Compiled once per graph and declared site set; fed (keep, fill) per slot per call."""

    def __init__(self, fn: Callable, slots: List[SlotInfo], original_outputs: int) -> None:
        self.fn = fn
        self.slots = slots
        self.slot_index = {slot.key: position for position, slot in enumerate(slots)}
        self.original_outputs = original_outputs
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
        outputs = self.fn(*args, *extra)
        probes = outputs[self.original_outputs :]
        pairs = [(probes[2 * p], probes[2 * p + 1]) for p in range(len(self.slots))]
        return list(outputs[: self.original_outputs]), pairs

    def run(self, selection: Selection, args: Sequence[Any]) -> Any:
        inputs: Dict[int, Tuple[torch.Tensor, torch.Tensor]] = {}
        probes_at: List[Tuple[int, List[Patch], List[Patch]]] = []
        for entry in selection:
            position = self.slot_index[site_key(entry.site)]
            before, values, after = split_probes(entry.patches)
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


def record(patch: Patch, value: torch.Tensor) -> None:
    if isinstance(patch, ProbePatch):
        patch.activation = value.detach().clone()
    else:
        patch.activations.append(value.detach().clone())


def build_prepared(
    capture: GraphCapture, sites: List[Site], args: Sequence[Any], compile_fn: Callable
) -> PreparedVariant:
    """The graph with a slot at every declared site, compiled once."""
    gm = torch.fx.GraphModule(capture.gm, copy.deepcopy(capture.gm.graph))
    graph = gm.graph
    nodes = {node.name: node for node in graph.nodes}
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    ordered = sorted(sites, key=lambda s: (s.rank, s.name))
    slots: List[SlotInfo] = []
    slot_nodes: List[Tuple[torch.fx.Node, torch.fx.Node]] = []
    last = placeholders[-1]
    # The variant is compiled for this call's concrete shapes (the dispatcher keys it by them).
    bindings = symbol_bindings([n.meta.get("example_value") for n in placeholders], args)
    for position, site in enumerate(ordered):
        meta = nodes[site.node].meta.get("example_value")
        slots.append(SlotInfo(site_key(site), concrete_shape(meta.shape, bindings), meta.dtype, meta.device))
        with graph.inserting_after(last):
            keep = graph.placeholder(f"_slot_keep_{position}")
        with graph.inserting_after(keep):
            fill = graph.placeholder(f"_slot_fill_{position}")
        last = fill
        slot_nodes.append((keep, fill))

    from .plan import SitePatches

    pseudo = tuple(SitePatches(site, ()) for site in ordered)
    use_chains = chains(graph, pseudo)
    memo: Dict[Tuple[str, Tuple[int, ...]], torch.fx.Node] = {}
    pre_post: Dict[int, Tuple[torch.fx.Node, torch.fx.Node]] = {}

    def through(producer: str, chain: Tuple[int, ...], before: torch.fx.Node) -> torch.fx.Node:
        key = (producer, chain)
        if key in memo:
            return memo[key]
        value = through(producer, chain[:-1], before) if len(chain) > 1 else nodes[producer]
        position = chain[-1]
        keep, fill = slot_nodes[position]
        with graph.inserting_before(before):
            result = graph.call_function(patch_ops.slot, (value, keep, fill))
            if position not in pre_post:
                pre = graph.call_function(patch_ops.probe, (value,)) if value.op == "placeholder" else value
                pre_post[position] = (pre, result)
        memo[key] = result
        return result

    order = {node.name: position for position, node in enumerate(graph.nodes)}
    for (producer, consumer), chain in sorted(use_chains.items(), key=lambda item: order[item[0][1]]):
        user = nodes[consumer]
        user.replace_input_with(nodes[producer], through(producer, chain, user))
    output = next(n for n in graph.nodes if n.op == "output")
    for position, site in enumerate(ordered):
        if position not in pre_post:
            through(site.node, (position,), output)
    results = output.args[0]
    flat = tuple(results) if isinstance(results, (list, tuple)) else (results,)
    extra = tuple(node for position in range(len(ordered)) for node in pre_post[position])
    output.args = (flat + extra,)
    graph.lint()
    gm.recompile()

    variant = PreparedVariant(None, slots, len(flat))
    example_extra = [t for position in range(len(slots)) for t in variant.identity(position)]
    variant.fn = compile_fn(gm, list(args) + example_extra)
    return variant
