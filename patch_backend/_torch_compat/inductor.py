"""Inductor compilation of one (plain or patched) graph, honouring torch.compile's mode/options."""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Sequence

import torch
import torch.fx


def inductor_config(options: Dict[str, Any]) -> Dict[str, Any]:
    """``mode=``/``options=`` as torch.compile gives them to a backend → Inductor config patches."""
    from torch._inductor import list_mode_options

    mode: Optional[str] = options.get("mode")
    patches: Dict[str, Any] = dict(list_mode_options(mode)) if mode else {}
    patches.update(options.get("options") or {})
    return patches


def compile_inductor(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], options: Dict[str, Any]) -> Callable:
    from torch._inductor.compile_fx import compile_fx

    # Called with positional arguments, as Dynamo calls a backend's result.
    compiled: Callable = compile_fx(gm, list(example_inputs), config_patches=inductor_config(options))  # type: ignore[assignment]
    return compiled
