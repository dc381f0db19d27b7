"""pb.sweep's eager tier as vmap over the base graph's cells (program/vmapped.py, issue 10 T6).

Under compile_policy "never" or "background", chunks that run uncompiled need no capture at K x
the batch: they run the base graph under torch.func.vmap. Every test compares with the unbatched
graphpatch_eager loop and with the K·B path (``config.sweep_vmap=False``), and asserts how many
chunks ran vmapped and how many graphs Dynamo captured.
"""

from __future__ import annotations

import copy
from typing import Dict, List

import pytest
import torch
from torch import nn

import patch_backend as pb
from patch_backend import AddPatch, ReplacePatch, ZeroPatch
from patch_backend.program.vmapped import VmapRefused, output_forms
from patch_backend.sweep import last_sweep_report

from test_sweep_fanout import Stack, loop, metric, mixed_cells


def _sweep(model: nn.Module, ids: torch.Tensor, cells: List[Dict], policy: str, vmap: bool = True, **config):
    compiled = torch.compile(model, backend="graphpatch")
    with pb.config.patch(compile_policy=policy, sweep_vmap=vmap, **config):
        rows = pb.sweep(compiled, (ids,), cells, metric, batch_size=3, progress=False)
    pb.wait_for_compiles()
    return rows, last_sweep_report(), compiled


def _captures(compiled) -> int:
    return pb.stats(compiled).graphs


@pytest.mark.parametrize("batch", [1, 3])
def test_vmapped_chunks_match_the_loop_and_the_batched_path(batch: int) -> None:
    torch.manual_seed(0)
    model = Stack().eval()
    ids = torch.randint(0, 16, (batch, 5))
    cells = mixed_cells()
    expected = loop(model, ids, cells)
    rows, report, compiled = _sweep(copy.deepcopy(model), ids, cells, "never")
    torch.testing.assert_close(rows, expected, rtol=1e-5, atol=1e-5)
    # 11 cells in chunks of 3: four chunks, the last padded, all vmapped; one capture, at the batch.
    assert (report.vmapped, report.vmap_refused) == (4, None)
    assert _captures(compiled) == 1
    assert pb.stats(compiled).compiled_calls == 0
    rows_kb, report_kb, compiled_kb = _sweep(copy.deepcopy(model), ids, cells, "never", vmap=False)
    torch.testing.assert_close(rows_kb, rows, rtol=1e-5, atol=1e-5)
    assert report_kb.vmapped == 0 and _captures(compiled_kb) == 2


def test_vmapped_sweep_under_background_stays_eager_and_compiles_after() -> None:
    torch.manual_seed(0)
    model = Stack(layers=2).eval()
    ids = torch.randint(0, 16, (2, 5))
    cells = [{f"blocks_{layer}.output": ZeroPatch(slice=(slice(None), p))} for layer in (1, 0) for p in range(3)]
    rows, report, compiled = _sweep(model, ids, cells, "background")
    torch.testing.assert_close(rows, loop(model, ids, cells), rtol=1e-5, atol=1e-5)
    assert report.vmapped == 2
    stats = pb.stats(compiled)
    # The chunks never waited for Inductor (two chunks and the sweep's one-cell check ran on the
    # eager tier); the plain program compiled once the sweep returned.
    assert stats.compiled_calls == 0 and stats.eager_calls == 3
    assert stats.compile_seconds > 0


def test_a_long_sweep_moves_to_compiled_chunks() -> None:
    """sweep_eager_seconds=0: after the first chunk the rest would take longer than that on the
    eager tier, so the sweep captures at K·B and its chunks compile (here: as soon as asked)."""
    torch.manual_seed(0)
    model = Stack(layers=2).eval()
    ids = torch.randint(0, 16, (2, 5))
    cells = [{f"blocks_{layer}.output": AddPatch(value=0.5, slice=(slice(None), p))} for layer in (1, 0) for p in range(4)]
    rows, report, compiled = _sweep(model, ids, cells, "background", sweep_eager_seconds=0)
    torch.testing.assert_close(rows, loop(model, ids, cells), rtol=1e-4, atol=1e-4)
    assert report.vmapped == 1
    assert _captures(compiled) == 2
    assert report.cuts and None not in report.cuts


