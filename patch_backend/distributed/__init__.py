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

Modules, by step: ``planning`` (step 1's pure part: costs and shards), ``agreement`` (steps 1
and 2 on a rank: local plan, ``_Agreement``, the agreed ``_Terms``), ``sharded`` (the entry
point ``sharded_sweep`` and step 3, the shard run with its compile hand-over), ``transport``
(the counted collectives: hand-over, step 4's exchange, step 5's delivery), ``failures``
(``RankFailure``, ``DistributedSweepError``), ``progress`` (the cross-rank progress bar) and
``timings`` (``last_timings``). Imports run one way: planning ← failures ← transport ←
agreement ← sharded.
"""

from __future__ import annotations


from .agreement import LocalSweep
from .failures import DistributedSweepError, RankFailure
from .planning import CHUNK_OVERHEAD, SWEEP_SHARES_PREFIX, Shard, ShardPlan, cell_costs, plan_shards, sweep_shards
from .sharded import active, rank_device, sharded_sweep
from .timings import Timings, last_timings
from .transport import INLINE_RESULT_BYTES

__all__ = [
    "CHUNK_OVERHEAD",
    "DistributedSweepError",
    "INLINE_RESULT_BYTES",
    "LocalSweep",
    "RankFailure",
    "SWEEP_SHARES_PREFIX",
    "Shard",
    "ShardPlan",
    "Timings",
    "active",
    "cell_costs",
    "last_timings",
    "plan_shards",
    "rank_device",
    "sharded_sweep",
    "sweep_shards",
]
