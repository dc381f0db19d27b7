"""``pb.record``: an activation cache from one compiled forward (TransformerLens's run_with_cache).

Every requested node gets a ProbePatch; probes are outputs of the compiled graph, so the cache
costs one forward, no hooks and no graph break. Names may be native names, TransformerLens
aliases (aliases.py) or globs of either; the cache is keyed by the names as matched (a
TransformerLens glob gives TransformerLens names, with their ``[batch, pos, head, d_head]``
views for per-head hooks).
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import torch

from .context import patch
from .capture.index import index_for
from .patches import ProbePatch
from .sweep import Inputs, _call, _compiled_model

_GLOB = ("*", "?")


def record(
    model: Any,
    inputs: Inputs,
    names: Union[str, Sequence[str]],
    patches: Optional[Mapping[str, Any]] = None,
) -> Dict[str, torch.Tensor]:
    """Runs ``model`` once on ``inputs``; returns ``{name: activation}`` for every matched name.

    ``model`` is a module (compiled here with backend="graphpatch") or its torch.compile result;
    ``inputs`` its args (tuple) or kwargs (dict). ``patches`` (a patch map) applies during the
    recorded forward, so a sweep cell's run, or a clean run with a fix, can be cached as it ran;
    called inside ``pb.patch``, the active patches apply too (the probes come after them). A glob
    needs the model's names, so a model never run is first run once to capture them.
    """
    compiled, root = _compiled_model(model)
    patterns = [names] if isinstance(names, str) else list(names)
    if not patterns:
        raise ValueError("pb.record needs at least one name or glob")
    index = index_for(root)
    if not index.names and any(mark in pattern for pattern in patterns for mark in _GLOB):
        with torch.no_grad():
            _call(compiled, inputs)  # captures: the names exist from now on
    matched = _expand(index, patterns)
    probes = {name: ProbePatch() for name in matched}
    patch_map: Dict[str, Any] = dict(patches or {})
    for name, probe in probes.items():
        existing = patch_map.get(name, [])
        patch_map[name] = (list(existing) if isinstance(existing, (list, tuple)) else [existing]) + [probe]
    with patch(compiled, patch_map):
        _call(compiled, inputs)
    cache: Dict[str, torch.Tensor] = {}
    for name, probe in probes.items():
        # Patchable sites hold tensors, and pb.patch raises PatchNotAppliedError for a node that
        # never ran, so every probe holds one here.
        if not isinstance(probe.activation, torch.Tensor):
            raise RuntimeError(
                f"pb.record: internal error, the probe at {name!r} recorded "
                f"{type(probe.activation).__name__}, not a tensor"
            )
        cache[name] = probe.activation
    return cache


def _expand(index: Any, patterns: List[str]) -> List[str]:
    """Exact names pass through (checked when patched); globs expand to the names they match."""
    names: List[str] = []
    for pattern in patterns:
        pattern = str(pattern)
        matched = index.match_all(pattern) if any(mark in pattern for mark in _GLOB) else [pattern]
        names.extend(name for name in matched if name not in names)
    return names
