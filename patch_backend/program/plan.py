"""From the active patches to what one graph call must do.

``select`` finds the sites of this graph occurrence that the active patch maps name; ``chains``
says, for every use of a patched value, which sites it passes through and in which order;
``structure_key`` is the cache key of a compiled variant: sites, patch kinds, list order and
slice *structure*, never values, so sweeping values reuses one variant.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.fx

from ..capture.capture import GraphCapture
from ..context import PatchState, validate_pending
from ..capture.naming import Site
from ..patches import AddPatch, CustomPatch, Patch, ProbePatch, RecordPatch, ReplacePatch, ZeroPatch, normalize_slice


@dataclass(frozen=True)
class SitePatches:
    site: Site
    patches: Tuple[Patch, ...]


Selection = Tuple[SitePatches, ...]


def select(state: PatchState, capture: GraphCapture, instance: Optional[int]) -> Selection:
    """The active patches that land in this graph occurrence, in graph order of their sites."""
    if not state.memo.get("validated"):
        state.memo["validated"] = validate_pending(state, (capture.uid, instance))
    found: List[SitePatches] = []
    keys = []
    for entry in state.roots:
        index = entry.index.refresh()
        memo_key = (capture.uid, instance, id(index), index._version)
        cached = state.memo.get(memo_key)
        if cached is None:
            sites = index.sites_for(capture, instance) or {}
            cached = tuple(
                SitePatches(sites[name], patches) for name, patches in entry.by_name.items() if name in sites
            )
            state.memo[memo_key] = cached
        found.extend(cached)
        keys.append(memo_key)
    # The same tuple on every call of this occurrence under this state, so that per-call memos
    # keyed by the selection (dynamic.check_call_shapes) hit instead of growing with each call.
    return state.memo.setdefault(("selection", tuple(keys)), tuple(found))


Chain = Tuple[int, ...]  # indices into the selection, in application order


def chains(graph: torch.fx.Graph, selection: Selection) -> Dict[Tuple[str, str], Chain]:
    """(producer, consumer) → the selection entries the consumer's input passes through."""
    by_node: Dict[str, List[int]] = {}
    for position, entry in enumerate(selection):
        by_node.setdefault(entry.site.node, []).append(position)
    nodes = {node.name: node for node in graph.nodes}
    result: Dict[Tuple[str, str], Chain] = {}
    for producer, positions in by_node.items():
        ordered = sorted(positions, key=lambda p: (selection[p].site.rank, selection[p].site.name))
        for user in nodes[producer].users:
            chain = tuple(
                p for p in ordered if selection[p].site.consumers is None or user.name in selection[p].site.consumers
            )
            if chain:
                result[(producer, user.name)] = chain
    return result


def dangling(graph: torch.fx.Graph, selection: Selection, found: Dict[Tuple[str, str], Chain]) -> List[int]:
    """Selection entries no use passes through (e.g. a probe on an unused weight)."""
    used = {p for chain in found.values() for p in chain}
    return [p for p in range(len(selection)) if p not in used]


def slice_structure(tensor_slice: Any) -> Any:
    """The part of a slice that decides the compiled code: kinds and None-ness, not the numbers.

    Index forms that masks cannot express (None, bools, several advanced indices) are compiled
    with their integers as constants, so for them the numbers are part of the structure.
    """
    if tensor_slice is None:
        return None
    from .insert import masked_form

    index = normalize_slice(tensor_slice)
    if not masked_form(index):
        return ("fallback", tuple(
            ("tensor", tuple(e.shape), e.dtype) if isinstance(e, torch.Tensor)
            else ("list", len(e)) if isinstance(e, list) else ("const", repr(e))
            for e in index
        ))
    out = []
    for element in normalize_slice(tensor_slice):
        if isinstance(element, slice):
            step = element.step
            out.append(("slice", element.start is None, element.stop is None, None if step is None else step > 0))
        elif isinstance(element, bool) or element is None or element is Ellipsis:
            out.append(("const", repr(element)))
        elif isinstance(element, int):
            out.append(("int",))
        elif isinstance(element, list):
            out.append(("list", len(element)))
        elif isinstance(element, torch.Tensor):
            out.append(("tensor", tuple(element.shape), element.dtype))
        else:
            out.append(("const", repr(element)))
    return tuple(out)


def value_structure(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.dtype, value.requires_grad)
    return ("scalar",)


def patch_structure(patch: Patch, probe_positions: Dict[int, Tuple[int, int]]) -> Any:
    from .custom import callable_structure

    if isinstance(patch, (ProbePatch, RecordPatch)):
        return ("probe",)
    if isinstance(patch, ZeroPatch):
        return ("zero", slice_structure(patch.slice))
    if isinstance(patch, (AddPatch, ReplacePatch)):
        return (type(patch).__name__, slice_structure(patch.slice), value_structure(patch.value))
    if isinstance(patch, CustomPatch):
        return ("custom", callable_structure(patch.custom_op, probe_positions))
    return ("custom", type(patch), callable_structure(patch.op, probe_positions))


def probe_positions(selection: Selection) -> Dict[int, Tuple[int, int]]:
    """id(ProbePatch) → (entry, patch) position, for custom ops that read a probe of this map."""
    return {
        id(patch): (entry_index, patch_index)
        for entry_index, entry in enumerate(selection)
        for patch_index, patch in enumerate(entry.patches)
        if isinstance(patch, ProbePatch)
    }


def structure_key(selection: Selection) -> Tuple[Any, ...]:
    positions = probe_positions(selection)
    return tuple(
        (entry.site.node, entry.site.consumers, entry.site.rank, tuple(patch_structure(p, positions) for p in entry.patches))
        for entry in selection
    )


def needs_clone(patches: Sequence[Patch]) -> bool:
    return any(patch.requires_clone for patch in patches)
