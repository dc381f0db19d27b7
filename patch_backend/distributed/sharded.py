"""Sharded sweeps: ``pb.sweep`` and ``pb.causal_trace`` split their cells over torch.distributed ranks.

When a process group is initialized (``torchrun``, or ``init_process_group`` by hand) and has more
than one rank, every rank calls ``pb.sweep`` with the same arguments, as it would in one process.
Each rank then

1. captures the model (one unpatched forward if it has not run yet), estimates a cost per cell
   from the model's node order and plans the same cost-balanced shards of whole chunks
   (``plan_shards``: a pure function, so every rank computes the same plan without talking);
2. checks with the others that they all hold the same cells (a fingerprint of names, patch types,
   slices and value shapes) and agrees on one chunk size and on the sweep's whole site set, so
   every rank builds one and the same program (same sites, same shape), whatever its shard names.
   This is one ``all_gather`` of a fixed-size int64 tensor per rank (``_Agreement``: counts,
   flags and digests); objects travel only when some rank failed to plan (its report) or the
   ranks resolved different site sets (rank 0's names);
3. runs its shard as an ordinary single-process ``sweep(..., distributed=False)``, inside
   try/except: a failure becomes a status, never an exception that would leave the other ranks
   waiting in a collective. When some rank has not compiled the sweep's program yet, the first
   rank with cells runs its first chunk alone (compiling it) and the others then load its
   artifacts instead of compiling the same program again (``config.compile_sharing``);
4. exchanges statuses and rows in one ``all_gather`` of bytes: a fixed-size header per rank
   (``_Header``: failed or not, rows, each cell's shape and dtype) followed by its rows, padded
   to the room agreed in step 2. If any rank failed, every rank raises
   ``DistributedSweepError`` naming the rank and the cell (the reports follow, pickled, on that
   path alone); nothing is returned half-written. Rows larger than their room travel in a
   second ``all_gather`` at their exact size;
5. only then returns every rank's rows, in cell order, on every rank.

A steady sweep (every rank has run its programs before, small rows) makes two collectives,
steps 2 and 4, and pickles nothing (``last_timings()``); a cold one adds step 3's hand-over.
Each is bounded by the process group's timeout (``init_process_group(..., timeout=...)``),
which is what bounds a rank that hangs rather than raises. See docs/scaling.md.
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import pickle
import socket
import weakref
import itertools
import os
import re
import threading
import time
import traceback
from datetime import timedelta
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, MutableSet, Optional, Sequence, Tuple

import torch
from tqdm.auto import tqdm
import torch.distributed as dist

from . import config
from .capture.index import index_for
from .runtime.tiers import wait_for_compiles

#: Whether ``pb.sweep`` runs the unpatched prefix of the forward once per chunk (prefix reuse):
#: it does, each chunk fanning out at its cells' earliest patched block (sweep.py), so a cell
#: patching a late node costs only the rest of the forward from that node on, and ``cell_costs``
#: weighs it so: ranks get shards of equal estimated cost, not equal cell counts.
SWEEP_SHARES_PREFIX = True

#: What a chunk costs besides its rows after the cut, per cell of the chunk, as a fraction of one
#: row block's whole forward: the host work per cell (checks, slot inputs), the metric, the
#: region calls of the unbatched prefix. Measured on the 6-layer GPT-2 shape of
#: ``scripts/bench_sweep.py --ranks`` (width 64, chunk 64): the last layer's chunk, whose rows
#: run only the head, costs 0.16 of the first layer's, where the rows-after-the-cut estimate
#: alone gives 0.03. It moves a shard boundary by at most about one chunk.
CHUNK_OVERHEAD = 0.15


#: Per root module: the program keys (sites, chunk, input shapes) its sharded sweeps have run in
#: this process. A rank that has run one has its program compiled (or the dispatcher's bounded
#: cache dropped it, and it compiles again alone: slower, never wrong).
_WARM: "weakref.WeakKeyDictionary[Any, MutableSet[Any]]" = weakref.WeakKeyDictionary()

#: One number per sweep, identical on every rank because sweeps are collective: it keys the
#: progress counters in the process group's store.
_SWEEPS = itertools.count()
_STORE_LOCK = threading.Lock()
_STORES: Dict[Tuple[str, int], Any] = {}


@dataclass(frozen=True)
class Shard:
    """Cells ``start:stop`` (in cell order) of one rank, and their estimated cost."""

    rank: int
    start: int
    stop: int
    cost: float

    def __len__(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class ShardPlan:
    """Shards in rank order, contiguous in ``order``: concatenating their results gives the cells
    in that order, which ``restore`` turns back into the caller's."""

    shards: Tuple[Shard, ...]
    cells: int
    #: ``order[k]``: the caller's index of the k-th cell of the shards' layout; None when the
    #: shards are contiguous in the caller's order. Whole chunks dealt to the ranks by cost
    #: (``plan_shards``) need not be.
    order: Optional[Tuple[int, ...]] = None

    @property
    def longest(self) -> int:
        return max(len(shard) for shard in self.shards)

    def caller_index(self, position: int) -> int:
        """The caller's index of the cell at ``position`` of the shards' layout."""
        return position if self.order is None else self.order[position]

    def caller_ranges(self, start: int, stop: int) -> Tuple[Tuple[int, int], ...]:
        """Cells ``start:stop`` of the layout as runs ``(first, last + 1)`` of caller indices."""
        runs: List[Tuple[int, int]] = []
        for position in range(start, stop):
            index = self.caller_index(position)
            if runs and runs[-1][1] == index:
                runs[-1] = (runs[-1][0], index + 1)
            else:
                runs.append((index, index + 1))
        return tuple(runs)

    def restore(self, rows: torch.Tensor) -> torch.Tensor:
        """Rows in the shards' layout → rows in the caller's cell order."""
        if self.order is None:
            return rows
        result = torch.empty_like(rows)
        result[torch.tensor(self.order, device=rows.device)] = rows
        return result


