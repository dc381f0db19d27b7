"""Regional compile: one compiled artifact per *distinct* repeated block, not one per model.

A transformer is a prefix (embeddings), N structurally identical blocks and a suffix. With
parameters as graph inputs (Dynamo lifts them), block 3 and block 7 differ only in the names of
their placeholders, so compiling the whole graph lowers and schedules the same block N times, and
a patched variant that touches one block recompiles all of them. ``compile_regional`` instead
splits the captured graph at the boundaries of the blocks of the most repeated ``ModuleList``
(found from ``node.meta["nn_module_stack"]``), renames each region's placeholders and nodes
positionally, and looks each one up by structure in a bounded, process-wide cache:

* a 12-layer model compiles three artifacts (prefix, one block, suffix);
* a patched variant hits the plain artifacts for every unpatched block and compiles only the
  block that holds the patch ops; the same relative site in another layer reuses that artifact,
  because the patch's runtime inputs (``_patch_ints``, ``_patch_scalars``, ``_patch_tensor_<k>``,
  ``_slot_keep_<k>``, ``_slot_fill_<k>``) are ordinary region inputs.

Where nothing repeats, or where the graph's shapes are symbolic, the graph is compiled whole,
exactly as before (see ``compile_regional``).
"""

from __future__ import annotations

import copy
import operator
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Dict, Hashable, List, Optional, Sequence, Set, Tuple

import torch
import torch.fx
from torch.multiprocessing.reductions import StorageWeakRef

from .. import config
from .._torch_compat.inductor import dynamo_static_input, fake_values
from .._torch_compat.sources import module_stack, stack_path

#: Compiled region artifacts kept in the process-wide cache; the least recently used beyond it
#: are dropped (a dropped artifact stays alive in the programs that use it).
MAX_REGION_ARTIFACTS = 512


# -- reports ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class RegionCompile:
    """One compile of one region structure."""

    #: What the region is: ``"transformer.h[*]"`` for a block, ``"before transformer.h"``,
    #: ``"between transformer.h"``, ``"after transformer.h"`` for the rest.
    label: str
    #: Number of graph nodes (patch ops included) in the region.
    nodes: int
    seconds: float


@dataclass(frozen=True)
class RegionReport:
    """Process-wide counters of the region cache (``region_report()``)."""

    compiles: int
    hits: int
    compile_seconds: float
    #: Every compile, oldest first (the last ``MAX_REGION_ARTIFACTS``).
    history: Tuple[RegionCompile, ...]

    def seconds_by_label(self) -> Dict[str, float]:
        """Compile seconds per region label, for ``pb.stats``' "compile seconds per region"."""
        totals: Dict[str, float] = {}
        for entry in self.history:
            totals[entry.label] = totals.get(entry.label, 0.0) + entry.seconds
        return totals


@dataclass(frozen=True)
class ProgramReport:
    """What one ``compile_regional`` call did."""

    #: Regions the graph was split into (1: compiled whole).
    regions: int
    #: Regions compiled by this call (cache misses).
    compiled: int
    #: Regions served by an artifact compiled earlier (in this call or before).
    reused: int
    compile_seconds: float
    #: Why the graph was compiled whole, or None when it was split.
    whole_reason: Optional[str]
    #: The container whose blocks delimit the regions (``"transformer.h"``), if any.
    container: Optional[str]
    #: Compile seconds of this call per region label (``RegionCompile.label``), cache misses only.
    seconds_by_region: Tuple[Tuple[str, float], ...] = ()


# -- the process-wide artifact cache ------------------------------------------------------------
@dataclass
class _Artifact:
    fn: Callable
    label: str
    #: Objects whose id() is part of the key, kept alive so the ids are not reused.
    pins: Tuple[Any, ...]
    ready: threading.Event
    error: Optional[BaseException] = None


