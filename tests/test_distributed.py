"""Sharded sweeps over torch.distributed ranks (gloo, CPU): plans, gathers, failures on one rank.

The multi-process tests spawn 2 or 3 ranks with torch.multiprocessing, one thread each, on a
process group with a 60 s timeout; each rank runs several scenarios in one process (a spawn and
an import of torch cost seconds) and asserts on its own results; a failed assertion on any rank
fails the test. The model runs on the ``graphpatch_eager`` backend, which patches the same
way as the compiled one without paying Inductor's compile per process; one slow test uses it.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import warnings
from datetime import timedelta
from typing import Any, Dict, List, Optional, Tuple

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import patch_backend as pb
from patch_backend.distributed import agreement, transport
from fixtures import TwoLayerMLP
from patch_backend import ZeroPatch
from patch_backend._torch_compat.inductor import fx_graph_cache_counters
from patch_backend.capture.capture import all_captures
from patch_backend.capture.index import index_for
from patch_backend.sweep import _VERIFIED, SweepBatchingWarning
from patch_backend.distributed import (
    DistributedSweepError,
    RankFailure,
    Shard,
    ShardPlan,
    SWEEP_SHARES_PREFIX,
    cell_costs,
    last_timings,
    plan_shards,
    sweep_shards,
)


# ---------------------------------------------------------------- planning (pure, one process)


def test_plan_splits_equal_costs_by_count_in_cell_order():
    plan = plan_shards([1.0] * 11, 3)
    assert plan == ShardPlan((Shard(0, 0, 4, 4.0), Shard(1, 4, 7, 3.0), Shard(2, 7, 11, 4.0)), 11)
    assert plan.longest == 4


def test_plan_balances_cost_not_count():
    # Early-layer cells cost 3x late ones: rank 0 gets fewer, costlier cells.
    costs = [3.0] * 8 + [1.0] * 8
    plan = plan_shards(costs, 2)
    assert [(shard.start, shard.stop) for shard in plan.shards] == [(0, 5), (5, 16)]
    assert [shard.cost for shard in plan.shards] == [15.0, 17.0]


def test_plan_with_fewer_cells_than_ranks_leaves_empty_shards():
    plan = plan_shards([1.0, 1.0], 3)
    assert [len(shard) for shard in plan.shards] == [1, 0, 1]
    assert sum(len(shard) for shard in plan.shards) == 2


@pytest.mark.parametrize("cells", [1, 2, 7, 64, 383])
@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_plan_covers_every_cell_once_and_within_one_cell_of_the_ideal(cells, world):
    costs = [1.0 + (index % 5) / 4 for index in range(cells)]
    plan = plan_shards(costs, world)
    assert plan.shards[0].start == 0 and plan.shards[-1].stop == cells
    assert all(a.stop == b.start for a, b in zip(plan.shards, plan.shards[1:]))
    ideal = sum(costs) / world
    assert max(shard.cost for shard in plan.shards) <= ideal + max(costs) + 1e-9


def test_plan_in_whole_chunks_balances_chunk_costs():
    # Six early-layer cells (cost 3) then ten late ones (cost 1), chunks of 4 cells: a chunk costs
    # its rows from its earliest cell's fan-out point on, so the second chunk costs 4 x 3.
    costs = [3.0] * 6 + [1.0] * 10
    plan = plan_shards(costs, 2, chunk=4)
    # Chunks of 12, 12, 4, 4: contiguous shards at best split 12 | 20; dealt costliest first to
    # the rank with less work, 16 | 16, each rank keeping its chunks in cell order.
    assert [shard.cost for shard in plan.shards] == [16.0, 16.0]
    assert [plan.caller_ranges(s.start, s.stop) for s in plan.shards] == [((0, 4), (8, 12)), ((4, 8), (12, 16))]
    assert plan.order == (*range(0, 4), *range(8, 12), *range(4, 8), *range(12, 16))
    # The gathered rows (in the shards' layout) come back in the caller's order.
    layout = torch.tensor(plan.order, dtype=torch.float32)[:, None]
    assert plan.restore(layout)[:, 0].tolist() == list(range(16))
    # Split by cells, the boundary falls inside the second chunk (each rank would pad its own).
    assert [(shard.start, shard.stop) for shard in plan_shards(costs, 2).shards] == [(0, 5), (5, 16)]


def test_plan_keeps_contiguous_shards_unless_dealing_balances_better():
    # Equal chunks: dealing cannot beat contiguous shards, which keep each rank's rows one slice.
    plan = plan_shards([1.0] * 16, 2, chunk=4)
    assert plan.order is None
    assert [(s.start, s.stop) for s in plan.shards] == [(0, 8), (8, 16)]


def test_plan_counts_each_chunks_fixed_work():
    # Two costly chunks, then four whose rows run almost nothing after their cut: counted by
    # their rows alone the cheap ones are nearly free; with a fixed cost per chunk (host work,
    # metric, head) each of them weighs a third of a costly one, in the shards' costs too.
    costs = [0.5] * 8 + [0.02] * 16
    plan = plan_shards(costs, 2, chunk=4)
    assert [round(s.cost, 6) for s in plan.shards] == [2.16, 2.16]
    plan = plan_shards(costs, 2, chunk=4, overhead=1.0)
    assert [round(s.cost, 6) for s in plan.shards] == [5.16, 5.16]
    assert [plan.caller_ranges(s.start, s.stop) for s in plan.shards] == [
        ((0, 4), (8, 12), (16, 20)), ((4, 8), (12, 16), (20, 24))
    ]


def test_plan_counts_each_chunks_unbatched_prefix():
    # Costs are fractions of one row block's forward: a chunk also runs the part before its cut
    # once, unbatched (1 - its costliest cell).
    costs = [0.75] * 4 + [0.25] * 4
    plan = plan_shards(costs, 1, chunk=4, unbatched_prefix=True)
    assert plan.shards[0].cost == pytest.approx(4 * 0.75 + 0.25 + 4 * 0.25 + 0.75)


def test_plan_gives_the_leader_less_for_its_extra_work():
    costs = [1.0] * 10
    assert [(s.start, s.stop) for s in plan_shards(costs, 2).shards] == [(0, 5), (5, 10)]
    plan = plan_shards(costs, 2, leader_extra=2.0)
    assert [(s.start, s.stop) for s in plan.shards] == [(0, 4), (4, 10)]
    # Shard costs are the cells' (the extra work is not a cell).
    assert [s.cost for s in plan.shards] == [4.0, 6.0]
    # The sweep's plan: the leader runs the one-cell check only with verify.
    checked = sweep_shards(costs, 2, 1, verify=True)
    unchecked = sweep_shards(costs, 2, 1, verify=False)
    assert len(checked.shards[0]) <= len(unchecked.shards[0])


@pytest.mark.parametrize("cells", [1, 5, 10, 64, 383])
@pytest.mark.parametrize("world", [1, 2, 3, 8])
def test_plan_in_whole_chunks_covers_every_cell_once(cells, world):
    costs = [1.0 + (index % 5) / 4 for index in range(cells)]
    for plan in (plan_shards(costs, world, chunk=4), sweep_shards(costs, world, 4, verify=True)):
        # Contiguous in the shards' layout, which holds every cell once.
        assert plan.shards[0].start == 0 and plan.shards[-1].stop == cells
        assert all(a.stop == b.start for a, b in zip(plan.shards, plan.shards[1:]))
        assert sorted(plan.order or range(cells)) == list(range(cells))
        for shard in plan.shards:
            runs = plan.caller_ranges(shard.start, shard.stop)
            # Whole chunks only (no two ranks each pad a split one); the short last one last.
            assert all(first % 4 == 0 and (stop % 4 == 0 or stop == cells) for first, stop in runs)
            assert all(stop != cells for _, stop in runs[:-1])


def test_plan_rejects_bad_costs():
    with pytest.raises(ValueError, match="cell costs must be positive"):
        plan_shards([1.0, 0.0], 2)
    with pytest.raises(ValueError, match="at least one rank"):
        plan_shards([1.0], 0)


def test_cell_costs_from_node_order():
    names = ["a.output", "b.output", "c.output", "d.output"]
    cells = [{"a.output": ZeroPatch()}, {"c.output": ZeroPatch(), "d.output": ZeroPatch()}, {}, {"typo": ZeroPatch()}]
    assert cell_costs(names, cells, shares_prefix=False) == (1.0, 1.0, 1.0, 1.0)
    # With prefix reuse a cell costs the rest of the forward from its earliest patched node.
    assert cell_costs(names, cells, shares_prefix=True) == (1.0, 0.5, 0.25, 1.0)


def test_cell_costs_follow_a_changed_node_order():
    # The node order's positions are kept between calls (the index replaces its list when it changes).
    names = ["a.output", "b.output"]
    cells = [{"b.output": ZeroPatch()}]
    assert cell_costs(names, cells, shares_prefix=True) == (0.5,)
    assert cell_costs(["b.output", "a.output"], cells, shares_prefix=True) == (1.0,)
    assert cell_costs(names, cells, shares_prefix=True) == (0.5,)
    names.insert(0, "z.output")  # the same list, changed in place: b is now third of three
    assert cell_costs(names, cells, shares_prefix=True) == (1 / 3,)


def test_fingerprint_sees_names_patches_slices_and_value_shapes_not_values():
    def cells(position=1, name="a.output", shape=(1, 4), kind=pb.ReplacePatch, seed=0):
        torch.manual_seed(seed)
        return [{name: kind(value=torch.randn(shape), slice=(slice(None), position))}, {"b.output": ZeroPatch()}]

    fingerprint = agreement._fingerprint
    assert fingerprint(cells(), 4) == fingerprint(cells(seed=1), 4)  # values may differ (GPU rounding)
    different = [cells(position=2), cells(name="c.output"), cells(shape=(1, 5)), cells(kind=pb.AddPatch)]
    assert all(fingerprint(other, 4) != fingerprint(cells(), 4) for other in different)
    assert fingerprint(cells(), 4) != fingerprint(cells(), 2)  # batch_size decides the chunks
    assert fingerprint(cells()[:1], 4) != fingerprint(cells(), 4)


def test_error_names_rank_and_cell():
    failure = RankFailure(1, 8, ((6, 11),), "shard", "ValueError", "sweep cell 8: bad slice", "trace")
    error = DistributedSweepError([failure], 2)
    assert str(error).startswith(
        "pb.sweep on 2 ranks: rank 1 failed at cell 8 (its cells 6..10): ValueError: sweep cell 8: bad slice. "
        "Every rank raises this error"
    )
    chunk = RankFailure(0, None, ((0, 6),), "shard", "RuntimeError", "boom", "trace", ((4, 6),))
    assert "rank 0 failed in the chunk of cells 4..5 (its cells 0..5): RuntimeError: boom" in str(
        DistributedSweepError([chunk], 2)
    )
    # Shards of chunks dealt by cost: the rank's cells are several runs of the caller's indices.
    dealt = RankFailure(1, None, ((4, 8), (12, 16)), "shard", "RuntimeError", "boom", "trace", ((12, 16),))
    assert "rank 1 failed in the chunk of cells 12..15 (its cells 4..7, 12..15)" in str(
        DistributedSweepError([dealt], 2)
    )


def test_without_a_process_group_nothing_changes():
    assert not dist.is_initialized()
    model, x, cells, metric = _problem()
    compiled = torch.compile(model, backend="graphpatch_eager")
    with torch.no_grad():
        default = pb.sweep(compiled, (x,), cells, metric, batch_size=4, progress=False)
        alone = pb.sweep(compiled, (x,), cells, metric, batch_size=4, progress=False, distributed=False)
    torch.testing.assert_close(default, alone, rtol=0, atol=0)


# ---------------------------------------------------------------- ranks (gloo, spawned)


def _problem(count: int = 11, width: int = 16):
    torch.manual_seed(0)
    model = TwoLayerMLP(width).eval()
    x = torch.randn(2, 5, width)
    sites = [f"layers_{layer}.up.output" for layer in range(2)]
    cells = [{sites[index % 2]: ZeroPatch(slice=(slice(None), index % 5))} for index in range(count)]
    return model, x, cells, lambda output: output.sum(-1)


def _costs(model: Any, cells: List[Dict[str, Any]]) -> Tuple[float, ...]:
    return cell_costs(index_for(model).names, cells, SWEEP_SHARES_PREFIX)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, scenario: str, env: Dict[str, str]) -> None:
    os.environ.update({name: value.format(rank=rank) for name, value in env.items()})
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    try:
        SCENARIOS[scenario](rank, world)
    finally:
        dist.destroy_process_group()


def _spawn(world: int, scenario: str, env: Optional[Dict[str, str]] = None) -> None:
    """``env``: variables set in each rank before it runs (``{rank}`` is replaced by the rank)."""
    mp.spawn(_rank_main, args=(world, _free_port(), scenario, dict(env or {})), nprocs=world, join=True)


def _matches_single_process(rank: int, world: int) -> None:
    model, x, cells, metric = _problem()
    compiled = torch.compile(model, backend="graphpatch_eager")
    with torch.no_grad():
        alone = pb.sweep(compiled, (x,), cells, metric, batch_size=4, progress=False, distributed=False)
        # 11 cells: uneven shards (6/5, 4/3/4), batch_size 2 or 4 smaller than a shard, padded last chunks.
        for batch_size in (2, 4, None):
            sharded = pb.sweep(compiled, (x,), cells, metric, batch_size=batch_size, progress=rank == 0)
            assert sharded.shape == alone.shape == (11, 2, 5)
            torch.testing.assert_close(sharded, alone, rtol=1e-5, atol=1e-5)
        # A steady sweep makes two collectives (step 2's agreement, step 4's headers and rows),
        # pickles nothing, and sends each rank's rows once, padded to the longest shard.
        steady = pb.sweep(compiled, (x,), cells, metric, batch_size=4, progress=False)
        timings = last_timings()
        assert timings is not None
        assert (timings.collectives, timings.pickled_bytes) == (2, 0), timings
        longest = max(len(shard) for shard in sweep_shards(_costs(model, cells), world, 4, verify=True).shards)
        header = transport._HEADER_BYTES
        assert timings.sent_bytes == 8 * len(dataclasses.fields(agreement._Agreement)) + header + longest * 2 * 5 * 4
        torch.testing.assert_close(steady, alone, rtol=1e-5, atol=1e-5)
        # Rows larger than the room reserved for them travel in a second all_gather at their
        # exact size: the same rows.
        inline = transport.INLINE_RESULT_BYTES
        transport.INLINE_RESULT_BYTES = 0
        try:
            gathered = pb.sweep(compiled, (x,), cells, metric, batch_size=4, progress=False)
            assert last_timings().collectives == 3
        finally:
            transport.INLINE_RESULT_BYTES = inline
        torch.testing.assert_close(gathered, alone, rtol=1e-5, atol=1e-5)
        # Rows of other shapes and dtypes: more dimensions than a header carries travel pickled;
        # bool and float64 rows as bytes.
        deep = pb.sweep(compiled, (x,), cells, lambda output: metric(output).reshape(-1, *[1] * 8, 5), batch_size=4,
                        progress=False)
        assert last_timings().pickled_bytes > 0
        torch.testing.assert_close(deep.reshape(alone.shape), alone, rtol=1e-5, atol=1e-5)
        for kind in (torch.bool, torch.float64):
            rows = pb.sweep(compiled, (x,), cells, lambda output: (metric(output) > 0).to(kind), batch_size=4,
                            progress=False)
            assert rows.dtype == kind and last_timings().pickled_bytes == 0
            torch.testing.assert_close(rows, (alone > 0).to(kind))
        # One cell on several ranks: the others have empty shards.
        one = pb.sweep(compiled, (x,), cells[3:4], metric, batch_size=4, progress=False)
        torch.testing.assert_close(one, alone[3:4], rtol=1e-5, atol=1e-5)
        # Early-layer cells first: their chunks cost about twice the late ones', so the ranks are
        # dealt chunks out of cell order; the rows still come back in cell order.
        layered = sorted(range(len(cells)), key=lambda k: "layers_1" in next(iter(cells[k])))
        costs = cell_costs(index_for(model).names, [cells[k] for k in layered], SWEEP_SHARES_PREFIX)
        assert sweep_shards(costs, world, 2, verify=True).order is not None
        dealt = pb.sweep(compiled, (x,), [cells[k] for k in layered], metric, batch_size=2, progress=False)
        torch.testing.assert_close(dealt, alone[layered], rtol=1e-5, atol=1e-5)
        # A bad cell is named by its index in the caller's cells, wherever it was dealt.
        bad = [cells[k] for k in layered]
        bad[9] = {"layers_1.up.output": ZeroPatch(slice=(slice(None), 9))}
        _expect_rank_error(
            r"rank \d+ failed at cell 9 \(its cells .*9",
            lambda: pb.sweep(compiled, (x,), bad, metric, batch_size=2, progress=False),
        )


def _causal_trace(rank: int, world: int) -> None:
    model, x, _, _ = _problem()
    corrupt = x.flip(1)
    compiled = torch.compile(model, backend="graphpatch_eager")
    sites = ["layers_0.up.output", "layers_1.up.output"]
    metric = lambda output: output[:, -1].sum(-1)  # noqa: E731
    alone = pb.causal_trace(compiled, (x,), (corrupt,), sites, 5, metric, batch_size=3, progress=False, distributed=False)
    sharded = pb.causal_trace(compiled, (x,), (corrupt,), sites, 5, metric, batch_size=3, progress=False)
    torch.testing.assert_close(sharded.grid, alone.grid, rtol=1e-5, atol=1e-5)


def _expect_rank_error(match: str, run) -> None:
    with pytest.raises(DistributedSweepError, match=match) as caught:
        run()
    assert caught.value.failures and caught.value.failures[0].traceback


def _failures(rank: int, world: int) -> None:
    model, x, cells, metric = _problem()
    compiled = torch.compile(model, backend="graphpatch_eager")
    last = world - 1
    with torch.no_grad():
        compiled(x)  # the node order, which the shards' cost estimate reads
    costs = cell_costs(index_for(model).names, cells, SWEEP_SHARES_PREFIX)
    # The shards of the sweeps below (batch_size 2), with and without the leader's one-cell check:
    # the last rank's cells, as the caller's indices (chunks may be dealt out of cell order).
    checked = sweep_shards(costs, world, 2, verify=True)
    shard = checked.shards[last]
    mine = [checked.caller_index(position) for position in range(shard.start, shard.stop)]
    runs = ", ".join(rf"{first}\.\.{stop - 1}" for first, stop in checked.caller_ranges(shard.start, shard.stop))

    # A bad cell (a slice beyond the 5 positions) on the last rank: refused there before its
    # shard runs, every rank raises naming that rank and the cell's index in the whole sweep.
    bad = list(cells)
    bad[mine[1]] = {"layers_0.up.output": ZeroPatch(slice=(slice(None), 9))}
    _expect_rank_error(
        rf"rank {last} failed at cell {mine[1]} \(its cells {runs}\)",
        lambda: pb.sweep(compiled, (x,), bad, metric, batch_size=2, progress=False),
    )

    # An unknown node name: the error does not say which cell; the rank finds it.
    typo = list(cells)
    typo[mine[0]] = {"layers_0.up.outptu": ZeroPatch()}
    _expect_rank_error(
        # (a name that is no node counts from the start of the forward, which can move the shards)
        rf"rank \d+ failed at cell {mine[0]} .*KeyError",
        lambda: pb.sweep(compiled, (x,), typo, metric, batch_size=2, progress=False),
    )

    # An exception while the last rank's second chunk runs (here, in the metric).
    calls = []

    def flaky(output):
        calls.append(1)
        if rank == last and len(calls) == 2:
            raise RuntimeError("metric failed on this rank")
        return metric(output)

    unverified = sweep_shards(costs, world, 2, verify=False)
    shard = unverified.shards[last]
    second = unverified.caller_ranges(shard.start + 2, min(shard.start + 4, shard.stop))
    _expect_rank_error(
        rf"rank {last} failed in the chunk of cells "
        + ", ".join(rf"{first}\.\.{stop - 1}" for first, stop in second) + " .*metric failed",
        lambda: pb.sweep(compiled, (x,), cells, flaky, batch_size=2, progress=False, verify=False),
    )

    # Ranks that built different cells would gather misaligned rows: refused before running.
    with pytest.raises(ValueError, match="ranks passed different cells"):
        pb.sweep(compiled, (x,), cells[: 11 - rank], metric, batch_size=2, progress=False)

    # The process group is still usable after every failure above: the ranks stayed in step.
    with torch.no_grad():
        fine = pb.sweep(compiled, (x,), cells, metric, batch_size=2, progress=False)
        alone = pb.sweep(compiled, (x,), cells, metric, batch_size=2, progress=False, distributed=False)
    torch.testing.assert_close(fine, alone, rtol=1e-5, atol=1e-5)


def _program_keys(model: Any) -> List[Any]:
    """The programs cached for ``model``'s graphs, comparable across processes (a prepared or
    sweep key's sites sorted: a frozenset's order follows string hashes, which differ per process)."""
    uids = {uid for uid, _ in index_for(model).by_occurrence}
    keys: List[Any] = []
    for capture in all_captures():
        dispatcher = capture.dispatcher
        if capture.uid not in uids or dispatcher is None:
            continue
        for key in dispatcher.variants.keys():
            if isinstance(key, tuple) and key and key[0] in ("prepared", "sweep"):
                # A sweep key's last part is the base graph's capture uid, a per-process number.
                keys.append((key[0], tuple(sorted(repr(site) for site in key[1])), *key[2:3]))
            else:
                keys.append(repr(key))
    return sorted(keys, key=repr)


def _split_site_cells() -> Tuple[Any, Any, List[Dict[str, Any]], Any]:
    """12 cells: the first 6 patch layer 0, the last 6 layer 1 (cheaper with prefix reuse), so
    rank 0's shard names only layer 0 and the last rank's mostly layer 1."""
    model, x, _, metric = _problem()
    sites = [f"layers_{layer}.up.output" for layer in range(2)]
    cells = [{sites[index // 6]: ZeroPatch(slice=(slice(None), index % 5))} for index in range(12)]
    return model, x, cells, metric


def _gathered(value: Any, world: int) -> List[Any]:
    everyone: List[Any] = [None] * world
    dist.all_gather_object(everyone, value)
    return everyone


def _programs_split_over_ranks(rank: int, world: int) -> None:
    model, x, cells, metric = _split_site_cells()
    compiled = torch.compile(model, backend="graphpatch_eager")
    with torch.no_grad():
        compiled(x)
        before = pb.stats(model).variants_compiled
        sharded = pb.sweep(compiled, (x,), cells, metric, batch_size=2, progress=False)
        first = last_timings()
        built = pb.stats(model).variants_compiled - before
        keys = _program_keys(model)
        again = pb.sweep(compiled, (x,), cells, metric, batch_size=2, progress=False)
        second = last_timings()
        rebuilt = pb.stats(model).variants_compiled - before
    assert first is not None and second is not None
    everyone = _gathered((built, rebuilt, keys, first.sharing, second.sharing), world)
    # Shards are cut by estimated cost (a layer-0 cell costs the whole forward, a layer-1 cell
    # only from its fan-out point on), and each chunk fans out at its cells' earliest block, so
    # ranks build programs for their own cuts (two ranks whose shards hold the same cut and slot
    # lengths build the same program, which Inductor's shared cache serves to the second): every
    # rank built at least one, each with a fan-out cut...
    assert all(entry[0] >= 1 for entry in everyone), everyone
    everyone_keys = [key for entry in everyone for key in entry[2]]
    assert all(key[0] == "sweep" and key[2] is not None for key in everyone_keys), everyone_keys
    # ... and the repeat built nothing anywhere.
    assert built == rebuilt
    # The first sweep had a program to build, so the ranks shared it (one host, one cache
    # directory); the repeat had nothing to build and ran at once everywhere.
    assert (first.sharing, second.sharing) == ("cache", "none")
    alone = pb.sweep(compiled, (x,), cells, metric, batch_size=2, progress=False, distributed=False)
    torch.testing.assert_close(sharded, alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again, alone, rtol=1e-5, atol=1e-5)
    # An unknown sharing mode on one rank: every rank raises, naming it (errors.md row 28).
    if rank == world - 1:
        pb.config.compile_sharing = "sometimes"  # bypasses config.set's check, as a bad env value does
    try:
        _expect_rank_error(
            rf"rank {world - 1} failed while planning .*compile_sharing .* must be one of .*got 'sometimes'",
            lambda: pb.sweep(compiled, (x,), cells, metric, batch_size=2, progress=False),
        )
    finally:
        pb.config.compile_sharing = "auto"


def _inductor(rank: int, world: int) -> None:
    """Inductor, in fresh cache directories: the leader compiles first; the other ranks build
    the programs of their own fan-out cuts, loading from torch's caches what the leader compiled
    (the shared block regions, any program of a cut both hold)."""
    model, x, cells, metric = _split_site_cells()
    compiled = torch.compile(model, backend="graphpatch")
    with torch.no_grad():
        compiled(x)
        caches = fx_graph_cache_counters()
        sharded = pb.sweep(compiled, (x,), cells, metric, batch_size=2, progress=False)
        # The sweep holds the compile worker's foreground: a rank's compiles that it did not
        # wait for (the leader waits for its first chunk's, to hand it over) run after it.
        pb.wait_for_compiles()
        caches = {name: count - caches[name] for name, count in fx_graph_cache_counters().items()}
        timings = last_timings()
        alone = pb.sweep(model, (x,), cells, metric, batch_size=2, progress=False, distributed=False)
    torch.testing.assert_close(sharded, alone, rtol=1e-5, atol=1e-5)
    assert timings is not None
    assert timings.sharing == os.environ["EXPECTED_SHARING"]
    if rank == 0:
        assert caches["fxgraph_cache_miss"] >= 1, caches  # the leader compiled
    else:
        # The others found graphs the leader compiled instead of compiling them again.
        assert caches["fxgraph_cache_hit"] >= 1, caches


def _checks_once_per_sweep(rank: int, world: int) -> None:
    """The one-cell batching check runs once per sweep, on the leader, plus once per program a
    process never verified: a rank does not re-verify programs it verified in earlier sweeps."""
    model, x, cells, metric = _split_site_cells()
    compiled = torch.compile(model, backend="graphpatch_eager")
    with torch.no_grad():
        alone = pb.sweep(compiled, (x,), cells, metric, batch_size=2, progress=False, distributed=False)
        _VERIFIED.clear()  # as in a fresh process: no program verified yet
        first = pb.sweep(compiled, (x,), cells, metric, batch_size=2, progress=False)
        first_checks = last_timings().checks
        again = pb.sweep(compiled, (x,), cells, metric, batch_size=2, progress=False)
        again_checks = last_timings().checks
    everyone = _gathered((first_checks, again_checks), world)
    # First sweep: every rank with cells checks each of its new programs (at least one each).
    assert all(entry[0] >= 1 for entry in everyone), everyone
    # Again: the leader checks the sweep's inputs once; the others check nothing.
    assert [entry[1] for entry in everyone] == [1] + [0] * (world - 1), everyone
    torch.testing.assert_close(first, alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again, alone, rtol=1e-5, atol=1e-5)


class _Branchy(torch.nn.Module):
    """Its Python reads a value across the batch (tests/test_sweep_verify.py): batched rows
    take the branch of the whole chunk's sum, a cell alone that of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(4, 4)
        self.b = torch.nn.Linear(4, 4)
        self.c = torch.nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        return self.b(h) if h.sum() > 0 else self.c(h)


