"""Compiled patching: values are inputs (no recompiles), probes are outputs, autograd works."""

import copy
import warnings

import pytest
import torch

import patch_backend as pb
from fixtures import LinearModel, TwoLayerMLP
from patch_backend import AddPatch, CustomPatch, ProbePatch, RecordPatch, ReplacePatch, ZeroPatch


def compiled_model(model, *args, backend="graphpatch", **options):
    compiled = torch.compile(model, backend=backend, **options)
    compiled(*args)
    return compiled


def test_value_sweep_compiles_one_variant():
    model, x = TwoLayerMLP(), torch.randn(2, 8)
    compiled = compiled_model(model, x)
    for step in range(100):
        delta = torch.full((8,), float(step))
        with pb.patch(compiled, {"layers_0.output": AddPatch(value=delta)}):
            patched = compiled(x)
        if step in (0, 57, 99):
            h = x + model.layers[0](x) + delta
            torch.testing.assert_close(patched, h + model.layers[1](h))
    stats = pb.stats(compiled)
    assert stats.variants_compiled == 1
    assert stats.variant_hits == 99


def test_scalar_value_sweep_compiles_one_variant():
    model, x = LinearModel(), torch.randn(3, 2)
    compiled = compiled_model(model, x)
    for value in (0.5, -2.0, 3, True):
        with pb.patch(compiled, {"linear.output": ReplacePatch(value=value, slice=(0,))}):
            patched = compiled(x)
        torch.testing.assert_close(patched[0], torch.full((3,), float(value)))
    assert pb.stats(compiled).variants_compiled == 1


def test_position_sweep_compiles_one_variant():
    model, x = TwoLayerMLP(16), torch.randn(3, 16, 16)
    compiled = compiled_model(model, x)
    eager = torch.compile(copy.deepcopy(model), backend="graphpatch_eager")
    for position in range(16):
        value = torch.full((3, 32), float(position))
        with pb.patch(compiled, {"layers_0.up.output": ReplacePatch(value=value, slice=(slice(None), position))}):
            patched = compiled(x)
        with pb.patch(eager, {"layers_0.up.output": ReplacePatch(value=value, slice=(slice(None), position))}):
            reference = eager(x)
        torch.testing.assert_close(patched, reference)
    assert pb.stats(compiled).variants_compiled == 1


def test_negative_positions_and_slice_bounds_share_a_variant():
    model, x = LinearModel(), torch.randn(6, 2)
    compiled = compiled_model(model, x)
    for bounds in [(0, 2, 1), (1, 6, 2), (-4, -1, 1), (2, 100, 3)]:
        with pb.patch(compiled, {"linear.output": ZeroPatch(slice=(slice(*bounds), -1))}):
            patched = compiled(x)
        expected = model(x).detach()
        expected[slice(*bounds), -1] = 0
        torch.testing.assert_close(patched, expected)
    assert pb.stats(compiled).variants_compiled == 1


def test_unpatched_call_after_patched_does_not_compile():
    model, x = LinearModel(), torch.randn(3, 2)
    compiled = compiled_model(model, x)
    with pb.patch(compiled, {"linear.output": ZeroPatch()}):
        compiled(x)
    before = pb.stats(compiled)
    torch.testing.assert_close(compiled(x), model(x))
    after = pb.stats(compiled)
    assert after.variants_compiled == before.variants_compiled == 1
    assert after.compile_seconds == before.compile_seconds


def test_probe_is_an_output_without_graph_break():
    model, x = TwoLayerMLP(), torch.randn(2, 8)
    compiled = compiled_model(model, x)
    record = RecordPatch()
    for _ in range(3):
        with pb.patch(compiled, {"layers_1.act.gelu": record}):
            compiled(x)
    assert pb.stats(compiled).graphs == 1
    assert len(record.activations) == 3
    expected = torch.nn.functional.gelu(model.layers[1].up(x + model.layers[0](x)))
    torch.testing.assert_close(record.activations[-1], expected)


def test_prepared_sites_compile_once():
    model, x = TwoLayerMLP(16), torch.randn(2, 16, 16)
    compiled = compiled_model(model, x)
    declared = pb.prepare(compiled, ["layers_*.output", "layers_*.up.output"])
    assert declared == ["layers_0.output", "layers_1.output", "layers_0.up.output", "layers_1.up.output"]
    eager = torch.compile(copy.deepcopy(model), backend="graphpatch_eager")
    for site in declared:
        for position in range(16):
            width = 32 if "up" in site else 16
            cell = {site: [ReplacePatch(value=torch.ones(2, width), slice=(slice(None), position)), ZeroPatch(slice=(0, 0))]}
            with pb.patch(compiled, cell):
                patched = compiled(x)
            if position in (0, 15):
                with pb.patch(eager, cell):
                    torch.testing.assert_close(patched, eager(x))
    assert pb.stats(compiled).variants_compiled == 1


