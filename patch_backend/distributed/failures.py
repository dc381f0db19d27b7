"""What a failing rank reports, and the error every rank raises when one failed.

A failure on one rank becomes a ``RankFailure`` (never an exception that would leave the other
ranks waiting in a collective); once every rank knows that some rank failed, each raises
``DistributedSweepError`` with every failing rank's report.
"""

from __future__ import annotations

import re
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence, Tuple

from .planning import Shard, ShardPlan


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
