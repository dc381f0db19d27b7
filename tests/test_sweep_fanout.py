"""Prefix reuse and lean slots (issue 14): every sweep mode against the unbatched loop."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import patch_backend as pb
from patch_backend import AddPatch, ReplacePatch, ZeroPatch
from patch_backend.program.fanout import FanOutRefused, cut_for, fan_out
from patch_backend.program.regions import find_blocks
from patch_backend.program.prepared import LeanSlot, SiteKey, cell_entries, lean_inputs
from patch_backend.sweep import last_sweep_report


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(width)
        self.up = nn.Linear(width, 2 * width)
        self.down = nn.Linear(2 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.relu(self.up(self.ln(x))))


class Stack(nn.Module):
    """Embedding, a ModuleList of blocks (regions) and a head; a batched mask made from a size."""

    def __init__(self, layers: int = 4, width: int = 8, vocab: int = 16, reverse: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.blocks = nn.ModuleList([Block(width) for _ in range(layers)])
        self.head = nn.Linear(width, vocab)
        self.reverse = reverse

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        if self.reverse:
            # A batch index used other than as a row selection: fan-out must refuse it.
            h = h[torch.arange(h.shape[0]).flip(0)]
        mask = torch.ones(ids.shape[0], ids.shape[1])
        for block in self.blocks:
            h = block(h) * mask[..., None]
        return self.head(h)


def metric(out: torch.Tensor) -> torch.Tensor:
    return out[:, -1].log_softmax(-1)


def loop(model: nn.Module, ids: torch.Tensor, cells) -> torch.Tensor:
    """The unbatched reference: one graphpatch_eager forward per cell."""
    eager = torch.compile(copy.deepcopy(model), backend="graphpatch_eager")
    rows = []
    with torch.no_grad():
        for cell in cells:
            with pb.patch(eager, cell):
                rows.append(metric(eager(ids)))
    return torch.stack(rows)


def mixed_cells(width: int = 8):
    """Zero/Add/Replace with slices and positions at several layers, one cell over two layers."""
    torch.manual_seed(3)
    cells = []
    for layer in (3, 0, 2, 1):
        cells.append({f"blocks_{layer}.output": ReplacePatch(value=torch.randn(width), slice=(slice(None), 1))})
        cells.append({f"blocks_{layer}.up.output": ZeroPatch(slice=(slice(None), slice(2, 4)))})
    cells.append({"blocks_2.down.output": AddPatch(value=torch.randn(5, width), slice=(slice(None), slice(None)))})
    cells.append({"blocks_1.output": ZeroPatch(slice=(slice(None), -1)), "blocks_3.ln.output": AddPatch(value=0.5)})
    cells.append({})
    return cells


@pytest.mark.parametrize("batch", [1, 3])
def test_fanout_matches_loop_mixed_cuts_padded_chunk(batch: int) -> None:
    torch.manual_seed(0)
    model = Stack().eval()
    ids = torch.randint(0, 16, (batch, 5))
    compiled = torch.compile(model, backend="graphpatch_eager")
    cells = mixed_cells()
    with torch.no_grad():
        compiled(ids)
        # 11 cells in chunks of 3: chunks mix layers, and the last one is padded.
        rows = pb.sweep(compiled, (ids,), cells, metric, batch_size=3, progress=False)
    report = last_sweep_report()
    torch.testing.assert_close(rows, loop(model, ids, cells), rtol=1e-5, atol=1e-5)
    assert not report.cell_by_cell and not report.refusals
    # Cells sorted by their earliest site: chunks fan out at blocks 0, 1, 2 (and later).
    assert len({cut for cut in report.cuts if cut is not None}) >= 3


@pytest.mark.slow
def test_fanout_compiled_matches_loop() -> None:
    torch.manual_seed(0)
    model = Stack(layers=3).eval()
    ids = torch.randint(0, 16, (2, 5))
    compiled = torch.compile(model, backend="graphpatch")
    cells = [c for c in mixed_cells() if not any("blocks_3" in name for name in c)]
    with torch.no_grad():
        compiled(ids)
        rows = pb.sweep(compiled, (ids,), cells, metric, batch_size=3, progress=False)
    report = last_sweep_report()
    torch.testing.assert_close(rows, loop(model, ids, cells), rtol=1e-4, atol=1e-4)
    assert not report.refusals
    cuts = {cut for cut in report.cuts}
    assert None not in cuts
    # One compiled program per fan-out cut, shared by its chunks (the padded last one too).
    assert pb.stats(compiled).variants_compiled == len(cuts)


def test_refused_fanout_runs_the_full_repeat_and_stays_exact() -> None:
    torch.manual_seed(0)
    model = Stack(layers=2, reverse=True).eval()
    ids = torch.randint(0, 16, (2, 5))
    compiled = torch.compile(model, backend="graphpatch_eager")
    cells = [{f"blocks_{layer}.output": ZeroPatch(slice=(slice(None), p))} for layer in (1, 0) for p in range(3)]
    with torch.no_grad():
        compiled(ids)
        rows = pb.sweep(compiled, (ids,), cells, metric, batch_size=4, progress=False)
    report = last_sweep_report()
    torch.testing.assert_close(rows, loop(model, ids, cells), rtol=1e-5, atol=1e-5)
    assert set(report.cuts) == {None}
    assert any("batch index" in reason for reason in report.refusals)


def test_lean_slot_capacity_scales_with_patches() -> None:
    torch.manual_seed(0)
    model = Stack(layers=2, width=8).eval()
    ids = torch.randint(0, 16, (2, 5))
    compiled = torch.compile(model, backend="graphpatch_eager")
    cells = [{f"blocks_{layer}.output": ReplacePatch(value=torch.ones(8), slice=(slice(None), p))}
             for layer in range(2) for p in range(5)]
    with torch.no_grad():
        compiled(ids)
        pb.sweep(compiled, (ids,), cells, metric, batch_size=4, progress=False)
    # One position of [B=2, T=5, d=8] per cell: 16 values. Sorted by layer, the chunks of 4 hold
    # 4 cells at layer 0, then 1 + 3, then 2 at layer 1: not 2 x [4 * 2, 5, 8] per slot.
    assert last_sweep_report().capacities == {"blocks_0.output": 64, "blocks_1.output": 48}


def test_cell_entries_and_lean_inputs_pad_with_distinct_positions() -> None:
    entries = cell_entries(
        [AddPatch(value=torch.tensor([1.0, 2.0]), slice=(slice(None), 1)), ZeroPatch(slice=(0, 2))],
        (1, 3, 2), torch.float32, torch.device("cpu"),
    )
    assert entries.index.tolist() == [2, 3, 4, 5]
    assert entries.keep.tolist() == [True, True, False, False]
    assert entries.fill.tolist() == [1.0, 2.0, 0.0, 0.0]
    slot = LeanSlot(SiteKey("x", None, (0, 0)), (3, 3, 2), torch.float32, torch.device("cpu"), 12)
    keep, fill, index = lean_inputs(slot, [(0, entries), (12, entries)])
    assert len(set(index.tolist())) == 12 == index.numel()
    assert index[:8].tolist() == [2, 3, 4, 5, 14, 15, 16, 17]
    assert keep[8:].all() and not fill[8:].any()
    x = torch.randn(3, 3, 2)
    expected = x.clone()
    for offset in (0, 2):  # row blocks of 6 positions: flat offsets 0 and 12
        expected[offset, 1] += torch.tensor([1.0, 2.0])
        expected[offset, 2] = 0
    torch.testing.assert_close(pb.program.ops.sparse_slot(x, index, keep, fill), expected)


def _graph(model: nn.Module, ids: torch.Tensor):
    """Dynamo's graph of ``model`` at ``ids``'s shape, and the arguments it was called with."""
    graphs = []

    def backend(gm, example):
        def run(*args):
            graphs.append((gm, args))
            return gm.forward(*args)

        return run

    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend, dynamic=False)
    with torch.no_grad():
        compiled(ids)
    return graphs[-1]


def test_fan_out_refuses_graphs_that_do_not_line_up() -> None:
    torch.manual_seed(0)
    model = Stack(layers=2).eval()
    ids = torch.randint(0, 16, (1, 5))
    base, _ = _graph(model, ids)
    batched, args = _graph(model, ids.repeat(4, 1))
    _, blocks = find_blocks(batched)
    cut = cut_for(batched, [node for node, block in blocks.items() if block == 1][-1].name)
    assert cut is not None
    fanned = fan_out(batched, base, cut, 4)
    assert fanned.repeated
    with torch.no_grad():
        torch.testing.assert_close(fanned.gm(*args)[0], batched(*args)[0])
    with pytest.raises(FanOutRefused, match="one cell"):
        fan_out(batched, base, cut, 1)
    other, _ = _graph(Stack(layers=3).eval(), ids)
    with pytest.raises(FanOutRefused):
        fan_out(batched, other, cut, 4)
    torch._dynamo.reset()


@pytest.mark.transformers
# A prompt batch of 2 in the fast set; of 1 (the same mask code, and the Stack tests above
# sweep batch 1 fast) with the slow tests.
@pytest.mark.parametrize("batch", [pytest.param(1, marks=pytest.mark.slow), 2])
def test_gpt2_fans_out_through_its_mask_code(batch: int) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=3, n_embd=32, n_head=4, vocab_size=64, n_positions=16, bos_token_id=0,
                        eos_token_id=0, use_cache=False)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config).eval()
    ids = torch.randint(0, 64, (batch, 8))
    compiled = torch.compile(model, backend="graphpatch_eager")
    cells = [{f"transformer.h_{layer}.output": ReplacePatch(value=torch.randn(32), slice=(slice(None), p))}
             for layer in (2, 0, 1) for p in (0, 5, -1)]
    logits = lambda out: out.logits[:, -1].log_softmax(-1)  # noqa: E731
    with torch.no_grad():
        compiled(input_ids=ids)
        rows = pb.sweep(compiled, {"input_ids": ids}, cells, logits, batch_size=4, progress=False)
    report = last_sweep_report()
    eager = torch.compile(copy.deepcopy(model), backend="graphpatch_eager")
    expected = []
    with torch.no_grad():
        for cell in cells:
            with pb.patch(eager, cell):
                expected.append(logits(eager(input_ids=ids)))
    torch.testing.assert_close(rows, torch.stack(expected), rtol=1e-4, atol=1e-4)
    assert not report.refusals and None not in report.cuts
