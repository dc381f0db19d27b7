"""The two Dynamo backends, ``graphpatch`` and ``graphpatch_eager``.

For every graph Dynamo hands us we record a capture (for naming) and return a ``Dispatcher``
(runtime/dispatcher.py), which runs the graph plain or patched on each call.
"""

from __future__ import annotations

from typing import Any, Callable, List

import torch.fx

from ._torch_compat.frame import current_frame_info
from .capture.capture import capture_graph
from .runtime.dispatcher import Dispatcher


def _backend(gm: torch.fx.GraphModule, example_inputs: List[Any], compiled: bool, **options: Any) -> Callable:
    frame = current_frame_info()
    capture = capture_graph(gm, example_inputs, frame)
    dispatcher = Dispatcher(capture, compiled, options, example_inputs)
    return dispatcher


def graphpatch(gm: torch.fx.GraphModule, example_inputs: List[Any], **options: Any) -> Callable:
    """Dynamo backend: Inductor-compiled graphs with compiled patched variants.

    ``torch.compile(model, backend="graphpatch", mode=..., options=...)`` forwards ``mode`` and
    ``options`` to Inductor for every variant.
    """
    return _backend(gm, example_inputs, compiled=True, **options)


def graphpatch_eager(gm: torch.fx.GraphModule, example_inputs: List[Any], **options: Any) -> Callable:
    """Dynamo backend: same capture, names and patch semantics, run eagerly (the test oracle)."""
    return _backend(gm, example_inputs, compiled=False, **options)
