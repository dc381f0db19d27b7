"""Which module a user's handle on a model stands for.

Users pass the module, its ``torch.compile`` result or a ``PatchableGraph``; names belong to the
module. This sits below every front-end (context, prepare, sweep, graph, stats), so it knows a
``PatchableGraph`` by the attribute it defines rather than by importing graph.py.
"""

from __future__ import annotations

from typing import Any

from torch import nn

#: The attribute through which a wrapper (``PatchableGraph``) hands over the module it wraps.
WRAPPED_ROOT = "_patch_backend_root"


def resolve_root(model: Any) -> nn.Module:
    """The module whose names a patch map uses: unwraps torch.compile and PatchableGraph."""
    if hasattr(type(model), WRAPPED_ROOT):
        return getattr(model, WRAPPED_ROOT)
    original = getattr(model, "_orig_mod", None)
    if isinstance(original, nn.Module):
        return original
    if isinstance(model, nn.Module):
        return model
    raise TypeError(
        f"expected a torch.nn.Module, its torch.compile result or a PatchableGraph, got {type(model).__name__}"
    )
