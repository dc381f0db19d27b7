"""Differential fuzzing: graphpatch == graphpatch_eager == hand-written forward hooks.

Each example draws a fixture model, 1-3 nested ``pb.patch`` layers, and in each layer 1-2 named
nodes with 1-3 patches of random kind, slice (ints, negative indices, steps, lists, tensor
indices, Ellipsis, occasionally forms only the constant fallback handles or that are invalid)
and value (numbers, tensors of the target slice's shape or any shape broadcasting to it, other
dtypes). Then:

* the compiled backend's result, probe and record activations equal ``graphpatch_eager``'s, or
  both raise the same exception type before the model runs, leaving no patch active;
* where every patched node is a module output, ``graphpatch_eager`` equals a plain eager run with
  forward hooks that apply the patches by hand (``x[s] = v`` ...), independent of ``Patch.op``;
* nothing mutates parameters, buffers, the input or the patch values.

Cost: compiled models live at module level, so each test captures them once (the conftest resets
Dynamo per test, not per example) and a patch *structure* seen before reuses its compiled
variant. In CI the structural choices come from 20 seeded structures (``Picks``) while
hypothesis draws the numbers, so variants recur and run again with other slice integers and
values; 50 examples per test, derandomized so CI is reproducible.
``PATCH_BACKEND_FUZZ_EXAMPLES=1000`` runs a campaign: random seeds, every choice from hypothesis.
"""

from __future__ import annotations

import contextlib
import copy
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import patch_backend as pb
from fixtures import BufferModel, CalledTwice, GraphBreakModel, NestedModel, TupleModel, TwoLayerMLP
from patch_backend import AddPatch, CustomPatch, ProbePatch, RecordPatch, ReplacePatch, ZeroPatch
from patch_backend.context import active_state
from patch_backend.capture.index import index_for

