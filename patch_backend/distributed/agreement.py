"""Steps 1 and 2 on one rank: plan locally (capture, costs, chunk, site set), then agree with
the other ranks in one ``all_gather`` of fixed-size integers (``_Agreement``)."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import socket
import weakref
from dataclasses import dataclass
from typing import Any, Callable, List, Mapping, MutableSet, Optional, Sequence, Tuple

import torch

from .. import config
from ..capture.index import index_for
from .failures import DistributedSweepError, RankFailure, _failure
from .planning import SWEEP_SHARES_PREFIX, ShardPlan, cell_costs, plan_shards, sweep_shards
from .transport import _Channel, _expected_result_bytes, _inline_room


#: Per root module: the program keys (sites, chunk, input shapes) its sharded sweeps have run in
#: this process. A rank that has run one has its program compiled (or the dispatcher's bounded
#: cache dropped it, and it compiles again alone: slower, never wrong).
_WARM: "weakref.WeakKeyDictionary[Any, MutableSet[Any]]" = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class LocalSweep:
    """The single-process sweep's pieces that a sharded sweep runs on each rank.

    sweep.py passes them in: it imports this package to hand ``pb.sweep`` over to the ranks, so
    the package must not import it back.
    """

    sweep: Callable[..., torch.Tensor]
    compiled_model: Callable[[Any], Tuple[Callable[..., Any], torch.nn.Module]]
    batch_size: Callable[[Any], int]
    call: Callable[[Callable[..., Any], Any], Any]
    chunk_size: Callable[[Any, int, int], int]
    check_cells: Callable[..., Any]
    #: ``last_sweep_report``: whether a shard's sweep fell back to one forward per cell.
    report: Callable[[], Any] = lambda: None


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
    """Step 1 (package docstring): capture, cell costs, chunk size and site set; a failure is
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


def _proposal(local_plan: _LocalPlan, cells: Sequence[Mapping[str, Any]], batch_size: Optional[int]) -> _Agreement:
    """Step 2's message of this rank: its local plan as integers (digests for texts)."""
    high, low = _fingerprint(cells, batch_size)
    return _Agreement(
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
        result_bytes=_expected_result_bytes(local_plan.batch),
    )


@dataclass(frozen=True)
class _Terms:
    """Step 2's outcome, the same on every rank (computed from the same agreed inputs): what every
    rank runs and how its rows travel."""

    #: Cells per chunk: the smallest any rank's memory budget allows (one chunk shape for all).
    chunk: int
    #: Shards of whole chunks, planned once the chunk is agreed.
    plan: ShardPlan
    #: The sweep's whole site set: every rank builds one and the same program.
    sites: Tuple[str, ...]
    #: How compiles are shared (``_sharing_mode``).
    sharing: str
    #: Bytes each rank reserves for its rows in step 4's one exchange.
    room: int
    #: The first rank with cells: it compiles, the others wait for it only when someone would.
    leader: int


def _agree(channel: _Channel, mine: _Agreement, local_plan: _LocalPlan, verify: bool) -> _Terms:
    """Step 2: exchange ``_Agreement``s (raising on every rank if one failed to plan or the cells
    differ), then derive the terms every rank computes alike."""
    everyone = _agreed(channel, mine, local_plan, channel.world)
    chunk = min(a.chunk for a in everyone)
    plan = sweep_shards(local_plan.costs, channel.world, chunk, verify)
    # One site set: the ranks resolved the same cells, so they agree unless a name resolves
    # differently on some rank; then rank 0's (that rank raises where its shard runs).
    sites = local_plan.sites
    if len({a.sites for a in everyone}) != 1:
        sites = channel.broadcast_object(local_plan.sites if channel.rank == 0 else None, 0)
    room = _inline_room(max(a.result_bytes for a in everyone), plan.longest)
    leader = next(shard.rank for shard in plan.shards if len(shard))
    return _Terms(chunk, plan, sites, _sharing_mode(everyone), room, leader)
