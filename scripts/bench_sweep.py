"""Activation-patching sweeps (every layer x every position), pb.sweep against its peers.

    python scripts/bench_sweep.py [--device cpu] [--json out/bench_sweep.json] [--quick]
    python scripts/bench_sweep.py --ranks 2 [--layers 6 --positions 64] [--json out/bench_ranks.json]

For each sweep (4 layers x 16 positions, 6 layers x 64 positions) one table, one process:
eager forward-hook loop; hand-batched eager hooks (one forward per chunk); graphpatch_eager
loop; graphpatch loop (one compiled forward per cell); pb.sweep. Compiled peers are timed
twice: from a fresh compile (total) and again once compiled (steady state).

With ``--ranks N``: one layer x position sweep as a sharded pb.sweep on N gloo ranks (spawned
here, 1 thread each, one shared fresh Inductor cache directory) against the same sweep on 1 rank
with 1 thread (a fresh process and cache directory of its own). Printed, and written with --json:

- D1 (target >= 1.7x at 2 ranks): throughput excluding compile. Measured in interleaved rounds
  inside the N-rank run: rank 0 alone runs the whole sweep (``distributed=False``, the same
  compiled program) while the others wait, then all ranks run it sharded; the median of the
  rounds' ratios. Interleaving puts both under the same load from other processes. The ratio
  against the separate 1-rank process and the CPU-seconds ratio (what D1 is with a free core
  per rank) are printed too: ``D1_cpu`` is rank 0's CPU seconds alone over the busiest rank's
  CPU seconds sharded, per round (process CPU seconds, all threads; on a machine shared with
  other jobs wall clock follows their load, CPU seconds much less). Every timed sweep runs with
  its programs compiled: the cold sweep waits for the background compile worker
  (``pb.wait_for_compiles``), and rank 0 runs the whole sweep alone once before the rounds.
  The baseline and the ranks run the same chunk size and the same fan-out cuts (checked:
  ``same chunk and fan-out cuts as 1 rank``).
- D2 (<= 5%): coordination overhead, the part of the sharded sweep's wall time (the last rank
  to return) that is not the slowest rank's shard, per interleaved round (median); the same from
  the two steady sweeps; ``D2_cpu``: the busiest rank's CPU seconds outside its shard (plan,
  agreement, status, gather: ``Timings.cpu_seconds``) over all its CPU seconds in the sweep.
  With it: each phase's wall ms per rank, and the collectives, pickled bytes and bytes sent
  per steady sharded sweep (``Timings``).
- D3 (<= 1.3x): compile seconds summed over ranks against one rank's. A rank's compile seconds
  are its first (cold) shard's time, plus the compiles the sweep left to the worker (a sweep
  starts them once it returns: ``pb.wait_for_compiles`` after it), minus its steady-state shard
  time, less the time it waited
  for the compiling rank (``--share``: docs/scaling.md), in wall-clock and in CPU seconds (the
  process's and its C++ compiler children's; Inductor compiles in-process here). Against the
  separate 1-rank run, and against the compiling rank of the same run (which compiles exactly
  what a single rank compiles, under the same load). Per rank: Dynamo's seconds, the variant
  compile seconds ``pb.stats`` counts, and the FX-graph-cache hits and misses.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import socket
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from typing import Dict, List, Optional, Tuple

import torch

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import patch_backend as pb  # noqa: E402
from bench_util import device_name, write_json  # noqa: E402
from sweep_common import (  # noqa: E402
    answer_metric,
    clean_and_corrupt,
    clean_block_outputs,
    gpt2,
    hand_batched_hooks,
    hook_loop,
    seconds,
    sweep_cells,
)


def patched_loop(compiled, corrupt, cells, metric):
    results = []
    with torch.no_grad():
        for cell in cells:
            with pb.patch(compiled, cell):
                results.append(metric(compiled(corrupt)))
    return torch.stack(results)


def run_sweep(layers: int, positions: int, width: int, device: str, chunk: int) -> Dict[str, object]:
    # "total s" counts the compiles and "steady s" must time compiled programs: compile in the
    # call that first needs a program, not on the background worker (config.compile_policy).
    pb.config.set("compile_policy", "sync")
    vocab = 256
    model = gpt2(layers, width, 4, vocab, positions, device)
    clean, corrupt = clean_and_corrupt(vocab, positions, device=device)
    with torch.no_grad():
        answer = int(model(clean).logits[0, -1].argmax())
    metric = answer_metric(answer)
    states = clean_block_outputs(model, clean)
    grid = [(layer, position) for layer in range(layers) for position in range(positions)]
    cells = sweep_cells(states, grid)
    totals: Dict[str, float] = {}
    steady: Dict[str, float] = {}
    outputs: Dict[str, torch.Tensor] = {}

    steady["eager hook loop"], outputs["eager hook loop"] = seconds(
        lambda: hook_loop(model, corrupt, states, grid, metric), device
    )
    steady["hand-batched eager hooks"], outputs["hand-batched eager hooks"] = seconds(
        lambda: hand_batched_hooks(model, corrupt, states, grid, metric, chunk), device
    )

    torch._dynamo.reset()
    eager_gp = torch.compile(copy.deepcopy(model), backend="graphpatch_eager")
    totals["graphpatch_eager loop"], _ = seconds(lambda: patched_loop(eager_gp, corrupt, cells, metric), device)
    steady["graphpatch_eager loop"], outputs["graphpatch_eager loop"] = seconds(
        lambda: patched_loop(eager_gp, corrupt, cells, metric), device
    )

    torch._dynamo.reset()
    compiled_loop = torch.compile(copy.deepcopy(model), backend="graphpatch")
    totals["graphpatch loop"], _ = seconds(lambda: patched_loop(compiled_loop, corrupt, cells, metric), device)
    steady["graphpatch loop"], outputs["graphpatch loop"] = seconds(
        lambda: patched_loop(compiled_loop, corrupt, cells, metric), device
    )

    torch._dynamo.reset()
    swept_model = copy.deepcopy(model)

    def sweep_fresh():
        compiled = torch.compile(swept_model, backend="graphpatch")
        with torch.no_grad():
            return pb.sweep(compiled, (corrupt,), cells, metric, batch_size=chunk, progress=False)

    totals["pb.sweep"], _ = seconds(sweep_fresh, device)
    steady["pb.sweep"], outputs["pb.sweep"] = seconds(sweep_fresh, device)
    variants = pb.stats(swept_model).variants_compiled

    reference = outputs["eager hook loop"]
    agree = {
        name: bool(torch.allclose(values.reshape(reference.shape), reference, atol=1e-4))
        for name, values in outputs.items()
    }
    for name in ("eager hook loop", "hand-batched eager hooks"):
        totals[name] = steady[name]
    hooks = steady["eager hook loop"]
    return {
        "sweep": f"{layers} layers x {positions} positions",
        "cells": len(cells),
        "chunk": chunk,
        "width": width,
        "seconds_total_including_compile": totals,
        "seconds_steady_state": steady,
        "cells_per_second_steady": {name: len(cells) / value for name, value in steady.items()},
        "ratios": {
            "pb.sweep vs eager hook loop (excluding compile)": hooks / steady["pb.sweep"],
            "pb.sweep vs eager hook loop (including compile)": hooks / totals["pb.sweep"],
            "pb.sweep vs hand-batched eager hooks": steady["hand-batched eager hooks"] / steady["pb.sweep"],
            "pb.sweep vs graphpatch loop (excluding compile)": steady["graphpatch loop"] / steady["pb.sweep"],
        },
        "agrees_with_hook_loop": agree,
        "sweep_variants_compiled": variants,
    }


class PeakRSS:
    """Peak resident memory above the level at entry, sampled every millisecond from /proc.

    Run under ``MALLOC_MMAP_THRESHOLD_`` (``--s1`` re-executes itself with it): large blocks
    are then mapped and unmapped per allocation, so RSS follows live tensors instead of
    glibc's high-water heap, and two peers in one process can be compared.
    """

    def __enter__(self) -> "PeakRSS":
        import threading

        self.start = self.peak = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss())
            self._stop.wait(0.001)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())

    @property
    def bytes(self) -> int:
        return self.peak - self.start


def _rss() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _layer_position_problem(layers: int, positions: int, width: int):
    """The layer x position restoration sweep both S1 and the ranks run: (model, corrupted ids,
    metric, clean block outputs, grid, cells)."""
    vocab = 256
    model = gpt2(layers, width, 4, vocab, positions)
    clean, corrupt = clean_and_corrupt(vocab, positions)
    with torch.no_grad():
        metric = answer_metric(int(model(clean).logits[0, -1].argmax()))
    states = clean_block_outputs(model, clean)
    grid = [(layer, position) for layer in range(layers) for position in range(positions)]
    return model, corrupt, metric, states, grid, sweep_cells(states, grid)


def run_s1(layers: int, positions: int, width: int, chunk: int, rounds: int, threads: Optional[int]) -> Dict[str, object]:
    """Targets S1/S2 of issue 14: steady-state pb.sweep against the hand-batched eager peer at
    the same chunk size, in interleaved rounds in one process (median ratio), and the peak RSS
    of each above its starting level."""
    from patch_backend.sweep import last_sweep_report

    if threads:
        torch.set_num_threads(threads)
    model, corrupt, metric, states, grid, cells = _layer_position_problem(layers, positions, width)
    compiled = torch.compile(model, backend="graphpatch")

    def swept() -> torch.Tensor:
        with torch.no_grad():
            return pb.sweep(compiled, (corrupt,), cells, metric, batch_size=chunk, progress=False)

    def hand() -> torch.Tensor:
        return hand_batched_hooks(model, corrupt, states, grid, metric, chunk)

    start = time.perf_counter()
    with torch.no_grad():
        compiled(corrupt)
    first = swept()
    pb.wait_for_compiles()  # the cold figure ends when the sweep's programs are compiled
    cold = time.perf_counter() - start
    report = last_sweep_report()
    reference = hand()
    agrees = bool(torch.allclose(first.reshape(reference.shape), reference, atol=1e-4))
    times: Dict[str, List[float]] = {"hand-batched eager hooks": [], "pb.sweep": []}
    peaks: Dict[str, List[int]] = {"hand-batched eager hooks": [], "pb.sweep": []}
    for _ in range(rounds):
        for name, fn in (("hand-batched eager hooks", hand), ("pb.sweep", swept)):
            with PeakRSS() as peak:
                elapsed, _ = seconds(fn)
            times[name].append(elapsed)
            peaks[name].append(peak.bytes)
    median = {name: sorted(values)[len(values) // 2] for name, values in times.items()}
    ratios = sorted(h / s for h, s in zip(times["hand-batched eager hooks"], times["pb.sweep"]))
    peak = {name: max(values) for name, values in peaks.items()}
    return {
        "sweep": f"{layers} layers x {positions} positions, width {width}",
        "cells": len(cells),
        "chunk": chunk,
        "threads": torch.get_num_threads(),
        "rounds": rounds,
        "seconds_per_round": times,
        "median_seconds": median,
        "S1 pb.sweep speed-up vs hand-batched eager (median of per-round ratios)": ratios[len(ratios) // 2],
        "peak_rss_mib_above_start": {name: value / 2**20 for name, value in peak.items()},
        "S2 pb.sweep peak RSS / hand-batched peak RSS": peak["pb.sweep"] / max(1, peak["hand-batched eager hooks"]),
        "pb.sweep first call seconds (capture + compile + sweep)": cold,
        "fan_out_cuts": sorted({str(cut) for cut in report.cuts}) if report else [],
        "fan_out_refusals": list(report.refusals) if report else [],
        "agrees_with_hand_batched": agrees,
        "sweep_variants_compiled": pb.stats(model).variants_compiled,
    }


def print_table(result: Dict[str, object]) -> None:
    print(f"\n== {result['sweep']} ({result['cells']} cells, chunk {result['chunk']}, width {result['width']})")
    print(f"{'peer':28s} {'total s':>9s} {'steady s':>9s} {'cells/s':>9s}  agrees")
    for name, steady in result["seconds_steady_state"].items():
        total = result["seconds_total_including_compile"][name]
        rate = result["cells_per_second_steady"][name]
        print(f"{name:28s} {total:9.2f} {steady:9.2f} {rate:9.0f}  {result['agrees_with_hook_loop'][name]}")
    for name, ratio in result["ratios"].items():
        print(f"{name:50s} {ratio:7.1f}x")
    print(f"pb.sweep compiled variants: {result['sweep_variants_compiled']}")


def _rank_sweep(
    rank: int, world: int, port: int, layers: int, positions: int, width: int, chunk: int, rounds: int, out: str
) -> None:
    """One rank of ``--ranks`` (world 1: the single-process baseline, no process group).

    With several ranks, after the cold sharded sweep: ``rounds`` interleaved rounds of (a) the
    whole sweep on rank 0 alone (``distributed=False``, the same program: all sites, one chunk
    shape) while the other ranks wait, then (b) the sharded sweep on every rank. Interleaving
    puts both under the same load from other processes; D1 is the median of the rounds' ratios.
    """
    import torch.distributed as dist
    from patch_backend._torch_compat.inductor import fx_graph_cache_counters
    from patch_backend.distributed import last_timings
    from patch_backend.sweep import last_sweep_report

    torch.set_num_threads(1)
    # D1 and D3 compare compiled sweeps: a sweep without ranks (rank 0 alone, the 1-rank
    # process) would otherwise stay on its vmapped eager tier (config.sweep_vmap), which ranks
    # do not use (they share the leader's compiled programs).
    pb.config.set("sweep_vmap", False)
    if os.environ.get("BENCH_SESSION_PER_RANK") == "1":
        # Linux's scheduler (autogroup) shares a busy machine's CPU between sessions, not
        # processes: ranks in the launcher's session split one session's share between them.
        os.setsid()
    if world > 1:
        os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=1800))
    model, corrupt, metric, _, _, cells = _layer_position_problem(layers, positions, width)
    compiled = torch.compile(model, backend="graphpatch")
    with torch.no_grad():
        compiled(corrupt)  # capture (Dynamo + the unpatched graph) is not part of the sweep's compile

    thread_cpu: List[float] = []

    def timed(
        distributed: bool = True, wait: bool = False, everyone: bool = False
    ) -> Tuple[float, float, float, object, torch.Tensor]:
        if world > 1:
            dist.barrier()
        start, cpu, main = time.perf_counter(), _cpu_seconds(), time.thread_time()
        values = None
        if distributed or rank == 0 or everyone:
            with torch.no_grad():
                values = pb.sweep(
                    compiled, (corrupt,), cells, metric, batch_size=chunk, progress=False, distributed=distributed
                )
        returned = time.perf_counter()
        if wait:
            # Under compile_policy "background" (the default) the cold sweep's chunks may run on
            # the eager tier while the worker compiles, and a sweep starts the compiles it asked
            # for only once it returns (it holds the worker's foreground): its compile ends here.
            pb.wait_for_compiles()
        waited = time.perf_counter() - returned
        wall, cpu = time.perf_counter() - start, _cpu_seconds() - cpu
        thread_cpu.append(time.thread_time() - main)
        timings = last_timings() if world > 1 and distributed else None
        # A rank's shard, and the compiles it left to the worker (counted with the shard: the
        # 1-rank baseline's wall clock counts them too).
        return wall, (timings.shard_seconds + waited if timings else wall), cpu, timings, values

    dynamo = _dynamo_seconds()
    variant_seconds = pb.stats(model).compile_seconds
    caches = fx_graph_cache_counters()
    cold_wall, cold_shard, cold_cpu, cold_timings, values = timed(wait=True)
    dynamo = _dynamo_seconds() - dynamo
    variant_seconds = pb.stats(model).compile_seconds - variant_seconds
    caches = {name: count - caches[name] for name, count in fx_graph_cache_counters().items()}
    shared = getattr(cold_timings, "share_seconds", 0.0)
    steady = [timed() for _ in range(2)]
    wall, shard, cpu, timings, _ = min(steady, key=lambda item: item[0])
    # What this process's steady sweep ran: its chunks' fan-out cuts (the 1-rank baseline and
    # the ranks together must run the same ones, at the same chunk size, for D1 to be fair).
    report = last_sweep_report()
    cuts = sorted({str(cut) for cut in report.cuts}) if report is not None else []
    interleaved = []
    if world > 1:
        # Rank 0 alone runs every chunk's program, some of which only other ranks ran so far:
        # compile them before the rounds, so that no round times a compile.
        timed(distributed=False, wait=True, everyone=True)
        for _ in range(rounds):
            alone_wall, _, alone_cpu, _, _ = timed(distributed=False)
            alone_thread = thread_cpu[-1]
            sharded_wall, _, sharded_cpu, sharded_timings, _ = timed()
            sharded_thread = thread_cpu[-1]
            # Every rank runs the whole sweep alone at once: its CPU seconds under the same
            # contention between the ranks as the sharded sweep's (on a loaded machine, CPU
            # seconds grow with contention too).
            _, _, contended_cpu, _, _ = timed(distributed=False, everyone=True)
            interleaved.append({"alone_wall": alone_wall, "alone_cpu": alone_cpu, "alone_thread_cpu": alone_thread,
                                "sharded_wall": sharded_wall, "sharded_cpu": sharded_cpu,
                                "sharded_thread_cpu": sharded_thread, "contended_alone_cpu": contended_cpu,
                                "sharded_timings": dataclasses.asdict(sharded_timings) if sharded_timings else None})
    mine = {
        "rank": rank,
        "cold_wall": cold_wall,
        # Waiting for the compiling rank (and loading what it compiled) is not compiling.
        "compile_seconds": cold_shard - shard - shared,
        "compile_seconds_with_waiting": cold_shard - shard,
        "waiting_for_leader_seconds": shared,
        "sharing": getattr(cold_timings, "sharing", "none"),
        "compile_cpu_seconds": cold_cpu - cpu,
        "variant_compile_seconds (pb.stats)": variant_seconds,
        "dynamo_seconds": dynamo,
        "fx_graph_cache": caches,
        "variants_compiled": pb.stats(model).variants_compiled,
        "steady_wall": wall,
        "steady_shard": shard,
        "steady_cpu": cpu,
        "steady_thread_cpu": min(thread_cpu[1:3]),
        "steady_cuts": cuts,
        "steady_chunk": report.chunk if report is not None else None,
        "timings": None if timings is None else dataclasses.asdict(timings),
        "interleaved": interleaved,
    }
    if world > 1:
        everyone: List[Optional[Dict[str, object]]] = [None] * world
        dist.all_gather_object(everyone, mine)
        dist.destroy_process_group()
    else:
        everyone = [mine]
    if rank == 0:
        torch.save({"ranks": everyone, "values": values, "cells": len(cells)}, out)


def _coordination_cpu(ranks: List[Dict[str, object]], round_: int) -> float:
    """Of the busiest rank's CPU seconds in one sharded round, the percentage spent outside its
    shard (planning, agreeing, status, gather: ``Timings.cpu_seconds``)."""
    phases = [rank["interleaved"][round_]["sharded_timings"]["cpu_seconds"] for rank in ranks]  # type: ignore[index]
    busiest = max(phases, key=sum)
    return 100 * (sum(busiest) - busiest[2]) / sum(busiest)


def _coordination_wall(ranks: List[Dict[str, object]], round_: int) -> float:
    """D2 of one sharded round: of the sweep's wall time (the last rank to return), the
    percentage that is not the slowest rank's shard (planning, the agreement, the status and
    rows exchange, restoring cell order, and waiting for a slower rank in them)."""
    walls = [rank["interleaved"][round_]["sharded_wall"] for rank in ranks]  # type: ignore[index]
    shards = [rank["interleaved"][round_]["sharded_timings"]["shard_seconds"] for rank in ranks]  # type: ignore[index]
    return 100 * (max(walls) - max(shards)) / max(walls)


def _phase_ms(ranks: List[Dict[str, object]], name: str) -> List[float]:
    """Per rank, the median over the sharded rounds of one ``Timings`` field, in ms."""
    return [
        1e3 * statistics.median(entry["sharded_timings"][name] for entry in rank["interleaved"])  # type: ignore[index]
        for rank in ranks
    ]


def _coordination_cpu_seconds(ranks: List[Dict[str, object]], round_: int) -> float:
    """Of the busiest rank's CPU seconds in one sharded round, those outside its shard."""
    phases = [rank["interleaved"][round_]["sharded_timings"]["cpu_seconds"] for rank in ranks]  # type: ignore[index]
    busiest = max(phases, key=sum)
    return sum(busiest) - busiest[2]


