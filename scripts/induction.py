"""A two-layer attention-only transformer trained on repeated random sequences (induction).

Used by ``demo.py``: a model small enough to train in seconds on two CPU cores whose mechanism
is known in advance (a previous-token head in layer 0 feeds an induction head in layer 1), so a
patching sweep has a right answer to find. Modules are named for readable node names:
``blocks_1.output`` is the residual stream after block 1, ``blocks_1.attn.z.output`` the
per-head attention outputs ``[batch, position, head, head_dim]`` before the output projection.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class Config:
    """Shape of the model and of the task; part of the cache key, so a change retrains."""

    layers: int = 2
    heads: int = 4
    width: int = 64
    vocab: int = 64
    half: int = 16  # longest repeated sequence; the model sees it twice (the demo's prompts)
    min_half: int = 4  # shortest one in training
    steps: int = 1000
    batch: int = 64
    lr: float = 3e-3
    seed: int = 0


class HeadOutputs(nn.Module):
    """``[batch, head, position, d]`` → ``[batch, position, head, d]``, as its own module so the
    per-head outputs get a stable name (``attn.z.output``) and a forward-hook point."""

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z.transpose(1, 2)


class Attention(nn.Module):
    """Causal multi-head self-attention; per-head outputs pass through ``self.z``."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.z = HeadOutputs()
        self.out = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, positions, width = x.shape
        qkv = self.qkv(x).view(batch, positions, 3, self.heads, width // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        z = self.z(F.scaled_dot_product_attention(q, k, v, is_causal=True))
        return self.out(z.reshape(batch, positions, width))


class Block(nn.Module):
    """Pre-norm residual block with attention only (no MLP): induction needs none."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(width)
        self.attn = Attention(width, heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.attn(self.ln(x))


class AttentionOnly(nn.Module):
    """Token + learned position embeddings, attention-only blocks, unembedding; returns logits."""

    def __init__(self, config: Config) -> None:
        super().__init__()
        self.embed = nn.Embedding(config.vocab, config.width)
        self.pos = nn.Embedding(2 * config.half, config.width)
        self.blocks = nn.ModuleList(Block(config.width, config.heads) for _ in range(config.layers))
        self.ln_f = nn.LayerNorm(config.width)
        self.unembed = nn.Linear(config.width, config.vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device))
        for block in self.blocks:
            x = block(x)
        return self.unembed(self.ln_f(x))


def repeated_sequences(config: Config, batch: int, generator: torch.Generator) -> torch.Tensor:
    """The demo's layout ``[A, A]``, A of ``half`` distinct random tokens (distinct: each token
    has one successor, so "the token after this one in the first copy" is well defined)."""
    first = torch.rand(batch, config.vocab, generator=generator).argsort(-1)[:, : config.half]
    return torch.cat([first, first], dim=1)


def training_batch(config: Config, batch: int, generator: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
    """Rows ``[noise (r), A (h), A (h)]`` of ``2 * half`` tokens, h uniform in ``min_half..half``;
    returns the ids and a mask of the predictable positions (the second copy but its first token).

    The offset h varies so that position alone cannot solve the task: with a fixed offset a
    single layer-0 head attending ``half - 1`` positions back learns to copy, and no induction
    head forms (the first version of this demo trained exactly that). All tokens of a row are
    distinct apart from the repeat.
    """
    length = 2 * config.half
    tokens = torch.rand(batch, config.vocab, generator=generator).argsort(-1)
    h = torch.randint(config.min_half, config.half + 1, (batch, 1), generator=generator)
    start = length - 2 * h  # where the first copy begins
    positions = torch.arange(length).unsqueeze(0)
    ids = tokens.gather(1, torch.where(positions < start + h, positions, positions - h))
    return ids, positions > start + h


def masked_loss(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy on the masked positions only: the rest is unpredictable noise."""
    losses = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
    return losses[mask[:, 1:]].mean()


def accuracy(model: nn.Module, config: Config, batch: int = 512, seed: int = 1234) -> float:
    """Share of predictable tokens predicted exactly (argmax), on held-out training-like rows."""
    ids, mask = training_batch(config, batch, torch.Generator().manual_seed(seed))
    with torch.no_grad():
        predicted = model(ids)[:, :-1].argmax(-1)
    return float((predicted == ids[:, 1:])[mask[:, 1:]].float().mean())