@dataclass(frozen=True)
class RankFailure:
    """What one rank reported instead of results."""

    rank: int
    #: The cell (the caller's index) the error is about, when it could be named.
    cell: Optional[int]
    #: The rank's shard: runs ``(first, last + 1)`` of the caller's cell indices (one run unless
    #: chunks were dealt by cost, ``ShardPlan.order``).
    cells: Tuple[Tuple[int, int], ...]
    #: ``planning`` (capture, cost estimate) or ``shard`` (running its cells).
    stage: str
    error_type: str
    message: str
    traceback: str
    #: When no single cell could be named: the cells of the chunk that was running, as runs.
    chunk: Optional[Tuple[Tuple[int, int], ...]] = None

    def describe(self) -> str:
        if self.cell is not None:
            where = f"at cell {self.cell}"
        elif self.stage == "planning":
            where = "while planning (capturing the model, estimating costs)"
        elif self.chunk:
            where = f"in the chunk of cells {_runs(self.chunk)}"
        else:
            where = "in its shard"
        shard = f"its cells {_runs(self.cells)}" if self.cells else "no cells"
        return f"rank {self.rank} failed {where} ({shard}): {self.error_type}: {self.message}"


def _runs(runs: Tuple[Tuple[int, int], ...]) -> str:
    """``((0, 4), (8, 10))`` → ``0..3, 8..9``."""
    return ", ".join(f"{first}..{stop - 1}" for first, stop in runs)


class DistributedSweepError(RuntimeError):
    """A sharded ``pb.sweep`` where some rank failed. Raised on every rank, so none waits for
    results that will not come; ``failures`` holds each failing rank's report."""

    def __init__(self, failures: Sequence[RankFailure], world_size: int) -> None:
        self.failures = tuple(failures)
        first = self.failures[0]
        others = "".join(f"; {failure.describe()}" for failure in self.failures[1:])
        super().__init__(
            f"pb.sweep on {world_size} ranks: {first.describe()}{others}. Every rank raises this error and no "
            "results are returned; the failing rank's traceback is in .failures (docs/errors.md)"
        )


@dataclass(frozen=True)
class _Agreement:
    """Step 2's message: what a rank is about to run (or that it cannot), as integers.

    Every rank sends one fixed-size int64 tensor of these fields and gets everyone's in one
    ``all_gather``: nothing is pickled. Texts travel as digests; the objects behind them (a
    planning failure's report, rank 0's site names) are exchanged only on the paths that need
    them (a rank failed, the ranks resolved different site sets)."""

    #: Whether this rank failed to plan (its ``RankFailure`` follows in a second exchange).
    failed: int
    cells: int
    chunk: int
    #: ``_fingerprint`` of the cells, two signed 64-bit halves.
    fingerprint_high: int
    fingerprint_low: int
    #: Digest of the sweep's whole site set (resolved names, first-use order).
    sites: int
    #: Whether this rank has run this sweep's program before (nothing to compile).
    warm: int
    #: Digest of where this rank's compiled artifacts live: (host, Inductor cache directory).
    cache: int
    #: This rank's ``config.compile_sharing`` as its index in ``config.COMPILE_SHARING_MODES``
    #: (-1: none of them, a planning failure). Rank 0's is used by all: ranks that went
    #: different ways here would wait in different collectives.
    sharing: int
    #: Bytes per cell this rank expects a cell's metric rows to take (``_result_bytes``): the
    #: room each rank leaves for its rows in step 4's one exchange.
    result_bytes: int

    def encode(self) -> List[int]:
        return [int(getattr(self, item.name)) for item in dataclasses.fields(self)]

    @classmethod
    def decode(cls, row: Sequence[int]) -> "_Agreement":
        return cls(*(int(value) for value in row))


#: Every dtype a metric's rows may have, by position (the same table on every rank: one torch).
_DTYPES: Tuple[torch.dtype, ...] = tuple(
    getattr(torch, name)
    for name in (
        "float32", "float64", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool",
        "complex64", "complex128", "uint16", "uint32", "uint64",
    )
    if isinstance(getattr(torch, name, None), torch.dtype)
)
#: Dimensions of a cell's metric rows that a header carries; more travel pickled (``_Header.PICKLED``).
_MAX_DIMS = 8


@dataclass(frozen=True)
class _Header:
    """Step 4's message in front of a rank's rows: its shard finished (how many rows, each
    cell's shape and dtype, how many bytes they take) or failed. Fixed size, so the headers and
    the rows of every rank travel in one ``all_gather`` of bytes."""

    #: ``dtype`` of a rank whose rows cannot travel as raw bytes (more than ``_MAX_DIMS``
    #: dimensions, a dtype outside ``_DTYPES``): every rank's rows then travel pickled.
    PICKLED = -2

    failed: int
    rows: int
    #: Whether this rank's one-cell check found that batching changes rows (its shard then
    #: ran one forward per cell): every other rank redoes its shard so too.
    cell_by_cell: int
    #: Index in ``_DTYPES``; -1: no rows; ``PICKLED``.
    dtype: int
    nbytes: int
    ndim: int
    dims: Tuple[int, ...] = (0,) * _MAX_DIMS

    def encode(self) -> List[int]:
        return [self.failed, self.rows, self.cell_by_cell, self.dtype, self.nbytes, self.ndim, *self.dims]

    @classmethod
    def decode(cls, row: Sequence[int]) -> "_Header":
        failed, rows, cell_by_cell, dtype, nbytes, ndim, *dims = (int(value) for value in row)
        return cls(failed, rows, cell_by_cell, dtype, nbytes, ndim, tuple(dims))

    @property
    def shape(self) -> Tuple[int, ...]:
        """Each cell's shape (the rows' shape without the leading cell dimension)."""
        return tuple(self.dims[: self.ndim])


#: Bytes of a header: int64 fields, a multiple of 16 so that the rows behind it can be viewed
#: as any dtype (a view needs its offset aligned to the element size).
_HEADER_BYTES = 8 * (6 + _MAX_DIMS)

#: The most bytes per rank that step 4's one exchange reserves for rows it has not seen yet
#: (``_result_bytes``). Rows larger than that, or larger than reserved, are sent in a second
#: exchange at their exact size, so a sweep pays one collective for its results when they are
#: small (each costs a wake-up of every rank, on a loaded machine milliseconds) and never pads
#: large ones.
INLINE_RESULT_BYTES = 1 << 22

#: Bytes per cell of the last sharded sweep's rows (every rank learns the same from step 4's
#: headers): what the next sweep reserves for its rows, expecting the same metric.
_LEARNED_RESULT_BYTES: Dict[str, int] = {}


