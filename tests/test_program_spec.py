"""The program spec (keys, typed slice forms) and the one insertion pass that builds from it."""

import copy
import gc
import weakref

import expecttest
import pytest
import torch

import patch_backend as pb
from fixtures import TwoLayerMLP
from patch_backend import AddPatch, CustomPatch, ProbePatch, RecordPatch, ReplacePatch, ZeroPatch
from patch_backend.capture.naming import Site
from patch_backend.program.insert import insert
from patch_backend.program.plan import SitePatches, structure_key
from patch_backend.program.spec import (
    AllDims,
    ConstantIndex,
    ConstantSlice,
    IndexTensor,
    IntIndex,
    MaskedSlice,
    PatchKind,
    PatchOp,
    ProbeOutput,
    ScalarValue,
    SliceRange,
    TensorValue,
    lower,
    slot_spec,
)


def _site(name, node, consumers=None, rank=(0, 0)):
    return Site(name, node, consumers, rank, "op", 0.0, (2, 3), torch.float32, "")


def _selection(*patches, site=None):
    return (SitePatches(site or _site("relu", "relu"), tuple(patches)),)


def test_key_ignores_values_and_positions():
    first = _selection(AddPatch(value=torch.ones(3), slice=(0, slice(1, None))), ReplacePatch(value=2.0, slice=[[0, 1]]))
    second = _selection(AddPatch(value=torch.zeros(3), slice=(-1, slice(0, None))), ReplacePatch(value=-5, slice=[[1, 0]]))
    assert structure_key(first) == structure_key(second)
    assert hash(structure_key(first)) == hash(structure_key(second))


@pytest.mark.parametrize(
    "other",
    [
        (0, slice(None, 2)),  # a bound given instead of omitted
        (0, slice(None, None, -1)),  # the step's sign
        (slice(None), 1),  # int and slice swapped
        (None, 0),  # a constant fallback form
        ([0, 1], [1, 2]),  # two advanced indices: fallback
    ],
)
def test_key_tells_slice_structures_apart(other):
    base = structure_key(_selection(ZeroPatch(slice=(0, slice(1, None)))))
    assert structure_key(_selection(ZeroPatch(slice=other))) != base


def test_fallback_constants_are_structure():
    # In a fallback form the numbers are compiled in, and True is not 1.
    assert structure_key(_selection(ZeroPatch(slice=(None, 1)))) != structure_key(_selection(ZeroPatch(slice=(None, 2))))
    assert structure_key(_selection(ZeroPatch(slice=(None, 1)))) != structure_key(_selection(ZeroPatch(slice=(None, True))))


def test_lowering_gives_typed_forms_and_their_values():
    lowered = lower(_selection(
        AddPatch(value=torch.ones(2), slice=(Ellipsis, slice(1, -1, 2))),
        ReplacePatch(value=3, slice=(1, [0, 2])),
        ZeroPatch(slice=(None, 0)),
        ProbePatch(),
    ))
    (site,) = lowered.spec.sites
    assert site.entries == (
        PatchOp(PatchKind.ADD, MaskedSlice((AllDims(), SliceRange(0, 1, 2, True))), TensorValue(0, (2,), torch.float32, False)),
        PatchOp(PatchKind.REPLACE, MaskedSlice((IntIndex(3), IndexTensor(1, (2,), torch.int64))), ScalarValue(0)),
        PatchOp(PatchKind.ZERO, ConstantSlice((ConstantIndex(None, "None"), ConstantIndex(0, "0"))), None),
        ProbeOutput(),
    )
    assert lowered.values.ints == (1, -1, 2, 1)
    assert lowered.values.scalars == (3.0,)
    assert [t.tolist() for t in lowered.values.tensors] == [[1.0, 1.0], [0, 2]]
    assert (lowered.spec.ints, lowered.spec.scalars, lowered.spec.tensors) == (4, 1, 2)


class _Small(torch.nn.Module):
    def forward(self, x):
        h = torch.relu(x)
        return h * 2 + h.sum()


def _listing(gm):
    lines = []
    for node in gm.graph.nodes:
        target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
        args = ", ".join(a.name if isinstance(a, torch.fx.Node) else "..." for a in node.args if not isinstance(a, tuple))
        lines.append(f"{node.op} {target}({args})" if node.op.startswith("call_") else f"{node.op} {target}")
    return "\n".join(lines) + "\n"