class _RegionCache:
    """Structure key → compiled region, bounded (LRU) and safe to use from several threads.

    Two threads asking for the same missing key compile it once: the second waits for the
    first's result instead of compiling it again (the tiered runtime compiles in background
    threads while the caller's thread may ask for the same region).
    """

    def __init__(self, bound: int) -> None:
        self.bound = bound
        self.entries: "OrderedDict[Hashable, _Artifact]" = OrderedDict()
        self.lock = threading.Lock()
        self.compiles = 0
        self.hits = 0
        self.seconds = 0.0
        self.history: List[RegionCompile] = []

    def get_or_compile(
        self, key: Hashable, label: str, nodes: int, pins: Tuple[Any, ...], compile: Callable[[], Callable]
    ) -> Tuple[Callable, bool, float]:
        """(artifact, compiled here, compile seconds) for ``key``."""
        with self.lock:
            entry = self.entries.get(key)
            if entry is not None:
                self.entries.move_to_end(key)
                owner = False
            else:
                entry = _Artifact(fn=None, label=label, pins=pins, ready=threading.Event())  # type: ignore[arg-type]
                self.entries[key] = entry
                owner = True
                while len(self.entries) > self.bound:
                    self.entries.popitem(last=False)
        if not owner:
            entry.ready.wait()
            if entry.error is not None:
                raise entry.error
            with self.lock:
                self.hits += 1
            return entry.fn, False, 0.0
        start = time.perf_counter()
        try:
            entry.fn = compile()
        except BaseException as error:
            entry.error = error
            with self.lock:
                if self.entries.get(key) is entry:
                    del self.entries[key]
            entry.ready.set()
            raise
        seconds = time.perf_counter() - start
        entry.ready.set()
        with self.lock:
            self.compiles += 1
            self.seconds += seconds
            self.history.append(RegionCompile(label, nodes, seconds))
            del self.history[: -self.bound]
        return entry.fn, True, seconds

    def clear(self) -> None:
        with self.lock:
            self.entries.clear()
            self.compiles = self.hits = 0
            self.seconds = 0.0
            self.history.clear()


_cache = _RegionCache(MAX_REGION_ARTIFACTS)


def region_report() -> RegionReport:
    """Counters of every regional compile in this process."""
    with _cache.lock:
        return RegionReport(_cache.compiles, _cache.hits, _cache.seconds, tuple(_cache.history))


def clear_region_cache() -> None:
    """Drops every cached region artifact and zeroes the counters (tests, benchmarks)."""
    _cache.clear()


# -- finding the repeated blocks ----------------------------------------------------------------
def parse_module_path(path: str) -> Tuple[str, ...]:
    """``L['self'].transformer.h[3].mlp`` or ``L['self'].transformer.h.3.mlp`` →
    ``('transformer', 'h', '3', 'mlp')`` (the frame's root local dropped); the naming code's
    parser (``_torch_compat.sources.stack_path``), so regions and names read paths alike."""
    return stack_path(path) or ()


def _module_paths(node: torch.fx.Node) -> List[Tuple[str, ...]]:
    return [parse_module_path(path) for _, path in module_stack(node)]


#: ``node.meta`` key of a node inserted after capture that belongs to no block: ``_assign``
#: would otherwise join it to the next captured node's block. The fan-out's row repeats carry it:
#: inside the first fanned-out block they made one block variant per cut (its outputs depend on
#: which later blocks read the repeated mask), outside it every cut shares the block's artifact.
OUTSIDE_BLOCKS = "patch_backend_outside_blocks"


def mark_outside_blocks(node: torch.fx.Node) -> torch.fx.Node:
    """Places an inserted ``node`` in a region of its own between blocks (see ``OUTSIDE_BLOCKS``)."""
    node.meta[OUTSIDE_BLOCKS] = True
    return node


def find_blocks(gm: torch.fx.GraphModule) -> Tuple[Optional[Tuple[str, ...]], Dict[torch.fx.Node, Optional[int]]]:
    """The container whose numbered children repeat most often, and each node's block index in it.

    A container is a module path followed by an integer segment (``transformer.h.3``). The one
    with the most distinct indices wins (ties: the outermost), and needs at least two. Nodes with
    no metadata at all (patch ops inserted after capture) are placed later (``_assign``); Dynamo's
    nodes outside every module (the root's own ops) and nodes marked ``OUTSIDE_BLOCKS`` are
    outside the blocks.
    """
    indices: Dict[Tuple[str, ...], set] = {}
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        for path in _module_paths(node):
            for position, segment in enumerate(path):
                if segment.isdigit() and position > 0:
                    indices.setdefault(path[:position], set()).add(int(segment))
    candidates = [(len(found), -len(prefix), prefix) for prefix, found in indices.items() if len(found) >= 2]
    if not candidates:
        return None, {}
    _, _, container = max(candidates)
    depth = len(container)
    blocks: Dict[torch.fx.Node, Optional[int]] = {}
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        paths = _module_paths(node)
        if not node.meta:
            continue  # inserted after capture (a patch op): decided by its neighbours
        block = None
        for path in paths:
            if len(path) > depth and path[:depth] == container and path[depth].isdigit():
                block = int(path[depth])
                break
        blocks[node] = block
    return container, blocks


