"""Batched activation-patching sweeps: many patch maps as row blocks of a few large forwards.

A chunk of K cells runs once, on the inputs repeated K times along the batch dimension; rows
``k*B:(k+1)*B`` see only cell k's patches. Every site any cell names becomes a declared slot
(prepared.py), whose (keep, fill) inputs are built per row block on the host, so all chunks —
the last one padded with empty cells — run one compiled variant. While a sweep runs on the eager
tier (no compiled program yet, or none wanted), a chunk runs instead as vmap over its cells on
the graph captured at the inputs' batch (program/vmapped.py): no capture at K·B.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, FrozenSet, Iterator, List, Mapping, Optional, Sequence, Set, Tuple, Union

import torch
from tqdm.auto import tqdm
from torch import nn

from . import config
from . import distributed as _distributed
from ._torch_compat import symbolic
from .aliases import resolve_aliases
from .context import (
    PatchState,
    RunLog,
    _active,
    active_state,
    eager_tier,
    normalize_map,
    patch as patch_context,
    raise_if_unapplied,
)
from .capture.index import RootIndex, index_for
from .capture.capture import GraphCapture
from .program.fanout import FanOutRefused, cut_for_site, fan_out, first_use
from .program.prepared import (
    CellEntries,
    SweepProgram,
    build_sweep_program,
    cell_entries,
    lean_inputs,
    site_key,
    slot_shapes,
)
from .program.vmapped import CellSlotInputs, VmappedProgram, VmapRefused, build_vmapped
from .runtime import worker
from .runtime.tiers import policy
from .runtime.requests import GraphFacts, Request, uncompiled
from .patches import AddPatch, Patch, ReplacePatch, ZeroPatch
from .validation import check_patch_for_site, unknown_name_error
from .roots import resolve_root

Inputs = Union[Mapping[str, Any], Sequence[Any]]
_VALUE_PATCHES = (ZeroPatch, AddPatch, ReplacePatch)
#: Bytes of activations one chunk may use when ``batch_size`` is not given (CPU).
CPU_BUDGET_BYTES = 1 << 30


class SweepPlan:
    """What every chunk of one ``pb.sweep`` call shares: the cells (in run order), the per-cell
    compacted patches, each slot's capacity, the base-batch graphs and the programs it ran.

    Mutable and local to one sweep call (never shared between threads)."""

    def __init__(self, index: RootIndex, batch: int, chunk: int, names: Sequence[str], cells: Sequence[Dict]) -> None:
        self.index = index
        self.batch = batch
        self.chunk = chunk
        self.names = tuple(names)
        self.cells = list(cells)
        #: (cell, name) → its compacted patches (``prepared.cell_entries``).
        self.entries: Dict[Tuple[int, str], CellEntries] = {}
        self.capacities: Dict[str, int] = {}
        #: The graphs the base-batch call ran, in call order: fan-out needs exactly one.
        self.base_graphs: List[GraphCapture] = []
        #: The prepared programs' eager forms (nothing compiled), built once per sweep.
        self.eager_programs: Dict[Any, Any] = {}
        #: Per chunk, the keys of the programs its graph calls ran (``sweep`` verifies new ones).
        self.keys_run: List[Any] = []
        #: (cut, why a fan-out was refused) of each program a chunk ran, for ``last_sweep_report``.
        self.programs_run: List[Tuple[Optional[str], Optional[str]]] = []
        #: Why fan-outs were refused (``_cut``).
        self.refusals: List[str] = []
        #: One-cell checks against the eager interpreter this sweep ran (``_rows_match_alone``).
        self.checks = 0
        #: Whether chunks run as vmap over the base graph's cells (program/vmapped.py), how many
        #: did, and why that stopped when it was refused.
        self.vmapped = False
        self.vmapped_chunks = 0
        self.vmap_refused: Optional[str] = None
        #: ``id`` of the sweep's input tensors: the graph inputs vmap leaves unmapped, batch first.
        self.input_ids: FrozenSet[int] = frozenset()
        #: Per patched name, the most positions one cell patches there (a vmapped slot's length).
        self.cell_capacities: Dict[str, int] = {}

    def entries_for(self, cell: int, name: str, shape: Tuple[int, ...], dtype: torch.dtype, device: torch.device) -> CellEntries:
        key = (cell, name)
        if key not in self.entries:
            self.entries[key] = cell_entries(self.cells[cell][name], shape, dtype, device)
        return self.entries[key]

    def capacity(self, name: str, shape: Tuple[int, ...], dtype: torch.dtype, device: torch.device) -> int:
        """The most positions any chunk patches at ``name`` (at least 1): every chunk's slot
        inputs have this length, so one compiled program serves all of them."""
        if name not in self.capacities:
            most = 1
            for start in range(0, len(self.cells), self.chunk):
                total = sum(
                    self.entries_for(cell, name, shape, dtype, device).index.numel()
                    for cell in range(start, min(start + self.chunk, len(self.cells)))
                    if name in self.cells[cell]
                )
                most = max(most, total)
            self.capacities[name] = most
        return self.capacities[name]

    def cell_capacity(self, name: str, shape: Tuple[int, ...], dtype: torch.dtype, device: torch.device) -> int:
        """The most positions one cell patches at ``name`` (at least 1): every cell's slot inputs
        in a vmapped chunk have this length."""
        if name not in self.cell_capacities:
            self.cell_capacities[name] = max(
                [1] + [self.entries_for(cell, name, shape, dtype, device).index.numel()
                       for cell in range(len(self.cells)) if name in self.cells[cell]]
            )
        return self.cell_capacities[name]

    def base_graph(self, capture: GraphCapture) -> Optional[GraphCapture]:
        """The same code's graph at the base batch, when the base call ran exactly one graph
        and both are static (a graph after a break gets rows already patched differently)."""
        if len(self.base_graphs) != 1:
            return None
        base = self.base_graphs[0]
        if base is capture or base.code_key != capture.code_key or base.dynamic or capture.dynamic:
            return None
        return base


@dataclass(frozen=True)
class _FanOutPoint:
    """Where one chunk's rows fan out in one graph (``SweepSpec._fan_out_point``)."""

    #: The same code's graph at the base batch (None: the base call ran no single static graph).
    base: Optional[GraphCapture]
    #: The first node run at the chunk's rows; None: the whole forward runs at K·B.
    cut: Optional[str]
    #: The names this graph's program slots: with a cut, those whose patched value is read after it.
    included: List[str]