CAMPAIGN = "PATCH_BACKEND_FUZZ_EXAMPLES" in os.environ
EXAMPLES = int(os.environ.get("PATCH_BACKEND_FUZZ_EXAMPLES", "50"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=not CAMPAIGN,
    database=None,
    print_blob=True,
    suppress_health_check=list(HealthCheck),
)


# -- fixtures ------------------------------------------------------------------------------------
#: Hook target of a module-output node: (module path in the model, which call of it, index
#: inside a tuple result or None).
Hook = Tuple[str, int, Optional[int]]


@dataclass(frozen=True)
class Fixture:
    build: Callable[[], torch.nn.Module]
    input_shape: Tuple[int, ...]
    #: node name -> hook target (None: not a module output, no hook reference).
    sites: Dict[str, Optional[Hook]]


FIXTURES: Dict[str, Fixture] = {
    "mlp": Fixture(
        lambda: TwoLayerMLP(8),
        (2, 5, 8),
        {
            "layers_0.output": ("layers.0", 0, None),
            "layers_1.up.output": ("layers.1.up", 0, None),
            "layers_1.act.output": ("layers.1.act", 0, None),
            "output": ("", 0, None),
            "layers_0.act.gelu": None,
            "layers_1.down.weight": None,
            "layers_0.up.input": None,
            "x": None,
        },
    ),
    "tuple": Fixture(
        TupleModel,
        (3, 2),
        {
            "output|sub_0": ("", 0, 0),
            "output|sub_1": ("", 0, 1),
            "linear.output": ("linear", 0, None),
            "linear.bias": None,
        },
    ),
    "twice": Fixture(
        CalledTwice,
        (4, 3),
        {
            "linear_0.output": ("linear", 0, None),
            "linear_1.output": ("linear", 1, None),
            "relu": None,
            "linear_0.weight": None,
            "linear_1.input": None,
        },
    ),
    "break": Fixture(
        GraphBreakModel,
        (4, 3),
        {
            "first.output": ("first", 0, None),
            "second.output": ("second", 0, None),
            "relu": None,
            "second.input": None,
            "add": None,
        },
    ),
    "buffer": Fixture(
        BufferModel,
        (3, 2),
        {"linear.output": ("linear", 0, None), "output": ("", 0, None), "scale": None, "mul": None},
    ),
    "nested": Fixture(
        NestedModel,
        (2, 100),
        {
            "a.b_1.output": ("a.b_1", 0, None),
            "a.b_2.output": ("a.b_2", 0, None),
            "a.output": ("a", 0, None),
            "a.b_0.c.linear.output": ("a.b_0.c.linear", 0, None),
            "mul": None,
        },
    ),
}

#: name -> {"eager"/"compiled": (model, compiled), "plain": model, "x": input}; built once.
_MODELS: Dict[str, Dict[str, Any]] = {}


def models(name: str) -> Dict[str, Any]:
    if name not in _MODELS:
        torch.manual_seed(1234)
        fixture = FIXTURES[name]
        # Inference graphs (no parameter requires grad): compiled variants skip the backward
        # partition and compile about twice as fast; gradients are tested in test_compiled.py.
        plain = fixture.build().eval().requires_grad_(False)
        entry: Dict[str, Any] = {"plain": plain, "x": torch.randn(fixture.input_shape)}
        for key, backend in (("eager", "graphpatch_eager"), ("compiled", "graphpatch")):
            model = copy.deepcopy(plain)
            entry[key] = (model, torch.compile(model, backend=backend))
        _MODELS[name] = entry
    entry = _MODELS[name]
    for key in ("eager", "compiled"):
        entry[key][1](entry["x"])  # (re)captures after the per-test Dynamo reset; cheap otherwise
    return entry


def site_shape(model: torch.nn.Module, name: str) -> Tuple[int, ...]:
    return tuple(index_for(model).by_name[name][0].site.shape)


# -- strategies ----------------------------------------------------------------------------------
#: CI: structural choices come from this many seeded structures, so compiled variants recur
#: and each also runs again with other numbers (the "values are inputs" path). A campaign draws
#: every choice from hypothesis.
STRUCTURES = None if CAMPAIGN else 20


class Picks:
    """Structural choices (``choice``/``count``: what decides the compiled variant) and numbers
    (``number``/``numbers``: slice integers, values), drawn by hypothesis or, for the structure
    in CI, by a ``random.Random`` seeded with a drawn structure number."""

    def __init__(self, draw, structure_seed: Optional[int]) -> None:
        import random

        self.draw = draw
        self.rng = random.Random(structure_seed) if structure_seed is not None else None

    def choice(self, options):
        options = list(options)
        return self.rng.choice(options) if self.rng else self.draw(st.sampled_from(options))

    def count(self, low: int, high: int) -> int:
        return self.rng.randint(low, high) if self.rng else self.draw(st.integers(low, high))

    def number(self, low: int, high: int) -> int:
        return self.draw(st.integers(low, high))

    def maybe_number(self, low: int, high: int) -> Optional[int]:
        return None if self.choice([True, False]) else self.number(low, high)


def dim_element(picks: Picks, size: int) -> Any:
    kind = picks.choice(["full", "full", "int", "int", "range", "step", "tensor", "list"])
    if kind == "full":
        return slice(None)
    if kind == "int":
        return picks.number(-size, size - 1)
    if kind == "range":
        return slice(picks.maybe_number(-size - 1, size), picks.maybe_number(-size - 1, size + 1))
    if kind == "step":
        return slice(picks.maybe_number(-size, size), None, picks.number(1, 3))
    rows = [picks.number(-size, size - 1) for _ in range(picks.count(1, 2))]
    return torch.tensor(rows) if kind == "tensor" else rows


def tensor_slice_for(picks: Picks, shape: Tuple[int, ...]) -> Any:
    rank = len(shape)
    form = picks.choice(["none"] * 3 + ["dims"] * 8 + ["ellipsis", "bare", "odd", "bad"])
    if form == "none":
        return None
    if form == "bare":  # a single element, not a sequence: indexes dim 0
        return picks.number(-shape[0], shape[0] - 1) if picks.choice([True, False]) else slice(1, None)
    if form == "ellipsis":
        return (Ellipsis, dim_element(picks, shape[-1]))
    if form == "odd":  # forms compiled with constants (several advanced indices, None, bool)
        return picks.choice([([0, 1], [1, 0]), (None, 0), (True, 0)] if rank >= 2 else [(None, 0)])
    if form == "bad":  # must be refused identically by both backends
        return picks.choice([
            (shape[0],), (slice(None, None, -1),), tuple([0] * (rank + 1)), (torch.tensor([shape[0]]),),
            (Ellipsis, [shape[-1]]), (Ellipsis, torch.tensor([-shape[-1] - 1])),
        ])
    count = picks.count(1, rank)
    elements = [dim_element(picks, shape[dim]) for dim in range(count)]
    if sum(isinstance(e, (list, torch.Tensor)) for e in elements) > 1:
        # one advanced index keeps the masked (runtime-integer) form; several are rarer ("odd")
        first = next(i for i, e in enumerate(elements) if isinstance(e, (list, torch.Tensor)))
        elements = [e if i == first or not isinstance(e, (list, torch.Tensor)) else slice(None) for i, e in enumerate(elements)]
    return list(elements) if picks.choice([True, False]) and count > 1 else tuple(elements)


def sliced(shape: Tuple[int, ...], tensor_slice: Any) -> Optional[Tuple[int, ...]]:
    """Shape of ``target[tensor_slice]``, None when the slice does not apply."""
    if tensor_slice is None:
        return shape
    from patch_backend.patches import normalize_slice

    index = tuple(e.to("meta") if isinstance(e, torch.Tensor) else torch.tensor(e, device="meta") if isinstance(e, list) else e
                  for e in normalize_slice(tensor_slice))
    try:
        return tuple(torch.empty(shape, device="meta")[index].shape)
    except Exception:
        return None


def value_for(picks: Picks, target: Optional[Tuple[int, ...]]) -> Any:
    form = picks.choice(["number", "number", "full", "full", "broadcast", "suffix", "bad"])
    if form == "number":
        return picks.draw(st.one_of(st.floats(-4, 4, allow_nan=False, width=32), st.integers(-3, 3), st.booleans()))
    target = target if target is not None else (1,)
    if form == "bad":
        return torch.ones(tuple(target) + (3,))
    shape = list(target)
    if form == "broadcast":
        shape = [1 if picks.choice([True, False]) else s for s in shape]
    elif form == "suffix":
        shape = shape[picks.count(0, len(shape)):]
    dtype = picks.choice([torch.float32, torch.float32, torch.float64, torch.int64])
    generator = torch.Generator().manual_seed(picks.number(0, 2**16))
    return (torch.randn(shape, generator=generator) * 3).to(dtype)


def _scale(scale):
    return lambda t: t * scale


def _relu_plus(t):
    return torch.relu(t) + 1


def _in_place_double(t):
    t.mul_(2)
    return t


def patch_spec(picks: Picks, shape: Tuple[int, ...]) -> Tuple[Any, ...]:
    kind = picks.choice(["zero", "add", "add", "replace", "replace", "probe", "record", "custom"])
    if kind in ("probe", "record"):
        return (kind,)
    if kind == "custom":
        which = picks.choice(["scale", "relu", "inplace"])
        if which == "scale":
            generator = torch.Generator().manual_seed(picks.number(0, 99))
            return ("custom", "scale", torch.randn(shape[-1], generator=generator))
        return ("custom", which, None)
    tensor_slice = tensor_slice_for(picks, shape)
    if kind == "zero":
        return ("zero", tensor_slice)
    return (kind, tensor_slice, value_for(picks, sliced(shape, tensor_slice)))


def make_patch(spec: Tuple[Any, ...]):
    """A fresh Patch for a spec (each backend and the hook reference get their own objects)."""
    kind = spec[0]
    if kind == "probe":
        return ProbePatch()
    if kind == "record":
        return RecordPatch()
    if kind == "custom":
        function = {"scale": lambda: _scale(spec[2]), "relu": lambda: _relu_plus, "inplace": lambda: _in_place_double}[spec[1]]()
        return CustomPatch(custom_op=function)
    if kind == "zero":
        return ZeroPatch(slice=spec[1])
    cls = AddPatch if kind == "add" else ReplacePatch
    return cls(value=spec[2], slice=spec[1])


@st.composite
def scenarios(draw, hooked_only: bool = False):
    structure = draw(st.integers(0, STRUCTURES - 1)) if STRUCTURES else None
    picks = Picks(draw, structure)
    # CI: every fixture gets its share of the structures.
    name = sorted(FIXTURES)[structure % len(FIXTURES)] if STRUCTURES else picks.choice(sorted(FIXTURES))
    entry = models(name)
    eager_model = entry["eager"][0]
    candidates = [site for site, hook in FIXTURES[name].sites.items() if hook is not None or not hooked_only]
    layers = []
    # Mostly small maps, sometimes deeper nesting and longer lists.
    for _ in range(picks.choice([1, 1, 1, 2, 2, 3])):
        sites = []
        for _ in range(picks.choice([1, 1, 2])):
            site = picks.choice(candidates)
            if site not in sites:
                sites.append(site)
        layer = {}
        for site in sites:
            shape = site_shape(eager_model, site)
            layer[site] = [patch_spec(picks, shape) for _ in range(picks.choice([1, 1, 1, 2, 3]))]
        layers.append(layer)
    return name, layers


# -- running -------------------------------------------------------------------------------------
@dataclass
class Outcome:
    error: Optional[type] = None
    message: str = ""
    output: Any = None
    probes: Any = None


def collect(layers_patches) -> List[Any]:
    found = []
    for layer in layers_patches:
        for site, patches in layer.items():
            for patch in patches:
                if isinstance(patch, ProbePatch):
                    found.append((site, patch.activation))
                elif isinstance(patch, RecordPatch):
                    found.append((site, list(patch.activations)))
    return found


def run_backend(compiled, layers, x) -> Outcome:
    layer_patches = [{site: [make_patch(s) for s in specs] for site, specs in layer.items()} for layer in layers]
    outcome = Outcome()
    try:
        with contextlib.ExitStack() as stack:
            for patch_map in layer_patches:
                stack.enter_context(pb.patch(compiled, patch_map))
            outcome.output = compiled(x)
    except Exception as error:  # the comparison is on the exception type
        outcome.error, outcome.message = type(error), str(error)
    assert active_state().roots == (), "a patch stayed active"
    outcome.probes = collect(layer_patches)
    return outcome


def _index(tensor_slice):
    from patch_backend.patches import normalize_slice

    return Ellipsis if tensor_slice is None else normalize_slice(tensor_slice)


def _converted(value: Any, target: torch.Tensor) -> Any:
    """docs/errors.md: a tensor value is converted to the target's dtype, then applied."""
    return value.to(target.dtype) if isinstance(value, torch.Tensor) else value


def apply_by_hand(value: torch.Tensor, patches) -> torch.Tensor:
    """The patch semantics of graphpatch 0.2.3's Patch API, written out (no Patch.op)."""
    if any(not isinstance(p, (ProbePatch, RecordPatch)) for p in patches):
        value = value.clone()
    for patch in patches:
        if isinstance(patch, ProbePatch):
            patch.activation = value.detach().clone()
        elif isinstance(patch, RecordPatch):
            patch.activations.append(value.detach().clone())
        elif isinstance(patch, ZeroPatch):
            value[_index(patch.slice)] = 0
        elif isinstance(patch, AddPatch):
            value[_index(patch.slice)] += _converted(patch.value, value)
        elif isinstance(patch, ReplacePatch):
            value[_index(patch.slice)] = _converted(patch.value, value)
        else:
            value = patch.custom_op(value)
    return value


def run_hooks(fixture: Fixture, plain: torch.nn.Module, layers, x) -> Outcome:
    layer_patches = [{site: [make_patch(s) for s in specs] for site, specs in layer.items()} for layer in layers]
    merged: Dict[str, List[Any]] = {}
    for layer in layer_patches:
        for site, patches in layer.items():
            merged.setdefault(site, []).extend(patches)
    by_module: Dict[str, List[Tuple[int, Optional[int], List[Any]]]] = {}
    for site, patches in merged.items():
        path, call, position = fixture.sites[site]
        by_module.setdefault(path, []).append((call, position, patches))
    handles = []
    for path, targets in by_module.items():
        calls = [0]

        def hook(module, args, output, targets=targets, calls=calls):
            call = calls[0]
            calls[0] += 1
            for target_call, position, patches in targets:
                if target_call != call:
                    continue
                if position is None:
                    output = apply_by_hand(output, patches)
                else:
                    items = list(output)
                    items[position] = apply_by_hand(items[position], patches)
                    output = type(output)(items)
            return output

        handles.append(plain.get_submodule(path).register_forward_hook(hook))
    try:
        output = plain(x)
    finally:
        for handle in handles:
            handle.remove()
    return Outcome(output=output, probes=collect(layer_patches))


def assert_same(actual: Outcome, expected: Outcome, what: str) -> None:
    assert actual.error == expected.error, f"{what}: {actual.error} ({actual.message}) != {expected.error} ({expected.message})"
    if expected.error is not None:
        return
    torch.testing.assert_close(actual.output, expected.output, rtol=1e-4, atol=1e-5, msg=lambda m: f"{what} output: {m}")
    assert [site for site, _ in actual.probes] == [site for site, _ in expected.probes]
    for (site, got), (_, want) in zip(actual.probes, expected.probes):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=lambda m: f"{what} probe at {site}: {m}")


