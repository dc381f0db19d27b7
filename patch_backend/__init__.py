"""patch_backend: a torch.compile backend for activation patching.

``torch.compile(model, backend="graphpatch")`` names every intermediate value after the module
hierarchy and patches it inside Inductor-compiled code. See README.md and docs/.
"""

from __future__ import annotations

from typing import Any, List, Optional

from .backend import graphpatch, graphpatch_eager
from .capture.index import index_for, no_graph_error
from .roots import resolve_root
from .cache import load_cache, save_cache
from .causal import CausalTrace, causal_trace, plot_grid
from .context import PatchNotAppliedError, patch
from .distributed import DistributedSweepError
from .errors import PatchBackendWarning
from .graph import NodePath, PatchableGraph
from .patches import (
    AddPatch,
    CustomPatch,
    Patch,
    ProbePatch,
    RecordPatch,
    ReplacePatch,
    TensorSlice,
    TensorSliceElement,
    ZeroPatch,
)
from . import config, recipes
from .prepare import prepare
from .record import record
from .stats import set_max_variants, stats
from .sweep import SweepBatchingWarning, sweep
from .runtime.tiers import wait_for_compiles

__all__ = [
    "CausalTrace",
    "causal_trace",
    "plot_grid",
    "AddPatch",
    "CustomPatch",
    "DistributedSweepError",
    "NodePath",
    "Patch",
    "PatchBackendWarning",
    "PatchNotAppliedError",
    "PatchableGraph",
    "ProbePatch",
    "RecordPatch",
    "ReplacePatch",
    "TensorSlice",
    "TensorSliceElement",
    "ZeroPatch",
    "graphpatch",
    "graphpatch_eager",
    "load_cache",
    "nodes",
    "patch",
    "prepare",
    "recipes",
    "record",
    "save_cache",
    "set_max_variants",
    "config",
    "stats",
    "SweepBatchingWarning",
    "sweep",
    "wait_for_compiles",
]


def nodes(model: Any, pattern: Optional[str] = None) -> List[str]:
    """Node names of ``model`` (module, torch.compile result or PatchableGraph), in graph order.

    ``pattern`` is a glob (``"layers_*.mlp.output"``). Names exist once the model has been
    captured: after its first compiled call, or at PatchableGraph construction.
    """

    root = resolve_root(model)
    index = index_for(root)
    if not index.names:
        raise no_graph_error(root, f"no graph of {type(root).__name__} has been captured yet")
    return index.match(pattern)