def _batching_broken_on_the_leader(rank: int, world: int) -> None:
    """The leader's check fails: every rank redoes its shard one forward per cell, also a rank
    whose own batched rows would have passed its own check but are wrong for another cell."""
    torch.manual_seed(0)
    model = _Branchy().eval()
    x = torch.randn(1, 4)
    compiled = torch.compile(model, backend="graphpatch_eager")
    metric = lambda output: output.sum(-1)  # noqa: E731
    # Chunks of 2: the leader's first cell alone takes c, its chunk b; rank 1's chunk takes b,
    # which is right for +3 and wrong for -1 (alone: c).
    values = (-10.0, 20.0, 3.0, -1.0)
    cells = [{"a.output": pb.AddPatch(value=value)} for value in values]
    expected = []
    with torch.no_grad():
        for cell in cells:
            with pb.patch(compiled, cell):
                expected.append(metric(compiled(x)))
        batched = pb.sweep(compiled, (x,), cells, metric, batch_size=2, progress=False, distributed=False, verify=False)
    assert not torch.allclose(batched[3], expected[3])  # unchecked batching gets rank 1's -1 wrong
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SweepBatchingWarning)
        with torch.no_grad():
            rows = pb.sweep(compiled, (x,), cells, metric, batch_size=2, progress=False)
    torch.testing.assert_close(rows, torch.stack(expected))