def snapshot(*modules: torch.nn.Module) -> List[torch.Tensor]:
    return [t.detach().clone() for m in modules for t in list(m.parameters()) + list(m.buffers())]


def value_tensors(layers) -> List[torch.Tensor]:
    return [v for layer in layers for specs in layer.values() for s in specs for v in s[1:] if isinstance(v, torch.Tensor)]


def check_scenario(scenario, compare_compiled: bool = True) -> None:
    name, layers = scenario
    fixture, entry = FIXTURES[name], models(name)
    x = entry["x"]
    eager_model, eager = entry["eager"]
    compiled_model, compiled = entry["compiled"]
    before = snapshot(eager_model, compiled_model, entry["plain"])
    inputs_before = [x.clone()] + [v.clone() for v in value_tensors(layers)]

    expected = run_backend(eager, layers, x)
    if compare_compiled:
        assert_same(run_backend(compiled, layers, x), expected, f"graphpatch vs graphpatch_eager on {name}")
    hooked = all(fixture.sites[site] is not None for layer in layers for site in layer)
    if hooked and expected.error is None:
        assert_same(expected, run_hooks(fixture, entry["plain"], layers, x), f"graphpatch_eager vs hooks on {name}")

    after = snapshot(eager_model, compiled_model, entry["plain"])
    assert all(torch.equal(a, b) for a, b in zip(before, after)), "a patch mutated a parameter or buffer"
    inputs_after = [x] + value_tensors(layers)
    assert all(torch.equal(a, b) for a, b in zip(inputs_before, inputs_after)), "a patch mutated its input or value"


