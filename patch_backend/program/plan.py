"""What one graph call must do: the selection of patched sites that spec.py turns into a
program spec (``pb.patch``'s front-end, ``context.select``, makes it from the active maps).
``structure_key`` is that spec, the cache key of a compiled variant: sweeping values reuses one
variant.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable, Tuple

from ..capture.naming import Site
from ..patches import Patch
from .spec import lower


@dataclass(frozen=True)
class SitePatches:
    site: Site
    patches: Tuple[Patch, ...]


Selection = Tuple[SitePatches, ...]


def structure_key(selection: Selection) -> Hashable:
    """The cache key of a compiled variant: the selection's program spec (spec.py), which holds
    sites, patch kinds, list order and slice structure, never values."""
    return lower(selection).spec
