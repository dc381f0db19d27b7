"""`make demo`: activation patching finds the induction head of a freshly trained transformer.

Trains (or loads from out/induction.pt) a two-layer attention-only transformer on repeated random
token sequences, a task solved by a known circuit: a previous-token head in layer 0 and an
induction head in layer 1. Then, with batched compiled sweeps:

- a causal trace restores the clean residual stream at every layer × position of a corrupted run
  (heatmap: where the answer is carried);
- per-head patching restores each head's clean output (heatmap: which head is the induction head);

checks both against the forward-hook loop users run today, reports the speed-up, and asserts that
the mechanism was found (exit status 1 otherwise). ``--model gpt2-random`` runs the previous demo:
a causal trace on a randomly initialised GPT-2, kept for architecture coverage.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Dict, List, Sequence, Tuple

import torch

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import patch_backend as pb  # noqa: E402
from patch_backend import ProbePatch, ReplacePatch  # noqa: E402
import induction  # noqa: E402
from sweep_common import answer_metric, clean_and_corrupt, clean_block_outputs, gpt2, hook_loop, seconds  # noqa: E402

LAYERS, WIDTH, HEADS, VOCAB, POSITIONS = 4, 64, 4, 256, 16
#: Rows of the clean/corrupt batch: enough sequences that one unlucky sequence cannot decide.
BATCH = 8
#: How far (as a share of the clean − corrupt gap) the top head must beat the median head.
MARGIN = 0.3


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("induction", "gpt2-random"), default="induction")
    parser.add_argument("--out", default="out", help="folder for the cached weights and the PNGs")
    parser.add_argument("--steps", type=int, default=induction.Config.steps, help="training steps")
    parser.add_argument("--retrain", action="store_true", help="ignore the cached weights")
    parser.add_argument("--batch", type=int, default=BATCH, help="clean/corrupt sequences per cell")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1, see main)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] = ()) -> int:
    """Runs the chosen demo; returns the exit status.

    One thread by default: on a small shared machine a second OpenMP thread that loses its core
    to another process stalls every op of these small models, which made timings vary a
    hundredfold between runs. Both sides of each comparison run with the same setting.
    """
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    if args.model == "gpt2-random":
        gpt2_random(args.out)
        return 0
    return induction_demo(args)


# --- the induction demo -------------------------------------------------------------------


def induction_demo(args: argparse.Namespace) -> int:
    """Trains or loads the model, runs both sweeps, writes both heatmaps; 1 if the head is not found."""
    config = induction.Config(steps=args.steps)
    cache = os.path.join(args.out, "induction.pt")
    if args.retrain and os.path.exists(cache):
        os.remove(cache)
    model, facts, cached = induction.load_or_train(config, cache)
    how = f"loaded from {cache}" if cached else f"trained in {facts['train_seconds']:.1f} s, saved to {cache}"
    print(f"model: attention-only transformer, {config.layers} layers x {config.heads} heads, width {config.width}, "
          f"vocab {config.vocab}; {config.steps} steps, {how}")
    print(f"task: a random sequence of {config.min_half}-{config.half} tokens, repeated; "
          f"held-out accuracy on the second copy {facts['accuracy']:.1%}")

    clean, corrupt = induction.clean_and_corrupt(config, args.batch)
    compiled = torch.compile(model, backend="graphpatch")
    with torch.no_grad():
        compiled(clean)
    print(f"{len(pb.nodes(compiled))} node names; patched below:",
          ", ".join(pb.nodes(compiled, "add") + pb.nodes(compiled, "blocks_*.output") + pb.nodes(compiled, "blocks_*.attn.z.output")))

    trace = residual_trace(model, compiled, clean, corrupt, config)
    heads = head_patching(model, compiled, clean, corrupt, config)
    paths = plots(trace, heads, config, args.out)
    return report(trace, heads, paths)


def residual_trace(model, compiled, clean, corrupt, config: induction.Config) -> Dict[str, object]:
    """pb.causal_trace over the residual stream, scored on the last query's logit difference.

    One query keeps the picture readable: the answer sits in layer 0 at the earlier copy of the
    answer token (where the previous-token head wrote "preceded by the query token"), then in
    layer 1 at the query itself (after the induction head copied it).
    """
    last = induction.scored_positions(config)[-1]
    metric = induction.logit_difference(clean, config, [last])
    sites = ["add", "blocks_*.output"]
    positions = 2 * config.half
    run = lambda: pb.causal_trace(compiled, (clean,), (corrupt,), sites, positions, metric, progress=False)  # noqa: E731
    first, trace = seconds(run)
    steady, trace = best_of(run)
    residual, _ = induction.record_clean(model, clean)
    cells = [(layer, position) for layer in range(len(trace.sites)) for position in range(positions)]
    hooks, reference = best_of(lambda: induction.hook_loop_residual(model, corrupt, residual, cells, metric))
    gap = float(trace.clean.mean() - trace.corrupt.mean())
    return {
        "grid": (trace.grid - trace.corrupt.mean()) / gap,
        "raw": trace.grid, "rows": ["embeddings"] + trace.sites[1:], "query": last,
        "clean": float(trace.clean.mean()), "corrupt": float(trace.corrupt.mean()),
        "cells": len(cells), "first": first, "steady": steady, "hooks": hooks,
        "difference": float((trace.grid.flatten() - reference.mean(1)).abs().max()),
    }


def head_patching(model, compiled, clean, corrupt, config: induction.Config) -> Dict[str, object]:
    """pb.sweep, one cell per (layer, head): that head's clean output (all positions) patched into
    the corrupted run; scored on the mean logit difference over the second copy."""
    metric = induction.logit_difference(clean, config, induction.scored_positions(config))
    names = [f"blocks_{layer}.attn.z.output" for layer in range(config.layers)]
    probes = {name: ProbePatch() for name in names}
    with torch.no_grad(), pb.patch(compiled, probes):
        clean_score = metric(compiled(clean)).mean()
    with torch.no_grad():
        corrupt_score = metric(compiled(corrupt)).mean()
    grid_cells = [(layer, head) for layer in range(config.layers) for head in range(config.heads)]
    cells = [
        {names[layer]: ReplacePatch(value=probes[names[layer]].activation[:, :, head], slice=(slice(None), slice(None), head))}
        for layer, head in grid_cells
    ]
    run = lambda: pb.sweep(compiled, (corrupt,), cells, metric, progress=False)  # noqa: E731
    first, values = seconds(run)
    steady, values = best_of(run)
    _, clean_heads = induction.record_clean(model, clean)
    hooks, reference = best_of(lambda: induction.hook_loop_heads(model, corrupt, clean_heads, grid_cells, metric))
    raw = values.mean(1).reshape(config.layers, config.heads)
    gap = float(clean_score - corrupt_score)
    return {
        "grid": (raw - corrupt_score) / gap, "raw": raw,
        "clean": float(clean_score), "corrupt": float(corrupt_score),
        "cells": len(cells), "first": first, "steady": steady, "hooks": hooks,
        "difference": float((values - reference).abs().max()),
    }


def best_of(fn: Callable[[], object], repeats: int = 3) -> Tuple[float, object]:
    """Fastest of a few runs: the least disturbed by other work on a shared machine."""
    runs = [seconds(fn) for _ in range(repeats)]
    return min(elapsed for elapsed, _ in runs), runs[-1][1]


def plots(trace: Dict[str, object], heads: Dict[str, object], config: induction.Config, out: str) -> List[str]:
    """Both heatmaps, in restoration units: 0 = the corrupted run, 1 = the clean run."""
    restoration = pb.plot_grid(
        trace["grid"], os.path.join(out, "restoration.png"), row_labels=trace["rows"],
        title=f"restoration of the logit difference at position {trace['query']} (clean residual restored)",
    )
    per_head = plot_heads(heads["grid"], os.path.join(out, "induction_heads.png"))
    return [restoration, per_head]


def plot_heads(grid: torch.Tensor, path: str) -> str:
    """Layer × head heatmap with each cell's value written in (pb.plot_grid labels its columns
    "position"; here they are heads, and eight numbers read better than a colour scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers, heads = grid.shape
    figure, axes = plt.subplots(figsize=(1.1 * heads + 2.2, 0.9 * layers + 1.4))
    image = axes.imshow(grid.numpy(), cmap="viridis", vmin=min(0.0, float(grid.min())), vmax=1.0)
    for layer in range(layers):
        for head in range(heads):
            value = float(grid[layer, head])
            axes.text(head, layer, f"{round(value, 2) + 0.0:.0%}", ha="center", va="center", color="black" if value > 0.6 else "white")
    axes.set_xticks(range(heads), labels=[f"head {head}" for head in range(heads)])
    axes.set_yticks(range(layers), labels=[f"layer {layer}" for layer in range(layers)])
    axes.set_title("restoration by patching one head's clean output", fontsize=10)
    figure.colorbar(image, ax=axes)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def report(trace: Dict[str, object], heads: Dict[str, object], paths: List[str]) -> int:
    """Prints the figures and checks the induction-head criteria; returns the exit status."""
    grid = heads["grid"]
    layers, n_heads = grid.shape
    top = int(grid.argmax())
    top_layer, top_head = divmod(top, n_heads)
    top_effect, median = float(grid.flatten()[top]), float(grid.flatten().median())
    print()
    print(f"logit difference, clean / corrupt:   {heads['clean']:.2f} / {heads['corrupt']:.2f} (second copy, mean)")
    print(f"top head by patching:                layer {top_layer} head {top_head}: restores {top_effect:.0%} "
          f"(median head {median:.0%})")
    for row, label in enumerate(trace["rows"]):
        position = int(trace["grid"][row].argmax())
        print(f"restoration peak, {label + ':':<17}  {float(trace['grid'][row, position]):.0%} at position {position}")
    for name, result in (("causal trace", trace), ("head patching", heads)):
        print(f"{name + ':':<15} {result['cells']:3d} cells, pb {result['steady'] * 1e3:6.1f} ms "
              f"({result['cells'] / result['steady']:6.0f} cells/s; first run {result['first']:.1f} s with compiling), "
              f"hook loop {result['hooks'] * 1e3:6.1f} ms ({result['cells'] / result['hooks']:5.0f} cells/s): "
              f"{result['hooks'] / result['steady']:.1f}x, max |pb - hooks| = {result['difference']:.1e}")
    for path in paths:
        print(f"heatmap: {os.path.abspath(path)}")
    return check(top_layer, layers, top_effect, median, [trace["difference"], heads["difference"]])


