"""Patch semantics (graphpatch 0.2.3's documented Patch API), each under graphpatch_eager and graphpatch."""

import pytest
import torch

import patch_backend as pb
from fixtures import (
    BlocksWithBreak,
    CalledTwice,
    GraphBreakModel,
    LayerNormModel,
    LinearModel,
    NestedModel,
    TupleModel,
    TwoLayerMLP,
)
from patch_backend import AddPatch, CustomPatch, ProbePatch, RecordPatch, ReplacePatch, ZeroPatch


def compile_and_run(model, backend, *args):
    compiled = torch.compile(model, backend=backend)
    compiled(*args)
    return compiled


def test_unpatched_matches_model(backend):
    model, x = NestedModel(), torch.randn(2, 100)
    compiled = compile_and_run(model, backend, x)
    torch.testing.assert_close(compiled(x), model(x))


def test_zero_input(backend):
    model, x = LinearModel(), torch.randn(3, 2)
    compiled = compile_and_run(model, backend, x)
    with pb.patch(compiled, {"linear.input": ZeroPatch()}):
        patched = compiled(x)
    torch.testing.assert_close(patched, model.linear(torch.zeros_like(x)))
    torch.testing.assert_close(compiled(x), model(x))


def test_replace_output_with_full_slice(backend):
    model, x = LinearModel(), torch.randn(3, 2)
    compiled = compile_and_run(model, backend, x)
    with pb.patch(compiled, {"output": ReplacePatch(value=3, slice=(slice(None), slice(None)))}):
        patched = compiled(x)
    torch.testing.assert_close(patched, torch.full((3, 3), 3.0))


def test_probe_weight(backend):
    model, x = LinearModel(), torch.randn(3, 2)
    compiled = compile_and_run(model, backend, x)
    probe = ProbePatch()
    with pb.patch(compiled, {"linear.weight": probe}):
        compiled(x)
    assert torch.equal(probe.activation, model.linear.weight)
    assert probe.activation.data_ptr() != model.linear.weight.data_ptr()
    assert not probe.activation.requires_grad


def test_nested_contexts(backend):
    model, x = LinearModel(), torch.randn(3, 2) + 5
    compiled = compile_and_run(model, backend, x)
    outer, inner = RecordPatch(), RecordPatch()
    outputs = []
    with pb.patch(compiled, {"linear.output": outer}):
        outputs.append(compiled(x))
        with pb.patch(compiled, {"linear.output": ZeroPatch()}):
            outputs.append(compiled(x))
            with pb.patch(compiled, {"linear.output": inner}):
                outputs.append(compiled(x))
            outputs.append(compiled(x))
        outputs.append(compiled(x))
    assert len(outer.activations) == 5
    assert all(bool((a != 0).all()) for a in outer.activations)
    assert len(inner.activations) == 1 and bool((inner.activations[0] == 0).all())
    assert [bool((o == 0).all()) for o in outputs] == [False, True, True, True, False]


def test_add_to_weight_row_leaves_parameter(backend):
    model, x = LinearModel(), torch.randn(3, 2)
    compiled = compile_and_run(model, backend, x)
    before = model.linear.weight.detach().clone()
    with pb.patch(compiled, {"linear.weight": AddPatch(value=torch.ones(2), slice=[1, ...])}):
        patched = compiled(x)
    expected_weight = before.clone()
    expected_weight[1] += 1
    torch.testing.assert_close(patched, x @ expected_weight.T + model.linear.bias)
    assert torch.equal(model.linear.weight, before)


def test_zero_with_row_list_and_slice(backend):
    model, x = LinearModel(), torch.randn(3, 2)
    compiled = compile_and_run(model, backend, x)
    with pb.patch(compiled, {"linear.output": ZeroPatch(slice=[(0, 2), slice(1, 3)])}):
        patched = compiled(x)
    expected = model(x).detach()
    expected[[0, 2], 1:3] = 0
    torch.testing.assert_close(patched, expected)


def test_probe_tuple_outputs(backend):
    model, x = TupleModel(), torch.randn(3, 2)
    compiled = compile_and_run(model, backend, x)
    first, second = ProbePatch(), ProbePatch()
    with pb.patch(compiled, {"output|sub_0": first, "output|sub_1": second}):
        result = compiled(x)
    y = model.linear(x)
    torch.testing.assert_close(first.activation, y + 1)
    torch.testing.assert_close(second.activation, y * 2)
    torch.testing.assert_close(result[1], y * 2)


def test_replace_one_tuple_output(backend):
    model, x = TupleModel(), torch.randn(3, 2)
    compiled = compile_and_run(model, backend, x)
    with pb.patch(compiled, {"output|sub_1": ZeroPatch()}):
        first, second = compiled(x)
    torch.testing.assert_close(first, model.linear(x) + 1)
    assert bool((second == 0).all())


