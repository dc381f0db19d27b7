"""Steps 3 to 5 of a sharded sweep on one rank, and the entry point that runs all five
(the package docstring describes them): ``sharded_sweep``."""

from __future__ import annotations

import itertools
import os
import time
from typing import Any, Callable, List, Mapping, Optional, Sequence

import torch
import torch.distributed as dist

from ..runtime.tiers import wait_for_compiles
from .agreement import _WARM, LocalSweep, _LocalPlan, _plan_locally, _program_key, _proposal, _agree, _Terms
from .failures import _CELL_IN_MESSAGE, RankFailure, _failure, _invalid_cell
from .progress import _CountingMetric, _Progress
from .timings import _LAST, _Clock
from .transport import _Channel, _delivered, _Exchange, _exchange_rows, _hand_over

#: One number per sweep, identical on every rank because sweeps are collective: it keys the
#: progress counters in the process group's store.
_SWEEPS = itertools.count()


def active(distributed: bool = True) -> bool:
    """Whether a sweep should be sharded: asked for, and a process group of several ranks exists."""
    return bool(distributed) and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_device() -> torch.device:
    """The device a rank should put its model and inputs on: ``cuda:LOCAL_RANK`` with CUDA, else CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return torch.device("cpu")


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
    """``pb.sweep`` over the ranks of the default process group (the package docstring's steps)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    serial = next(_SWEEPS)
    clock = _Clock()
    if not cells:
        raise ValueError("sweep needs at least one cell (patch map)")
    cells = list(cells)
    channel = _Channel(rank, world)
    local_plan = _plan_locally(local, model, inputs, cells, batch_size, rank, world)
    mine = _proposal(local_plan, cells, batch_size)
    clock.mark()
    terms = _agree(channel, mine, local_plan, verify)
    clock.mark()
    bar = _Progress(progress, rank, len(cells), serial)
    shard_run = _ShardRun(local, local_plan, terms, channel, inputs, cells, metric, batch_size, verify, bar)
    shard_run.run_shard()
    clock.mark()
    exchange = _report(channel, shard_run, terms.room)
    clock.mark()
    bar.finish(sum(h.rows for h in exchange.headers if not h.failed))
    result = _delivered(channel, exchange, shard_run.failure, shard_run.values, terms.plan, inputs, world)
    clock.mark()
    _LAST["last"] = clock.timings(
        shard_run.share_seconds, terms.sharing, shard_run.checks,
        channel.collectives, channel.pickled_bytes, channel.sent_bytes,
    )
    return result


class _ShardRun:
    """Step 3 on one rank: its shard, run as single-process sweeps.

    Mutable state, because the leader's hand-over runs from inside its shard's sweep (after the
    first chunk) and changes where the others start. A failure becomes ``failure`` (a report),
    never an exception: the other ranks would wait for this one in a collective.
    """

    def __init__(
        self, local: LocalSweep, local_plan: _LocalPlan, terms: _Terms, channel: _Channel, inputs: Any,
        cells: Sequence[Mapping[str, Any]], metric: Callable[[Any], torch.Tensor], batch_size: Optional[int],
        verify: bool, bar: _Progress,
    ) -> None:
        self.local, self.local_plan, self.terms, self.channel = local, local_plan, terms, channel
        self.inputs, self.batch_size, self.verify, self.bar = inputs, batch_size, verify, bar
        plan = terms.plan
        # The shards' layout of the cells (the caller's order unless chunks were dealt by cost).
        self.laid_out = cells if plan.order is None else [cells[i] for i in plan.order]
        self.shard = plan.shards[channel.rank]
        self.counted = _CountingMetric(metric, terms.chunk * local_plan.batch, terms.chunk, len(self.shard), bar)
        self.pieces: List[torch.Tensor] = []
        self.failure: Optional[RankFailure] = None
        self.values: Optional[torch.Tensor] = None
        self.share_seconds = 0.0
        self.start = self.shard.start
        # One check per sweep of whether batching keeps rows exact, as in one process: the
        # leader's, on its first chunk. The other ranks check only programs their process has
        # not verified; when any check fails, every rank redoes its shard one forward per cell
        # (step 4), as the single-process sweep does after a failed check.
        self.fell_back = False
        self.checks = 0
        self.handed_over = terms.sharing == "none"

    @property
    def leads(self) -> bool:
        return self.channel.rank == self.terms.leader

    def run_shard(self) -> None:
        """The whole shard, the leader handing its compile over after its first chunk; sets
        ``values`` and records the program as warm in this process when it succeeded."""
        if not self.leads:
            self.hand_over()
        self.run(self.shard.stop, after_first_chunk=self.hand_over if self.leads else None)
        self.hand_over()  # the leader, when its shard failed before the hook ran
        if self.failure is None and self.pieces:
            self.values = self.pieces[0] if len(self.pieces) == 1 else torch.cat(self.pieces)
            self.bar.add(len(self.shard) - self.counted.done)
            if self.local_plan.root is not None:
                key = _program_key(self.terms.sites, self.terms.chunk, self.inputs)
                _WARM.setdefault(self.local_plan.root, set()).add(key)

    def redo_cell_by_cell(self) -> None:
        """Runs the shard again one forward per cell (some rank found that batching changes rows)."""
        self.pieces.clear()
        self.start = self.shard.start
        self.run(self.shard.stop, cell_by_cell=True)
        self.values = None
        if self.failure is None and self.pieces:
            self.values = self.pieces[0]

    def run(self, stop: int, cell_by_cell: bool = False, after_first_chunk: Optional[Callable[[], None]] = None) -> None:
        """Cells ``start:stop`` of the layout as one single-process sweep, its rows kept in ``pieces``."""
        if self.failure is not None or stop <= self.start:
            return
        try:
            self.pieces.append(
                self.local.sweep(
                    self.local_plan.compiled, self.inputs, self.laid_out[self.start : stop], self.counted,
                    batch_size=self.terms.chunk, progress=False, verify=self.verify, distributed=False,
                    _sites=self.terms.sites, _trusted=not self.leads, _cell_by_cell=cell_by_cell or self.fell_back,
                    _after_first_chunk=after_first_chunk,
                )
            )
            report = self.local.report()
            self.fell_back = self.fell_back or bool(getattr(report, "cell_by_cell", False))
            self.checks += int(getattr(report, "checks", 0))
        except Exception as error:
            self.failure = self._failed(error, stop)
        self.start = stop

    def _failed(self, error: Exception, stop: int) -> RankFailure:
        """This rank's report of ``error`` raised by the sweep of cells ``start:stop``: the cell it
        names, else the first cell that fails the sweep's checks alone, else the running chunk."""
        cell = None
        if not _CELL_IN_MESSAGE.search(str(error)):
            cell = _invalid_cell(
                self.local.check_cells, self.local_plan.index, self.laid_out[self.start : stop], self.local_plan.batch,
                self.start,
            )
        first = self.shard.start + self.counted.done
        chunk = (first, min(first + self.terms.chunk, self.shard.stop))
        return _failure(self.channel.rank, self.shard, "shard", error, cell, chunk, self.start, self.terms.plan)

    def hand_over(self) -> None:
        """The leader compiles the program by running its first chunk; then it hands over
        (called from inside its shard's sweep after that chunk, so that the shard runs as one
        sweep with the same programs as every later sweep; or after it, when it failed)."""
        if self.handed_over:
            return
        self.handed_over = True
        if self.leads and self.failure is None:
            # The sweep holds the compile worker's foreground (sweep.py), so the first chunk's
            # compile is still queued: wait_for_compiles starts it now and waits for it (it does
            # not wait for the calls in the foreground), so the artifacts exist when handed over.
            wait_for_compiles()
        waited = time.perf_counter()
        handed = _hand_over(self.channel, self.terms.sharing, self.terms.leader, self.failure is None)
        if not self.leads:
            if handed is False:
                self.start = self.shard.stop  # the leader failed: every rank raises at step 4, skip the work
            elif isinstance(handed, bytes):
                try:
                    torch.compiler.load_cache_artifacts(handed)
                except Exception:
                    pass  # artifacts this torch cannot load: this rank compiles for itself
        self.share_seconds = time.perf_counter() - waited


def _report(channel: _Channel, shard_run: _ShardRun, room: int) -> _Exchange:
    """Step 4: every rank's status and rows. When some rank found that batching changes rows, no
    rank's batched rows are to be trusted (a rank that trusted the leader's check did not check
    its own chunks): the ranks that ran batched redo their shards one forward per cell, and all
    exchange again."""
    rows = len(shard_run.shard)
    exchange = _exchange_rows(channel, rows, shard_run.values, shard_run.failure, shard_run.fell_back, room)
    if not any(h.failed for h in exchange.headers) and any(h.cell_by_cell for h in exchange.headers):
        if not shard_run.fell_back:
            shard_run.redo_cell_by_cell()
        exchange = _exchange_rows(channel, rows, shard_run.values, shard_run.failure, True, room)
    return exchange