def test_prepared_probes_before_and_after():
    model, x = TwoLayerMLP(), torch.randn(2, 8)
    compiled = compiled_model(model, x)
    pb.prepare(compiled, "layers_0.output")
    before, after = ProbePatch(), ProbePatch()
    with pb.patch(compiled, {"layers_0.output": [before, AddPatch(value=1.0), after]}):
        compiled(x)
    torch.testing.assert_close(before.activation, model.layers[0](x))
    torch.testing.assert_close(after.activation, model.layers[0](x) + 1)
    assert pb.stats(compiled).variants_compiled == 1


def test_recreated_lambda_with_new_tensor_does_not_recompile():
    model, x = LinearModel(), torch.randn(3, 2)
    compiled = compiled_model(model, x)
    for step in range(5):
        scale = torch.full((3,), float(step))
        with pb.patch(compiled, {"linear.output": CustomPatch(custom_op=lambda t: t * scale)}):
            patched = compiled(x)
        torch.testing.assert_close(patched, model(x) * scale)
    assert pb.stats(compiled).variants_compiled == 1


def test_untraceable_custom_patch_runs_opaque_with_warning():
    model, x = LinearModel(), torch.randn(3, 2)
    compiled = compiled_model(model, x)

    def via_numpy(t):
        return torch.from_numpy(t.detach().numpy() * 2)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            with pb.patch(compiled, {"linear.output": CustomPatch(custom_op=via_numpy)}):
                patched = compiled(x)
    messages = [str(w.message) for w in caught if "could not be traced" in str(w.message)]
    assert len(messages) == 1 and "'linear.output'" in messages[0]
    torch.testing.assert_close(patched, model(x) * 2)
    assert pb.stats(compiled).variants_compiled == 1


def _add_patch_gradient(model, x, site, backend):
    compiled = compiled_model(model, x, backend=backend)
    delta = torch.zeros(x.shape[-1], requires_grad=True)
    with pb.patch(compiled, {site: AddPatch(value=delta, slice=(0,))}):
        compiled(x).pow(2).sum().backward()
    return delta.grad


def test_add_patch_gradient_matches_eager():
    model, x = TwoLayerMLP(), torch.randn(2, 8)
    compiled_grad = _add_patch_gradient(model, x, "layers_0.output", "graphpatch")
    torch._dynamo.reset()
    eager_grad = _add_patch_gradient(model, x, "layers_0.output", "graphpatch_eager")
    assert compiled_grad is not None and bool(compiled_grad.abs().sum() > 0)
    torch.testing.assert_close(compiled_grad, eager_grad)


@pytest.mark.transformers
@pytest.mark.slow
def test_add_patch_gradient_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64, n_positions=16, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config).eval()
    ids = torch.randint(0, 64, (1, 8))
    grads = []
    for backend in ("graphpatch", "graphpatch_eager"):
        torch._dynamo.reset()
        compiled = torch.compile(model, backend=backend)
        compiled(ids)
        delta = torch.zeros(32, requires_grad=True)
        with pb.patch(compiled, {"transformer.h_0.mlp.output": AddPatch(value=delta, slice=(0, 3))}):
            compiled(ids).logits[0, -1].logsumexp(-1).backward()
        grads.append(delta.grad)
    assert bool(grads[0].abs().sum() > 0)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-5)


def test_mode_and_options_are_forwarded():
    from patch_backend._torch_compat.inductor import inductor_config

    assert inductor_config({"mode": "reduce-overhead"})["triton.cudagraphs"] is True
    assert inductor_config({"options": {"max_autotune": False}}) == {"max_autotune": False}
    model, x = LinearModel(), torch.randn(3, 2)
    compiled = compiled_model(model, x, mode="reduce-overhead")
    for value in (1.0, 2.0, 3.0):
        with pb.patch(compiled, {"linear.output": AddPatch(value=value)}):
            torch.testing.assert_close(compiled(x), model(x) + value)
    assert pb.stats(compiled).variants_compiled == 1


def test_variant_bound_warns_once_and_never_falls_back_silently():
    model, x = LinearModel(), torch.randn(3, 2)
    compiled = compiled_model(model, x)
    pb.set_max_variants(2)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for site in ("linear.output", "linear.input", "output", "linear.linear"):
                with pb.patch(compiled, {site: ZeroPatch()}):
                    assert bool((compiled(x) == 0).all()) == (site != "linear.input")
        bound = [w for w in caught if "more than 2 patched variants" in str(w.message)]
        assert len(bound) == 1
        stats = pb.stats(compiled)
        assert stats.variants_compiled == 4 and stats.evictions == 2
    finally:
        pb.set_max_variants(64)
