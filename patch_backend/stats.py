"""Accounting: how many graphs and variants a model compiled, and what it cost."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Dict, Optional

from . import config
from .capture.capture import all_captures
from .capture.index import index_for
from .roots import resolve_root


@dataclass
class Stats:
    """Counters of one graph's dispatcher, or totals over a model's graphs."""

    graphs: int = 0
    #: Patched programs built (compiled, or interpreted forms for ``graphpatch_eager``).
    variants_compiled: int = 0
    #: Patched calls whose program was in the cache, and those whose program was not.
    variant_hits: int = 0
    variant_misses: int = 0
    #: Seconds spent compiling, in calls and in background compiles (runtime/tiers.py).
    compile_seconds: float = 0.0
    calls: int = 0
    patched_calls: int = 0
    #: Patched calls per tier: the eager interpreter (while a compile is pending, under
    #: ``compile_policy="never"``, ``graphpatch_eager``) or a compiled program.
    eager_calls: int = 0
    compiled_calls: int = 0
    #: Unpatched calls that ran the captured graph eagerly while its plain program compiled
    #: in the background (``compile_policy="background"``); the rest ran the compiled program.
    plain_eager_calls: int = 0
    #: Background compiles that raised (their programs run eagerly; a warning says so).
    compile_failures: int = 0
    #: Graphs with symbolic shapes captured while a background compile held the compile lock:
    #: their unpatched calls run the captured graph uncompiled (runtime/dispatcher.py).
    plain_uncompiled_graphs: int = 0
    evictions: int = 0
    #: Compile seconds per region label (program/regions.py: ``"transformer.h[*]"`` for a
    #: block, ``"before transformer.h"``, ``"after transformer.h"``, ``"whole graph"``), counting
    #: the regions this graph's compiles built; a region reused from the process-wide artifact
    #: cache costs nothing and does not appear.
    compile_seconds_by_region: Dict[str, float] = field(default_factory=dict)


def stats(model: Optional[Any] = None) -> Stats:
    """Totals over the graphs captured for ``model`` (all graphs when ``model`` is None).

    ``variants_compiled`` counts patched variants only; each graph's plain variant is compiled
    once, at its first unpatched call (on the compile worker under the default
    ``compile_policy="background"``), and its time is included in ``compile_seconds`` and
    ``compile_seconds_by_region``. ``eager_calls`` / ``compiled_calls`` count patched calls per
    tier, ``plain_eager_calls`` the unpatched calls that ran before their plain program was
    ready. A background compile is counted when it ends (``pb.wait_for_compiles()``).

    Args:
        model: the module, its ``torch.compile`` result or a ``PatchableGraph``; None for all.

    Raises:
        TypeError: ``model`` is none of those.

    Example::

        before = pb.stats(compiled).variants_compiled
        with pb.patch(compiled, {"linear.output": pb.ZeroPatch()}):
            compiled(x)                  # runs on the eager tier while the variant compiles
        pb.wait_for_compiles()
        assert pb.stats(compiled).variants_compiled == before + 1   # one new patch structure
    """
    captures = all_captures()
    if model is not None:

        index = index_for(resolve_root(model))
        uids = {uid for uid, _ in index.by_occurrence}
        captures = [capture for capture in captures if capture.uid in uids]
    total = Stats()
    for capture in captures:
        dispatcher = capture.dispatcher
        if dispatcher is None:
            continue
        for counter in fields(Stats):
            mine, theirs = getattr(total, counter.name), getattr(dispatcher.stats, counter.name)
            if isinstance(mine, dict):
                for label, seconds in theirs.items():
                    mine[label] = mine.get(label, 0.0) + seconds
            else:
                setattr(total, counter.name, mine + theirs)
    return total


def set_max_variants(count: int) -> None:
    """Bound on patched variants kept per graph; beyond it the least recently used are dropped."""
    config.set("max_variants", count)
