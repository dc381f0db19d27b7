"""Where a sharded sweep's time went on this rank (``last_timings()``), for benchmarks."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple


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


class _Clock:
    """The phase boundaries of one sharded sweep on this rank (wall clock, this process's CPU,
    the calling thread's CPU), read into ``Timings`` at the end: plan, agree, shard, status,
    gather."""

    def __init__(self) -> None:
        self.marks: List[Tuple[float, float, float]] = []
        self.mark()

    def mark(self) -> None:
        """Ends one phase (and starts the next)."""
        self.marks.append((time.perf_counter(), time.process_time(), time.thread_time()))

    def timings(
        self, share_seconds: float, sharing: str, checks: int, collectives: int, pickled_bytes: int, sent_bytes: int
    ) -> Timings:
        """The phases between the marks (five once the sweep is delivered) and the counts."""
        wall, cpu, thread = (
            tuple(later[k] - earlier[k] for earlier, later in zip(self.marks, self.marks[1:])) for k in range(3)
        )
        plan, agree, shard, status, gather = wall
        return Timings(
            plan, agree, shard, status, gather, share_seconds, sharing, cpu, thread,
            checks, collectives, pickled_bytes, sent_bytes,
        )