# -- tests ---------------------------------------------------------------------------------------
@pytest.mark.slow
@FUZZ
@given(scenario=scenarios())
def test_fuzz_compiled_matches_eager(scenario):
    check_scenario(scenario)


@FUZZ
@given(scenario=scenarios(hooked_only=True))
def test_fuzz_module_outputs_match_hooks(scenario):
    """Module outputs only, so every example checks graphpatch_eager against the hooks (cheap:
    nothing compiles; the compiled backend is held to graphpatch_eager by the test above)."""
    check_scenario(scenario, compare_compiled=CAMPAIGN)


# Failures the campaigns found, kept as fixed examples (both backends, each against the hand
# written reference).
def test_found_empty_slice_with_empty_value(backend):
    """An empty selection with an empty value: the compiled masked op gathered out of bounds."""
    model, x = GraphBreakModel(), torch.randn(4, 3)
    compiled = torch.compile(model, backend=backend)
    compiled(x)
    with pb.patch(compiled, {"first.output": AddPatch(slice=(slice(None, 0),), value=torch.ones(0, 3))}):
        torch.testing.assert_close(compiled(x), model(x))


def test_found_advanced_index_replace_converts_dtype(backend):
    """A float64 value at two advanced indices: eager index_put refused the dtype mid-run."""
    model, x = TupleModel(), torch.randn(3, 2)
    compiled = torch.compile(model, backend=backend)
    compiled(x)
    value = torch.tensor([4.5, -1.25], dtype=torch.float64)
    with pb.patch(compiled, {"linear.output": ReplacePatch(slice=([0, 1], [1, 0]), value=value)}):
        first, _ = compiled(x)
    expected = model.linear(x).detach()
    expected[[0, 1], [1, 0]] = value.float()
    torch.testing.assert_close(first, expected + 1)