class WritesIntoBuffer(nn.Module):
    """After its block, an in-place write of the block's value into a fresh tensor: one graph,
    but vmap cannot write a value mapped over cells into a tensor that is not."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.block(x)
        out = torch.zeros(x.shape[0], 4)
        out[:, :2] = h[:, :2]
        return self.head(out)


def test_refused_vmap_falls_back_to_the_batched_graph_and_stays_exact() -> None:
    torch.manual_seed(0)
    model = WritesIntoBuffer().eval()
    x = torch.randn(2, 4)
    cells = [{"block.output": ReplacePatch(value=torch.full((4,), float(k)), slice=(slice(None), slice(None)))}
             for k in range(-2, 3)]
    compiled = torch.compile(model, backend="graphpatch")
    with pb.config.patch(compile_policy="never"):
        rows = pb.sweep(compiled, (x,), cells, lambda out: out, batch_size=2, progress=False)
    report = last_sweep_report()
    assert report.vmapped == 0 and "vmap over the cells failed" in report.vmap_refused
    assert _captures(compiled) == 2
    torch.testing.assert_close(rows, loop_outputs(model, x, cells), rtol=1e-5, atol=1e-5)


def loop_outputs(model: nn.Module, x: torch.Tensor, cells: List[Dict]) -> torch.Tensor:
    eager = torch.compile(copy.deepcopy(model), backend="graphpatch_eager")
    with torch.no_grad():
        rows = []
        for cell in cells:
            with pb.patch(eager, cell):
                rows.append(eager(x))
    return torch.stack(rows)


def test_an_output_a_patch_reaches_without_a_batch_dimension_is_refused() -> None:
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    slot = graph.placeholder("slot")
    summed = graph.call_function(torch.sum, (graph.call_function(torch.add, (x, slot)),))
    graph.output((summed, graph.call_function(torch.relu, (x,))))
    gm = torch.fx.GraphModule(nn.Module(), graph)
    for node in gm.graph.nodes:
        if node.op != "output":
            node.meta["example_value"] = torch.zeros(()) if node.target is torch.sum else torch.zeros(2, 3)
    with pytest.raises(VmapRefused, match="depends on a patched site but has no batch dimension first"):
        output_forms(gm, 1, frozenset({0}), 2, batch=2)
    # Without the patched input, the same outputs are one value returned once and one batch of rows.
    forms = output_forms(gm, 2, frozenset({0}), 2, batch=2)
    assert [form.rows for form in forms] == [False, True]


class BreakBetweenBlocks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(4, 4)
        self.second = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.first(x)
        torch._dynamo.graph_break()
        return self.second(h)


def test_a_graph_break_keeps_the_batched_path() -> None:
    torch.manual_seed(0)
    model = BreakBetweenBlocks().eval()
    x = torch.randn(2, 4)
    cells = [{"first.output": ZeroPatch(slice=(slice(None), p))} for p in range(3)]
    compiled = torch.compile(model, backend="graphpatch")
    with pb.config.patch(compile_policy="never"):
        rows = pb.sweep(compiled, (x,), cells, lambda out: out, batch_size=2, progress=False)
    assert last_sweep_report().vmapped == 0
    torch.testing.assert_close(rows, loop_outputs(model, x, cells), rtol=1e-5, atol=1e-5)


@pytest.mark.transformers
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_transformers_layer_by_position_sweep_vmapped(family: str) -> None:
    """A restore-one-position sweep over every layer of a Hugging Face model: one capture, every
    chunk vmapped (attention, masks, rotary embeddings and KV heads under vmap), and the rows of
    the K·B path."""
    import test_transformers

    torch.manual_seed(0)
    model = getattr(test_transformers, family)()
    ids = torch.randint(1, test_transformers.VOCAB, (2, 6))
    blocks = "transformer.h" if family == "gpt2" else "model.layers"
    cells = [{f"{blocks}_{layer}.output": ReplacePatch(value=torch.randn(test_transformers.HIDDEN), slice=(slice(None), p))}
             for layer in range(2) for p in range(6)]

    def last_logits(out):
        return out.logits[:, -1]

    results = {}
    for vmap in (True, False):
        compiled = torch.compile(copy.deepcopy(model), backend="graphpatch")
        with pb.config.patch(compile_policy="never", sweep_vmap=vmap):
            results[vmap] = pb.sweep(compiled, (ids,), cells, last_logits, batch_size=5, progress=False)
        report = last_sweep_report()
        assert report.vmapped == (3 if vmap else 0) and report.vmap_refused is None
        assert _captures(compiled) == (1 if vmap else 2)
    torch.testing.assert_close(results[True], results[False], rtol=1e-4, atol=1e-4)


def test_sweep_eager_seconds_is_checked() -> None:
    for bad in (-1, "10", True):
        with pytest.raises(ValueError, match="sweep_eager_seconds must be a number of seconds"):
            pb.config.set("sweep_eager_seconds", bad)
    with pb.config.patch(sweep_eager_seconds=2.5):
        assert pb.config.sweep_eager_seconds == 2.5
    assert pb.config.sweep_eager_seconds == 10.0


@pytest.mark.parametrize(
    "mask_shape, mask_mapped",
    [((1, 1, 8, 8), False), ((2, 1, 8, 8), False), ((5, 2, 1, 8, 8), True), ((8, 8), False), ((5, 8, 8), True), (None, False)],
)
@pytest.mark.parametrize("gqa", [False, True])
def test_attention_over_cells_gives_each_cells_attention(mask_shape, mask_mapped, gqa) -> None:
    """The vmapped graph's attention runs the K cells as K·B rows of one call: equal to one call
    per cell, for masks that broadcast over the batch, have its rows, or differ per cell."""
    import torch.nn.functional as F

    op = torch.ops.patch_backend.attention_over_cells.default
    torch.manual_seed(0)
    query = torch.randn(5, 2, 4, 8, 16)
    key = torch.randn(2, 2 if gqa else 4, 8, 16)
    mask = None if mask_shape is None else torch.randn(*mask_shape)
    mapped = torch.func.vmap(lambda q, m: op(q, key, key, m, False, None, gqa), in_dims=(0, 0 if mask_mapped else None))
    expected = torch.stack([
        F.scaled_dot_product_attention(query[k], key, key, attn_mask=mask[k] if mask_mapped else mask, enable_gqa=gqa)
        for k in range(5)
    ])
    torch.testing.assert_close(mapped(query, mask), expected)
