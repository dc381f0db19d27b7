"""Activation-patching recipes shaped like TransformerLens's ``patching`` module.

Each recipe restores one clean activation into the corrupted run per cell (a layer and a
position, and a head for per-head recipes) and runs every cell as one ``pb.sweep``: a few
batched compiled forwards instead of one hooked forward per cell. The clean activations come
from a cache keyed by TransformerLens names (``pb.record(model, clean, "blocks.*.hook_resid_pre")``),
so the recipes need a model family with aliases (docs/transformers.md).

The grid holds ``metric`` averaged over the batch: ``metric(logits)`` returns one value per row
(TransformerLens's metric returns one value per batch; for a metric that is a mean over rows,
the two agree).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from .aliases import alias_table
from .roots import resolve_root
from .patches import ReplacePatch
from .sweep import Inputs, sweep

__all__ = ["Axis", "PatchGrid", "attn_head_out_by_pos", "block_every", "resid_pre"]

Metric = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Axis:
    """One axis of a grid: its name and the label of each index along it."""

    name: str
    labels: Tuple[Any, ...]


@dataclass(frozen=True)
class PatchGrid:
    """``values[i, j, ...]``: the metric with the cell at those axis labels restored to clean."""

    values: torch.Tensor
    axes: Tuple[Axis, ...]

    def axis(self, name: str) -> Axis:
        for axis in self.axes:
            if axis.name == name:
                return axis
        raise KeyError(f"no axis {name!r}; axes: {[axis.name for axis in self.axes]}")


@dataclass(frozen=True)
class _Cell:
    """One patched forward: the alias patched, the position and (per-head recipes) the head."""

    name: str
    position: int
    head: Optional[int] = None


def resid_pre(
    model: Any, corrupted: Inputs, clean_cache: Mapping[str, torch.Tensor], metric: Metric, **options: Any
) -> PatchGrid:
    """``get_act_patch_resid_pre``: ``[layer, pos]``, each cell restoring ``blocks.{layer}.hook_resid_pre``
    at one position."""
    layers, positions = _shape(model, clean_cache, "hook_resid_pre")
    cells = [_Cell(f"blocks.{layer}.hook_resid_pre", position) for layer in layers for position in positions]
    values = _run(model, corrupted, clean_cache, metric, cells, options)
    return PatchGrid(values.reshape(len(layers), len(positions)), (Axis("layer", tuple(layers)), Axis("pos", tuple(positions))))


def attn_head_out_by_pos(
    model: Any, corrupted: Inputs, clean_cache: Mapping[str, torch.Tensor], metric: Metric, **options: Any
) -> PatchGrid:
    """``get_act_patch_attn_head_out_by_pos``: ``[layer, pos, head]``, each cell restoring one head's
    ``blocks.{layer}.attn.hook_z`` at one position."""
    layers, positions = _shape(model, clean_cache, "attn.hook_z")
    heads = list(range(clean_cache[f"blocks.{layers[0]}.attn.hook_z"].shape[2]))
    cells = [
        _Cell(f"blocks.{layer}.attn.hook_z", position, head)
        for layer in layers
        for position in positions
        for head in heads
    ]
    values = _run(model, corrupted, clean_cache, metric, cells, options)
    axes = (Axis("layer", tuple(layers)), Axis("pos", tuple(positions)), Axis("head", tuple(heads)))
    return PatchGrid(values.reshape(len(layers), len(positions), len(heads)), axes)


BLOCK_COMPONENTS = ("hook_resid_pre", "hook_attn_out", "hook_mlp_out")


def block_every(
    model: Any, corrupted: Inputs, clean_cache: Mapping[str, torch.Tensor], metric: Metric, **options: Any
) -> PatchGrid:
    """``get_act_patch_block_every``: ``[component, layer, pos]`` for the residual stream, the
    attention output and the MLP output of every layer, all in one sweep."""
    layers, positions = _shape(model, clean_cache, "hook_resid_pre")
    for component in BLOCK_COMPONENTS[1:]:
        _shape(model, clean_cache, component)
    cells = [
        _Cell(f"blocks.{layer}.{component}", position)
        for component in BLOCK_COMPONENTS
        for layer in layers
        for position in positions
    ]
    values = _run(model, corrupted, clean_cache, metric, cells, options)
    axes = (Axis("component", BLOCK_COMPONENTS), Axis("layer", tuple(layers)), Axis("pos", tuple(positions)))
    return PatchGrid(values.reshape(len(BLOCK_COMPONENTS), len(layers), len(positions)), axes)


def _shape(model: Any, clean_cache: Mapping[str, torch.Tensor], hook: str) -> Tuple[List[int], List[int]]:
    """The model's layers and the cache's positions; KeyError saying what to record if missing."""
    table = alias_table(resolve_root(model))
    if table is None:
        raise ValueError(
            f"patching recipes need TransformerLens aliases, which {type(resolve_root(model)).__name__} has "
            "none of (supported: GPT-2, GPT-NeoX, Llama, Mistral, Qwen2, Gemma)"
        )
    layers = sorted({int(name.split(".")[1]) for name in table.names if name.endswith(f".{hook}")})
    missing = [f"blocks.{layer}.{hook}" for layer in layers if f"blocks.{layer}.{hook}" not in clean_cache]
    if missing or not layers:
        raise KeyError(
            f"the clean cache has no {', '.join(missing) or hook!r}: record them first, "
            f"e.g. pb.record(model, clean_inputs, 'blocks.*.{hook}')"
        )
    return layers, list(range(clean_cache[f"blocks.{layers[0]}.{hook}"].shape[1]))


def _run(
    model: Any,
    corrupted: Inputs,
    clean_cache: Mapping[str, torch.Tensor],
    metric: Metric,
    cells: Sequence[_Cell],
    options: Dict[str, Any],
) -> torch.Tensor:
    """One pb.sweep over the cells; the metric per cell, averaged over the batch."""
    patch_maps = [{cell.name: _restore(clean_cache[cell.name], cell)} for cell in cells]
    options.setdefault("progress", False)
    with torch.no_grad():
        values = sweep(model, corrupted, patch_maps, lambda output: metric(_logits(output)), **options)
    return values.float().mean(dim=1)


def _restore(clean: torch.Tensor, cell: _Cell) -> ReplacePatch:
    if cell.head is None:
        return ReplacePatch(value=clean[:, cell.position], slice=(slice(None), cell.position))
    return ReplacePatch(value=clean[:, cell.position, cell.head], slice=(slice(None), cell.position, cell.head))


def _logits(output: Any) -> Any:
    """What TransformerLens's metrics take: the logits (a HF output's ``.logits``), else the output."""
    logits = getattr(output, "logits", None)
    return output if logits is None else logits