def test_found_slice_ending_early_with_full_value(backend):
    """A full-size value on a slice that stops before the end: positions past the slice had a
    gather index past the value's end (Inductor: 'index out of bounds' in the kernel)."""
    model, x = TwoLayerMLP(8), torch.randn(2, 5, 8)
    compiled = torch.compile(model, backend=backend)
    compiled(x)
    tensor_slice = [slice(1, None, 3), [-4, 2], slice(None, -1)]
    value = torch.randn(1, 2, 15, dtype=torch.float64)
    probe = ProbePatch()
    patches = [ReplacePatch(slice=tensor_slice, value=value), CustomPatch(custom_op=_relu_plus), probe]
    with pb.patch(compiled, {"layers_1.up.output": patches}):
        compiled(x)
    up = model.layers[1].up(x + model.layers[0](x)).detach()
    up[1::3, [-4, 2], :-1] = value.float()
    torch.testing.assert_close(probe.activation, torch.relu(up) + 1)


def test_fuzz_unpatched_after_examples():
    """After patched examples, every fixture runs its plain code again with the model's result."""
    for name in FIXTURES:
        entry = models(name)
        for key in ("eager", "compiled"):
            torch.testing.assert_close(entry[key][1](entry["x"]), entry["plain"](entry["x"]), rtol=1e-4, atol=1e-5)