def check(top_layer: int, layers: int, top_effect: float, median: float, differences: List[float]) -> int:
    """The issue's criteria: the top head is in the last layer, well above the median head, and
    the sweeps agree with the hook loop."""
    failures = []
    if top_layer != layers - 1:
        failures.append(f"the top head is in layer {top_layer}, not the last layer ({layers - 1})")
    if top_effect - median < MARGIN:
        failures.append(f"the top head restores {top_effect:.0%}, less than {MARGIN:.0%} above the median ({median:.0%})")
    if max(differences) > 1e-3:
        failures.append(f"pb and the hook loop disagree by {max(differences):.1e}")
    for failure in failures:
        print("FAILED:", failure)
    if not failures:
        print("found: the induction head (last layer, far above the median head)")
    return 1 if failures else 0


# --- the random GPT-2 causal trace (architecture coverage) ----------------------------------


def gpt2_random(out: str) -> None:
    """Causal tracing on a GPT-2-shaped model with random weights: 4 layers x 16 positions as one
    batched sweep, compared with a forward-hook loop. The heatmap is noise (nothing was learnt);
    the run shows that GPT-2's Hugging Face code captures, patches and sweeps correctly."""
    torch.manual_seed(0)
    model = gpt2(LAYERS, WIDTH, HEADS, VOCAB, POSITIONS)
    clean, corrupt = clean_and_corrupt(VOCAB, POSITIONS)
    with torch.no_grad():
        answer = int(model(clean).logits[0, -1].argmax())
    metric = answer_metric(answer)
    compiled = torch.compile(model, backend="graphpatch")

    print(f"model: GPT-2 architecture, {LAYERS} layers, width {WIDTH}, random weights; prompt of {POSITIONS} tokens")
    with torch.no_grad():
        compiled(clean)
    print("a few of its", len(pb.nodes(compiled)), "node names:")
    for name in pb.nodes(compiled, "transformer.h_0.mlp.act.*")[:4] + pb.nodes(compiled, "transformer.h_*.output"):
        print("   ", name)

    run: Callable[[], pb.CausalTrace] = lambda: pb.causal_trace(  # noqa: E731
        compiled, (clean,), (corrupt,), "transformer.h_*.output", POSITIONS, metric, progress=False
    )
    first, trace = seconds(run)
    cells = len(trace.sites) * len(trace.positions)
    steady, trace = seconds(run)

    clean_states = clean_block_outputs(model, clean)
    grid_cells = [(layer, position) for layer in range(LAYERS) for position in range(POSITIONS)]
    hooks, reference = seconds(lambda: hook_loop(model, corrupt, clean_states, grid_cells, metric))
    matches = torch.allclose(trace.grid.flatten(), reference.mean(1).flatten(), atol=1e-5)

    path = pb.plot_grid(trace, os.path.join(out, "causal_trace.png"), title=f"log P(token {answer}) with the clean state restored")
    stats = pb.stats(compiled)
    print()
    print(f"grid shape:                      {tuple(trace.grid.shape)}  (sites x positions)")
    print(f"clean / corrupt log P(answer):   {float(trace.clean[0]):.4f} / {float(trace.corrupt[0]):.4f}")
    print(f"strongest restoration:           {trace.sites[int(trace.grid.argmax()) // POSITIONS]} "
          f"at position {int(trace.grid.argmax()) % POSITIONS}")
    print(f"pb.causal_trace, first run:      {first:.2f} s (includes compiling)")
    print(f"pb.causal_trace, compiled:       {steady * 1e3:.1f} ms = {cells / steady:.0f} cells/s")
    print(f"forward-hook loop, same sweep:   {hooks * 1e3:.1f} ms = {cells / hooks:.0f} cells/s")
    print(f"speed-up over the hook loop:     {hooks / steady:.1f}x (excluding compile)")
    print(f"same numbers as the hook loop:   {matches}")
    print(f"compiled variants:               {stats.variants_compiled} (probe variant + one sweep variant)")
    print(f"heatmap:                         {os.path.abspath(path)}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
