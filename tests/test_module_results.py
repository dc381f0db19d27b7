"""A module's results are named as it returned them (issue 9, case 7).

Dynamo inlines module calls into the caller's graph, so the graph alone does not say which
values a module returned, in which order, or which of them it passed through unchanged. The
names come from the tracer (``_torch_compat.frame.ModuleReturn``): ``output|sub_k`` is element k
of what the module returned, the same in every layer, and every element has a name, also one the
module passes through. Every patch is checked against a forward hook that edits ``output[k]``.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Dict, List, Optional, Tuple

import expecttest
import pytest
import torch
from torch import nn

import patch_backend as pb
from fixtures import output_with_hooks
from patch_backend._torch_compat import frame, gates
from patch_backend.errors import PatchBackendWarning

BACKENDS = ["graphpatch_eager", "graphpatch"]


class T5Layer(nn.Module):
    """Like T5's block: the first layer computes the position bias, later layers pass it on."""

    def __init__(self, first: bool) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.rel = nn.Linear(4, 4) if first else None

    def forward(self, hidden: torch.Tensor, position_bias: Optional[torch.Tensor] = None):
        if self.rel is not None:
            position_bias = self.rel(hidden).sigmoid()
        return self.lin(hidden) + position_bias, position_bias


class T5Like(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = nn.ModuleList([T5Layer(index == 0) for index in range(3)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None
        for block in self.block:
            x, bias = block(x, bias)
        return x * bias


class Router(nn.Module):
    """Like Mixtral's router: returns (input, weights, probabilities), computed in another
    order than returned, the first element passed through."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor):
        probs = self.gate(x).softmax(-1)
        weights = probs * 2
        return x, weights, probs


class MixtralLike(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.router = Router()
        self.out = nn.Linear(3, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b, c = self.router(x)
        return a + self.out(b - c)


class Nested(nn.Module):
    """Returns a nested structure: ``(h, (h * 2, {"k": x}))``; ``x`` is its input."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor):
        h = self.lin(x)
        return h, (h * 2, {"k": x})


class NestedCaller(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = Nested()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, (double, extra) = self.inner(x)
        return h + double + extra["k"]


Hook = Callable[[nn.Module, Any, Any], Any]


def _with_hooks(model: nn.Module, hooks: List[Tuple[nn.Module, Hook]], x: torch.Tensor) -> torch.Tensor:
    return output_with_hooks(model, x, [module.register_forward_hook(hook) for module, hook in hooks])


def _edit(index: int, change: Callable[[torch.Tensor], torch.Tensor]) -> Hook:
    """A forward hook that replaces ``output[index]`` by ``change(output[index])``."""

    def hook(module: nn.Module, args: Any, output: Any) -> Any:
        edited = list(output)
        edited[index] = change(edited[index])
        return tuple(edited)

    return hook


def _compiled(model: nn.Module, backend: str, x: torch.Tensor) -> nn.Module:
    torch._dynamo.reset()
    compiled = torch.compile(model, backend=backend)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled(x)
    return compiled


def _patched(compiled: nn.Module, patches: Dict[str, Any], x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad(), pb.patch(compiled, patches):
        return compiled(x)


class NamesTest(expecttest.TestCase):
    def test_t5_like_names_in_return_order_in_every_layer(self) -> None:
        torch.manual_seed(0)
        compiled = _compiled(T5Like(), "graphpatch_eager", torch.randn(2, 4))
        self.assertExpectedInline("\n".join(pb.nodes(compiled, "block_*.output*")), """\
block_0.output|sub_0
block_0.output|sub_1
block_1.output|sub_0
block_1.output|sub_1
block_2.output|sub_0
block_2.output|sub_1""")

    def test_router_names_in_return_order(self) -> None:
        torch.manual_seed(0)
        compiled = _compiled(MixtralLike(), "graphpatch_eager", torch.randn(2, 4))
        self.assertExpectedInline("\n".join(pb.nodes(compiled)), """\
x
router.x
router.gate.input
router.gate.weight
router.gate.bias
router.gate.linear
router.gate.output
router.softmax
router.mul
router.output|sub_0
router.output|sub_1
router.output|sub_2
sub
out.input
out.weight
out.bias
out.linear
out.output
add
output""")

    def test_nested_result_names(self) -> None:
        torch.manual_seed(0)
        compiled = _compiled(NestedCaller(), "graphpatch_eager", torch.randn(2, 4))
        self.assertExpectedInline("\n".join(pb.nodes(compiled, "inner.output*")), """\
inner.output|sub_0
inner.output|sub_1.sub_0
inner.output|sub_1.sub_1.k""")


@pytest.mark.parametrize("backend", BACKENDS)
def test_t5_like_patches_equal_hooks(backend: str) -> None:
    torch.manual_seed(0)
    model, x = T5Like(), torch.randn(2, 4)
    compiled = _compiled(model, backend, x)
    blocks = model.block
    cases = [
        # The bias computed in layer 0, as layer 0 returns it: layers 1 and 2 see the change.
        ({"block_0.output|sub_1": pb.AddPatch(value=1.0)}, [(blocks[0], _edit(1, lambda t: t + 1.0))]),
        # The bias layer 1 passes through: only layer 2 and the model's result see it.
        ({"block_1.output|sub_1": pb.ZeroPatch()}, [(blocks[1], _edit(1, torch.zeros_like))]),
        ({"block_2.output|sub_1": pb.AddPatch(value=3.0)}, [(blocks[2], _edit(1, lambda t: t + 3.0))]),
        ({"block_1.output|sub_0": pb.AddPatch(value=-2.0)}, [(blocks[1], _edit(0, lambda t: t - 2.0))]),
        # Two layers' passthroughs of one value: applied in the order the value flows.
        (
            {"block_0.output|sub_1": pb.ZeroPatch(), "block_1.output|sub_1": pb.AddPatch(value=0.5)},
            [(blocks[0], _edit(1, torch.zeros_like)), (blocks[1], _edit(1, lambda t: t + 0.5))],
        ),
    ]
    plain = model(x)
    for patches, hooks in cases:
        expected = _with_hooks(model, hooks, x)
        assert not torch.allclose(expected, plain), patches
        torch.testing.assert_close(_patched(compiled, patches, x), expected, msg=lambda m: f"{patches}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_t5_like_probe_of_a_passthrough(backend: str) -> None:
    torch.manual_seed(0)
    model, x = T5Like(), torch.randn(2, 4)
    compiled = _compiled(model, backend, x)
    probes = {f"block_{k}.output|sub_1": pb.ProbePatch() for k in range(3)}
    with torch.no_grad(), pb.patch(compiled, dict(probes)):
        compiled(x)
    bias = model.block[0].rel(x).sigmoid().detach()
    for probe in probes.values():
        torch.testing.assert_close(probe.activation, bias)


@pytest.mark.parametrize("backend", BACKENDS)
def test_router_patches_equal_hooks(backend: str) -> None:
    torch.manual_seed(0)
    model, x = MixtralLike(), torch.randn(2, 4)
    compiled = _compiled(model, backend, x)
    router = model.router
    for index in range(3):
        patches = {f"router.output|sub_{index}": pb.AddPatch(value=float(index + 1))}
        expected = _with_hooks(model, [(router, _edit(index, lambda t, k=index: t + float(k + 1)))], x)
        torch.testing.assert_close(_patched(compiled, patches, x), expected, msg=lambda m: f"{patches}: {m}")
    patches = {"router.output|sub_0": pb.ZeroPatch(), "router.output|sub_2": pb.ZeroPatch()}
    hooks = [(router, _edit(0, torch.zeros_like)), (router, _edit(2, torch.zeros_like))]
    torch.testing.assert_close(_patched(compiled, patches, x), _with_hooks(model, hooks, x))


@pytest.mark.parametrize("backend", BACKENDS)
def test_nested_result_patches_equal_hooks(backend: str) -> None:
    torch.manual_seed(0)
    model, x = NestedCaller(), torch.randn(2, 4)
    compiled = _compiled(model, backend, x)

    def edit_nested(module: nn.Module, args: Any, output: Any) -> Any:
        h, (double, extra) = output
        return h, (double + 1.0, {"k": extra["k"] * 0})

    expected = _with_hooks(model, [(model.inner, edit_nested)], x)
    patches = {"inner.output|sub_1.sub_0": pb.AddPatch(value=1.0), "inner.output|sub_1.sub_1.k": pb.ZeroPatch()}
    torch.testing.assert_close(_patched(compiled, patches, x), expected)


def _fallback_messages(caught) -> List[str]:
    return [str(w.message) for w in caught if issubclass(w.category, PatchBackendWarning)]


def test_recorder_install_fallback_warns_once(monkeypatch) -> None:
    """A torch without the tracer hooks: the recorder is not installed, with one warning."""
    gates.reset_warnings()
    monkeypatch.setattr(frame, "_probe_module_call_sites", lambda: None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert frame.install_return_recorder() is False
        assert frame.install_return_recorder() is False
    messages = _fallback_messages(caught)
    assert len(messages) == 1 and "graph order" in messages[0]
    gates.reset_warnings()


def test_unreadable_module_result_falls_back_to_graph_order(monkeypatch) -> None:
    """Where a module's result cannot be read, its results are named in graph order (the
    passed-through element unnamed), with one warning: degraded, never silent."""
    gates.reset_warnings()

    def unreadable(tx: Any, stack: Any, result: Any, *arguments: Any) -> None:
        raise LookupError("simulated")

    monkeypatch.setattr(frame, "_record_return", unreadable)
    torch.manual_seed(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch._dynamo.reset()
        compiled = torch.compile(MixtralLike(), backend="graphpatch_eager")
        compiled(torch.randn(2, 4))
        names = pb.nodes(compiled, "router.output*")
    messages = _fallback_messages(caught)
    assert len(messages) == 1 and "graph order" in messages[0]
    # Graph order: probs (softmax) before weights (mul); the passed-through x has no name.
    assert names == ["router.output|sub_0", "router.output|sub_1"]
    gates.reset_warnings()