_UNSET = object()


def _assign(gm: torch.fx.GraphModule, blocks: Dict[torch.fx.Node, Optional[int]]) -> Dict[torch.fx.Node, int]:
    """Node → region number: maximal runs of graph-ordered nodes in the same block (or in none).

    A node inserted after capture joins the next captured node (patch ops are inserted just
    before the node that consumes the patched value), or the previous one at the end of the graph.
    """
    body = [node for node in gm.graph.nodes if node.op not in ("placeholder", "output")]
    resolved: List[Any] = [blocks.get(node, _UNSET) for node in body]
    following: Any = _UNSET
    for position in range(len(body) - 1, -1, -1):
        if resolved[position] is _UNSET:
            resolved[position] = following
        else:
            following = resolved[position]
    previous: Any = None
    for position in range(len(body)):
        if resolved[position] is _UNSET:
            resolved[position] = previous
        previous = resolved[position]
    regions: Dict[torch.fx.Node, int] = {}
    region = -1
    current: Any = _UNSET
    for node, block in zip(body, resolved):
        if block != current or region < 0:
            region += 1
            current = block
        regions[node] = region
    return regions


# -- structure keys -----------------------------------------------------------------------------
_PLAIN = (int, float, bool, str, type(None), type(Ellipsis), torch.dtype, torch.device, torch.layout,
          torch.memory_format)


class _Canon:
    """Turns a region's nodes and constants into a hashable key in which Node references are
    positions, so regions that differ only by names (and by which tensors they read) are equal."""

    def __init__(self, positions: Dict[torch.fx.Node, Tuple[str, int]]) -> None:
        self.positions = positions
        self.pins: List[Any] = []

    def value(self, value: Any) -> Hashable:
        if isinstance(value, torch.fx.Node):
            return ("node",) + self.positions[value]
        if isinstance(value, _PLAIN):
            return (type(value).__name__, value)
        if isinstance(value, (tuple, list)):
            return (type(value).__name__, tuple(self.value(item) for item in value))
        if isinstance(value, dict):
            return ("dict", tuple((str(key), self.value(item)) for key, item in value.items()))
        if isinstance(value, slice):
            return ("slice", self.value(value.start), self.value(value.stop), self.value(value.step))
        try:
            hash(value)
            return ("obj", type(value), value)
        except TypeError:
            self.pins.append(value)
            return ("id", id(value))

    def target(self, node: torch.fx.Node, root: torch.nn.Module) -> Hashable:
        if node.op in ("get_attr", "call_module"):
            attribute = root
            for part in str(node.target).split("."):
                attribute = getattr(attribute, part)
            self.pins.append(attribute)
            return (node.op, id(attribute))
        return (node.op, self.value(node.target) if isinstance(node.target, str) else ("fn", node.target))


def _input_spec(value: Any, meta: Dict[str, Any], storages: Dict[Any, int], position: int) -> Hashable:
    if isinstance(value, torch.Tensor):
        storage = StorageWeakRef(value.untyped_storage())
        alias = storages.setdefault(storage, position)
        return ("tensor", tuple(value.shape), tuple(value.stride()), value.storage_offset(), value.dtype,
                value.device, value.requires_grad, alias, dynamo_static_input(meta))
    return ("value", type(value).__name__, value)


# -- building the program -------------------------------------------------------------------------
@dataclass(frozen=True)
class _Step:
    fn: Callable
    inputs: Tuple[int, ...]
    outputs: Tuple[int, ...]
    #: Slots whose last use is this step: freed after it, as the whole-graph code frees them.
    release: Tuple[int, ...]


