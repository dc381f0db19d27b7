"""Cells done across ranks, shown on rank 0 (best effort: the sweep never waits for it)."""

from __future__ import annotations

import os
import threading
from datetime import timedelta
from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.distributed as dist
from tqdm.auto import tqdm


_STORE_LOCK = threading.Lock()


_STORES: Dict[Tuple[str, int], Any] = {}


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
