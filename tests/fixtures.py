"""Tiny models built in code (random weights, nothing downloaded)."""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn


class LinearModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(2, 3)

    def forward(self, x):
        return self.linear(x)


class LayerNormModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(4)

    def forward(self, x):
        return self.ln(x)


class C(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(100, 100)

    def forward(self, x):
        return self.linear(x)


class B(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c = C()

    def forward(self, x):
        return torch.relu(self.c(x))


class A(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.b_0 = B()
        self.b_1 = B()
        self.b_2 = B()

    def forward(self, x):
        return self.b_2(self.b_1(self.b_0(x)))


class NestedModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = A()

    def forward(self, x):
        return self.a(x) * 2


class TupleModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(2, 3)

    def forward(self, x):
        y = self.linear(x)
        return (y + 1, y * 2)


class CalledTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 3)

    def forward(self, x):
        return self.linear(torch.relu(self.linear(x)))


class ContainerModel(nn.Module):
    """One Linear reachable as shared, seq[0], blocks["a"] and layers[1]."""

    def __init__(self) -> None:
        super().__init__()
        shared = nn.Linear(3, 3)
        self.shared = shared
        self.seq = nn.Sequential(shared, nn.ReLU())
        self.blocks = nn.ModuleDict({"a": shared, "b": nn.Sequential(nn.Linear(3, 3))})
        self.layers = nn.ModuleList([nn.Linear(3, 3), shared])

    def forward(self, x):
        x = self.seq(x)
        x = self.blocks["b"](self.blocks["a"](x))
        for layer in self.layers:
            x = layer(x)
        return x


class BufferModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(2, 2)
        self.register_buffer("scale", torch.tensor([2.0, 3.0]))

    def forward(self, x):
        return self.linear(x) * self.scale


class VarArgsModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(2, 2)

    def forward(self, x, *args, k=3, **kwargs):
        y = self.linear(x) * k
        for extra in args:
            y = y + extra
        return y + kwargs["bias"]


class GraphBreakModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(3, 3)
        self.second = nn.Linear(3, 3)

    def forward(self, x):
        x = torch.relu(self.first(x))
        torch._dynamo.graph_break()
        return self.second(x) + 1


class BreakInBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(3, 4)
        self.down = nn.Linear(4, 3)

    def forward(self, x):
        h = torch.relu(self.up(x))
        torch._dynamo.graph_break()
        return self.down(h) + x


class BlocksWithBreak(nn.Module):
    """Several instances of a block whose forward graph-breaks (Dynamo shares its graphs)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(3, 3)
        self.blocks = nn.ModuleList([BreakInBlock() for _ in range(3)])

    def forward(self, x):
        x = self.embed(x)
        x = self.blocks[0](x)
        x = self.blocks[1](x)
        x = self.blocks[2](x)
        return x * 2


class MLP(nn.Module):
    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.up = nn.Linear(width, 2 * width)
        self.act = nn.GELU()
        self.down = nn.Linear(2 * width, width)

    def forward(self, x):
        return self.down(self.act(self.up(x)))


class TwoLayerMLP(nn.Module):
    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.layers = nn.ModuleList([MLP(width), MLP(width)])

    def forward(self, x):
        for layer in self.layers:
            x = x + layer(x)
        return x


def output_with_hooks(model: nn.Module, x: torch.Tensor, handles: Sequence[Any]) -> Any:
    """``model(x)`` under no_grad with the hooks behind ``handles`` registered, which are
    removed after: the hand-written-hooks side of the differential tests."""
    try:
        with torch.no_grad():
            return model(x)
    finally:
        for handle in handles:
            handle.remove()