@dataclass(frozen=True)
class SweepSpec:
    """pb.sweep's front-end for one chunk (or, with ``base``, for the base-batch call)."""

    plan: SweepPlan
    #: The chunk's first cell (in the plan's run order).
    start: int
    #: The chunk's cells, padded with empty ones to the plan's chunk size.
    cells: Tuple[Dict[str, Tuple[Union[ZeroPatch, AddPatch, ReplacePatch], ...]], ...]
    #: The base-batch call: records its graphs, runs them uncompiled, patches nothing.
    base: bool = False
    #: Which names ran in this chunk's forward (checked on leaving ``row_patches``).
    log: RunLog = field(default_factory=RunLog, compare=False)

    @property
    def index(self) -> RootIndex:
        return self.plan.index

    @property
    def names(self) -> Tuple[str, ...]:
        return () if self.base else self.plan.names

    def request(self, state: PatchState, graph: GraphFacts, instance: Any, args: Sequence[Any]) -> Optional[Request]:
        """This graph's sites that cells patch, as lean slots of one program per fan-out cut."""
        capture = graph.capture
        found = self.index.sites_for(capture, instance)
        note_sweep_graph(self, found)
        if self.base:
            if found is not None:
                self.plan.base_graphs.append(capture)
            # Name discovery need not compile the plain variant; a sweep's base call runs it (the
            # graph the user runs: compiled once, and cheaper than interpreting it every sweep).
            return uncompiled(graph) if not self.plan.names else None
        sites = found or {}
        here = [name for name in self.plan.names if name in sites]
        if not here:
            return None
        plan = self.plan
        if plan.vmapped:
            return self._vmapped_request(graph, sites, here, args)
        capacities = self._capacities(capture, sites, here, args)
        fanning = self._fan_out_point(capture, sites, here)
        cut, base, included = fanning.cut, fanning.base, fanning.included
        chosen = [sites[name] for name in included]
        key = (
            "sweep",
            frozenset((site_key(site), capacities[site_key(site)]) for site in chosen),
            cut,
            None if base is None or cut is None else base.uid,
        )
        plan.keys_run.append(key)
        base_gm = None if base is None or cut is None else base.gm
        chunk = plan.chunk

        def build(compile_fn: Callable, call_args: Sequence[Any]) -> SweepProgram:
            return build_sweep_program(capture, chosen, capacities, call_args, compile_fn, base_gm, cut, chunk)

        return Request(
            key=key,
            build=build,
            interpret=lambda call_args: self._eager_program(graph, key, build, call_args),
            run=lambda program, call_args: self._run(program, call_args, sites, included),
            owners=(self.index,),
        )

    def _capacities(
        self, capture: GraphCapture, sites: Dict[str, Any], here: List[str], args: Sequence[Any]
    ) -> Dict[Any, int]:
        """Per site of this graph, its lean slot's length: the plan's capacity for the site's
        per-cell shape (the same for every chunk, so one program serves them all)."""
        plan = self.plan
        shapes = slot_shapes(capture, [sites[name] for name in here], args)
        capacities = {}
        for name in here:
            shape, dtype, device = shapes[site_key(sites[name])]
            per_cell = (shape[0] // plan.chunk,) + tuple(shape[1:])
            capacities[site_key(sites[name])] = plan.capacity(name, per_cell, dtype, device)
        return capacities

    def _fan_out_point(self, capture: GraphCapture, sites: Dict[str, Any], here: List[str]) -> _FanOutPoint:
        """Where this chunk's rows fan out in this graph: the earliest cut of the sites its cells
        patch, when the fan-out there passes its checks; else none (the full-repeat program)."""
        plan = self.plan
        base = plan.base_graph(capture)
        cut = None
        included = here
        if base is not None:
            gm = capture.gm
            order = {node.name: position for position, node in enumerate(gm.graph.nodes)}
            patched = [name for name in here if any(name in cell for cell in self.cells)]
            cuts = [_site_cut(capture, sites[name]) for name in patched]
            known = [c for c in cuts if c is not None]
            if patched and len(known) == len(cuts):
                cut = _checked_cut(plan, capture, base, min(known, key=lambda c: order[c]))
            if cut is not None:
                # Every site whose patched value is read only after the cut (the others are
                # patched by no cell of this chunk, whose sites are all read after it).
                included = [name for name in here if _first_use(capture, sites[name]) >= order[cut]]
        return _FanOutPoint(base, cut, included)

    def _vmapped_request(self, graph: GraphFacts, sites: Dict[str, Any], here: List[str], args: Sequence[Any]) -> Request:
        """The chunk as vmap over its cells on the base call's graph, at the base batch's inputs:
        run uncompiled, never compiled (program/vmapped.py)."""
        plan, capture = self.plan, graph.capture
        if plan.base_graphs != [capture]:
            raise VmapRefused("the chunk's forward ran another graph than the base call's")
        batched = frozenset(position for position, arg in enumerate(args) if id(arg) in plan.input_ids)
        if not batched:
            raise VmapRefused("none of the graph's inputs is one of the sweep's inputs")
        shapes = slot_shapes(capture, [sites[name] for name in here], args)
        capacities = {site_key(sites[name]): plan.cell_capacity(name, *shapes[site_key(sites[name])]) for name in here}
        chosen = [sites[name] for name in here]
        key = ("sweep-vmap", frozenset(capacities.items()), None, batched)
        plan.keys_run.append(key)

        def build(compile_fn: Callable, call_args: Sequence[Any]) -> VmappedProgram:
            return build_vmapped(capture, chosen, capacities, call_args, batched, plan.chunk)

        return Request(
            key=key,
            build=build,
            interpret=lambda call_args: self._eager_program(graph, key, build, call_args),
            run=lambda program, call_args: program.call(call_args, self.cell_slot_inputs(program, sites, here)),
            owners=(self.index,),
            compile=False,
        )

    def _run(self, program: SweepProgram, args: Sequence[Any], sites: Dict[str, Any], names: Sequence[str]) -> Any:
        self.plan.programs_run.append((program.cut, program.refused))
        return program.call(args, self.slot_inputs(program, sites, names))

    def _eager_program(self, graph: GraphFacts, key: Any, build: Callable, args: Sequence[Any]) -> Any:
        """The program run as the FX graph's Python code (nothing compiled)."""
        memo_key = (graph.capture.uid, key, graph.shape_key(args))
        program = self.plan.eager_programs.get(memo_key)
        if program is None:
            program = self.plan.eager_programs[memo_key] = build(_uncompiled, args)
        return program

    def slot_inputs(self, program: SweepProgram, sites: Dict[str, Any], names: Sequence[str]) -> Dict[int, Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(keep, fill, index) per slot this chunk patches; the others get cached identities."""
        inputs: Dict[int, Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        for name in names:
            position = program.slot_index.get(site_key(sites[name]))
            if position is None:
                continue
            slot = program.slots[position]
            per_cell = (slot.shape[0] // self.plan.chunk,) + tuple(slot.shape[1:])
            block = math.prod(per_cell)
            parts = [
                (k * block, self.plan.entries_for(self.start + k, name, per_cell, slot.dtype, slot.device))
                for k, cell in enumerate(self.cells)
                if name in cell
            ]
            if parts:
                inputs[position] = lean_inputs(slot, parts)
        return inputs

    def cell_slot_inputs(self, program: VmappedProgram, sites: Dict[str, Any], names: Sequence[str]) -> Dict[int, CellSlotInputs]:
        """(keep, fill, index) per slot this chunk patches, one row per cell (vmap maps them)."""
        inputs: Dict[int, CellSlotInputs] = {}
        for name in names:
            position = program.slot_index.get(site_key(sites[name]))
            if position is None or not any(name in cell for cell in self.cells):
                continue
            slot = program.slots[position]
            untouched = program.program.identity(position)
            per_cell = [
                lean_inputs(slot, [(0, self.plan.entries_for(self.start + k, name, slot.shape, slot.dtype, slot.device))])
                if name in cell else untouched
                for k, cell in enumerate(self.cells)
            ]
            keep, fill, index = (torch.stack(parts) for parts in zip(*per_cell))
            inputs[position] = (keep, fill, index)
        return inputs


def _site_cut(capture: GraphCapture, site: Any) -> Optional[str]:
    if len(_CUTS) >= 4096:
        _CUTS.clear()  # a memo: dropping it costs a recheck, never a wrong row
    key = ("cut", capture.uid, site.node, site.consumers)
    if key not in _CUTS:
        _CUTS[key] = cut_for_site(capture.gm, site.node, site.consumers)
    return _CUTS[key]


def _first_use(capture: GraphCapture, site: Any) -> int:
    key = ("use", capture.uid, site.node, site.consumers)
    if key not in _CUTS:
        use = first_use(capture.gm, site.node, site.consumers)
        nodes = list(capture.gm.graph.nodes)
        _CUTS[key] = nodes.index(use) if use is not None else 0
    return _CUTS[key]


def _checked_cut(plan: SweepPlan, capture: GraphCapture, base: GraphCapture, cut: str) -> Optional[str]:
    """``cut`` if the fan-out there passes its checks (tried once per cut on the captured
    graphs, so that refused cuts share the one full-repeat program instead of compiling one
    each), else None."""
    key = ("check", capture.uid, base.uid, cut, plan.chunk)
    if key not in _CUTS:
        refused = None
        try:
            fan_out(capture.gm, base.gm, cut, plan.chunk, check_only=True)
        except FanOutRefused as error:
            refused = str(error)
        _CUTS[key] = refused
    refused = _CUTS[key]
    if refused is not None:
        plan.refusals.append(refused)
        return None
    return cut


#: Per captured graph (uids are never reused, graphs never change): each site's cut and first
#: use, and why a fan-out at a cut was refused (None: it was not), so later sweeps skip the work.
_CUTS: Dict[Any, Any] = {}


def _uncompiled(gm: Any, example: Sequence[Any]) -> Callable:
    return gm.forward


class row_patches:
    """Context manager: cell k's patches apply to rows ``k*rows_per_cell:(k+1)*rows_per_cell``.

    Never silent, like ``pb.patch``: on a normal exit, a name some cell patches whose node did
    not run in the chunk's forward raises PatchNotAppliedError.
    """

    def __init__(self, plan: SweepPlan, start: int, cells: Sequence[Dict], base: bool = False) -> None:
        self.spec = SweepSpec(plan, start, tuple(cells), base)

    def __enter__(self) -> None:
        self._token = _active.set(PatchState(roots=(), frontend=self.spec))

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        _active.reset(self._token)
        if exc_type is None and not self.spec.base:
            spec = self.spec
            patched = {name: _patches_of(spec, name) for name in spec.names}
            patched = {name: patches for name, patches in patched.items() if patches}
            raise_if_unapplied(spec.log, spec.index, patched, "this sweep chunk")


def _patches_of(spec: SweepSpec, name: str) -> Tuple[Patch, ...]:
    return tuple(patch for cell in spec.cells for patch in cell.get(name, ()))


def note_sweep_graph(spec: SweepSpec, sites: Optional[Dict[str, Any]]) -> None:
    """Called by the dispatcher per graph call of a sweep chunk (``sites`` None: another model's)."""
    if sites is None:
        return
    key = id(spec.index)
    spec.log.graph_calls[key] = spec.log.graph_calls.get(key, 0) + 1
    spec.log.applied.update((key, name) for name in spec.names if name in sites)


def _compiled_model(model: Any) -> Tuple[Callable, nn.Module]:
    """The callable to run and the root module; a plain module is compiled with graphpatch."""
    root = resolve_root(model)
    if model is root:
        # A fresh wrapper is cheap: Dynamo's cache lives on the code, not on the wrapper.
        return torch.compile(root, backend="graphpatch"), root
    return model, root


def _call(model: Callable, inputs: Inputs) -> Any:
    if isinstance(inputs, Mapping):
        return model(**inputs)
    return model(*inputs)


def _batch_size(inputs: Inputs) -> int:
    sizes = {v.shape[0] for v in _values(inputs) if isinstance(v, torch.Tensor) and v.dim() > 0}
    if len(sizes) != 1:
        raise ValueError(f"sweep inputs must share one leading batch dimension; found sizes {sorted(sizes)}")
    return sizes.pop()


def _repeat(inputs: Inputs, times: int) -> Inputs:
    def repeat(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            repeated = value.repeat(times, *([1] * (value.dim() - 1)))
            # Every chunk has this exact shape (the last is padded): a static graph compiles
            # faster than the dynamic one Dynamo would otherwise make for a second batch size.
            symbolic.mark_static(repeated)
            return repeated
        return value

    if isinstance(inputs, Mapping):
        return {key: repeat(value) for key, value in inputs.items()}
    return tuple(repeat(value) for value in inputs)


def _check_cells(index: RootIndex, cells: Sequence[Mapping], batch: int) -> Tuple[List[Dict], List[str]]:
    normalized: List[Dict[str, Tuple[Patch, ...]]] = []
    names: List[str] = []
    for position, cell in enumerate(cells):
        try:
            by_name = resolve_aliases(index.root, normalize_map(cell))
        except (KeyError, ValueError) as error:
            raise type(error)(f"sweep cell {position}: {error.args[0]}") from None
        for name, patches in by_name.items():
            sites = index.by_name.get(name)
            if not sites:
                raise unknown_name_error(name, index)
            batched = [s.site for s in sites if s.site.shape and not isinstance(s.site.shape[0], int)]
            batched += [s.site for s in sites if s.site.shape and s.site.shape[0] == batch]
            site = batched[0] if batched else sites[0].site
            if not batched or site.kind == "param":
                raise ValueError(
                    f"sweep cell {position}: {name!r} (shape {site.shape}) has no leading batch dimension of "
                    f"size {batch}; sweeps patch row blocks, so sites must keep the batch first"
                )
            per_cell = _per_cell_site(site, batch)
            for patch in patches:
                if not isinstance(patch, _VALUE_PATCHES):
                    raise ValueError(
                        f"sweep cell {position}: {type(patch).__name__} at {name!r}; sweep cells take Zero/Add/Replace "
                        "patches (record activations with pb.patch and a ProbePatch instead)"
                    )
                check_patch_for_site(name, per_cell, patch)
            if name not in names:
                names.append(name)
        normalized.append(by_name)
    return normalized, names


def _per_cell_site(site: Any, batch: int) -> Any:
    return dataclasses.replace(site, shape=(batch,) + tuple(site.shape[1:]))


def _chunk_size(index: RootIndex, batch: int, cells: int) -> int:
    """Cells per forward from a memory budget: the bytes of every named activation, per row."""
    seen = set()
    row_bytes = 0
    for named_sites in index.by_name.values():
        site = named_sites[0].site
        if site.node in seen or site.shape is None or site.dtype is None or not site.shape:
            continue
        seen.add(site.node)
        row_bytes += math.prod(site.shape) * site.dtype.itemsize // max(1, site.shape[0])
    budget = CPU_BUDGET_BYTES
    if torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info()
        budget = max(budget, free // 4)
    return max(1, min(cells, 256, budget // max(1, row_bytes * batch)))


class SweepBatchingWarning(RuntimeWarning):
    """pb.sweep found that running cells as row blocks of one forward changed a result (the
    model's Python reads values across the batch) and ran one forward per cell instead."""


def sweep(
    model: Any,
    inputs: Inputs,
    cells: Sequence[Mapping[str, Any]],
    metric: Callable[[Any], torch.Tensor],
    batch_size: Optional[int] = None,
    progress: bool = True,
    verify: bool = True,
    distributed: bool = True,
    _sites: Sequence[str] = (),
    _trusted: bool = False,
    _cell_by_cell: bool = False,
    _after_first_chunk: Optional[Callable[[], None]] = None,
) -> torch.Tensor:
    """Runs every patch map in ``cells`` on ``inputs``; returns ``metric`` per cell, ``[cells, B, ...]``.

    ``model`` is a module (compiled here with backend="graphpatch") or its torch.compile
    result; ``inputs`` its args (tuple) or kwargs (dict), batch size B on dim 0;
    ``metric(output)`` must return a tensor whose leading dim is the rows of the batched forward.
    ``batch_size`` is cells per forward (default: from a memory budget).

    Never a wrong row: batching is exact only if no Python code of the model reads values
    across the batch (``if h.sum() > 0``). With ``verify`` (the default), the first cell of the
    first chunk is also run alone, on the eager interpreter (nothing compiled for it); if it
    differs from its rows, the sweep warns (``SweepBatchingWarning``) and runs one forward per
    cell instead (docs/errors.md).

    Under an initialized torch.distributed process group of several ranks (``torchrun``), the
    cells are sharded over the ranks and every rank returns all rows, in cell order
    (docs/scaling.md); ``distributed=False`` runs them all in this process.

    Raises (before any cell runs unless said otherwise; docs/errors.md):
        ValueError / KeyError / IndexError: a cell the checks of ``pb.patch`` refuse, named
            ``sweep cell k`` (rows 1-11); no cells; inputs without one batch dimension; a
            ``batch_size`` below 1; a metric whose leading dim is not the chunk's rows.
        RuntimeError: ``pb.sweep`` inside an active ``pb.patch`` or sweep of the same model.
        PatchNotAppliedError: after a chunk, a cell's node its forward did not run (row 17).
        DistributedSweepError: on every rank, when a rank's shard failed (row 26).
    Warns ``SweepBatchingWarning`` when batching would change rows (row 23).

    ``_trusted`` and ``_cell_by_cell`` are for the distributed package. ``_trusted``: another rank runs
    this sweep's once-per-sweep check (on its first chunk), so this call checks only the programs
    this process has not verified before; the caller must redo these cells with
    ``_cell_by_cell`` when that check fails there. ``_cell_by_cell``: the fallback, at once.
    ``_after_first_chunk``: called once the first chunk's rows are in (the leader hands its
    compiled programs over to the other ranks there).

    Example::

        cells = [{f"transformer.h_{layer}.output": pb.ReplacePatch(value=clean[layer][:, pos], slice=(slice(None), pos))}
                 for layer in range(n_layers) for pos in range(n_positions)]
        scores = pb.sweep(compiled, (corrupt_ids,), cells, metric=lambda out: out.logits[:, -1, answer])
        # scores: [len(cells), batch]
    """
    if _distributed.active(distributed):
        return _distributed.sharded_sweep(_LOCAL, model, inputs, cells, metric, batch_size, progress, verify)
    if not cells:
        raise ValueError("sweep needs at least one cell (patch map)")
    with _sweep_mode() as foreground:
        return _sweep_here(model, inputs, cells, metric, batch_size, progress, verify, _sites, _trusted,
                           _cell_by_cell, _after_first_chunk, foreground)


@contextlib.contextmanager
def _sweep_mode() -> Iterator[contextlib.ExitStack]:
    """Every forward of a sweep runs without autograd (its results are detached metric values):
    one grad mode means one Dynamo capture per batch size, and Inductor compiles an inference
    graph. The whole sweep is one eager-tier caller (runtime/worker.py, ``foreground``): a
    compile it asks for starts once the sweep has returned (or the stack yielded here is closed),
    or after FOREGROUND_LIMIT seconds of a long one, so a short sweep never shares the machine
    with a compile it will not use."""
    with torch.no_grad(), contextlib.ExitStack() as foreground:
        foreground.enter_context(worker.foreground())
        yield foreground


def _sweep_here(
    model: Any,
    inputs: Inputs,
    cells: Sequence[Mapping[str, Any]],
    metric: Callable[[Any], torch.Tensor],
    batch_size: Optional[int],
    progress: bool,
    verify: bool,
    _sites: Sequence[str],
    _trusted: bool,
    _cell_by_cell: bool,
    _after_first_chunk: Optional[Callable[[], None]],
    foreground: contextlib.ExitStack,
) -> torch.Tensor:
    """``sweep`` in this process: check the cells, run the base forward, then the chunks.
    ``foreground`` holds back compiles while the sweep expects to finish on the eager tier."""
    prepared = _prepare(model, inputs, cells, batch_size, _sites)
    plan, compiled = prepared.plan, prepared.compiled
    bar = _progress(len(cells), progress)
    if _cell_by_cell:
        return _only_cell_by_cell(prepared, inputs, metric, bar)
    batched = _chunk_inputs(plan, inputs, _sites)
    began = time.perf_counter()
    results: List[torch.Tensor] = []
    checks = _Checks(verify, _trusted)
    try:
        for start in range(0, len(cells), plan.chunk):
            block = plan.cells[start : start + plan.chunk]
            known = len(plan.keys_run)  # the programs this chunk runs are those after it
            values = _chunk_values(compiled, plan, start, block, inputs, batched, metric)
            if not _batching_checked(checks, plan, known, compiled, inputs, block, values, metric):
                _warn_batching(prepared.root)
                _report(plan, True)
                return _cell_by_cell_run(compiled, inputs, prepared.normalized, metric, bar)
            results.append(values.detach())
            if bar is not None:
                bar.update(len(block))
            if _after_first_chunk is not None and start == 0:
                _after_first_chunk()
            if plan.vmapped and _long_for_eager(plan, began, start + len(block)):
                # Compiled chunks pay off now: capture at K·B, compile on the worker meanwhile.
                plan.vmapped = False
                foreground.close()
    finally:
        if bar is not None:
            bar.close()
    _report(plan, False)
    return _in_caller_order(torch.cat(results), prepared.order)


@dataclass(frozen=True)
class _Prepared:
    """A sweep's checked cells and plan (``_prepare``), before any chunk runs."""

    compiled: Callable
    root: nn.Module
    #: The caller's cells, checked and normalized, in the caller's order.
    normalized: List[Dict]
    #: ``order[k]``: the caller's index of the plan's k-th cell (cells sorted by fan-out point).
    order: List[int]
    plan: SweepPlan


def _prepare(
    model: Any, inputs: Inputs, cells: Sequence[Mapping[str, Any]], batch_size: Optional[int], sites: Sequence[str]
) -> _Prepared:
    """Everything checked before a chunk runs (the cells, the batch, ``batch_size``), the plan of
    chunks, and the base forward whose graphs run the part before each chunk's cut."""
    compiled, root = _compiled_model(model)
    state = active_state()
    if isinstance(state.frontend, SweepSpec) or any(entry.index.root is root for entry in state.roots):
        raise RuntimeError("pb.sweep cannot run inside an active pb.patch or sweep on the same model")
    batch = _batch_size(inputs)
    index = index_for(root)
    if not index.names:
        with row_patches(SweepPlan(index, batch, 1, (), ()), 0, (), base=True):
            _call(compiled, inputs)
        index.refresh()
    normalized, names = _check_cells(index, cells, batch)
    # distributed/: every rank declares the whole sweep's sites, so all ranks build one program.
    names += [name for name in sites if name not in names]
    chunk = batch_size or _chunk_size(index, batch, len(cells))
    if chunk < 1:
        raise ValueError(f"batch_size must be a positive number of cells, got {batch_size}")
    # Cells patching late sites run together: their chunk's fan-out point is late too.
    order = sorted(range(len(cells)), key=lambda cell: _earliest(index, normalized[cell]))
    plan = SweepPlan(index, batch, chunk, names, [normalized[cell] for cell in order])
    with row_patches(plan, 0, (), base=True):
        # The graphs of one unbatched forward: the part before a chunk's cut runs them.
        _call(compiled, inputs)
    return _Prepared(compiled, root, normalized, order, plan)


def _only_cell_by_cell(prepared: _Prepared, inputs: Inputs, metric: Callable[[Any], torch.Tensor], bar: Any) -> torch.Tensor:
    """The whole sweep one forward per cell, at once (a rank told so by the others, whose check
    found that batching changes rows)."""
    try:
        _report(prepared.plan, True)
        return _cell_by_cell_run(prepared.compiled, inputs, prepared.normalized, metric, bar)
    finally:
        if bar is not None:
            bar.close()


def _chunk_inputs(plan: SweepPlan, inputs: Inputs, sites: Sequence[str]) -> Inputs:
    """Decides whether chunks start as vmap over the base graph, and returns the inputs of a
    chunk's K·B forward (the inputs repeated once per cell of a chunk)."""
    plan.vmapped = _vmap_chunks(plan, sites)
    plan.input_ids = frozenset(id(value) for value in _values(inputs) if isinstance(value, torch.Tensor))
    return _repeat(inputs, plan.chunk)


def _chunk_values(
    compiled: Callable, plan: SweepPlan, start: int, block: List[Dict], inputs: Inputs, batched: Inputs,
    metric: Callable[[Any], torch.Tensor],
) -> torch.Tensor:
    """One chunk's metric rows, ``[cells, B, ...]``: the chunk padded with empty cells to the
    plan's chunk size (one program shape for every chunk), run, scored, the padding dropped."""
    padded = block + [{}] * (plan.chunk - len(block))
    return _chunk_rows(metric(_run_chunk(compiled, plan, start, padded, inputs, batched)), plan, len(block))


def _batching_checked(
    checks: "_Checks", plan: SweepPlan, known: int, compiled: Callable, inputs: Inputs, block: List[Dict],
    values: torch.Tensor, metric: Callable[[Any], torch.Tensor],
) -> bool:
    """False when this chunk's check (if it wants one: ``_Checks``) found that its first cell
    run alone differs from its rows; the sweep then falls back to one forward per cell.
    ``known``: how many programs the plan had run before this chunk."""
    if checks.wanted(plan, known):
        if not _rows_match_alone(compiled, inputs, block, values, metric):
            return False
        checks.passed(plan, known)
    return True


def _in_caller_order(ran: torch.Tensor, order: List[int]) -> torch.Tensor:
    """The plan's rows (cells sorted by fan-out point) back in the caller's cell order."""
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(len(order))
    return ran[inverse.to(ran.device)]


@dataclass(frozen=True)
class SweepReport:
    """What the last ``pb.sweep`` of this process did (diagnostics, tests, benchmarks)."""

    cells: int
    chunk: int
    #: Per graph call of each chunk: the first node run at the chunk's rows (None: the whole
    #: forward ran at K·B) and why a fan-out was refused (None: not refused or not tried).
    programs: Tuple[Tuple[Optional[str], Optional[str]], ...]
    #: Whether the sweep fell back to one forward per cell (``SweepBatchingWarning``).
    cell_by_cell: bool
    #: Per patched name, the length of its lean slot's (keep, fill, index): the most positions
    #: one chunk's cells patch there.
    capacities: Dict[str, int]
    #: Fan-outs refused before a program was built (the chunk then ran the full repeat).
    refused: Tuple[str, ...] = ()
    #: One-cell checks run on the eager interpreter (``verify``): the first chunk's, and one
    #: per fanned-out program this process had not verified; none for a trusting rank's
    #: programs verified before (docs/scaling.md).
    checks: int = 0
    #: Chunks run as vmap over the base graph's cells (program/vmapped.py), and why that was
    #: refused (None: it was not).
    vmapped: int = 0
    vmap_refused: Optional[str] = None

    @property
    def cuts(self) -> Tuple[Optional[str], ...]:
        return tuple(cut for cut, _ in self.programs)

    @property
    def refusals(self) -> Tuple[str, ...]:
        return tuple(sorted({reason for _, reason in self.programs if reason} | set(self.refused)))


_last_report: List[SweepReport] = []


def last_sweep_report() -> Optional[SweepReport]:
    """The ``SweepReport`` of the last ``pb.sweep`` that finished in this process."""
    return _last_report[-1] if _last_report else None


def _vmap_chunks(plan: SweepPlan, sites: Sequence[str]) -> bool:
    """Whether uncompiled chunks run as vmap over the base graph's cells (program/vmapped.py):
    under the "background" and "never" policies, for a model whose base call ran one static
    graph. Not for a rank of a sharded sweep (distributed/ declares ``sites``): the ranks share
    the compiled programs of the leader's first chunk."""
    return (
        config.sweep_vmap and policy() in ("background", "never") and not sites
        and len(plan.base_graphs) == 1 and not plan.base_graphs[0].dynamic
    )


def _chunk_rows(values: Any, plan: SweepPlan, cells: int) -> torch.Tensor:
    """The metric's rows of one chunk as ``[cells, B, ...]`` (padding cells dropped)."""
    rows = plan.chunk * plan.batch
    if not isinstance(values, torch.Tensor) or values.dim() == 0 or values.shape[0] != rows:
        raise ValueError(
            f"metric must return a tensor whose leading dim is the {rows} rows of the batched "
            f"forward, got {getattr(values, 'shape', type(values).__name__)}"
        )
    return values.reshape(plan.chunk, plan.batch, *values.shape[1:])[:cells]


class _Checks:
    """Which chunks' first cell is run alone to check the batching (``verify``): the sweep's
    first chunk (another rank's, when ``trusted``), and each chunk that runs a program not
    checked yet (another fan-out cut). Programs without a fan-out never enter ``_VERIFIED``."""

    def __init__(self, verify: bool, trusted: bool) -> None:
        self.verify, self.trusted = verify, trusted
        self.verified = trusted
        self.checked: Set[Any] = set()

    def wanted(self, plan: SweepPlan, known: int) -> bool:
        new = [key for key in plan.keys_run[known:] if key not in self.checked and key not in _VERIFIED]
        if self.trusted:
            # The trusting rank's unverified programs are those with a fan-out cut: whether a
            # full-repeat program batches exactly is what the other rank's check is about.
            new = [key for key in new if key[2] is not None]
        check = self.verify and (not self.verified or bool(new))
        plan.checks += int(check)
        return check

    def passed(self, plan: SweepPlan, known: int) -> None:
        self.verified = True
        self.checked.update(plan.keys_run[known:])
        if len(_VERIFIED) >= 4096:
            _VERIFIED.clear()
        _VERIFIED.update(key for key in plan.keys_run[known:] if key[2] is not None)


def _warn_batching(root: nn.Module) -> None:
    warnings.warn(
        f"pb.sweep: a cell run alone differs from its rows in the batched forward of "
        f"{type(root).__name__} (its Python code reads values across the batch, e.g. a branch on a "
        "tensor's value), so batching cells would change results; running one forward per cell "
        "instead (docs/errors.md)",
        SweepBatchingWarning,
        stacklevel=4,
    )


def _run_chunk(compiled: Callable, plan: SweepPlan, start: int, cells: Sequence[Dict], inputs: Inputs,
               batched: Inputs) -> Any:
    """One chunk's forward: vmapped at the base inputs while it may be, else at K·B rows."""
    if plan.vmapped:
        try:
            with row_patches(plan, start, cells):
                output = _call(compiled, inputs)
        except VmapRefused as why:
            plan.vmapped, plan.vmap_refused = False, str(why)
        else:
            plan.vmapped_chunks += 1
            return output
    with row_patches(plan, start, cells):
        return _call(compiled, batched)


def _long_for_eager(plan: SweepPlan, began: float, done: int) -> bool:
    """Under the "background" policy: whether the cells left would take longer on the eager tier
    than ``config.sweep_eager_seconds``, at the pace of the cells done."""
    if policy() != "background" or done >= len(plan.cells):
        return False
    return (time.perf_counter() - began) / done * (len(plan.cells) - done) > config.sweep_eager_seconds


def _values(inputs: Inputs) -> List[Any]:
    return list(inputs.values()) if isinstance(inputs, Mapping) else list(inputs)


def _report(plan: SweepPlan, cell_by_cell: bool) -> None:
    _last_report[:] = [SweepReport(
        len(plan.cells), plan.chunk, tuple(plan.programs_run), cell_by_cell, dict(plan.capacities),
        tuple(plan.refusals), plan.checks, plan.vmapped_chunks, plan.vmap_refused,
    )]


#: Keys of fanned-out programs that gave a sampled cell's unbatched rows once (their exactness
#: does not depend on values: later sweeps check only their first chunk, as without fan-out).
_VERIFIED: Set[Any] = set()


def _earliest(index: RootIndex, cell: Mapping[str, Any]) -> float:
    """Where in graph order the cell's first patched site is (its chunk's fan-out point)."""
    positions = [site.site.position for name in cell for site in index.by_name.get(name, ())]
    return min(positions) if positions else math.inf


def _rows_match_alone(
    compiled: Callable, inputs: Inputs, block: Sequence[Dict], values: torch.Tensor, metric: Callable
) -> bool:
    """Whether the first patched cell of a chunk gives, run alone on the eager tier, the rows
    the batched forward gave it. One cell: the check is one unbatched eager forward per sweep."""
    position = next((position for position, cell in enumerate(block) if cell), None)
    if position is None:
        return True
    with patch_context(compiled, block[position]), eager_tier():
        alone = metric(_call(compiled, inputs)).detach()
    return _close(alone, values[position])


def _close(expected: torch.Tensor, actual: torch.Tensor) -> bool:
    """Equal up to the rounding that another batch size's kernels may bring."""
    if expected.shape != actual.shape:
        return False
    if not expected.is_floating_point():
        return bool(torch.equal(expected, actual))
    loose = expected.dtype in (torch.float16, torch.bfloat16)
    scale = 1.0 + float(expected.abs().max()) if expected.numel() else 1.0
    tolerance = (5e-2 if loose else 1e-4) * scale
    return bool(torch.allclose(actual.to(expected.dtype), expected, rtol=5e-2 if loose else 1e-3, atol=tolerance))


def _cell_by_cell_run(
    compiled: Callable, inputs: Inputs, cells: Sequence[Dict], metric: Callable, bar: Any
) -> torch.Tensor:
    """The fallback: one patched forward per cell (cells of one structure share a variant)."""
    if bar is not None:
        bar.reset()
    results = []
    for cell in cells:
        with patch_context(compiled, cell):
            results.append(metric(_call(compiled, inputs)).detach())
        if bar is not None:
            bar.update(1)
    return torch.stack(results)


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    return tqdm(total=total, unit="cell", desc="sweep")


#: The single-process sweep's pieces a sharded sweep runs on each rank (distributed/ must not
#: import this module, which imports it).
_LOCAL = _distributed.LocalSweep(sweep, _compiled_model, _batch_size, _call, _chunk_size, _check_cells, last_sweep_report)
