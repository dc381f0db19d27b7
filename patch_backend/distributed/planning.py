"""Step 1's pure part: cost-balanced shards of whole chunks, the same on every rank.

``plan_shards`` and ``cell_costs`` are pure functions of the cells' names and the model's node
order, so every rank computes the same plan without talking (the package docstring's step 1).
"""

from __future__ import annotations

import bisect
import itertools
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch


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
        return _plan_chunks(costs, world_size, max(1, chunk), overhead, unbatched_prefix, leader_extra)
    return _plan_cells(costs, world_size)


def _plan_cells(costs: Sequence[float], world_size: int) -> ShardPlan:
    """Contiguous shards of single cells: boundary k where the running cost is nearest k/world
    of the total (``plan_shards`` without chunks)."""
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


def _chunk_costs(costs: Sequence[float], chunk: int, overhead: float, unbatched_prefix: bool) -> List[float]:
    """Each whole chunk's cost (``plan_shards``' docstring): ``chunk`` times its costliest cell,
    its fixed work and, with an unbatched prefix, the forward before its cut."""
    unit_costs = []
    for i in range(0, len(costs), chunk):
        costliest = max(costs[i : i + chunk])
        unit_costs.append(costliest * chunk + overhead + (max(0.0, 1.0 - costliest) if unbatched_prefix else 0.0))
    return unit_costs


def _plan_chunks(
    costs: Sequence[float], world_size: int, chunk: int, overhead: float, unbatched_prefix: bool, leader_extra: float
) -> ShardPlan:
    """Shards of whole chunks: contiguous, or dealt by cost where that balances strictly better."""
    unit_costs = _chunk_costs(costs, chunk, overhead, unbatched_prefix)
    contiguous = _contiguous_chunks(unit_costs, world_size, chunk, len(costs), leader_extra)
    dealt = _deal_chunks(unit_costs, world_size, chunk, len(costs), leader_extra)
    contiguous_load = max(shard.cost + (leader_extra if shard.rank == 0 else 0.0) for shard in contiguous.shards)
    dealt_load = max(shard.cost + (leader_extra if shard.rank == 0 else 0.0) for shard in dealt.shards)
    # Contiguous unless dealing chunks balances strictly better (contiguous keeps each
    # rank's result a plain slice of the caller's order, and ties are common: equal chunks).
    return dealt if dealt_load < contiguous_load * (1 - 1e-9) else contiguous


def _contiguous_chunks(
    unit_costs: Sequence[float], world_size: int, chunk: int, cells: int, leader_extra: float
) -> ShardPlan:
    """Whole chunks cut into contiguous shards: the chunks planned as units (``_plan_cells``),
    the leader's extra work as a first unit that only rank 0 can hold, mapped back to cells."""
    lead = 1 if leader_extra > 0 and unit_costs else 0
    units = plan_shards([leader_extra] * lead + list(unit_costs), world_size)

    def cell(unit: int) -> int:
        return min(max(0, unit - lead) * chunk, cells)

    return ShardPlan(
        tuple(
            Shard(
                unit.rank, cell(unit.start), cell(unit.stop),
                unit.cost - (leader_extra if lead and unit.start == 0 < unit.stop else 0.0),
            )
            for unit in units.shards
        ),
        cells,
    )


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