class RegionalProgram:
    """Runs the compiled regions in order, feeding each the values it reads.

    Called with the graph's positional inputs, as Dynamo calls a backend's result; returns the
    graph's outputs in the container type the graph returns.
    """

    def __init__(self, steps: Sequence[_Step], slots: int, inputs: int, output: Any, report: ProgramReport) -> None:
        self.steps = tuple(steps)
        self.slots = slots
        self.inputs = inputs
        self.output = output
        self.report = report

    def __call__(self, *args: Any) -> Any:
        env: List[Any] = list(args[: self.inputs]) + [None] * (self.slots - self.inputs)
        for step in self.steps:
            results = step.fn(*[env[slot] for slot in step.inputs])
            for slot, value in zip(step.outputs, results):
                env[slot] = value
            for slot in step.release:
                env[slot] = None
        return _build_output(self.output, env)


def _build_output(template: Any, env: List[Any]) -> Any:
    if isinstance(template, _Slot):
        return env[template.index]
    if isinstance(template, (tuple, list)):
        return type(template)(_build_output(item, env) for item in template)
    if isinstance(template, dict):
        return {key: _build_output(item, env) for key, item in template.items()}
    return template


@dataclass(frozen=True)
class _Slot:
    index: int


class WholeProgram:
    """The graph compiled whole (``compile_fn(gm, example)``), with the same ``report`` as a
    ``RegionalProgram`` says why it was not split."""

    def __init__(self, fn: Callable, report: ProgramReport) -> None:
        self.fn = fn
        self.report = report

    def __call__(self, *args: Any) -> Any:
        return self.fn(*args)


def _whole(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], compile_fn: Callable, reason: str,
           container: Optional[str] = None) -> WholeProgram:
    start = time.perf_counter()
    fn = compile_fn(gm, example_inputs)
    seconds = time.perf_counter() - start
    with _cache.lock:
        _cache.compiles += 1
        _cache.seconds += seconds
        _cache.history.append(RegionCompile("whole graph", len(gm.graph.nodes), seconds))
        del _cache.history[: -_cache.bound]
    return WholeProgram(fn, ProgramReport(1, 1, 0, seconds, reason, container, (("whole graph", seconds),)))


def _symbolic(value: Any) -> bool:
    if isinstance(value, torch.SymInt):
        return True
    return isinstance(value, torch.Tensor) and any(not isinstance(size, int) for size in value.shape)


def compile_regional(
    gm: torch.fx.GraphModule,
    example_inputs: Sequence[Any],
    compile_fn: Callable[[torch.fx.GraphModule, Sequence[Any]], Callable],
    options: Optional[Dict[str, Any]] = None,
) -> Callable:
    """Compiles ``gm`` region by region with ``compile_fn(region_gm, example) -> callable``.

    The result is called like ``compile_fn(gm, example_inputs)``'s result (positional inputs, the
    graph's outputs) and computes the same values. Regions whose structure (canonical nodes,
    input shapes/strides/dtypes/devices/aliasing and ``options``) was compiled before, in this call
    or an earlier one, reuse that artifact. ``options`` are the compile options ``compile_fn``
    applies (``mode``, Inductor ``options``): they are part of the key, so pass them whenever
    ``compile_fn`` is not the same object for every call (a bound method is a new object each
    time); without them artifacts are shared only among calls with the same ``compile_fn``.

    Compiled whole (``compile_fn(gm, example_inputs)``, exactly as without regions) when:

    * ``config.regional_compile`` is False;
    * nothing repeats (no ``ModuleList``-style container with two or more blocks in the graph);
    * the graph's inputs have symbolic shapes: compiling a region needs the symbols of every
      input it reads bound in Dynamo's tracing context, which only exists while Dynamo calls
      the backend; splitting there is left for later;
    * the graph cannot be run on fake tensors (a data-dependent op) or a multi-output node's
      tuple crosses a region boundary.

    With ``mode="reduce-overhead"`` each region is a separate CUDA graph, as after a graph break:
    parameters stay static inputs because each region keeps Dynamo's markers (placeholder
    sources and ``tensor_dict``), the same way Dynamo's DDP optimizer splits graphs.

    The result (a ``RegionalProgram`` or ``WholeProgram``) has a ``report`` attribute
    (``ProgramReport``) saying what was compiled and why a graph was not split.
    """
    placeholders = [node for node in gm.graph.nodes if node.op == "placeholder"]
    split = _plan_split(gm, example_inputs, placeholders)
    if isinstance(split, _Refusal):
        return _whole(gm, example_inputs, compile_fn, split.reason, split.container)
    return _compile_split(split, compile_fn, options)