def train(config: Config) -> Tuple[AttentionOnly, Dict[str, float]]:
    """Trains from a fixed seed; returns the model (eval mode) and its time and accuracy.

    One thread: the machine has two shared cores, and for a model this small a second OpenMP
    thread competing with another process slows training several-fold instead of helping.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(config)
    finally:
        torch.set_num_threads(threads)


def _train(config: Config) -> Tuple[AttentionOnly, Dict[str, float]]:
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    model = AttentionOnly(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, config.lr, total_steps=config.steps, pct_start=0.1)
    start = time.perf_counter()
    for _ in range(config.steps):
        ids, mask = training_batch(config, config.batch, generator)
        loss = masked_loss(model(ids), ids, mask)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    seconds = time.perf_counter() - start
    model.eval()
    return model, {"train_seconds": seconds, "loss": float(loss.detach()), "accuracy": accuracy(model, config)}


def load_or_train(config: Config, path: str) -> Tuple[AttentionOnly, Dict[str, float], bool]:
    """The cached model at ``path`` when its config matches, else a freshly trained one (saved).

    Returns (model, training facts, whether it came from the cache).
    """
    if os.path.exists(path):
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if saved.get("config") == asdict(config):
            model = AttentionOnly(config)
            model.load_state_dict(saved["state"])
            return model.eval(), saved["facts"], True
    model, facts = train(config)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    torch.save({"config": asdict(config), "state": model.state_dict(), "facts": facts}, path)
    return model, facts, False


def clean_and_corrupt(config: Config, batch: int, seed: int = 7) -> Tuple[torch.Tensor, torch.Tensor]:
    """Clean ``[A, A]``; corrupt ``[B, A]`` with B random tokens none of which occur in A.

    The second copy is the same tokens in both runs, so only what induction reads from the first
    copy differs: in the corrupted run the query token never occurred before and there is nothing
    to copy. (Reversing A instead makes induction predict a wrong token; then undoing the
    previous-token head alone scores well on a logit difference by removing that wrong
    prediction, which hides which head writes the answer.)
    """
    tokens = torch.rand(batch, config.vocab, generator=torch.Generator().manual_seed(seed)).argsort(-1)
    first, other = tokens[:, : config.half], tokens[:, config.half : 2 * config.half]
    return torch.cat([first, first], dim=1), torch.cat([other, first], dim=1)


def scored_positions(config: Config) -> List[int]:
    """Query positions ``half + i`` for i in 1..half-2: those with both a right answer (``A[i+1]``)
    and an in-context distractor (``A[i-1]``, the token before the query)."""
    return list(range(config.half + 1, 2 * config.half - 1))


def logit_difference(clean: torch.Tensor, config: Config, positions: List[int]):
    """Metric: mean over ``positions`` of logit(right next token) − logit(the token before the
    query), one value per row; rows may be the batch repeated (sweep chunks).

    The distractor is a token of the context, so the difference measures copying the *next*
    token of the earlier copy, not merely copying something seen before.
    """
    half = config.half
    index = torch.tensor(positions)
    right = clean[:, index - half + 1]
    wrong = clean[:, index - half - 1]

    def metric(logits: torch.Tensor) -> torch.Tensor:
        repeats = logits.shape[0] // clean.shape[0]
        rows = logits[:, index]
        gathered_right = rows.gather(-1, right.repeat(repeats, 1).unsqueeze(-1)).squeeze(-1)
        gathered_wrong = rows.gather(-1, wrong.repeat(repeats, 1).unsqueeze(-1)).squeeze(-1)
        return (gathered_right - gathered_wrong).mean(-1)

    return metric


def record_clean(model: AttentionOnly, ids: torch.Tensor) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """With forward hooks: the residual stream (embeddings, then each block's output) and each
    layer's per-head outputs ``[batch, position, head, d]`` of the clean run."""
    residual: List[torch.Tensor] = []
    heads: List[torch.Tensor] = []
    handles = [model.blocks[0].register_forward_pre_hook(lambda module, args: residual.append(args[0].clone()))]
    for block in model.blocks:
        handles.append(block.register_forward_hook(lambda module, args, output: residual.append(output.clone())))
        handles.append(block.attn.z.register_forward_hook(lambda module, args, output: heads.append(output.clone())))
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for handle in handles:
            handle.remove()
    return residual, heads


def hook_loop_residual(model: AttentionOnly, corrupt: torch.Tensor, residual: List[torch.Tensor],
                       cells: List[Tuple[int, int]], metric) -> torch.Tensor:
    """The peer users write today: one eager forward per (residual layer, position) cell, a hook
    restoring the clean residual there (layer 0: block 0's input, layer r: block r-1's output)."""
    results = []
    with torch.no_grad():
        for layer, position in cells:
            def restore(hidden: torch.Tensor) -> torch.Tensor:
                hidden = hidden.clone()
                hidden[:, position] = residual[layer][:, position]
                return hidden

            if layer == 0:
                handle = model.blocks[0].register_forward_pre_hook(lambda module, args: (restore(args[0]),))
            else:
                handle = model.blocks[layer - 1].register_forward_hook(lambda module, args, output: restore(output))
            try:
                results.append(metric(model(corrupt)))
            finally:
                handle.remove()
    return torch.stack(results)


def hook_loop_heads(model: AttentionOnly, corrupt: torch.Tensor, heads: List[torch.Tensor],
                    cells: List[Tuple[int, int]], metric) -> torch.Tensor:
    """One eager forward per (layer, head), a hook on ``attn.z`` restoring that head's clean output."""
    results = []
    with torch.no_grad():
        for layer, head in cells:
            def restore(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
                output = output.clone()
                output[:, :, head] = heads[layer][:, :, head]
                return output

            handle = model.blocks[layer].attn.z.register_forward_hook(restore)
            try:
                results.append(metric(model(corrupt)))
            finally:
                handle.remove()
    return torch.stack(results)