def test_custom_patch_in_place_on_weight(backend):
    model, x = LinearModel(), torch.randn(3, 2)
    compiled = compile_and_run(model, backend, x)
    before = model.linear.weight.detach().clone()

    def add_in_place(t):
        t += 1
        return t

    with pb.patch(compiled, {"linear.weight": CustomPatch(custom_op=add_in_place)}):
        patched = compiled(x)
    torch.testing.assert_close(patched, x @ (before + 1).T + model.linear.bias)
    assert torch.equal(model.linear.weight, before)


def test_probe_inside_second_invocation(backend):
    model, x = CalledTwice(), torch.randn(2, 3)
    compiled = compile_and_run(model, backend, x)
    probe = ProbePatch()
    with pb.patch(compiled, {"linear_1.linear": probe}):
        compiled(x)
    torch.testing.assert_close(probe.activation, model.linear(torch.relu(model.linear(x))))


def test_patch_only_first_invocation_weight(backend):
    model, x = CalledTwice(), torch.randn(2, 3)
    compiled = compile_and_run(model, backend, x)
    with pb.patch(compiled, {"linear_0.weight": ZeroPatch()}):
        patched = compiled(x)
    first = torch.relu(model.linear.bias.expand(2, 3))
    torch.testing.assert_close(patched, model.linear(first))


def test_patches_across_graph_break(backend):
    model, x = GraphBreakModel(), torch.randn(2, 3)
    compiled = compile_and_run(model, backend, x)
    probe = ProbePatch()
    with pb.patch(compiled, {"first.output": ZeroPatch(), "second.input": probe, "add": AddPatch(value=2.0)}):
        patched = compiled(x)
    assert bool((probe.activation == 0).all())
    torch.testing.assert_close(patched, model.second(torch.zeros(2, 3)) + 3)


def test_patch_in_shared_block_graph_applies_to_one_instance(backend):
    model, x = BlocksWithBreak(), torch.randn(2, 3)
    compiled = compile_and_run(model, backend, x)
    probes = [ProbePatch() for _ in range(3)]
    with pb.patch(compiled, {f"blocks_{i}.up.output": probes[i] for i in range(3)} | {"blocks_1.relu": ZeroPatch()}):
        patched = compiled(x)
    h = model.embed(x)
    h = model.blocks[0](h)
    torch.testing.assert_close(probes[1].activation, model.blocks[1].up(h))
    h = model.blocks[1].down(torch.zeros(2, 4)) + h
    torch.testing.assert_close(probes[2].activation, model.blocks[2].up(h))
    torch.testing.assert_close(patched, model.blocks[2](h) * 2)


def test_layer_norm_output_replace_with_broadcast(backend):
    model, x = LayerNormModel(), torch.randn(2, 4)
    compiled = compile_and_run(model, backend, x)
    value = torch.arange(4.0)
    with pb.patch(compiled, {"ln.output": ReplacePatch(value=value, slice=(1,))}):
        patched = compiled(x)
    torch.testing.assert_close(patched[1], value)
    torch.testing.assert_close(patched[0], model(x)[0])


def test_patch_list_order_and_single_clone(backend):
    model, x = LinearModel(), torch.randn(3, 2)
    compiled = compile_and_run(model, backend, x)
    before, after = ProbePatch(), ProbePatch()
    with pb.patch(compiled, {"linear.output": [before, AddPatch(value=1.0), ZeroPatch(slice=(0,)), after]}):
        patched = compiled(x)
    reference = model(x).detach()
    torch.testing.assert_close(before.activation, reference)
    expected = reference + 1
    expected[0] = 0
    torch.testing.assert_close(after.activation, expected)
    torch.testing.assert_close(patched, expected)


def test_custom_patch_reads_probe_of_same_forward(backend):
    model, x = TwoLayerMLP(), torch.randn(2, 8)
    compiled = compile_and_run(model, backend, x)
    layer_0 = ProbePatch()
    with pb.patch(
        compiled,
        {
            "layers_0.output": [layer_0],
            "layers_1.output": CustomPatch(custom_op=lambda t: layer_0.activation),
        },
    ):
        patched = compiled(x)
    h = x + model.layers[0](x)
    torch.testing.assert_close(patched, h + model.layers[0](x))


def test_node_path_keys(backend):
    model, x = LinearModel(), torch.randn(3, 2)
    pg = pb.PatchableGraph(model, x, _backend=backend)
    with pg.patch({pg.graph.linear.output: ZeroPatch()}):
        assert bool((pg(x) == 0).all())