@dataclass(frozen=True)
class _Refusal:
    """Why a graph is compiled whole (``ProgramReport.reason``), and its container if one was found."""

    reason: str
    container: Optional[str] = None


def _plan_split(
    gm: torch.fx.GraphModule, example_inputs: Sequence[Any], placeholders: List[torch.fx.Node]
) -> _Split | _Refusal:
    """The graph assigned to regions (the blocks of its most repeated container, the code before,
    between and after them), or why it is compiled whole (``compile_regional``'s list)."""
    reason = _unsplittable(gm, example_inputs, placeholders)
    if reason is not None:
        return _Refusal(reason)
    container_path, blocks = find_blocks(gm)
    if container_path is None:
        return _Refusal("no repeated blocks")
    container = ".".join(container_path)
    try:
        values = fake_values(gm, example_inputs)
    except Exception as error:  # noqa: BLE001 - any failure here means: compile as before
        return _Refusal(f"fake propagation failed: {type(error).__name__}: {error}", container)
    regions = _assign(gm, blocks)
    reason = _join_tuples(gm, regions, values)
    count = max(regions.values()) + 1 if regions else 0
    if reason is None and count < 2:
        reason = "one region"
    if reason is not None:
        return _Refusal(reason, container)
    return _Split(gm, placeholders, example_inputs, values, regions, count, blocks, container)


def _unsplittable(
    gm: torch.fx.GraphModule, example_inputs: Sequence[Any], placeholders: List[torch.fx.Node]
) -> Optional[str]:
    """Why the graph is compiled whole before looking for blocks (``compile_regional``'s first
    three reasons), or None."""
    if not config.regional_compile:
        return "config.regional_compile is False"
    if len(example_inputs) != len(placeholders):
        return "example inputs do not match the placeholders"
    if any(_symbolic(value) for value in example_inputs) or any(
        _symbolic(node.meta.get("example_value", node.meta.get("val"))) for node in placeholders
    ):
        # Dynamo hands a backend ints for symbolic sizes: the graph's metadata tells.
        return "symbolic shapes"
    return None


def _join_tuples(
    gm: torch.fx.GraphModule, regions: Dict[torch.fx.Node, int], values: Dict[torch.fx.Node, Any]
) -> Optional[str]:
    """A multi-output node's elements travel as tensors: its getitems join its region (in
    ``regions``). Returns why the graph cannot be split where its tuple itself leaves the region."""
    for node in gm.graph.nodes:
        if node in regions and isinstance(values.get(node), (tuple, list)):
            for user in node.users:
                if user.op == "call_function" and user.target is operator.getitem:
                    regions[user] = regions[node]
                elif user.op != "output" and regions.get(user) != regions[node]:
                    return f"tuple {node.name} crosses a region boundary"
                elif user.op == "output":
                    return f"tuple {node.name} is a graph output"
    return None


@dataclass(frozen=True)
class _Split:
    """A graph assigned to regions (``compile_regional``), ready to compile region by region."""

    gm: torch.fx.GraphModule
    placeholders: List[torch.fx.Node]
    example_inputs: Sequence[Any]
    #: Fake values of the graph's nodes (the example inputs of inner regions).
    values: Dict[torch.fx.Node, Any]
    #: Node → its region (graph inputs and the output have none).
    regions: Dict[torch.fx.Node, int]
    count: int
    #: Node → its block index in the container, None outside blocks.
    blocks: Dict[torch.fx.Node, Optional[int]]
    #: The container's path, ``"transformer.h"``: the regions' labels name it.
    container: str


@dataclass(frozen=True)
class _Layout:
    """Where every value lives while the program runs: its slot (graph inputs first, then each
    region's nodes in graph order), and which nodes each region runs."""

    members: List[List[torch.fx.Node]]
    slot: Dict[torch.fx.Node, int]
    output_node: torch.fx.Node
    #: Slots the graph output reads: kept to the end.
    in_output: Set[int]
    #: Per region, the block index it runs (None: before, between or after the blocks).
    block_of: Dict[int, Optional[int]]


