"""`make demo`: causal tracing on a GPT-2-shaped model with random weights, as one batched sweep.

Restores the clean residual stream after every block at every position of a corrupted prompt
(4 layers x 16 positions = 64 patched forwards), compares with the forward-hook loop users run
today, and writes the heatmap.
"""

from __future__ import annotations

import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import patch_backend as pb  # noqa: E402
from sweep_common import answer_metric, clean_and_corrupt, clean_block_outputs, gpt2, hook_loop, seconds  # noqa: E402

LAYERS, WIDTH, HEADS, VOCAB, POSITIONS = 4, 64, 4, 256, 16


def main() -> None:
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

    start = time.perf_counter()
    trace = pb.causal_trace(compiled, (clean,), (corrupt,), "transformer.h_*.output", POSITIONS, metric, progress=False)
    first = time.perf_counter() - start
    cells = len(trace.sites) * len(trace.positions)
    steady, trace = seconds(
        lambda: pb.causal_trace(compiled, (clean,), (corrupt,), "transformer.h_*.output", POSITIONS, metric, progress=False)
    )

    clean_states = clean_block_outputs(model, clean)
    grid_cells = [(layer, position) for layer in range(LAYERS) for position in range(POSITIONS)]
    hooks, reference = seconds(lambda: hook_loop(model, corrupt, clean_states, grid_cells, metric))
    matches = torch.allclose(trace.grid.flatten(), reference.mean(1).flatten(), atol=1e-5)

    os.makedirs("out", exist_ok=True)
    path = pb.plot_grid(trace, os.path.join("out", "causal_trace.png"), title=f"log P(token {answer}) with the clean state restored")
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
    main()
