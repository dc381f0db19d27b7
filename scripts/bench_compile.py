"""Compile cost of patching (issue 10, targets T1-T7) on GPT-2 shapes with random weights.

    python scripts/bench_compile.py [--layers 4 12] [--width 256 --heads 4 --seq 32]
                                    [--device cpu] [--json out/bench_compile.json]

Every figure comes from a fresh child process with its own empty ``TORCHINDUCTOR_CACHE_DIR``
(cold), except the warm-cache rerun, which reuses the first graphpatch child's directory:

* ``inductor``: eager forward, ``backend="inductor"`` first call and steady forward.
* ``graphpatch``: the first plain call, a new single-site structure (first call, compile
  seconds), the same site in another layer, steady forwards unpatched and patched.
* ``graphpatch warm``: the same in a second process whose on-disk caches are warm (T7).
  "compile seconds" (both children) is ``region_report().compile_seconds``: the wall time of
  every Inductor ``compile_fn`` call of a region (or whole graph) this process had not compiled
  yet, hit or miss in torch's on-disk caches. It includes the process's one-time Inductor
  start-up inside its first region (imports, hashing Inductor's sources, the C++ header check),
  paid by both children; it excludes Dynamo's capture and ``compile_regional``'s fake-tensor
  propagation and region keys, which run outside ``compile_fn`` (docs/performance.md, "T7:
  what a warm process spends"). ``cache counters`` say what was served from disk.
* ``sweep``: a one-off pb.sweep over every layer x position and the forward-hook loop it
  replaces, everything included (T6); then the same sweep on compiled programs (T5).
* ``steady``: ``backend="inductor"`` and graphpatch (unpatched, patched at one site) at batch
  8 x 128 tokens in one process, timed in turns (T4).

The dispatcher compiles through ``compile_regional`` (``config.regional_compile``). Targets are
ratios of figures measured in this run on this machine. ``--policy`` is the children's
``compile_policy`` (default ``background``, the library's default): first calls then return on the
eager tier, and compile seconds are read after ``pb.wait_for_compiles()``. ``--kinds`` runs a
subset of the children (a loaded machine); targets whose children did not run are left out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
ROUTING = "the dispatcher compiles through program.regions.compile_regional"
#: The children, and the cache folder each uses (the warm rerun reuses the first graphpatch one's).
KINDS = {"inductor": "inductor", "graphpatch": "graphpatch", "graphpatch warm": "graphpatch", "sweep": "sweep",
         "steady": "steady"}


def median_seconds(fn: Callable[[], Any], repeats: int, device: str) -> float:
    from bench_util import sync

    fn()
    samples = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def timed(fn: Callable[[], Any], device: str) -> float:
    from bench_util import sync

    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


# -- children ---------------------------------------------------------------------------------------
def child(kind: str, args: argparse.Namespace) -> Dict[str, Any]:
    import torch

    sys.path.insert(0, HERE)
    import patch_backend as pb
    from patch_backend import AddPatch
    from patch_backend._torch_compat.inductor import fx_graph_cache_counters
    from patch_backend.program.regions import region_report
    from patch_backend.sweep import last_sweep_report
    from sweep_common import answer_metric, clean_and_corrupt, clean_block_outputs, gpt2, hook_loop, sweep_cells

    device, layers = args.device, args.layers[0]
    torch.set_grad_enabled(False)
    model = gpt2(layers, args.width, args.heads, 1024, args.seq, device)
    ids = torch.randint(0, 1024, (1, args.seq), generator=torch.Generator().manual_seed(0)).to(device)
    result: Dict[str, Any] = {}
    if kind == "inductor":
        result["eager forward"] = median_seconds(lambda: model(ids), args.repeats, device)
        compiled = torch.compile(model, backend="inductor")
        result["inductor first call"] = timed(lambda: compiled(ids), device)
        result["inductor forward"] = median_seconds(lambda: compiled(ids), args.repeats, device)
        return result
    if kind in ("graphpatch", "graphpatch warm"):
        compiled = torch.compile(model, backend="graphpatch")
        result["plain first call"] = timed(lambda: compiled(ids), device)
        # Under "background" the first calls run eagerly while the plain program compiles.
        start = time.perf_counter()
        while not pb.wait_for_compiles(timeout=0):
            compiled(ids)
        result["plain compile ready after first call"] = time.perf_counter() - start
        result["plain compile seconds"] = region_report().compile_seconds
        result["graphpatch forward"] = median_seconds(lambda: compiled(ids), args.repeats, device)
        site = f"transformer.h_{layers // 2}.mlp.act.mul_1"
        patches = {site: AddPatch(value=0.5)}

        def patched():
            with pb.patch(compiled, patches):
                return compiled(ids)

        before = region_report().compile_seconds
        cpu = time.thread_time()
        result["new structure first call"] = timed(patched, device)
        # CPU seconds of the calling thread alone (intra-op helper threads excluded): less
        # sensitive to a loaded machine than the wall-clock figure T1 uses.
        result["new structure first call thread s"] = time.thread_time() - cpu
        result["new structure first call ran beside its compile"] = not pb.wait_for_compiles(timeout=0)
        pb.wait_for_compiles()
        result["new structure compile seconds"] = region_report().compile_seconds - before
        other = {f"transformer.h_{layers // 2 - 1}.mlp.act.mul_1": AddPatch(value=0.5)}
        before, compiles = region_report().compile_seconds, region_report().compiles

        def other_layer():
            with pb.patch(compiled, other):
                return compiled(ids)

        result["same site other layer first call"] = timed(other_layer, device)
        pb.wait_for_compiles()
        result["same site other layer region compiles"] = region_report().compiles - compiles
        result["graphpatch patched forward"] = median_seconds(patched, args.repeats, device)
        result["eager forward"] = median_seconds(lambda: model(ids), args.repeats, device)
        cpu = time.thread_time()
        for _ in range(args.repeats):
            model(ids)
        result["eager forward thread s"] = (time.thread_time() - cpu) / args.repeats
        report = region_report()
        result["compile seconds"] = report.compile_seconds
        result["region compiles"] = report.compiles
        result["compile seconds per region"] = report.seconds_by_label()
        result["cache counters"] = fx_graph_cache_counters()
        result["tiers"] = {name: getattr(pb.stats(compiled), name)
                           for name in ("plain_eager_calls", "eager_calls", "compiled_calls", "compile_failures")}
        return result
    if kind == "steady":
        # T4 at batch 8 x 128 tokens: Inductor and graphpatch in one process, timed in turns.
        import copy

        big = gpt2(layers, args.width, args.heads, 1024, max(args.steady_seq, args.seq), device)
        tokens = torch.randint(0, 1024, (args.steady_batch, args.steady_seq),
                               generator=torch.Generator().manual_seed(0)).to(device)
        inductor = torch.compile(copy.deepcopy(big), backend="inductor", dynamic=False)
        patched_model = torch.compile(copy.deepcopy(big), backend="graphpatch", dynamic=False)
        patches = {f"transformer.h_{layers // 2}.mlp.act.mul_1": AddPatch(value=0.5)}

        def patched():
            with pb.patch(patched_model, patches):
                return patched_model(tokens)

        calls = {"inductor": lambda: inductor(tokens), "graphpatch": lambda: patched_model(tokens),
                 "graphpatch patched": patched}
        for fn in calls.values():
            fn()
            fn()
        # Steady state: the patched program compiled (under "background" its first calls ran on
        # the eager tier, and its compile would otherwise run beside the timed calls).
        pb.wait_for_compiles()
        samples: Dict[str, List[float]] = {name: [] for name in calls}
        for _ in range(args.repeats):
            for name, fn in calls.items():
                samples[name].append(timed(fn, device))
        for name, values in samples.items():
            result[f"{name} forward {args.steady_batch}x{args.steady_seq}"] = statistics.median(values)
        return result
    if kind == "sweep":
        clean, corrupt = clean_and_corrupt(1024, args.seq, device=device)
        answer = int(model(clean).logits[0, -1].argmax())
        metric = answer_metric(answer)
        states = clean_block_outputs(model, clean)
        grid = [(layer, position) for layer in range(layers) for position in range(args.seq)]
        cells = sweep_cells(states, grid)
        start = time.perf_counter()
        hooks = hook_loop(model, corrupt, states, grid, metric)
        result["forward-hook loop"] = time.perf_counter() - start
        compiles = region_report().compiles
        start = time.perf_counter()
        compiled = torch.compile(model, backend="graphpatch")
        swept = pb.sweep(compiled, (corrupt,), cells, metric, batch_size=args.sweep_batch, progress=False)
        result["one-off sweep"] = time.perf_counter() - start
        # The results are in; compiles the sweep started may still run (not part of the figure).
        pb.wait_for_compiles()
        result["sweep compiles done after"] = time.perf_counter() - start
        result["sweep tiers"] = {name: getattr(pb.stats(compiled), name)
                                 for name in ("plain_eager_calls", "eager_calls", "compiled_calls")}
        report = last_sweep_report()
        result["sweep chunks vmapped"] = report.vmapped if report is not None else 0
        # T5 counts what the sweep's *compiled* programs cost: a one-off sweep that stayed on the
        # vmapped eager tier compiled none, so the same sweep runs again with every chunk on the
        # K·B program (sweep_vmap=False), compiled on the worker.
        with pb.config.patch(sweep_vmap=False):
            again = pb.sweep(compiled, (corrupt,), cells, metric, batch_size=args.sweep_batch, progress=False)
        pb.wait_for_compiles()
        result["compiled-path sweep agrees"] = bool(torch.allclose(again, swept, atol=1e-4))
        history = region_report().history[compiles:]
        result["sweep region compiles"] = len(history)
        result["sweep block variants compiled"] = sum(1 for entry in history if entry.label.endswith("[*]"))
        result["sweep regions compiled"] = [entry.label for entry in history]
        result["sweep agrees with hooks"] = bool(torch.allclose(swept.reshape(hooks.shape), hooks, atol=1e-4))
        return result
    raise ValueError(f"unknown child {kind!r}")


def spawn(kind: str, layers: int, cache_dir: str, argv: List[str], policy: str) -> Dict[str, Any]:
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache_dir, PYTHONPATH=ROOT, PATCH_BACKEND_COMPILE_POLICY=policy)
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--child", kind, "--layers", str(layers), *argv],
        env=env, capture_output=True, text=True,
    )
    if done.returncode != 0:
        raise RuntimeError(f"child {kind} ({layers} layers) failed:\n{done.stderr[-4000:]}")
    line = next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))
    result = json.loads(line[len("RESULT "):])
    result["process seconds"] = time.perf_counter() - start
    return result


def targets(layers: int, measured: Dict[str, Dict[str, Any]]) -> Dict[str, Any]:
    """The T1-T7 ratios from the children's figures (also usable on a saved --json's "measured");
    a target whose children did not run (``--kinds``) is left out."""
    ind, gp = measured.get("inductor"), measured.get("graphpatch")
    warm, sw, st = measured.get("graphpatch warm"), measured.get("sweep"), measured.get("steady")
    ratios: Dict[str, Any] = {}
    if gp is not None:
        ratios["T1 new-structure first call / eager forward (target <= 3)"] = (
            gp["new structure first call"] / gp["eager forward"])
    if ind is not None and gp is not None:
        inductor_compile = ind["inductor first call"] - ind["inductor forward"]
        # Everything the new structure's first call spends beyond a patched forward.
        ratios["T2 new-structure first-call overhead s / full inductor compile s (target <= 0.1)"] = (
            (gp["new structure first call"] - gp["graphpatch patched forward"]) / inductor_compile)
        ratios["T2' new-structure region compile s / full inductor compile s"] = (
            gp["new structure compile seconds"] / inductor_compile)
        ratios["T3 plain first call / inductor first call (target <= 0.4)"] = (
            gp["plain first call"] / ind["inductor first call"])
    if st is not None:
        shape = next(key for key in st if key.startswith("inductor forward ")).split()[-1]
        base = st[f"inductor forward {shape}"]
        ratios["T4 unpatched forward / inductor forward (target <= 1.05)"] = st[f"graphpatch forward {shape}"] / base
        ratios["T4 patched forward / inductor forward (target <= 1.05)"] = (
            st[f"graphpatch patched forward {shape}"] / base)
    if sw is not None:
        ratios["T5 block variants compiled by the sweep (target <= 2)"] = sw["sweep block variants compiled"]
        ratios["T6 one-off sweep / forward-hook loop (target < 1)"] = sw["one-off sweep"] / sw["forward-hook loop"]
    if warm is not None and gp is not None:
        ratios["T7 warm-process compile s / first-process compile s (target <= 0.2)"] = (
            warm["compile seconds"] / gp["compile seconds"])
    return {"layers": layers, "targets": ratios, "measured": measured}


def main() -> Any:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, nargs="+", default=[4, 12])
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--sweep-batch", type=int, default=64)
    parser.add_argument("--steady-batch", type=int, default=8)
    parser.add_argument("--steady-seq", type=int, default=128)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default=None)
    parser.add_argument("--policy", default="background", choices=("background", "sync", "never"))
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=list(KINDS))
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        sys.path.insert(0, ROOT)
        print("RESULT " + json.dumps(child(args.child, args)))
        return None
    sys.path.insert(0, HERE)
    from bench_util import device_name, write_json

    argv = ["--width", str(args.width), "--heads", str(args.heads), "--seq", str(args.seq), "--repeats",
            str(args.repeats), "--sweep-batch", str(args.sweep_batch), "--steady-batch", str(args.steady_batch),
            "--steady-seq", str(args.steady_seq), "--device", args.device]
    runs = []
    for layers in args.layers:
        measured: Dict[str, Dict[str, Any]] = {}
        with tempfile.TemporaryDirectory() as scratch:
            for kind in args.kinds:
                measured[kind] = spawn(kind, layers, os.path.join(scratch, KINDS[kind]), argv, args.policy)
                print(f"[{layers} layers] {kind}: {measured[kind]['process seconds']:.1f} s", file=sys.stderr)
        run = targets(layers, measured)
        runs.append(run)
        print(f"\n{layers} layers, width {args.width}, {args.heads} heads, {args.seq} tokens, {device_name(args.device)}")
        for name, value in run["targets"].items():
            print(f"  {name}: {value:.3f}" if isinstance(value, float) else f"  {name}: {value}")
    result = {"device": device_name(args.device), "note": ROUTING, "compile_policy": args.policy, "runs": runs}
    print(f"\n({ROUTING}; compile_policy {args.policy})")
    if args.json:
        write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