def _layout(split: _Split) -> _Layout:
    """Slots and region members of ``split`` (the program's frame, before anything compiles)."""
    gm, regions = split.gm, split.regions
    members: List[List[torch.fx.Node]] = [[] for _ in range(split.count)]
    for node in gm.graph.nodes:
        if node in regions:
            members[regions[node]].append(node)
    slot = {node: position for position, node in enumerate(split.placeholders)}
    for node in gm.graph.nodes:
        if node in regions:
            slot[node] = len(slot)
    output_node = next(node for node in gm.graph.nodes if node.op == "output")
    in_output = {slot[node] for node in output_node.all_input_nodes}
    block_of: Dict[int, Optional[int]] = {region: None for region in range(split.count)}
    for node, region in regions.items():
        if split.blocks.get(node) is not None:
            block_of[region] = split.blocks[node]
    return _Layout(members, slot, output_node, in_output, block_of)


def _label(region: int, layout: _Layout, container: str) -> str:
    """What a region is, for reports: a block (``transformer.h[*]``), or before, between or
    after the blocks."""
    block_regions = [index for index, block in layout.block_of.items() if block is not None]
    if layout.block_of[region] is not None:
        return f"{container}[*]"
    if not block_regions or region < block_regions[0]:
        return f"before {container}"
    if region > block_regions[-1]:
        return f"after {container}"
    return f"between {container}"


@dataclass(frozen=True)
class _Boundary:
    """A region's inputs (values from outside it, first-use order) and outputs (its nodes read
    outside it)."""

    inputs: List[torch.fx.Node]
    outputs: List[torch.fx.Node]


def _boundary(nodes: List[torch.fx.Node]) -> _Boundary:
    inside = set(nodes)
    inputs: List[torch.fx.Node] = []
    for node in nodes:
        for used in node.all_input_nodes:
            if used not in inside and used not in inputs:
                inputs.append(used)
    outputs = [node for node in nodes if any(user not in inside for user in node.users)]
    return _Boundary(inputs, outputs)


class _Tally:
    """What compiling the regions of one program cost (its ``ProgramReport`` counts)."""

    def __init__(self) -> None:
        self.compiled = self.reused = 0
        self.seconds = 0.0
        self.by_label: Dict[str, float] = {}

    def add(self, label: str, fresh: bool, spent: float) -> None:
        self.compiled += fresh
        self.reused += not fresh
        self.seconds += spent
        if fresh:
            self.by_label[label] = self.by_label.get(label, 0.0) + spent


def _compile_split(split: _Split, compile_fn: Callable, options: Optional[Dict[str, Any]]) -> RegionalProgram:
    """Compiles (or reuses, by structure) each region of ``split`` and chains them as steps over
    the layout's slots."""
    options_key = (
        _options_key(options) if options is not None else ("compile_fn", id(compile_fn)),
        # An artifact compiled under no_grad is an inference graph: never reuse it with grad on.
        torch.is_grad_enabled(),
    )
    layout = _layout(split)
    slot = layout.slot
    # Last step that reads each slot (the graph output keeps its slots to the end).
    last_use: Dict[int, int] = {}
    steps: List[_Step] = []
    tally = _Tally()
    sources = {node: getattr(node, "_dynamo_source", None) for node in split.placeholders}
    for region, nodes in enumerate(layout.members):
        boundary = _boundary(nodes)
        for used in boundary.inputs:
            last_use[slot[used]] = region
        label = _label(region, layout, split.container)
        region_gm, key, pins = _canonical(split.gm, nodes, boundary.inputs, boundary.outputs, split.values, sources)
        example = [
            split.values[node] if node in split.values else split.example_inputs[slot[node]] for node in boundary.inputs
        ]
        fn, fresh, spent = _cache.get_or_compile(
            (options_key, key), label, len(nodes), pins, lambda: compile_fn(region_gm, example)
        )
        tally.add(label, fresh, spent)
        inputs, outputs = tuple(slot[node] for node in boundary.inputs), tuple(slot[node] for node in boundary.outputs)
        steps.append(_Step(fn, inputs, outputs, ()))
    # map_aggregate's stubs say the function returns an fx Argument; it maps to any value, and
    # the template holds _Slot markers in place of the output's nodes (read by _build_output).
    template = torch.fx.node.map_aggregate(
        layout.output_node.args[0],
        lambda value: _Slot(slot[value]) if isinstance(value, torch.fx.Node) else value,  # type: ignore[arg-type, return-value]
    )
    report = ProgramReport(
        split.count, tally.compiled, tally.reused, tally.seconds, None, split.container, tuple(tally.by_label.items())
    )
    final = _with_releases(steps, last_use, layout.in_output)
    return RegionalProgram(final, len(slot), len(split.placeholders), template, report)