def _two_rank_scenarios(rank: int, world: int) -> None:
    _checks_once_per_sweep(rank, world)
    _batching_broken_on_the_leader(rank, world)
    _programs_split_over_ranks(rank, world)
    _matches_single_process(rank, world)
    _causal_trace(rank, world)
    _failures(rank, world)


def _three_rank_scenarios(rank: int, world: int) -> None:
    _checks_once_per_sweep(rank, world)
    _programs_split_over_ranks(rank, world)
    _matches_single_process(rank, world)
    _failures(rank, world)


SCENARIOS = {"two": _two_rank_scenarios, "three": _three_rank_scenarios, "inductor": _inductor}


def test_two_ranks_match_one_process_and_fail_together():
    _spawn(2, "two")


def test_three_ranks_match_one_process_and_fail_together():
    _spawn(3, "three")


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["one shared cache directory", "a cache directory per rank"])
def test_two_ranks_compiled_with_inductor_compile_once(tmp_path, layout):
    # One directory: the others load the leader's graphs from it ("cache"); one per rank: the
    # leader sends its artifacts through the process group ("broadcast", as across nodes).
    shared = layout == "one shared cache directory"
    directory = str(tmp_path / ("inductor" if shared else "inductor-{rank}"))
    env = {
        "TORCHINDUCTOR_CACHE_DIR": directory,
        "EXPECTED_SHARING": "cache" if shared else "broadcast",
    }
    _spawn(2, "inductor", env)