def _dynamo_seconds() -> float:
    """Seconds Dynamo spent compiling frames in this process (tracing plus its backend call)."""
    return sum(torch._dynamo.utils.compilation_time_metrics.get("_compile.compile_inner", []))


def _cpu_seconds() -> float:
    """CPU seconds of this process and of its finished children (the C++ compiler Inductor runs)."""
    import resource

    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_ranks(
    ranks: int, layers: int, positions: int, width: int, chunk: int, share: str = "auto", rounds: int = 3,
    session_per_rank: bool = False,
) -> Dict[str, object]:
    """1 rank, then ``ranks`` ranks, each in fresh processes with a fresh Inductor cache directory."""
    import torch.multiprocessing as mp

    runs = {}
    # Inductor compiles in this process, not in a pool of workers: one core per rank, and
    # time.process_time() sees all of the compile's CPU seconds.
    os.environ["TORCHINDUCTOR_COMPILE_THREADS"] = "1"
    os.environ["PATCH_BACKEND_COMPILE_SHARING"] = share
    os.environ["BENCH_SESSION_PER_RANK"] = "1" if session_per_rank else "0"
    for world in (1, ranks):
        with tempfile.TemporaryDirectory(prefix="bench_ranks_") as scratch:
            # Every rank of this configuration shares one cache directory (docs/scaling.md).
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(scratch, "inductor")
            out = os.path.join(scratch, "result.pt")
            args = (world, _free_port(), layers, positions, width, chunk, rounds, out)
            mp.spawn(_rank_sweep, args=args, nprocs=world, join=True)
            runs[world] = torch.load(out)
    one, many = runs[1], runs[ranks]
    single = one["ranks"][0]
    cells = one["cells"]
    wall = max(rank["steady_wall"] for rank in many["ranks"])
    slowest_shard = max(rank["steady_shard"] for rank in many["ranks"])
    fastest_shard = min(rank["steady_shard"] for rank in many["ranks"])
    compile_summed = sum(rank["compile_seconds"] for rank in many["ranks"])
    compile_cpu_summed = sum(rank["compile_cpu_seconds"] for rank in many["ranks"])
    variant_summed = sum(rank["variant_compile_seconds (pb.stats)"] for rank in many["ranks"])
    leader = many["ranks"][0]["interleaved"]
    rounds_d1 = [
        entry["alone_wall"] / max(other["interleaved"][k]["sharded_wall"] for other in many["ranks"])
        for k, entry in enumerate(leader)
    ]
    rounds_cpu = [
        entry["alone_cpu"] / max(other["interleaved"][k]["sharded_cpu"] for other in many["ranks"])
        for k, entry in enumerate(leader)
    ]
    return {
        "sweep": f"{layers} layers x {positions} positions, width {width}",
        "cells": cells,
        "chunk": chunk,
        "ranks": ranks,
        "threads_per_rank": 1,
        "session_per_rank": session_per_rank,
        "compile_sharing": many["ranks"][-1]["sharing"],
        "load average (1 min) at the end": os.getloadavg()[0],
        "D1 throughput ratio (excluding compile, interleaved rounds, median)": statistics.median(rounds_d1),
        "D1 per round": rounds_d1,
        "D1 throughput ratio (excluding compile, separate 1-rank process)": single["steady_wall"] / wall,
        "cells_per_second_1_rank": cells / single["steady_wall"],
        f"cells_per_second_{ranks}_ranks": cells / wall,
        # What D1 would be with a core per rank: the busiest rank's CPU seconds against the
        # single rank's. Other processes on the machine lower the wall-clock ratio, not this one.
        "CPU-seconds ratio (rank 0 alone / busiest rank, interleaved, median)": statistics.median(rounds_cpu),
        "D1_cpu (CPU seconds: rank 0 alone / busiest rank, interleaved, median)": statistics.median(rounds_cpu),
        "D1_cpu per round": rounds_cpu,
        "D1_cpu contention-matched (every rank alone at once / busiest rank sharded, median over ranks and rounds)":
        statistics.median(
            rank["interleaved"][k]["contended_alone_cpu"]
            / max(other["interleaved"][k]["sharded_cpu"] for other in many["ranks"])
            for rank in many["ranks"] for k in range(len(leader))
        ),
        "D1_cpu (CPU seconds: separate 1-rank process / busiest rank, steady)": single["steady_cpu"]
        / max(rank["steady_cpu"] for rank in many["ranks"]),
        "D2_cpu coordination % of the busiest rank's sweep CPU seconds (interleaved, median)": statistics.median(
            _coordination_cpu(many["ranks"], k) for k in range(len(leader))
        ),
        "D2 coordination overhead % of sweep time (interleaved rounds, median)": statistics.median(
            _coordination_wall(many["ranks"], k) for k in range(len(leader))
        ),
        "D2 per round": [_coordination_wall(many["ranks"], k) for k in range(len(leader))],
        "D2 coordination overhead % of sweep time (steady sweeps)": 100 * (wall - slowest_shard) / wall,
        # Where the coordination goes, per rank (median over the rounds, wall ms): planning (cell
        # costs, site set, fingerprint), the agreement (step 2, with waiting for the slower
        # rank's planning), the status and rows exchange (step 4, with waiting for the slower
        # shard), restoring cell order.
        "plan ms per rank": _phase_ms(many["ranks"], "plan_seconds"),
        "agreement ms per rank": _phase_ms(many["ranks"], "agree_seconds"),
        "status and rows exchange ms per rank": _phase_ms(many["ranks"], "status_seconds"),
        "restore ms per rank": _phase_ms(many["ranks"], "gather_seconds"),
        "coordination CPU ms of the busiest rank (plan, agree, status, restore; median)": statistics.median(
            1e3 * _coordination_cpu_seconds(many["ranks"], k) for k in range(len(leader))
        ),
        "collectives per steady sharded sweep (per rank)": [
            (rank["interleaved"][-1]["sharded_timings"] or {}).get("collectives") for rank in many["ranks"]
        ] if leader else None,
        "bytes pickled per steady sharded sweep (per rank)": [
            (rank["interleaved"][-1]["sharded_timings"] or {}).get("pickled_bytes") for rank in many["ranks"]
        ] if leader else None,
        "bytes sent in all_gathers per steady sharded sweep (per rank)": [
            (rank["interleaved"][-1]["sharded_timings"] or {}).get("sent_bytes") for rank in many["ranks"]
        ] if leader else None,
        "shard imbalance % (slowest vs fastest shard)": 100 * (slowest_shard - fastest_shard) / slowest_shard,
        "compile_seconds_1_rank": single["compile_seconds"],
        f"compile_seconds_summed_{ranks}_ranks": compile_summed,
        "D3 compile seconds ratio (summed over ranks / 1 rank)": compile_summed / single["compile_seconds"],
        # The compiling rank does what a single rank does (the same program, compiled cold), in
        # the same run and under the same load: the ratio to it is not disturbed by the load
        # changing between the 1-rank and the N-rank runs.
        "D3 compile CPU-seconds ratio (summed over ranks / the compiling rank's, same run)": compile_cpu_summed
        / max(rank["compile_cpu_seconds"] for rank in many["ranks"]),
        "D3 compile seconds ratio (summed over ranks / the compiling rank's, same run)": compile_summed
        / max(rank["compile_seconds"] for rank in many["ranks"]),
        "cold sweep wall seconds (1 rank, N ranks)": [single["cold_wall"], max(r["cold_wall"] for r in many["ranks"])],
        "compile_cpu_seconds_1_rank": single["compile_cpu_seconds"],
        f"compile_cpu_seconds_summed_{ranks}_ranks": compile_cpu_summed,
        "D3 compile CPU-seconds ratio (summed over ranks / 1 rank)": compile_cpu_summed / single["compile_cpu_seconds"],
        "variant compile seconds (pb.stats) 1 rank": single["variant_compile_seconds (pb.stats)"],
        f"variant compile seconds (pb.stats) summed {ranks} ranks": variant_summed,
        "D3 variant compile seconds ratio (pb.stats, summed / 1 rank)": variant_summed
        / single["variant_compile_seconds (pb.stats)"],
        "waiting for the compiling rank, s (per rank)": [rank["waiting_for_leader_seconds"] for rank in many["ranks"]],
        "variants compiled per rank": [rank["variants_compiled"] for rank in many["ranks"]],
        "one-cell checks per rank in a steady sharded sweep": [
            (rank["timings"] or {}).get("checks") for rank in many["ranks"]
        ],
        # The 1-rank baseline and the ranks do the same work: the same chunk size and the same
        # fan-out cuts (each chunk's program), split between the ranks.
        "same chunk and fan-out cuts as 1 rank": single["steady_chunk"] == chunk
        and all(rank["steady_chunk"] == chunk for rank in many["ranks"])
        and sorted({cut for rank in many["ranks"] for cut in rank["steady_cuts"]}) == single["steady_cuts"],
        "agrees_with_1_rank": bool(torch.allclose(many["values"], one["values"], atol=1e-4)),
        "per_rank": many["ranks"],
        "baseline": single,
    }


