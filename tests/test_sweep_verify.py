"""Never a wrong row (issue 14): pb.sweep checks sampled cells against their unbatched runs."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import patch_backend as pb
from patch_backend.sweep import SweepBatchingWarning


class Branchy(nn.Module):
    """Its Python reads a value across the batch: batching cells changes the branch taken."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.c = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        return self.b(h) if h.sum() > 0 else self.c(h)


class Plain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


def _metric(output: torch.Tensor) -> torch.Tensor:
    return output.sum(-1)


def _one_by_one(compiled, x, cells):
    rows = []
    for cell in cells:
        with torch.no_grad(), pb.patch(compiled, cell):
            rows.append(_metric(compiled(x)))
    return torch.stack(rows)


@pytest.mark.parametrize("backend", ["graphpatch_eager", "graphpatch"])
def test_batch_dependent_branch_gives_the_unbatched_rows(backend: str) -> None:
    torch.manual_seed(0)
    compiled = torch.compile(Branchy(), backend=backend)
    x = torch.randn(1, 4)
    cells = [{"a.output": pb.AddPatch(value=value)} for value in (10.0, -10.0, 3.0, -3.0)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        with pytest.warns(SweepBatchingWarning, match="reads values across the batch"):
            rows = pb.sweep(compiled, (x,), cells, _metric, batch_size=4, progress=False)
        unchecked = pb.sweep(compiled, (x,), cells, _metric, batch_size=4, progress=False, verify=False)
    expected = _one_by_one(compiled, x, cells)
    torch.testing.assert_close(rows, expected)
    # Without the check, batching takes one branch for every row: the figure would be wrong.
    assert not torch.allclose(unchecked, expected)


def test_check_compiles_nothing_and_keeps_batched_rows() -> None:
    torch.manual_seed(0)
    compiled = torch.compile(Plain(), backend="graphpatch")
    x = torch.randn(2, 4)
    cells = [{"a.output": pb.ZeroPatch(slice=(slice(None), k))} for k in range(4)]
    with warnings.catch_warnings():
        warnings.simplefilter("error", SweepBatchingWarning)
        rows = pb.sweep(compiled, (x,), cells, _metric, batch_size=2, progress=False)
    # One prepared variant for the batched graph; the two sampled cells ran on the eager tier.
    assert pb.stats(compiled).variants_compiled == 1
    torch.testing.assert_close(rows, _one_by_one(compiled, x, cells))


def _two_layer_problem():
    from fixtures import TwoLayerMLP

    torch.manual_seed(0)
    model = TwoLayerMLP(8).eval()
    x = torch.randn(2, 5, 8)
    sites = [f"layers_{layer}.up.output" for layer in range(2)]
    # 8 cells, 4 per layer: with batch_size 4, two chunks that fan out at different blocks.
    cells = [{sites[index // 4]: pb.ZeroPatch(slice=(slice(None), index % 5))} for index in range(8)]
    return model, x, cells


def test_each_program_is_checked_once_per_process_and_the_inputs_once_per_sweep() -> None:
    from patch_backend.sweep import last_sweep_report

    model, x, cells = _two_layer_problem()
    compiled = torch.compile(model, backend="graphpatch_eager")
    expected = _one_by_one(compiled, x, cells)
    with torch.no_grad():
        first = pb.sweep(compiled, (x,), cells, _metric, batch_size=4, progress=False)
        report = last_sweep_report()
        assert report is not None and len({cut for cut in report.cuts if cut is not None}) == 2
        # Two programs (one per fan-out cut), each new: both chunks are checked.
        assert report.checks == 2
        again = pb.sweep(compiled, (x,), cells, _metric, batch_size=4, progress=False)
        # Both programs verified before: only the sweep's first chunk (its inputs) is checked.
        assert last_sweep_report().checks == 1
        # A rank that trusts another rank's check of this sweep checks nothing it verified before.
        trusted = pb.sweep(compiled, (x,), cells, _metric, batch_size=4, progress=False, _trusted=True)
        assert last_sweep_report().checks == 0
        unchecked = pb.sweep(compiled, (x,), cells, _metric, batch_size=4, progress=False, verify=False)
        assert last_sweep_report().checks == 0
    for rows in (first, again, trusted, unchecked):
        torch.testing.assert_close(rows, expected)


def test_a_trusting_sweep_still_checks_a_program_it_never_verified() -> None:
    from patch_backend.sweep import last_sweep_report

    model, x, cells = _two_layer_problem()
    compiled = torch.compile(model, backend="graphpatch_eager")
    with torch.no_grad():
        # Only layer 1's program has run (and been verified) in this process.
        pb.sweep(compiled, (x,), cells[4:], _metric, batch_size=4, progress=False)
        rows = pb.sweep(compiled, (x,), cells, _metric, batch_size=4, progress=False, _trusted=True)
    # Layer 0's program is new here: checked, although the sweep's inputs were trusted.
    assert last_sweep_report().checks == 1
    torch.testing.assert_close(rows, _one_by_one(compiled, x, cells))


def test_without_fan_out_a_sweep_checks_its_first_chunk_only() -> None:
    from patch_backend.sweep import last_sweep_report

    torch.manual_seed(0)
    compiled = torch.compile(Branchy(), backend="graphpatch_eager")
    x = torch.randn(1, 4)
    # Every row's value keeps the branch (h.sum() > 0) the batch takes: batching is exact here.
    cells = [{"a.output": pb.AddPatch(value=value)} for value in (10.0, 20.0, 30.0, 40.0, 50.0, 60.0)]
    with warnings.catch_warnings():
        warnings.simplefilter("error", SweepBatchingWarning)
        rows = pb.sweep(compiled, (x,), cells, _metric, batch_size=2, progress=False)
    report = last_sweep_report()
    # A graph break: no fan-out, so no program is verified for later sweeps; the three chunks
    # run one full-repeat program, checked once.
    assert report is not None and set(report.cuts) == {None} and report.checks == 1
    torch.testing.assert_close(rows, _one_by_one(compiled, x, cells))