class InsertionListingTest(expecttest.TestCase):
    def setUp(self):
        self.gm = torch.fx.symbolic_trace(_Small())
        # A site on relu for every use, then one for its `mul` use only: `mul` reads relu through
        # both, `sum` through the first, and the shared prefix is emitted once.
        self.sites = [_site("relu.output", "relu", None, (0, 0)), _site("mul.input", "relu", frozenset({"mul"}), (1, 0))]

    def test_patched_variant(self):
        selection = (
            SitePatches(self.sites[0], (ZeroPatch(slice=(0,)), ProbePatch())),
            SitePatches(self.sites[1], (AddPatch(value=1.0), RecordPatch())),
        )
        inserted = insert(self.gm, lower(selection).spec)
        self.assertExpectedInline(_listing(inserted.gm), """\
placeholder x
placeholder _patch_ints
placeholder _patch_scalars
call_function relu(x)
call_function zero(relu, _patch_ints)
call_function probe(zero)
call_function select.int(_patch_scalars, ..., ...)
call_function add(zero, _patch_ints, select_int)
call_function probe(add_1)
call_function mul(add_1, ...)
call_method sum(zero)
call_function add(mul, sum_1)
output output
""")
        assert [(r.site, r.entry) for r in inserted.extra] == [(0, 1), (1, 1)]
        assert inserted.original_outputs == 1

    def test_slot_variant(self):
        inserted = insert(self.gm, slot_spec(self.sites))
        self.assertExpectedInline(_listing(inserted.gm), """\
placeholder x
placeholder _slot_keep_0
placeholder _slot_fill_0
placeholder _slot_keep_1
placeholder _slot_fill_1
call_function relu(x)
call_function slot(relu, _slot_keep_0, _slot_fill_0)
call_function slot(slot, _slot_keep_1, _slot_fill_1)
call_function mul(slot_1, ...)
call_method sum(slot)
call_function add(mul, sum_1)
output output
""")
        assert [(r.slot, r.after) for r in inserted.extra] == [(0, False), (0, True), (1, False), (1, True)]

    def test_the_captured_graph_is_left_alone(self):
        before = str(self.gm.graph)
        insert(self.gm, slot_spec(self.sites))
        assert str(self.gm.graph) == before


def _patch_maps():
    width = 8
    return {
        "zero": lambda: {"layers_0.output": ZeroPatch(slice=(slice(None), 3))},
        "add": lambda: {"layers_0.up.output": AddPatch(value=torch.randn(2 * width), slice=(1,))},
        "replace": lambda: {"layers_1.output": ReplacePatch(value=0.5, slice=(0, slice(2, 6, 2)))},
        "custom": lambda: {"layers_0.output": CustomPatch(custom_op=lambda t: t * 3)},
        "probe": lambda: {"layers_0.output": [AddPatch(value=1.0), ProbePatch()]},
        "record": lambda: {"layers_1.up.output": [RecordPatch(), ZeroPatch(slice=[[0, 1]])]},
    }


@pytest.mark.parametrize("kind", sorted(_patch_maps()))
def test_compiled_matches_eager_for_each_kind(kind):
    model, x = TwoLayerMLP(), torch.randn(2, 8)
    compiled = torch.compile(model, backend="graphpatch")
    eager = torch.compile(copy.deepcopy(model), backend="graphpatch_eager")
    torch.manual_seed(1)
    ours = _patch_maps()[kind]()
    torch.manual_seed(1)
    reference = _patch_maps()[kind]()
    with pb.patch(compiled, ours):
        got = compiled(x)
    with pb.patch(eager, reference):
        want = eager(x)
    torch.testing.assert_close(got, want)
    for mine, theirs in zip(_probes(ours), _probes(reference)):
        torch.testing.assert_close(mine, theirs)


def _probes(patch_map):
    for patches in patch_map.values():
        for patch in patches if isinstance(patches, list) else [patches]:
            if isinstance(patch, ProbePatch):
                yield patch.activation
            elif isinstance(patch, RecordPatch):
                yield patch.activations


def test_slot_variant_matches_eager():
    model, x = TwoLayerMLP(), torch.randn(2, 8)
    compiled = torch.compile(model, backend="graphpatch")
    eager = torch.compile(copy.deepcopy(model), backend="graphpatch_eager")
    compiled(x)
    pb.prepare(compiled, ["layers_0.output", "layers_1.up.output"])
    for cell in (
        {"layers_0.output": [ProbePatch(), ZeroPatch(slice=(0,)), AddPatch(value=torch.ones(8))]},
        {"layers_1.up.output": ReplacePatch(value=2.0, slice=(slice(None), [1, 5]))},
    ):
        with pb.patch(compiled, cell):
            got = compiled(x)
        with pb.patch(eager, cell):
            want = eager(x)
        torch.testing.assert_close(got, want)
    assert pb.stats(compiled).variants_compiled == 1


def _scaled_by(captured):
    return lambda t: t * captured


def test_variant_keeps_no_custom_capture_alive():
    # Neither the cache key (the spec) nor the compiled graph holds the first patch's callable:
    # its captured tensors are inputs, and the traced stand-in keeps only the code.
    model, x = TwoLayerMLP(), torch.randn(2, 8)
    compiled = torch.compile(model, backend="graphpatch")
    compiled(x)
    captured = torch.full((8,), 2.0)
    with pb.patch(compiled, {"layers_0.output": CustomPatch(custom_op=_scaled_by(captured))}):
        compiled(x)
    assert pb.stats(compiled).variants_compiled == 1
    ref = weakref.ref(captured)
    del captured
    gc.collect()
    assert ref() is None