def active(distributed: bool = True) -> bool:
    """Whether a sweep should be sharded: asked for, and a process group of several ranks exists."""
    return bool(distributed) and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_device() -> torch.device:
    """The device a rank should put its model and inputs on: ``cuda:LOCAL_RANK`` with CUDA, else CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return torch.device("cpu")


def plan_shards(
    costs: Sequence[float], world_size: int, chunk: int = 1, overhead: float = 0.0, unbatched_prefix: bool = False,
    leader_extra: float = 0.0,
) -> ShardPlan:
    """Shards, one per rank, whose costs are as equal as chunk boundaries allow.

    With ``chunk`` > 1 the shards hold whole chunks of ``chunk`` cells (all but the last shard):
    a rank pads its last chunk to the full chunk, so a boundary inside a chunk would make two
    ranks each run a padded chunk, and with prefix reuse a chunk costs its rows from its
    earliest cell's fan-out point on, so a chunk is planned at ``chunk`` times its costliest
    cell. A chunk also costs ``overhead`` (its fixed work) and, with ``unbatched_prefix`` (costs are
    fractions of one row block's forward, as ``cell_costs`` gives them), the part of the forward
    before its cut, run once at the unbatched rows: ``1 - `` its costliest cell.
    ``leader_extra``: work only the first rank with cells does (the sweep's one-cell check on
    the eager interpreter), in the same units, so that it gets correspondingly less.

    Whole chunks are either cut into contiguous shards or, where that balances strictly better
    (chunks of very different costs: a layer sweep's early and late layers), dealt to the ranks
    costliest first (``_deal_chunks``); the plan's ``order`` then says where each cell went.

    Without chunks, boundary k is the cell boundary nearest to where the running cost reaches
    k/world of the total, so no shard is off by more than about one cell's cost. Contiguous (not greedy) keeps
    neighbouring cells, which patch nearby sites, on one rank (they share chunks and fan-out
    points) and makes the gathered result a plain concatenation in rank order. Ranks beyond the
    number of cells get empty shards.
    """
    if world_size < 1:
        raise ValueError(f"plan_shards needs at least one rank, got world_size={world_size}")
    if any(not cost > 0 for cost in costs):
        raise ValueError(f"cell costs must be positive numbers, got {[c for c in costs if not c > 0][:3]}")
    if chunk > 1 or overhead or leader_extra:
        chunk = max(1, chunk)
        starts = range(0, len(costs), chunk)
        unit_costs = []
        for i in starts:
            costliest = max(costs[i : i + chunk])
            unit_costs.append(costliest * chunk + overhead + (max(0.0, 1.0 - costliest) if unbatched_prefix else 0.0))
        # The leader's extra work, as a unit that only rank 0 can hold (it is first).
        lead = 1 if leader_extra > 0 and unit_costs else 0
        units = plan_shards([leader_extra] * lead + unit_costs, world_size)
        cells = len(costs)

        def cell(unit: int) -> int:
            return min(max(0, unit - lead) * chunk, cells)

        contiguous = ShardPlan(
            tuple(
                Shard(
                    unit.rank, cell(unit.start), cell(unit.stop),
                    unit.cost - (leader_extra if lead and unit.start == 0 < unit.stop else 0.0),
                )
                for unit in units.shards
            ),
            cells,
        )
        dealt = _deal_chunks(unit_costs, world_size, chunk, cells, leader_extra)
        contiguous_load = max(shard.cost + (leader_extra if shard.rank == 0 else 0.0) for shard in contiguous.shards)
        dealt_load = max(shard.cost + (leader_extra if shard.rank == 0 else 0.0) for shard in dealt.shards)
        # Contiguous unless dealing chunks balances strictly better (contiguous keeps each
        # rank's result a plain slice of the caller's order, and ties are common: equal chunks).
        return dealt if dealt_load < contiguous_load * (1 - 1e-9) else contiguous
    prefix = [0.0, *itertools.accumulate(float(cost) for cost in costs)]
    total = prefix[-1]
    bounds = [0]
    for k in range(1, world_size):
        target = total * k / world_size
        right = bisect.bisect_left(prefix, target, lo=bounds[-1])
        right = min(right, len(costs))
        left = max(bounds[-1], right - 1)
        bounds.append(left if target - prefix[left] < prefix[right] - target else right)
    bounds.append(len(costs))
    shards = tuple(
        Shard(rank, bounds[rank], bounds[rank + 1], prefix[bounds[rank + 1]] - prefix[bounds[rank]])
        for rank in range(world_size)
    )
    return ShardPlan(shards, len(costs))


def _deal_chunks(
    unit_costs: Sequence[float], world_size: int, chunk: int, cells: int, leader_extra: float
) -> ShardPlan:
    """Whole chunks dealt costliest first to the rank with the least work so far (rank 0 starts
    with ``leader_extra``); each rank keeps its chunks in cell order, so a padded last chunk stays
    last in its shard. The longest-processing-time rule: within 4/3 of the best split."""
    loads = [0.0] * world_size
    if unit_costs:
        loads[0] = leader_extra
    held: List[List[int]] = [[] for _ in range(world_size)]
    for unit in sorted(range(len(unit_costs)), key=lambda u: (-unit_costs[u], u)):
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        held[rank].append(unit)
        loads[rank] += unit_costs[unit]
    order: List[int] = []
    shards = []
    for rank, units in enumerate(held):
        start = len(order)
        for unit in sorted(units):
            order.extend(range(unit * chunk, min((unit + 1) * chunk, cells)))
        shards.append(Shard(rank, start, len(order), sum(unit_costs[u] for u in units)))
    return ShardPlan(tuple(shards), cells, tuple(order))


def sweep_shards(costs: Sequence[float], world_size: int, chunk: int, verify: bool) -> ShardPlan:
    """The shards a sharded ``pb.sweep`` runs: whole chunks, each costing its rows after its cut
    (``cell_costs``), its fixed work (``CHUNK_OVERHEAD``) and its unbatched prefix; the leader
    also runs the sweep's one-cell check (``verify``: about one row block's forward on the eager
    interpreter, counted as the fixed work of one chunk)."""
    overhead = chunk * CHUNK_OVERHEAD if SWEEP_SHARES_PREFIX else 0.0
    extra = chunk * CHUNK_OVERHEAD if verify else 0.0
    return plan_shards(costs, world_size, chunk, overhead, SWEEP_SHARES_PREFIX, extra)


def cell_costs(names: Sequence[str], cells: Sequence[Mapping[str, Any]], shares_prefix: bool) -> Tuple[float, ...]:
    """An estimated cost per cell, as a fraction of one row's whole forward.

    ``names`` is the model's node order (first-run order, ``pb.nodes``). With prefix reuse, a
    cell's rows compute only from its earliest patched node on: cost ``(n - first) / n``. Without
    it every row computes everything: cost 1. Names that are not node names (aliases, typos)
    count from the start; the shard that holds a typo raises the usual error when it runs.
    """
    if not shares_prefix or not names:
        return tuple(1.0 for _ in cells)
    order = _node_order(names)
    total = len(names)
    costs = []
    for cell in cells:
        keys = cell if type(cell) is dict or isinstance(cell, Mapping) else ()
        first = min((order.get(str(key), 0) for key in keys), default=total - 1)
        costs.append(max(total - first, 1) / total)
    return tuple(costs)


#: ``(names, length, positions)`` of the last node order ``cell_costs`` read: a model's index
#: replaces its list of names when it changes (``RootIndex.refresh``), so the same list object
#: of the same length (and last name) has the same positions, and a sweep does not rebuild a
#: dict of every node name (thousands) per call.
_ORDER: List[Tuple[Sequence[str], int, Dict[str, int]]] = []


def _node_order(names: Sequence[str]) -> Dict[str, int]:
    if _ORDER:
        known, length, order = _ORDER[0]
        if known is names and length == len(names) and (not names or order.get(names[-1]) == length - 1):
            return order
    order = {name: position for position, name in enumerate(names)}
    _ORDER[:] = [(names, len(names), order)]
    return order


def _fingerprint(cells: Sequence[Mapping[str, Any]], batch_size: Optional[int]) -> Tuple[int, int]:
    """What every rank must agree on for the gathered rows to line up: the cells' names, patch
    types, slices and value shapes (not values: ranks may compute them with GPU rounding), as
    two signed 64-bit halves of a 128-bit digest.

    Every rank computes it over all cells each sweep, so it is kept cheap (about 2 us a cell):
    one list of plain values, one ``repr`` and one hash, no string building per patch."""
    parts: List[Any] = [batch_size]
    append = parts.append
    for cell in cells:
        if type(cell) is not dict and not isinstance(cell, Mapping):
            append(type(cell).__name__)
            continue
        for key, patches in cell.items():
            append(str(key))
            for patch in patches if type(patches) in (list, tuple) else (patches,):
                append(type(patch).__name__)
                for attribute in ("slice", "value"):
                    item = getattr(patch, attribute, _ABSENT)
                    if item is not _ABSENT:
                        append(_described(item))
        append(";")
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=16).digest()
    return int.from_bytes(digest[:8], "little", signed=True), int.from_bytes(digest[8:], "little", signed=True)


_ABSENT = object()


def _described(item: Any) -> Any:
    """A patch's slice or value as the fingerprint sees it: tensors by shape and dtype."""
    kind = type(item)
    if kind in _PLAIN:
        return item
    if kind is tuple or kind is list:
        if all(type(element) in _PLAIN for element in item):
            return item  # the usual slice, (slice(None), 5): nothing to describe
        return tuple(_described(element) for element in item)
    if isinstance(item, torch.Tensor):
        return ("tensor", item.shape, item.dtype)  # reprs: torch.Size([1, 64]), torch.float32
    return item


#: Types a fingerprint takes as they are (their ``repr`` is their value).
_PLAIN = frozenset({int, float, bool, str, slice, type(None), type(Ellipsis)})


def _digest(text: str) -> int:
    """A signed 64-bit digest of ``text`` (fits an int64 tensor)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little", signed=True)


_CELL_IN_MESSAGE = re.compile(r"sweep cell (\d+)")


def _failure(
    rank: int,
    shard: Shard,
    stage: str,
    error: BaseException,
    cell: Optional[int],
    chunk: Optional[Tuple[int, int]] = None,
    offset: Optional[int] = None,
    plan: Optional[ShardPlan] = None,
) -> RankFailure:
    """``offset``: the index of the first cell of the sweep call that raised (default the shard's
    first), so a ``sweep cell k`` in its message becomes the whole sweep's index. Positions are
    in ``plan``'s layout of the cells; the report says the caller's indices."""
    layout = plan or ShardPlan((shard,), shard.stop)
    message = str(error.args[0]) if len(error.args) == 1 and isinstance(error.args[0], str) else str(error)
    found = _CELL_IN_MESSAGE.search(message)
    if found and stage == "shard":
        # The shard's sweep counts from its own first cell: say the caller's index.
        base = shard.start if offset is None else offset
        cell = base + int(found.group(1))
        message = _CELL_IN_MESSAGE.sub(
            lambda match: f"sweep cell {layout.caller_index(base + int(match.group(1)))}", message
        )
    text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    return RankFailure(
        rank,
        None if cell is None else layout.caller_index(cell),
        layout.caller_ranges(shard.start, shard.stop),
        stage,
        type(error).__name__,
        message,
        text,
        None if chunk is None else layout.caller_ranges(*chunk),
    )


def _invalid_cell(
    check: Optional[Callable], index: Any, cells: Sequence[Mapping], batch: int, start: int
) -> Optional[int]:
    """The first cell of a failed shard that fails the sweep's own checks alone, if any: a bad
    cell is named even when the error's message does not say which cell it came from."""
    if check is None:
        return None
    for offset, cell in enumerate(cells):
        try:
            check(index, [cell], batch)
        except Exception:
            return start + offset
    return None


class _Progress:
    """Cells done across ranks, shown on rank 0.

    Ranks other than 0 add their finished cells to a counter in the process group's store after
    every chunk; rank 0 reads it after each of its own chunks. Without a reachable store (a
    process group not initialized from MASTER_ADDR/MASTER_PORT), rank 0 still shows its own
    chunks and every other rank's shard when the statuses arrive.
    """

    def __init__(self, enabled: bool, rank: int, total: int, serial: int) -> None:
        self.rank, self.total, self.own, self.others_seen = rank, total, 0, 0
        self.key = f"patch_backend/sweep/{serial}/done"
        self.bar = None
        self.store = _store() if enabled else None
        if enabled and rank == 0:
            self.bar = tqdm(total=total, unit="cell", desc=f"sweep ({dist.get_world_size()} ranks)")

    def add(self, cells: int) -> None:
        if cells <= 0:
            return
        self.own += cells
        if self.rank != 0:
            if self.store is not None:
                try:
                    self.store.add(self.key, cells)
                except Exception:
                    self.store = None  # progress is best effort; the sweep goes on
            return
        others = self.others_seen
        if self.store is not None:
            try:
                others = int(self.store.add(self.key, 0))
            except Exception:
                self.store = None
        self._show(self.own + others)
        self.others_seen = others

    def finish(self, done: int) -> None:
        self._show(done)
        if self.bar is not None:
            self.bar.close()

    def _show(self, done: int) -> None:
        if self.bar is not None:
            done = min(done, self.total)
            if done > self.bar.n:
                self.bar.update(done - self.bar.n)


def _store() -> Optional[Any]:
    """A client of the process group's TCPStore (torchrun and env:// set MASTER_ADDR/PORT)."""
    address, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not address or not port:
        return None
    key = (address, int(port))
    with _STORE_LOCK:
        if key not in _STORES:
            try:
                _STORES[key] = dist.TCPStore(address, int(port), is_master=False, timeout=timedelta(seconds=10))
            except Exception:
                _STORES[key] = None
        return _STORES[key]


def _communication_device() -> torch.device:
    """Tensors of a collective live where the backend wants them: CUDA for NCCL-only groups."""
    backend = str(dist.get_backend())
    if "gloo" not in backend and "nccl" in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _input_device(inputs: Any) -> torch.device:
    values = inputs.values() if isinstance(inputs, Mapping) else inputs
    for value in values:
        if isinstance(value, torch.Tensor):
            return value.device
    return torch.device("cpu")


@dataclass(frozen=True)
class Timings:
    """Where a sharded sweep's time went on this rank (``last_timings()``), for benchmarks."""

    plan_seconds: float
    agree_seconds: float
    shard_seconds: float
    status_seconds: float
    gather_seconds: float
    #: Of ``shard_seconds``: waiting for the compiling rank and loading its artifacts (0 when
    #: nothing was shared: every rank warm, one rank, or ``config.compile_sharing="none"``).
    share_seconds: float = 0.0
    #: How compiles were shared in this sweep: ``"cache"``, ``"broadcast"`` or ``"none"``.
    sharing: str = "none"
    #: CPU seconds of this process (all its threads) per phase: plan, agree, shard, status,
    #: gather. On a machine shared with other jobs wall clock follows the load; these do not.
    cpu_seconds: Tuple[float, ...] = ()
    #: The same for the calling thread alone: more CPU than this in ``cpu_seconds`` is other
    #: threads' (a background compile, the backend's).
    thread_cpu_seconds: Tuple[float, ...] = ()
    #: One-cell batching checks this rank ran (``SweepReport.checks`` of its shard's sweeps).
    checks: int = 0
    #: Collectives this rank took part in (an ``all_gather_object`` or a
    #: ``broadcast_object_list`` counts two: sizes, then the pickles). A steady sweep with
    #: small rows: 2 (step 2's and step 4's ``all_gather``).
    collectives: int = 0
    #: Bytes this rank pickled for collectives (0 in a steady sweep: failures, rank 0's site
    #: names when the ranks resolved different ones, a hand-over, and rows that cannot travel
    #: as raw bytes are the only objects sent).
    pickled_bytes: int = 0
    #: Bytes of tensors this rank sent in ``all_gather``s (agreement, headers, rows with padding).
    sent_bytes: int = 0


_LAST: Dict[str, Timings] = {}


def last_timings() -> Optional[Timings]:
    """Timings of this process's last sharded sweep (None before the first)."""
    return _LAST.get("last")


@dataclass(frozen=True)
class LocalSweep:
    """The single-process sweep's pieces that a sharded sweep runs on each rank.

    sweep.py passes them in: it imports this module to hand ``pb.sweep`` over to the ranks, so
    this module must not import it back.
    """

    sweep: Callable[..., torch.Tensor]
    compiled_model: Callable[[Any], Tuple[Callable[..., Any], torch.nn.Module]]
    batch_size: Callable[[Any], int]
    call: Callable[[Callable[..., Any], Any], Any]
    chunk_size: Callable[[Any, int, int], int]
    check_cells: Callable[..., Any]
    #: ``last_sweep_report``: whether a shard's sweep fell back to one forward per cell.
    report: Callable[[], Any] = lambda: None


def sharded_sweep(
    local: LocalSweep,
    model: Any,
    inputs: Any,
    cells: Sequence[Mapping[str, Any]],
    metric: Callable[[Any], torch.Tensor],
    batch_size: Optional[int],
    progress: bool,
    verify: bool,
) -> torch.Tensor:
    """``pb.sweep`` over the ranks of the default process group (module docstring)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    serial = next(_SWEEPS)
    clock = time.perf_counter()
    cpu = [(time.process_time(), time.thread_time())]
    if not cells:
        raise ValueError("sweep needs at least one cell (patch map)")
    cells = list(cells)
    channel = _Channel(rank, world)
    local_plan = _plan_locally(local, model, inputs, cells, batch_size, rank, world)
    compiled, root, index, batch = local_plan.compiled, local_plan.root, local_plan.index, local_plan.batch
    high, low = _fingerprint(cells, batch_size)
    mine = _Agreement(
        failed=int(local_plan.failure is not None),
        cells=len(cells),
        chunk=local_plan.chunk,
        fingerprint_high=high,
        fingerprint_low=low,
        sites=_digest("\n".join(local_plan.sites)),
        warm=int(local_plan.warm),
        cache=_digest("\n".join(_cache_location())),
        sharing=(
            config.COMPILE_SHARING_MODES.index(config.compile_sharing)
            if config.compile_sharing in config.COMPILE_SHARING_MODES else -1
        ),
        result_bytes=_LEARNED_RESULT_BYTES.get("last", 4 * max(1, batch)),
    )
    planned = time.perf_counter()
    cpu.append((time.process_time(), time.thread_time()))

    everyone = _agreed(channel, mine, local_plan, world)
    agreed = time.perf_counter()
    cpu.append((time.process_time(), time.thread_time()))
    # Every rank compiles one chunk shape: the smallest any rank's memory budget allows.
    chunk = min(a.chunk for a in everyone)
    # Shards of whole chunks, now that the chunk is agreed (every rank computes the same plan).
    plan = sweep_shards(local_plan.costs, world, chunk, verify)
    # One site set: the ranks resolved the same cells, so they agree unless a name resolves
    # differently on some rank; then rank 0's (that rank raises where its shard runs).
    sites = local_plan.sites
    if len({a.sites for a in everyone}) != 1:
        sites = channel.broadcast_object(local_plan.sites if rank == 0 else None, 0)
    sharing = _sharing_mode(everyone)
    # Room for each rank's rows in step 4's one exchange (the same on every rank: agreed inputs).
    room = max(a.result_bytes for a in everyone) * plan.longest
    room = room if room <= INLINE_RESULT_BYTES else 0
    # The first rank with cells compiles; the others wait for it only when someone would compile.
    leader = next(shard.rank for shard in plan.shards if len(shard))

    # The shards' layout of the cells (the caller's order unless chunks were dealt by cost).
    laid_out = cells if plan.order is None else [cells[i] for i in plan.order]
    shard = plan.shards[rank]
    bar = _Progress(progress, rank, len(cells), serial)
    counted = _CountingMetric(metric, chunk * batch, chunk, len(shard), bar)
    pieces: List[torch.Tensor] = []
    failure: Optional[RankFailure] = None
    share_seconds = 0.0
    start = shard.start

    # One check per sweep of whether batching keeps rows exact, as in one process: the leader's,
    # on its first chunk. The other ranks check only programs
    # their process has not verified; when any check fails, every rank redoes its shard one
    # forward per cell (step 4), as the single-process sweep does after a failed check.
    fell_back = False
    checks = 0

    def run(stop: int, cell_by_cell: bool = False, after_first_chunk: Optional[Callable[[], None]] = None) -> None:
        nonlocal start, failure, fell_back, checks
        if failure is not None or stop <= start:
            return
        try:
            pieces.append(
                local.sweep(
                    compiled, inputs, laid_out[start:stop], counted, batch_size=chunk, progress=False, verify=verify,
                    distributed=False, _sites=sites, _trusted=rank != leader,
                    _cell_by_cell=cell_by_cell or fell_back, _after_first_chunk=after_first_chunk,
                )
            )
            report = local.report()
            fell_back = fell_back or bool(getattr(report, "cell_by_cell", False))
            checks += int(getattr(report, "checks", 0))
        except Exception as error:
            cell = None
            if not _CELL_IN_MESSAGE.search(str(error)):
                cell = _invalid_cell(local.check_cells, index, laid_out[start:stop], batch, start)
            first = shard.start + counted.done
            failure = _failure(
                rank, shard, "shard", error, cell, (first, min(first + chunk, shard.stop)), start, plan
            )
        start = stop

    handed_over = sharing == "none"

    def hand_over() -> None:
        """The leader compiles the program by running its first chunk; then it hands over
        (called from inside its shard's sweep after that chunk, so that the shard runs as one
        sweep with the same programs as every later sweep; or after it, when it failed)."""
        nonlocal handed_over, share_seconds, start
        if handed_over:
            return
        handed_over = True
        if rank == leader and failure is None:
            # The sweep holds the compile worker's foreground (sweep.py), so the first chunk's
            # compile is still queued: wait_for_compiles starts it now and waits for it (it does
            # not wait for the calls in the foreground), so the artifacts exist when handed over.
            wait_for_compiles()
        waited = time.perf_counter()
        handed = _hand_over(channel, sharing, leader, failure is None)
        if rank != leader:
            if handed is False:
                start = shard.stop  # the leader failed: every rank raises at step 4, skip the work
            elif isinstance(handed, bytes):
                try:
                    torch.compiler.load_cache_artifacts(handed)
                except Exception:
                    pass  # artifacts this torch cannot load: this rank compiles for itself
        share_seconds = time.perf_counter() - waited

    if rank != leader:
        hand_over()
    run(shard.stop, after_first_chunk=hand_over if rank == leader else None)
    hand_over()  # the leader, when its shard failed before the hook ran
    values: Optional[torch.Tensor] = None
    if failure is None and pieces:
        values = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
        bar.add(len(shard) - counted.done)
        if root is not None:
            _WARM.setdefault(root, set()).add(_program_key(sites, chunk, inputs))
    ran = time.perf_counter()
    cpu.append((time.process_time(), time.thread_time()))

    exchange = _exchange_rows(channel, len(shard), values, failure, fell_back, room)
    if not any(h.failed for h in exchange.headers) and any(h.cell_by_cell for h in exchange.headers):
        # A rank found that batching changes rows: no rank's batched rows are to be trusted (a
        # rank that trusted the leader's check did not check its own chunks). The ranks that
        # ran batched redo their shards one forward per cell; all exchange again.
        if not fell_back:
            pieces.clear()
            start = shard.start
            run(shard.stop, cell_by_cell=True)
            values = None
            if failure is None and pieces:
                values = pieces[0]
        exchange = _exchange_rows(channel, len(shard), values, failure, True, room)
    reported = time.perf_counter()
    cpu.append((time.process_time(), time.thread_time()))
    bar.finish(sum(h.rows for h in exchange.headers if not h.failed))
    result = _delivered(channel, exchange, failure, values, plan, inputs, world)
    gathered = time.perf_counter()
    cpu.append((time.process_time(), time.thread_time()))
    _LAST["last"] = Timings(
        planned - clock, agreed - planned, ran - agreed, reported - ran, gathered - reported, share_seconds, sharing,
        tuple(later[0] - earlier[0] for earlier, later in zip(cpu, cpu[1:])),
        tuple(later[1] - earlier[1] for earlier, later in zip(cpu, cpu[1:])),
        checks, channel.collectives, channel.pickled_bytes, channel.sent_bytes,
    )
    return result


class _Channel:
    """The default group's collectives as one sharded sweep uses them, counted for ``Timings``
    (a steady sweep makes two: step 2's and step 4's ``all_gather``; ``all_gather_object`` and
    ``broadcast_object_list`` are two each, sizes then pickles)."""

    def __init__(self, rank: int, world: int) -> None:
        self.rank, self.world = rank, world
        self.device = _communication_device()
        self.collectives = 0
        self.pickled_bytes = 0
        self.sent_bytes = 0

    def gather(self, tensor: torch.Tensor) -> List[torch.Tensor]:
        """Every rank's ``tensor`` (the same shape and dtype on every rank), in rank order."""
        received = [torch.empty_like(tensor) for _ in range(self.world)]
        dist.all_gather(received, tensor)
        self.collectives += 1
        self.sent_bytes += tensor.numel() * tensor.element_size()
        return received

    def gather_objects(self, item: Any) -> List[Any]:
        """Every rank's ``item``, pickled: only where objects must travel (failures, rows that
        cannot travel as bytes)."""
        everyone: List[Any] = [None] * self.world
        dist.all_gather_object(everyone, item)
        self.collectives += 2
        self.pickled_bytes += len(pickle.dumps(item))
        return everyone

    def broadcast_object(self, item: Any, source: int) -> Any:
        """``source``'s ``item`` on every rank."""
        message: List[Any] = [item]
        dist.broadcast_object_list(message, src=source)
        self.collectives += 2
        if self.rank == source:
            self.pickled_bytes += len(pickle.dumps(item))
        return message[0]


@dataclass(frozen=True)
class _LocalPlan:
    """Step 1 on one rank: what it captured and estimated, or why it could not."""

    compiled: Any
    root: Any
    index: Any
    batch: int
    chunk: int
    costs: Sequence[float]
    sites: Tuple[str, ...]
    #: Whether this process already ran the sweep's program (no rank needs to wait for it).
    warm: bool
    failure: Optional[RankFailure]


def _plan_locally(
    local: LocalSweep, model: Any, inputs: Any, cells: Sequence[Mapping[str, Any]], batch_size: Optional[int],
    rank: int, world: int,
) -> _LocalPlan:
    """Step 1 (module docstring): capture, cell costs, chunk size and site set; a failure is
    returned, not raised, so that every rank learns of it in step 2. Only what every sweep
    needs is computed (the shards are planned once the chunk is agreed): each rank pays it per
    sweep whatever its share of the cells."""
    compiled, root, index, batch, chunk = model, None, None, 0, batch_size or 1
    costs: Sequence[float] = [1.0] * len(cells)
    sites: Tuple[str, ...] = ()
    warm = False
    try:
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be a positive number of cells, got {batch_size}")
        if config.compile_sharing not in config.COMPILE_SHARING_MODES:
            # A planning failure, so that every rank raises, also when only this rank's is wrong.
            raise ValueError(
                f"pb.config.compile_sharing (PATCH_BACKEND_COMPILE_SHARING) must be one of "
                f"{config.COMPILE_SHARING_MODES}, got {config.compile_sharing!r}"
            )
        compiled, root = local.compiled_model(model)
        batch = local.batch_size(inputs)
        index = index_for(root)
        if not index.names:
            with torch.no_grad():
                local.call(compiled, inputs)
            index.refresh()
        costs = cell_costs(index.names, cells, SWEEP_SHARES_PREFIX)
        chunk = batch_size or local.chunk_size(index, batch, max(1, plan_shards(costs, world).longest))
        sites = _site_set(local.check_cells, index, cells, batch)
        warm = _program_key(sites, chunk, inputs) in _WARM.get(root, ())
    except Exception as error:
        shard = plan_shards([1.0] * len(cells), world).shards[rank]
        return _LocalPlan(compiled, root, index, batch, chunk, costs, sites, warm,
                          _failure(rank, shard, "planning", error, None))
    return _LocalPlan(compiled, root, index, batch, chunk, costs, sites, warm, None)


def _agreed(channel: _Channel, mine: _Agreement, local_plan: _LocalPlan, world: int) -> List[_Agreement]:
    """Step 2: one ``all_gather`` of every rank's ``_Agreement``, then its checks, the same on
    every rank: a rank that failed to plan, or ranks that hold different cells, make every rank
    raise before any shard runs. Only when some rank failed do the failures' reports travel
    (pickled: a second exchange, on that path alone)."""
    row = torch.tensor(mine.encode(), dtype=torch.int64, device=channel.device)
    everyone = [_Agreement.decode(tensor.tolist()) for tensor in channel.gather(row)]
    if any(agreement.failed for agreement in everyone):
        reports = channel.gather_objects(local_plan.failure)
        raise DistributedSweepError([report for report in reports if report is not None], world)
    if len({(a.fingerprint_high, a.fingerprint_low, a.cells) for a in everyone}) != 1:
        counts = ", ".join(f"rank {r}: {a.cells} cells" for r, a in enumerate(everyone))
        raise ValueError(
            f"pb.sweep on {world} ranks: the ranks passed different cells or batch_size ({counts}; fingerprints "
            "differ), so gathered rows would not line up; build the cells identically on every rank (same "
            "order, seeds, names)"
        )
    return everyone


@dataclass(frozen=True)
class _Exchange:
    """Step 4's outcome on one rank: every rank's header, and its rows as raw bytes (or, where
    some rank's rows could not travel as bytes, every rank's rows as tensors, pickled)."""

    headers: Tuple[_Header, ...]
    payloads: Tuple[Optional[torch.Tensor], ...]
    pickled: Optional[Tuple[Optional[torch.Tensor], ...]] = None


def _exchange_rows(
    channel: _Channel, rows: int, values: Optional[torch.Tensor], failure: Optional[RankFailure], cell_by_cell: bool,
    room: int,
) -> _Exchange:
    """Step 4 (and 5): every rank's status and rows, on every rank, in one ``all_gather`` of
    bytes: a fixed-size ``_Header`` followed by the rows, padded to ``room`` bytes (agreed in
    step 2). Rows that do not fit travel in a second ``all_gather`` at the exact size of the
    largest; rows that cannot travel as bytes, pickled. A failed rank sends its header only;
    its report travels afterwards (``_delivered``), when every rank knows that one failed."""
    header = _Header(int(failure is not None), rows, int(cell_by_cell), -1, 0, 0)
    data: Optional[torch.Tensor] = None
    if failure is None and values is not None:
        shape = tuple(values.shape[1:])
        try:
            if values.dtype not in _DTYPES or len(shape) > _MAX_DIMS:
                raise TypeError(values.dtype)
            data = values.detach().to(channel.device).contiguous().view(-1).view(torch.uint8)
            dims = shape + (0,) * (_MAX_DIMS - len(shape))
            header = _Header(0, rows, int(cell_by_cell), _DTYPES.index(values.dtype), data.numel(), len(shape), dims)
        except (TypeError, RuntimeError):
            data = None  # e.g. a dtype without a byte view: every rank's rows travel pickled
            header = _Header(0, rows, int(cell_by_cell), _Header.PICKLED, 0, len(shape))
    fits = data is not None and data.numel() <= room
    buffer = torch.zeros(_HEADER_BYTES + room, dtype=torch.uint8, device=channel.device)
    buffer[:_HEADER_BYTES] = torch.tensor(header.encode(), dtype=torch.int64, device=channel.device).view(torch.uint8)
    if fits and data is not None:
        buffer[_HEADER_BYTES : _HEADER_BYTES + data.numel()] = data
    received = channel.gather(buffer)
    headers = tuple(_Header.decode(tensor[:_HEADER_BYTES].view(torch.int64).tolist()) for tensor in received)
    if any(h.failed for h in headers):
        return _Exchange(headers, (None,) * len(headers))
    if any(h.dtype == _Header.PICKLED for h in headers):
        sent = None if values is None else values.detach().cpu()
        return _Exchange(headers, (None,) * len(headers), tuple(channel.gather_objects(sent)))
    largest = max(h.nbytes for h in headers)
    if largest <= room:
        payloads = tuple(tensor[_HEADER_BYTES : _HEADER_BYTES + h.nbytes] for tensor, h in zip(received, headers))
    else:
        # Some rank's rows did not fit the room reserved for them: every rank sends its rows
        # again, at the exact size of the largest (the headers already told everyone).
        again = torch.zeros(largest, dtype=torch.uint8, device=channel.device)
        if data is not None:
            again[: data.numel()] = data
        payloads = tuple(tensor[: h.nbytes] for tensor, h in zip(channel.gather(again), headers))
    # What the next sweep reserves per cell (every rank learns the same from the headers).
    _LEARNED_RESULT_BYTES["last"] = max((-(-h.nbytes // h.rows) for h in headers if h.rows), default=0)
    return _Exchange(headers, payloads)


def _delivered(
    channel: _Channel, exchange: _Exchange, failure: Optional[RankFailure], values: Optional[torch.Tensor],
    plan: ShardPlan, inputs: Any, world: int,
) -> torch.Tensor:
    """Step 5: every rank's rows in the caller's cell order, once every rank reported success
    (else every rank raises, with the failing ranks' reports), from step 4's bytes."""
    headers = exchange.headers
    if any(h.failed for h in headers):
        reports = channel.gather_objects(failure)
        raise DistributedSweepError([report for report in reports if report is not None], world)
    sent = [rank for rank, h in enumerate(headers) if h.rows]
    if exchange.pickled is not None:
        kinds = {(tuple(rows.shape[1:]), rows.dtype) for rank in sent if (rows := exchange.pickled[rank]) is not None}
    else:
        kinds = {(headers[rank].shape, _DTYPES[headers[rank].dtype]) for rank in sent if headers[rank].dtype >= 0}
    if len(kinds) != 1 or any(exchange.pickled is None and headers[rank].dtype < 0 for rank in sent):
        raise ValueError(
            f"pb.sweep on {world} ranks: ranks' metrics returned different shapes or dtypes per cell "
            f"({sorted(str(kind) for kind in kinds)}); the metric must give every cell the same shape"
        )
    (shape, dtype), = kinds
    device = _input_device(inputs) if values is None else values.device
    parts: List[torch.Tensor] = []
    for rank in sent:
        if exchange.pickled is not None:
            rows = exchange.pickled[rank]
            assert rows is not None
            parts.append(rows)
        else:
            payload = exchange.payloads[rank]
            assert payload is not None
            parts.append(payload.view(dtype).reshape(headers[rank].rows, *shape))
    result = (parts[0] if len(parts) == 1 else torch.cat(parts)).to(device=device, dtype=dtype)
    return plan.restore(result)


def _site_set(check: Callable[..., Any], index: Any, cells: Sequence[Mapping], batch: int) -> Tuple[str, ...]:
    """Every node name the sweep's cells patch (resolved, first-use order): the slots of the one
    program all ranks build.

    Names depend on a cell's keys only, so one cell per distinct key tuple is checked (a
    layer x position sweep has one per layer): checking all cells would cost every rank the
    whole sweep's checks, a part of the work that does not shrink with more ranks. Cells the
    sweep's checks refuse add nothing; the rank whose shard holds one reports it when it runs.
    """
    names: List[str] = []
    resolved: set = set()
    for cell in cells:
        try:
            keys: Any = tuple(cell) if type(cell) is dict or isinstance(cell, Mapping) else None
            if keys is not None and keys in resolved:
                continue
            found = check(index, [cell], batch)[1]
        except Exception:
            continue
        if keys is not None:
            resolved.add(keys)
        names.extend(name for name in found if name not in names)
    return tuple(names)


def _program_key(sites: Sequence[str], chunk: int, inputs: Any) -> Tuple[Any, ...]:
    """What decides a sweep's compiled program besides the model: sites, cells per chunk, and the
    inputs' shapes and dtypes."""
    values = inputs.values() if isinstance(inputs, Mapping) else inputs
    shapes = tuple(
        (tuple(value.shape), value.dtype, value.device.type) if isinstance(value, torch.Tensor) else type(value).__name__
        for value in values
    )
    return (tuple(sites), chunk, shapes)


def _cache_location() -> Tuple[str, str]:
    """(host, Inductor cache directory) of this rank: ranks that share both share compiled artifacts."""
    directory = os.environ.get("TORCHINDUCTOR_CACHE_DIR", "")
    if not directory:
        user = os.environ.get("USER", "") or str(os.getuid() if hasattr(os, "getuid") else "")
        directory = f"<default {user}>"
    return socket.gethostname(), os.path.abspath(directory) if not directory.startswith("<") else directory


def _sharing_mode(agreements: Sequence[_Agreement]) -> str:
    """How this sweep shares compiles (rank 0's setting, the same decision on every rank):
    ``none`` also when every rank is warm (nothing to compile)."""
    setting = config.COMPILE_SHARING_MODES[agreements[0].sharing]
    if all(agreement.warm for agreement in agreements) or setting == "none":
        return "none"
    if setting != "auto":
        return setting
    return "cache" if len({agreement.cache for agreement in agreements}) == 1 else "broadcast"


def _hand_over(channel: _Channel, sharing: str, leader: int, ok: bool) -> Any:
    """One exchange after the leader's first chunk: False when it failed, else True or,
    broadcasting, its compiled artifacts as bytes (True when torch has none to give or cannot
    serialize them: the others then compile for themselves, slower but never wrong)."""
    payload: Any = None
    if channel.rank == leader:
        payload = ok
        if ok and sharing == "broadcast":
            try:
                saved = torch.compiler.save_cache_artifacts()
            except Exception:
                saved = None
            payload = saved[0] if saved is not None else True
    return channel.broadcast_object(payload, leader)


class _CountingMetric:
    """The user's metric, counting the cells of each batched chunk it scores (for progress).

    A call on a whole chunk (``chunk * batch`` rows) counts its cells; the sweep's one-cell
    verification call (``batch`` rows) does not.
    """

    def __init__(self, metric: Callable, rows: int, chunk: int, cells: int, progress: _Progress) -> None:
        self.metric, self.rows, self.chunk, self.cells, self.progress = metric, rows, chunk, cells, progress
        self.done = 0

    def __call__(self, output: Any) -> Any:
        values = self.metric(output)
        if isinstance(values, torch.Tensor) and values.dim() and values.shape[0] == self.rows and self.chunk > 1:
            step = min(self.chunk, self.cells - self.done)
            self.done += step
            self.progress.add(step)
        return values
