"""The program cache of one dispatcher: a bounded, thread-safe LRU.

Threads patching the same compiled model share its dispatchers, and background compiles
(tiers.py) insert programs from a worker thread, so every read that reorders and every write
takes the cache's lock: an ``OrderedDict.move_to_end`` racing an eviction in another thread
raises ``KeyError`` (or corrupts the order) without it.

The bound is ``config.max_variants``, read at each insertion so that ``pb.config.patch``
applies to graphs captured before it. Beyond it the least recently used program is dropped
(and rebuilt if its key comes back); the first eviction of each dispatcher warns, because a
sweep of structures that thrashes the cache recompiles without anything else saying so.
"""

from __future__ import annotations

import threading
import warnings
from collections import OrderedDict
from typing import Any, Callable, Dict, Hashable, List, Optional, Sequence, Tuple

from .. import config
from ..stats import Stats


_NO_KEY = object()  # ``ProgramCache._last``'s key when no entry was used yet


class Guarded:
    """The programs of one key on a graph with symbolic shapes, each compiled with symbolic
    sizes and valid where its shape guard holds (a patch that ties a size to a value's length
    makes the compile assume it; program.dynamic). Bounded like the cache itself."""

    __slots__ = ("entries",)

    def __init__(self) -> None:
        self.entries: List[Tuple[Callable[[Sequence[Any]], bool], Any]] = []

    def find(self, args: Sequence[Any]) -> Any:
        for guard, program in self.entries:
            if guard(args):
                return program
        return None


def _guard_args(key: Hashable, args: Optional[Sequence[Any]]) -> Sequence[Any]:
    """The call's args, which a Guarded entry's shape guards read; a lookup without them can
    only be a caller that keyed a symbolic compile as a plain one."""
    if args is None:
        raise RuntimeError(
            f"patch_backend internal error: the program cache entry for {key!r} holds symbolic "
            "compiles guarded by shape, but the lookup passed no args to check the guards against"
        )
    return args


class ProgramCache:
    """Key → program, at most ``config.max_variants`` of them, least recently used dropped first.

    A key's entry may be a ``Guarded`` set, of which ``get(key, args)`` returns the program
    whose guard holds for ``args``. ``graph_uid`` names the graph in the eviction warning.
    """

    def __init__(self, stats: Stats, graph_uid: int, warn: bool = True) -> None:
        self._entries: "OrderedDict[Hashable, Any]" = OrderedDict()
        self._lock = threading.Lock()
        self._stats = stats
        self._graph_uid = graph_uid
        self._warned = not warn
        #: (key, program) of the entry used last, already the most recently used one: a loop of
        #: calls of one program finds it by the key's identity, without the lock or a hash.
        #: Replaced as one tuple (atomic), under the lock, by every get, put and clear.
        self._last: Tuple[Any, Any] = (_NO_KEY, None)

    def get(self, key: Hashable, args: Optional[Sequence[Any]] = None) -> Optional[Any]:
        """The program for ``key`` (now the most recently used), or None; counts a hit or a miss."""
        last = self._last
        if last[0] is key:
            self._stats.variant_hits += 1
            return last[1]
        with self._lock:
            program = self._entries.get(key)
            if program is None:
                self._stats.variant_misses += 1
                return None
            self._entries.move_to_end(key)
            if type(program) is Guarded:
                program = program.find(_guard_args(key, args))
                if program is None:
                    self._stats.variant_misses += 1
                    return None
                self._last = (_NO_KEY, None)  # a Guarded entry's program depends on the args
            else:
                self._last = (key, program)
            self._stats.variant_hits += 1
            return program

    def peek(self, key: Hashable, args: Optional[Sequence[Any]] = None) -> Optional[Any]:
        """Like ``get``, without counting or reordering (a build checking it lost no race)."""
        with self._lock:
            program = self._entries.get(key)
            if type(program) is Guarded:
                program = program.find(_guard_args(key, args))
            return program

    def put(self, key: Hashable, program: Any) -> Any:
        """Inserts ``program`` unless another thread inserted one for ``key`` first; returns the
        one kept. Evicts beyond the bound, warning on the first eviction."""
        with self._lock:
            kept = self._entries.setdefault(key, program)
            self._entries.move_to_end(key)
            self._last = (key, kept) if type(kept) is not Guarded else (_NO_KEY, None)
            warn = self._evict()
            if key not in self._entries:  # a bound of 0: nothing is kept, nor remembered
                self._last = (_NO_KEY, None)
        if warn:
            self._warn()
        return kept

    def put_guarded(self, key: Hashable, guard: Callable[[Sequence[Any]], bool], program: Any) -> Any:
        """Adds a symbolic compile valid where ``guard`` holds to ``key``'s Guarded set."""
        with self._lock:
            entry = self._entries.get(key)
            if type(entry) is not Guarded:
                entry = self._entries[key] = Guarded()
            self._entries.move_to_end(key)
            self._last = (_NO_KEY, None)
            entry.entries.append((guard, program))
            evicted = False
            while len(entry.entries) > config.max_variants:
                entry.entries.pop(0)
                self._stats.evictions += 1
                evicted = True
            warn = self._evict() or (evicted and self._first_warning())
        if warn:
            self._warn()
        return program

    def _evict(self) -> bool:
        """Drops the least recently used beyond the bound (lock held); whether to warn now."""
        evicted = False
        while len(self._entries) > config.max_variants:
            self._entries.popitem(last=False)
            self._stats.evictions += 1
            evicted = True
        return evicted and self._first_warning()

    def _first_warning(self) -> bool:
        warn = not self._warned
        self._warned = True
        return warn

    def _warn(self) -> None:
        warnings.warn(
            f"patch_backend: graph {self._graph_uid} compiled more than {config.max_variants} patched "
            "variants (one per distinct patch structure); the least recently used are dropped and "
            "recompiled on reuse. Declare the sites with pb.prepare(model, sites) or raise the bound "
            "with pb.set_max_variants(n).",
            stacklevel=5,
        )

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._last = (_NO_KEY, None)

    def keys(self) -> List[Hashable]:
        with self._lock:
            return list(self._entries)

    def values(self) -> List[Any]:
        """The programs (a Guarded set's programs one by one)."""
        with self._lock:
            entries = list(self._entries.values())
        return [p for entry in entries for p in (
            [program for _, program in entry.entries] if type(entry) is Guarded else [entry])]

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._entries


class BoundedMemo:
    """A small bounded, thread-safe memo (emptied when full: an entry is cheap to rebuild);
    writes take its lock, reads need none.

    For what a front-end derives from a patch *structure* once per graph rather than once per
    patch context (context.py): ``builds`` counts the entries made, which tests assert.
    """

    __slots__ = ("_entries", "_lock", "_bound", "builds")

    def __init__(self, bound: int = 1024) -> None:
        self._entries: Dict[Hashable, Any] = {}
        self._lock = threading.Lock()
        self._bound = bound
        self.builds = 0

    def get(self, key: Hashable) -> Any:
        # Reads take no lock: one dict lookup is atomic, and writers only add, replace or clear
        # (every patched call reads a memo or two; a lock would be most of a lookup's cost).
        return self._entries.get(key)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    def put(self, key: Hashable, value: Any) -> Any:
        with self._lock:
            if len(self._entries) >= self._bound:
                self._entries.clear()
            self._entries[key] = value
            self.builds += 1
        return value

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)
