"""Patching overhead on a GPT-2-shaped model with random weights (one process, one table).

    python scripts/bench_patching.py [--layers 4 --width 256 --batch 8 --seq 128 --device cpu]
                                     [--json out/bench_patching.json]
    python scripts/bench_patching.py --router [--profile out/router.prof] [--count 20]

Rows: eager, eager + forward hook, graphpatch_eager patched, Inductor, graphpatch unpatched,
graphpatch patched at an MLP output and at an op inside the MLP activation; plus compile
seconds. Ratios are what to compare: they are measured in this process on this machine.

``--router`` measures the router's cost alone: a loop of ``pb.patch``'d forwards with a new
value every call against the unpatched compiled loop of the same model, at a size where host
work shows (GPT-2 shape, 4 layers, width 256, batch 1, 16 tokens); ``--profile`` writes a
cProfile of the patched loop.

"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from typing import Callable, Dict, Optional

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import patch_backend as pb  # noqa: E402
from bench_util import device_name, sync, write_json  # noqa: E402
from patch_backend import AddPatch  # noqa: E402


def gpt2(layers: int, width: int, heads: int, seq: int, device: str):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        n_layer=layers, n_embd=width, n_head=heads, vocab_size=1024, n_positions=max(seq, 64),
        bos_token_id=0, eos_token_id=0,
    )
    torch.manual_seed(0)
    return GPT2LMHeadModel(config).eval().to(device)



def interleaved(calls: Dict[str, Callable[[], object]], device: str, repeats: int) -> Dict[str, float]:
    """Median seconds per call, timing the contenders in turns so machine drift hits all alike."""
    samples = interleaved_samples(calls, device, repeats)
    return {name: statistics.median(values) for name, values in samples.items()}


def interleaved_samples(
    calls: Dict[str, Callable[[], object]], device: str, repeats: int, cpu: Optional[Dict[str, list]] = None
) -> Dict[str, list]:
    """Seconds of each call, ``repeats`` times, the contenders timed in turns; ``cpu`` (when
    given) gets the calling thread's CPU seconds of each sample."""
    for fn in calls.values():
        for _ in range(2):
            fn()
    samples: Dict[str, list] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, fn in calls.items():
            sync(device)
            start, start_cpu = time.perf_counter(), time.thread_time()
            fn()
            sync(device)
            samples[name].append(time.perf_counter() - start)
            if cpu is not None:
                cpu[name].append(time.thread_time() - start_cpu)
    return samples


def _patched(compiled, patch_map, ids) -> Callable[[], object]:
    def run():
        with pb.patch(compiled, patch_map):
            return compiled(ids)

    return run


