"""Activation-patching sweeps (every layer x every position), pb.sweep against its peers.

    python scripts/bench_sweep.py [--device cpu] [--json out/bench_sweep.json] [--quick]

For each sweep (4 layers x 16 positions, 6 layers x 64 positions) one table, one process:
eager forward-hook loop; hand-batched eager hooks (one forward per chunk); graphpatch_eager
loop; graphpatch loop (one compiled forward per cell); pb.sweep. Compiled peers are timed
twice: from a fresh compile (total) and again once compiled (steady state).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from typing import Dict, List, Tuple

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


def main() -> List[Dict[str, object]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--chunk", type=int, default=64, help="cells per batched forward")
    parser.add_argument("--quick", action="store_true", help="only the 4 x 16 sweep")
    parser.add_argument("--json", default=None)
    options = parser.parse_args()
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
