"""Inductor compilation of one (plain or patched) graph, honouring torch.compile's mode/options."""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Dict, Iterator, Mapping, Optional, Sequence

import torch
import torch.fx


def inductor_config(options: Dict[str, Any]) -> Dict[str, Any]:
    """``mode=``/``options=`` as torch.compile gives them to a backend → Inductor config patches."""
    from torch._inductor import list_mode_options

    mode: Optional[str] = options.get("mode")
    patches: Dict[str, Any] = dict(list_mode_options(mode)) if mode else {}
    patches.update(options.get("options") or {})
    return patches


def compile_inductor(
    gm: torch.fx.GraphModule,
    example_inputs: Sequence[Any],
    options: Dict[str, Any],
    cacheable: Optional[Mapping[str, str]] = None,
) -> Callable:
    """Inductor's ``compile_fx`` on ``gm``; ``cacheable`` maps the qualified names of Python
    functions the graph calls (the patch ops, program/ops.py ``cache_keys``) to a key that changes
    with their code. AOTAutograd's cache refuses graphs calling functions it does not know (it
    cannot tell whether their code changed), so without them every patched variant bypassed it;
    Inductor's ``unsafe_marked_cacheable_functions`` admits them under that key."""
    from torch._inductor.compile_fx import compile_fx

    patches = inductor_config(options)
    marked = dict(cacheable or {})
    marked.update(patches.get("unsafe_marked_cacheable_functions") or {})
    patches["unsafe_marked_cacheable_functions"] = marked
    with cacheable_context(example_inputs):
        # Called with positional arguments, as Dynamo calls a backend's result.
        compiled: Callable = compile_fx(gm, list(example_inputs), config_patches=patches)  # type: ignore[assignment]
    return compiled


@contextlib.contextmanager
def cacheable_context(example_inputs: Sequence[Any]) -> Iterator[None]:
    """A tracing context whose fake mode has a ShapeEnv, unless one is active already.

    Inductor's FX graph cache and AOTAutograd's cache look up the ShapeEnv of the active tracing
    context and bypass themselves without one ("No shape env"). Dynamo provides it while it
    calls a backend; the dispatcher compiles later (at a graph's first plain or patched call),
    outside Dynamo, so without this every compile of this package missed torch's on-disk caches
    and a second process recompiled everything. Shapes stay static: real inputs are fakified
    with their concrete sizes.
    """
    from torch._guards import TracingContext, detect_fake_mode, tracing
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    mode = detect_fake_mode(list(example_inputs))
    if TracingContext.try_get() is not None or (mode is not None and mode.shape_env is None):
        # Inside Dynamo already, or fake inputs of a mode that cannot take a ShapeEnv (a second
        # mode would mix fake modes): compile as torch would without us.
        yield
        return
    if mode is None:
        mode = FakeTensorMode(shape_env=ShapeEnv(), allow_non_fake_inputs=True)
    with tracing(TracingContext(mode)):
        yield


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

    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    mode = detect_fake_mode(list(example_inputs))
    if mode is None:
        # With a ShapeEnv, so compiling a region on these fakes can use torch's on-disk caches
        # (``cacheable_context``); sizes stay static.
        mode = FakeTensorMode(shape_env=ShapeEnv(), allow_non_fake_inputs=True)
    fakes = [
        mode.from_tensor(value, static_shapes=True)
        if isinstance(value, torch.Tensor) and not isinstance(value, FakeTensor) else value
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
