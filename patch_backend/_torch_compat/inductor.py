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
    return compile_fx(gm, list(example_inputs), config_patches=inductor_config(options))


# -- regional compile (program/regions.py) ------------------------------------------------------
def fake_values(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> Dict[torch.fx.Node, Any]:
    """Every node's value on fake copies of ``example_inputs`` (shapes, strides, dtypes, aliasing).

    Region boundaries need the metadata of intermediate values (a region's inputs are another
    region's outputs). Running the graph on fake tensors gets it without running the model and,
    unlike a real run, without applying any in-place update of an input twice. Inputs that are
    already fake keep their mode (Dynamo's); real ones are converted in a fresh static mode.
    """
    from torch._guards import detect_fake_mode
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    mode = detect_fake_mode(list(example_inputs))
    if mode is None:
        mode = FakeTensorMode(allow_non_fake_inputs=True)
    fakes = [
        mode.from_tensor(value) if isinstance(value, torch.Tensor) and not isinstance(value, FakeTensor) else value
        for value in example_inputs
    ]
    values: Dict[torch.fx.Node, Any] = {}

    class _Recorder(torch.fx.Interpreter):
        def run_node(self, node: torch.fx.Node) -> Any:
            result = super().run_node(node)
            values[node] = result
            return result

    with mode:
        _Recorder(gm).run(*fakes)
    return values


def dynamo_static_input(meta: Dict[str, Any]) -> bool:
    """Whether Dynamo marked the placeholder with this meta as a static input (a parameter or
    buffer under ``inline_inbuilt_nn_modules``), which CUDA graphs keep at a fixed address."""
    tensor_dict = meta.get("tensor_dict") or {}
    return bool(tensor_dict.get("_dynamo_static_input_type"))


def fx_graph_cache_counters() -> Dict[str, int]:
    """Inductor's FX-graph-cache and AOTAutograd-cache counters of this process (hits, misses,
    bypasses), as torch counts them: the measure of whether a compile was served from disk."""
    from torch._dynamo.utils import counters

    inductor = counters["inductor"]
    aot = counters["aot_autograd"]
    return {
        "fxgraph_cache_hit": int(inductor["fxgraph_cache_hit"]),
        "fxgraph_cache_miss": int(inductor["fxgraph_cache_miss"]),
        "fxgraph_cache_bypass": int(inductor["fxgraph_cache_bypass"]),
        "autograd_cache_hit": int(aot["autograd_cache_hit"]),
        "autograd_cache_miss": int(aot["autograd_cache_miss"]),
        "autograd_cache_bypass": int(aot["autograd_cache_bypass"]),
    }
