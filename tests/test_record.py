"""pb.record: the activation cache of one forward, against a loop of ProbePatches and hooks."""

import copy

import pytest
import torch

import patch_backend as pb
from fixtures import TwoLayerMLP
from patch_backend import AddPatch, ProbePatch, ZeroPatch

pytestmark = pytest.mark.transformers

transformers = pytest.importorskip("transformers")


def tiny_gpt2():
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64, n_positions=16,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config).eval()


def probe_loop(model, ids, names, patches=None):
    """One forward per name, one ProbePatch each: what pb.record replaces."""
    values = {}
    for name in names:
        patch_map = dict(patches or {})
        patch_map[name] = [patch_map[name]] if name in patch_map else []
        patch_map[name].append(probe := ProbePatch())
        with torch.no_grad(), pb.patch(model, patch_map):
            model(ids)
        values[name] = probe.activation
    return values


def test_record_equals_a_loop_of_probes_native_and_aliases():
    compiled = torch.compile(tiny_gpt2(), backend="graphpatch_eager")
    ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        cache = pb.record(compiled, (ids,), ["transformer.h_*.mlp.output", "blocks.*.hook_resid_post", "output|logits"])
    assert list(cache) == [
        "transformer.h_0.mlp.output", "transformer.h_1.mlp.output",
        "blocks.0.hook_resid_post", "blocks.1.hook_resid_post", "output|logits",
    ]
    expected = probe_loop(compiled, ids, list(cache))
    for name, value in cache.items():
        assert torch.equal(value, expected[name]), name
    assert torch.equal(cache["blocks.1.hook_resid_post"], probe_loop(compiled, ids, ["transformer.h_1.output"])["transformer.h_1.output"])


@pytest.mark.slow
def test_record_sees_the_patches_of_the_run():
    """Inside pb.patch, and with ``patches=`` (a sweep cell's run), the cache is the patched run's."""
    compiled = torch.compile(tiny_gpt2(), backend="graphpatch_eager")
    ids = torch.randint(0, 64, (1, 5))
    cell = {"blocks.0.hook_mlp_out": ZeroPatch(slice=(slice(None), 2))}
    names = ["blocks.0.hook_mlp_out", "blocks.1.hook_resid_pre", "transformer.h_1.mlp.output"]
    with torch.no_grad():
        cache = pb.record(compiled, (ids,), names, patches=cell)
    expected = probe_loop(compiled, ids, names, {"blocks.0.hook_mlp_out": ZeroPatch(slice=(slice(None), 2))})
    for name in names:
        assert torch.equal(cache[name], expected[name]), name
    assert cache["blocks.0.hook_mlp_out"][:, 2].abs().max() == 0
    with torch.no_grad(), pb.patch(compiled, {"transformer.h_0.output": AddPatch(value=1.0)}):
        inside = pb.record(compiled, (ids,), "blocks.1.hook_resid_pre")
    clean = pb.record(compiled, (ids,), "blocks.0.hook_resid_post")
    assert torch.equal(inside["blocks.1.hook_resid_pre"], clean["blocks.0.hook_resid_post"] + 1.0)


def test_record_rejects_what_pb_patch_rejects():
    compiled = torch.compile(tiny_gpt2(), backend="graphpatch_eager")
    ids = torch.randint(0, 64, (1, 4))
    with pytest.raises(KeyError, match="close matches"):
        pb.record(compiled, (ids,), "transformer.h_0.mlp.outpt")
    with pytest.raises(KeyError, match="close matches"):
        pb.record(compiled, (ids,), "transformer.h_*.mlp.outpt")
    with pytest.raises(ValueError, match="at least one"):
        pb.record(compiled, (ids,), [])


def test_record_on_a_plain_module_is_one_compiled_forward_equal_to_hooks():
    """The Inductor path (the module is compiled with backend='graphpatch' by pb.record)."""
    model = TwoLayerMLP()
    reference = copy.deepcopy(model)
    x = torch.randn(3, 8)
    cache = pb.record(model, (x,), "layers_*.output")
    seen = {}
    for i, layer in enumerate(reference.layers):
        layer.register_forward_hook(lambda _, __, out, i=i: seen.__setitem__(f"layers_{i}.output", out.detach()))
    reference(x)
    assert list(cache) == ["layers_0.output", "layers_1.output"]
    for name in cache:
        torch.testing.assert_close(cache[name], seen[name])