def main() -> List[Dict[str, object]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=64, help="cells per batched forward")
    parser.add_argument("--quick", action="store_true", help="only the 4 x 16 sweep")
    parser.add_argument("--json", default=None)
    parser.add_argument("--ranks", type=int, default=None, help="sharded sweep on N gloo ranks vs 1 rank")
    parser.add_argument("--layers", type=int, default=6, help="with --ranks")
    parser.add_argument("--positions", type=int, default=64, help="with --ranks")
    parser.add_argument("--share", default="auto", choices=("auto", "cache", "broadcast", "none"),
                        help="with --ranks: how ranks share compiles (pb.config.compile_sharing)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="interleaved rounds: with --ranks 1-rank/N-rank rounds (default 3), with --s1 (default 5)")
    parser.add_argument(
        "--session-per-rank", action="store_true",
        help="with --ranks: each rank in its own session, so that on a machine other jobs keep busy, Linux's "
        "autogroup scheduler gives each rank a session's share of the CPU (docs/scaling.md)",
    )
    parser.add_argument("--s1", action="store_true",
                        help="issue 14's S1/S2: 12 layers x 32 positions, width 256, interleaved rounds vs hand-batched")
    parser.add_argument("--threads", type=int, default=None, help="with --s1 (default: torch's default)")
    options = parser.parse_args()
    if options.s1:
        if os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:
            # RSS must follow live tensors (see PeakRSS): re-execute with a fixed mmap threshold.
            os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
            os.execv(sys.executable, [sys.executable] + sys.argv)
        layers = options.layers if options.layers != 6 else 12
        positions = options.positions if options.positions != 64 else 32
        width = options.width if options.width != 64 else 256
        result = run_s1(layers, positions, width, options.chunk, options.rounds or 5, options.threads)
        result["device"] = "cpu"
        for name, value in result.items():
            print(f"{name:72s} {value:.3f}" if isinstance(value, float) else f"{name:72s} {value}")
        if options.json:
            write_json(options.json, [result])
        return [result]
    if options.ranks:
        result = run_ranks(
            options.ranks, options.layers, options.positions, options.width, options.chunk, options.share,
            options.rounds or 3, options.session_per_rank,
        )
        result["device"] = "cpu (gloo)"
        for name, value in result.items():
            if name not in ("per_rank", "baseline"):
                print(f"{name:55s} {value:.3f}" if isinstance(value, float) else f"{name:55s} {value}")
        if options.json:
            write_json(options.json, [result])
        return [result]
    torch._inductor.config.fx_graph_cache = False
    sweeps: List[Tuple[int, int]] = [(4, 16)] if options.quick else [(4, 16), (6, 64)]
    results = []
    for layers, positions in sweeps:
        result = run_sweep(layers, positions, options.width, options.device, options.chunk)
        result["device"] = device_name(options.device)
        print_table(result)
        results.append(result)
    if options.json:
        write_json(options.json, results)
    return results


if __name__ == "__main__":
    main()
