"""Shared by demo.py and bench_sweep.py: a GPT-2-shaped model and the peers a sweep replaces."""

from __future__ import annotations

import time
from typing import Callable, Dict, List, Sequence, Tuple

import torch


def gpt2(layers: int, width: int, heads: int, vocab: int, positions: int, device: str = "cpu"):
    """GPT-2 architecture with random weights, built from a config (nothing downloaded)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        n_layer=layers, n_embd=width, n_head=heads, vocab_size=vocab, n_positions=max(positions, 16),
        bos_token_id=0, eos_token_id=0, use_cache=False,
    )
    torch.manual_seed(0)
    return GPT2LMHeadModel(config).eval().to(device)


def clean_and_corrupt(vocab: int, positions: int, batch: int = 1, corrupted: int = 3, device: str = "cpu"):
    """Random prompts; the corrupted copy changes the first ``corrupted`` tokens (the 'subject')."""
    generator = torch.Generator().manual_seed(1)
    clean = torch.randint(0, vocab, (batch, positions), generator=generator)
    corrupt = clean.clone()
    corrupt[:, :corrupted] = (clean[:, :corrupted] + vocab // 2) % vocab
    return clean.to(device), corrupt.to(device)


def answer_metric(answer: int) -> Callable[[object], torch.Tensor]:
    """Log-probability of ``answer`` at the last position, one value per row."""
    return lambda output: output.logits[:, -1].log_softmax(-1)[:, answer]


def clean_block_outputs(model, ids) -> List[torch.Tensor]:
    """Residual stream after each block of the clean run, recorded with forward hooks."""
    recorded: List[torch.Tensor] = []
    handles = [
        block.register_forward_hook(lambda module, args, output: recorded.append(_hidden(output).detach().clone()))
        for block in model.transformer.h
    ]
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for handle in handles:
            handle.remove()
    return recorded


def _hidden(output):
    return output[0] if isinstance(output, tuple) else output


def _replace(output, hidden):
    return (hidden,) + tuple(output[1:]) if isinstance(output, tuple) else hidden


def hook_loop(model, corrupt, clean_states, cells: Sequence[Tuple[int, int]], metric) -> torch.Tensor:
    """What users do today: one eager forward per cell, a forward hook patching one block."""
    results = []
    with torch.no_grad():
        for layer, position in cells:
            def restore(module, args, output, layer=layer, position=position):
                hidden = _hidden(output).clone()
                hidden[:, position] = clean_states[layer][:, position]
                return _replace(output, hidden)

            handle = model.transformer.h[layer].register_forward_hook(restore)
            try:
                results.append(metric(model(corrupt)))
            finally:
                handle.remove()
    return torch.stack(results)


def hand_batched_hooks(model, corrupt, clean_states, cells: Sequence[Tuple[int, int]], metric, chunk: int):
    """The best eager peer: one forward per chunk, each hook patching row k at its own cell."""
    batch = corrupt.shape[0]
    results = []
    with torch.no_grad():
        for start in range(0, len(cells), chunk):
            block = list(cells[start : start + chunk])
            ids = corrupt.repeat(len(block), 1)
            handles = []
            for layer in {layer for layer, _ in block}:
                rows = [(k, position) for k, (l, position) in enumerate(block) if l == layer]

                def restore(module, args, output, layer=layer, rows=rows):
                    hidden = _hidden(output).clone()
                    for k, position in rows:
                        hidden[k * batch : (k + 1) * batch, position] = clean_states[layer][:, position]
                    return _replace(output, hidden)

                handles.append(model.transformer.h[layer].register_forward_hook(restore))
            try:
                values = metric(model(ids))
            finally:
                for handle in handles:
                    handle.remove()
            results.append(values.reshape(len(block), batch, *values.shape[1:]))
    return torch.cat(results)


def sweep_cells(clean_states, cells: Sequence[Tuple[int, int]]) -> List[Dict[str, object]]:
    from patch_backend import ReplacePatch

    return [
        {f"transformer.h_{layer}.output": ReplacePatch(value=clean_states[layer][:, position], slice=(slice(None), position))}
        for layer, position in cells
    ]


def seconds(fn: Callable[[], object], device: str = "cpu") -> Tuple[float, object]:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start, result
