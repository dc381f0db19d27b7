"""Causal tracing (activation patching from a clean into a corrupted run) and its heatmap."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence, Union

import torch

from .context import patch
from .capture.index import index_for
from .patches import ProbePatch, ReplacePatch
from .sweep import Inputs, _call, _compiled_model, sweep


@dataclass
class CausalTrace:
    """``grid[i, j]``: the metric when site ``sites[i]`` at position ``positions[j]`` is restored
    to its clean value in the corrupted run (averaged over the batch)."""

    grid: torch.Tensor
    sites: List[str]
    positions: List[int]
    clean: torch.Tensor
    corrupt: torch.Tensor


def causal_trace(
    model: Any,
    clean: Inputs,
    corrupt: Inputs,
    sites: Union[str, Sequence[str]],
    positions: Union[int, Sequence[int]],
    metric: Callable[[Any], torch.Tensor],
    batch_size: Optional[int] = None,
    progress: bool = True,
    distributed: bool = True,
) -> CausalTrace:
    """Restores each site × position of the corrupted run to its clean value, one cell each.

    Clean activations are recorded with probes in one compiled forward; the cells then run as a
    batched ``pb.sweep``. Sites (names or globs) must be ``[batch, position, ...]`` activations.
    ``metric(output)`` returns one value per row (e.g. the probability of the answer token).
    Under a torch.distributed process group the sweep is sharded over the ranks (``pb.sweep``).
    """
    compiled, root = _compiled_model(model)
    if not index_for(root).names:
        with torch.no_grad():
            _call(compiled, clean)
    names = index_for(root).match_all(sites)
    position_list = list(range(positions)) if isinstance(positions, int) else list(positions)
    probes = {name: ProbePatch() for name in names}
    with torch.no_grad(), patch(compiled, probes):
        clean_metric = metric(_call(compiled, clean)).detach()
    with torch.no_grad():
        corrupt_metric = metric(_call(compiled, corrupt)).detach()
    cells = []
    for name in names:
        activation = probes[name].activation
        if not isinstance(activation, torch.Tensor) or activation.dim() < 2:
            raise ValueError(f"causal_trace: {name!r} is not a [batch, position, ...] activation")
        for position in position_list:
            value = activation[:, position]
            cells.append({name: ReplacePatch(value=value, slice=(slice(None), position))})
    with torch.no_grad():
        values = sweep(
            compiled, corrupt, cells, metric, batch_size=batch_size, progress=progress, distributed=distributed
        )
    grid = values.float().mean(dim=1).reshape(len(names), len(position_list), *values.shape[2:])
    return CausalTrace(grid, names, position_list, clean_metric, corrupt_metric)


def plot_grid(
    grid: Union[CausalTrace, torch.Tensor],
    path: str,
    row_labels: Optional[Sequence[str]] = None,
    column_labels: Optional[Sequence[Any]] = None,
    title: str = "causal trace",
) -> str:
    """Writes a labelled heatmap PNG of a ``[rows, columns]`` grid; returns ``path``."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError("pb.plot_grid needs matplotlib: pip install 'patch-backend[plot]'") from error
    if isinstance(grid, CausalTrace):
        row_labels = row_labels or grid.sites
        column_labels = column_labels or grid.positions
        grid = grid.grid
    values = grid.detach().float().cpu()
    if values.dim() != 2:
        raise ValueError(f"plot_grid needs a 2-d grid, got shape {tuple(values.shape)}")
    rows, columns = values.shape
    figure, axes = plt.subplots(figsize=(max(4.0, 0.35 * columns + 3), max(3.0, 0.3 * rows + 1.5)))
    image = axes.imshow(values.numpy(), aspect="auto", cmap="viridis")
    row_ticks: List[Any] = list(row_labels) if row_labels else list(range(rows))
    axes.set_yticks(range(rows), labels=row_ticks, fontsize=7)
    axes.set_xticks(range(columns), labels=[str(c) for c in (column_labels or range(columns))], fontsize=7)
    axes.set_xlabel("position")
    axes.set_title(title)
    figure.colorbar(image, ax=axes)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