def first_call_seconds(fn: Callable[[], object], device: str) -> float:
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def router_cost(options: argparse.Namespace) -> Dict[str, object]:
    """Patched forwards with a new value each call vs unpatched compiled forwards, same model.

    At 16 tokens and batch 1 the kernels take about a millisecond on CPU, so the ratio is the
    host work of ``pb.patch`` plus the dispatcher's routing per call. Each sample times a loop
    of ``--loop`` calls, the two loops alternating so drift hits both alike.
    """
    torch._inductor.config.fx_graph_cache = False
    pb.config.set("compile_policy", "sync")  # routing is measured, not compiling
    device = options.device
    torch.set_grad_enabled(False)
    if options.threads:  # before compiling: the programs are compiled under the loops' setting
        torch.set_num_threads(options.threads)
    model = gpt2(options.layers, options.width, options.heads, options.seq, device)
    ids = torch.randint(0, 1024, (options.batch, options.seq), device=device)
    site = f"transformer.h_{options.layers // 2}.mlp.output"
    compiled = torch.compile(model, backend="graphpatch")
    compiled(ids)
    values = [torch.randn(options.width, device=device) for _ in range(8)]
    with pb.patch(compiled, {site: AddPatch(value=values[0])}):
        compiled(ids)  # compiles the variant: the loop measures routing, not compiling
    loop = options.loop

    def unpatched():
        for _ in range(loop):
            compiled(ids)

    def patched():
        for step in range(loop):
            with pb.patch(compiled, {site: AddPatch(value=values[step % 8])}):
                compiled(ids)

    calls = {"unpatched": unpatched, "patched, new value each call": patched}
    cpu: Dict[str, list] = {name: [] for name in calls}
    samples = interleaved_samples(calls, device, options.repeats, cpu)
    # The median, and the minimum: on a shared machine the fastest sample is the one least
    # disturbed by other processes, so it is the steadier estimate of the work itself.
    rows = {name: statistics.median(values) for name, values in samples.items()}
    fastest = {name: min(values) for name, values in samples.items()}
    per_call = {name: seconds / loop * 1e3 for name, seconds in rows.items()}
    ratio = rows["patched, new value each call"] / rows["unpatched"]
    ratio_fastest = fastest["patched, new value each call"] / fastest["unpatched"]
    if options.profile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.runcall(patched)
        os.makedirs(os.path.dirname(options.profile) or ".", exist_ok=True)
        profiler.dump_stats(options.profile)
    stats = pb.stats(compiled)
    result = {
        "config": vars(options) | {"torch": torch.__version__, "device_name": device_name(device)},
        "milliseconds_per_forward": per_call,
        "ratio patched / unpatched": ratio,
        "ratio patched / unpatched, fastest samples": ratio_fastest,
        "host milliseconds per patched call": per_call["patched, new value each call"] - per_call["unpatched"],
        "variants_compiled": stats.variants_compiled,
    }
    print(f"config: {result['config']}")
    for name, ms in per_call.items():
        print(f"{name:48s} {ms:10.3f} ms")
    print(f"{'ratio patched / unpatched (medians)':48s} {ratio:10.3f}")
    print(f"{'ratio patched / unpatched (fastest samples)':48s} {ratio_fastest:10.3f}")
    print(f"patched variants compiled: {stats.variants_compiled}")
    cpu_rows = {name: statistics.median(values) for name, values in cpu.items()}
    result["thread cpu milliseconds per forward"] = {name: seconds / loop * 1e3 for name, seconds in cpu_rows.items()}
    result["ratio patched / unpatched, thread cpu (medians)"] = cpu_rows["patched, new value each call"] / cpu_rows["unpatched"]
    for name, seconds in cpu_rows.items():
        print(f"{'thread cpu: ' + name:48s} {seconds / loop * 1e3:10.3f} ms")
    print(f"{'ratio patched / unpatched (thread cpu, medians)':48s} {result['ratio patched / unpatched, thread cpu (medians)']:10.3f}")
    if options.count:
        counted = {name: count_opcodes(lambda: compiled(ids), options.count) for name in ("unpatched",)}
        step = iter(range(10**9))

        def one_patched() -> None:
            with pb.patch(compiled, {site: AddPatch(value=values[next(step) % 8])}):
                compiled(ids)

        counted["patched, new value each call"] = count_opcodes(one_patched, options.count)
        beyond = counted["patched, new value each call"] - counted["unpatched"]
        result["python opcodes per forward"] = counted
        result["python opcodes per patched call beyond an unpatched one"] = beyond
        for name, number in counted.items():
            print(f"{'opcodes: ' + name:48s} {number:10.0f}")
        print(f"{'opcodes per patched call beyond unpatched':48s} {beyond:10.0f}")
    if options.json:
        write_json(options.json, result)
    return result


def count_opcodes(fn: Callable[[], object], calls: int) -> float:
    """Python opcodes executed per call of ``fn`` (every thread-local frame, torch's included),
    counted with ``sys.settrace``: the same on a loaded machine as on a quiet one."""
    executed = [0]

    def tracer(frame, event, arg):  # noqa: ANN001 - sys.settrace's signature
        if event == "call":
            frame.f_trace_opcodes = True
        elif event == "opcode":
            executed[0] += 1
        return tracer

    fn()
    sys.settrace(tracer)
    try:
        for _ in range(calls):
            fn()
    finally:
        sys.settrace(None)
    return executed[0] / calls