def _with_releases(steps: List[_Step], last_use: Dict[int, int], in_output: Set[int]) -> List[_Step]:
    """Each step with the slots it reads last (not the output's): freed after it, as the
    whole-graph code frees them."""
    final = []
    for region, step in enumerate(steps):
        release = tuple(
            index for index in sorted(set(step.inputs)) if last_use.get(index) == region and index not in in_output
        )
        final.append(_Step(step.fn, step.inputs, step.outputs, release))
    return final


def _options_key(options: Dict[str, Any]) -> Hashable:
    return repr(sorted((str(key), repr(value)) for key, value in options.items()))


def _canonical(
    gm: torch.fx.GraphModule,
    nodes: List[torch.fx.Node],
    inputs: List[torch.fx.Node],
    outputs: List[torch.fx.Node],
    values: Dict[torch.fx.Node, Any],
    sources: Dict[torch.fx.Node, Any],
) -> Tuple[torch.fx.GraphModule, Hashable, Tuple[Any, ...]]:
    """The region as a GraphModule with positional names (``in_<k>``, ``n_<k>``) and its key."""
    positions: Dict[torch.fx.Node, Tuple[str, int]] = {node: ("in", k) for k, node in enumerate(inputs)}
    positions.update({node: ("n", k) for k, node in enumerate(nodes)})
    canon = _Canon(positions)
    structure = []
    for node in nodes:
        structure.append((canon.target(node, gm), canon.value(node.args), canon.value(node.kwargs)))
    storages: Dict[Any, int] = {}
    specs = tuple(
        _input_spec(values.get(node), node.meta if node.op == "placeholder" else {}, storages, k)
        for k, node in enumerate(inputs)
    )
    key = (tuple(structure), specs, tuple(positions[node][1] for node in outputs))

    graph = torch.fx.Graph()
    env: Dict[torch.fx.Node, torch.fx.Node] = {}
    for k, node in enumerate(inputs):
        placeholder = graph.placeholder(f"in_{k}")
        if node.op == "placeholder":
            placeholder.meta = copy.copy(node.meta)
        else:
            placeholder.meta = {key: node.meta[key] for key in ("example_value", "val") if key in node.meta}
        # Dynamo's markers, which AOTAutograd reads to keep parameters static under CUDA graphs.
        placeholder._dynamo_source = sources.get(node)
        env[node] = placeholder
    for k, node in enumerate(nodes):
        copied = graph.create_node(
            node.op, node.target, torch.fx.node.map_arg(node.args, env.__getitem__),
            torch.fx.node.map_arg(node.kwargs, env.__getitem__), name=f"n_{k}",
        )
        copied.meta = copy.copy(node.meta)
        if "example_value" not in copied.meta and node in values:
            # A node inserted after capture (a patch op) has no Dynamo metadata. AOTAutograd's
            # cache admits a method call only on a node that has an example value (its test for
            # "a tensor"), so a patched value read by ``x.view(...)`` bypassed the cache in every
            # process. Dynamo's nodes carry their own.
            copied.meta["example_value"] = values[node]
        env[node] = copied
    graph.output(tuple(env[node] for node in outputs))
    region = torch.fx.GraphModule(gm, graph)
    if "dynamo_compile_id" in gm.meta:
        # Marks the region as Dynamo's, as Dynamo's DDP optimizer marks its partitions, so that
        # AOTAutograd reads the placeholders' static-input markers (inputs that are not the
        # graph's own placeholders have no source, as there).
        region.meta.update(gm.meta)
        # nn.Module's stubs type every attribute as Tensor | Module (from __getattr__); this is
        # Dynamo's plain dict attribute, which Module.__setattr__ stores as is.
        region._param_name_to_source = getattr(gm, "_param_name_to_source", {})  # type: ignore[assignment]
    return region, key, tuple(canon.pins)
