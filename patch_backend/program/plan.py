"""From the active patches to what one graph call must do.

``select`` finds the sites of this graph occurrence that the active patch maps name: the
selection that spec.py turns into a program spec. ``structure_key`` is that spec, the cache key
of a compiled variant: sweeping values reuses one variant.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable, List, Optional, Tuple

from ..capture.capture import GraphCapture
from ..context import PatchState, validate_pending
from ..capture.naming import Site
from ..patches import Patch
from .spec import lower


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


def structure_key(selection: Selection) -> Hashable:
    """The cache key of a compiled variant: the selection's program spec (spec.py), which holds
    sites, patch kinds, list order and slice structure, never values."""
    return lower(selection).spec