def main() -> Dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default=None, help="write the results here as JSON")
    parser.add_argument("--router", action="store_true", help="the router-cost case (defaults: batch 1, 16 tokens)")
    parser.add_argument("--loop", type=int, default=50, help="--router: calls per timed sample")
    parser.add_argument("--profile", default=None, help="--router: write a cProfile of the patched loop here")
    parser.add_argument("--threads", type=int, default=0, help="--router: torch threads (0: torch's default)")
    parser.add_argument("--count", type=int, default=0, help="--router: count the Python opcodes of this many calls")
    options = parser.parse_args()
    if options.router:
        if "--batch" not in sys.argv:
            options.batch = 1
        if "--seq" not in sys.argv:
            options.seq = 16
        return router_cost(options)

    # The rows time compiled programs, and "compile seconds" the first call's compile: patched
    # programs compile in the call that first needs them, not in the background (config.py).
    pb.config.set("compile_policy", "sync")
    # Compile times must not come from Inductor's on-disk cache of an earlier run, and the
    # first compile in a process pays one-time imports/warm-up that belong to neither side.
    torch._inductor.config.fx_graph_cache = False
    device = options.device
    warmup = torch.compile(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU()).to(device))
    warmup(torch.randn(2, 8, device=device))
    model = gpt2(options.layers, options.width, options.heads, options.seq, device)
    ids = torch.randint(0, 1024, (options.batch, options.seq), device=device)
    layer = options.layers // 2
    mlp_site = f"transformer.h_{layer}.mlp.output"
    delta = torch.full((options.width,), 0.1, device=device)
    calls: Dict[str, Callable[[], object]] = {}
    torch.set_grad_enabled(False)

    calls["eager"] = lambda: model(ids)

    hooked = copy.deepcopy(model)
    hooked.transformer.h[layer].mlp.register_forward_hook(lambda m, a, out: out + delta)
    calls["eager + forward hook"] = lambda: hooked(ids)

    eager_gp = torch.compile(copy.deepcopy(model), backend="graphpatch_eager")
    eager_gp(ids)
    calls["graphpatch_eager patched"] = _patched(eager_gp, {mlp_site: AddPatch(value=delta)}, ids)

    inductor = torch.compile(copy.deepcopy(model), backend="inductor")
    inductor_compile = first_call_seconds(lambda: inductor(ids), device)
    calls["inductor"] = lambda: inductor(ids)

    compiled = torch.compile(model, backend="graphpatch")
    graphpatch_compile = first_call_seconds(lambda: compiled(ids), device)
    calls["graphpatch unpatched"] = lambda: compiled(ids)

    act_ops = [n for n in pb.nodes(compiled, f"transformer.h_{layer}.mlp.act.*") if not n.endswith(("input", "output"))]
    act_site = act_ops[len(act_ops) // 2]
    with pb.patch(compiled, {mlp_site: AddPatch(value=delta)}):
        variant_compile = first_call_seconds(lambda: compiled(ids), device)
    calls["graphpatch patched (MLP output)"] = _patched(compiled, {mlp_site: AddPatch(value=delta)}, ids)
    act_label = f"graphpatch patched ({act_site.split('.', 3)[-1]})"
    calls[act_label] = _patched(compiled, {act_site: AddPatch(value=delta.repeat(4))}, ids)
    # Values change every call: still the same variant.
    values = [torch.randn(options.width, device=device) for _ in range(8)]
    counter = iter(range(10**9))

    def sweep_values():
        with pb.patch(compiled, {mlp_site: AddPatch(value=values[next(counter) % 8])}):
            return compiled(ids)

    calls["graphpatch patched, new value each call"] = sweep_values
    rows = interleaved(calls, device, options.repeats)
    stats = pb.stats(compiled)

    patched = rows["graphpatch patched (MLP output)"]
    ratios = {
        "patched compiled / unpatched Inductor": patched / rows["inductor"],
        "graphpatch unpatched / Inductor": rows["graphpatch unpatched"] / rows["inductor"],
        "compile seconds graphpatch / Inductor": graphpatch_compile / inductor_compile,
        "eager + hook / patched compiled (speedup)": rows["eager + forward hook"] / patched,
        "graphpatch_eager patched / patched compiled (speedup)": rows["graphpatch_eager patched"] / patched,
    }
    result = {
        "config": vars(options) | {"torch": torch.__version__, "device_name": device_name(device)},
        "milliseconds_per_forward": {k: v * 1e3 for k, v in rows.items()},
        "compile_seconds": {
            "inductor": inductor_compile,
            "graphpatch (first call)": graphpatch_compile,
            "graphpatch patched variant": variant_compile,
        },
        "ratios": ratios,
        "variants_compiled": stats.variants_compiled,
        "act_site": act_site,
    }
    _print_table(result)
    if options.json:
        write_json(options.json, result)
    return result



def _print_table(result: Dict[str, object]) -> None:
    print(f"config: {result['config']}")
    print(f"{'forward':48s} {'ms':>10s}")
    for name, ms in result["milliseconds_per_forward"].items():
        print(f"{name:48s} {ms:10.3f}")
    for name, seconds in result["compile_seconds"].items():
        print(f"compile: {name:39s} {seconds:10.2f} s")
    for name, ratio in result["ratios"].items():
        print(f"{name:48s} {ratio:10.3f}")
    print(f"patched variants compiled: {result['variants_compiled']}")


if __name__ == "__main__":
    main()
