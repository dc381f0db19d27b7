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
