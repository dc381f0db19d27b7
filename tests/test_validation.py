"""Bad input fails clearly, before the model runs, and leaves no patch active."""

import subprocess
import sys

import pytest
import torch

import patch_backend as pb
from fixtures import LinearModel, TupleModel
from patch_backend import AddPatch, ProbePatch, ReplacePatch, ZeroPatch
from patch_backend.context import active_state




@pytest.fixture
def counted(backend):
    model = LinearModel()
    calls = []
    model.linear.register_forward_pre_hook(lambda module, args: calls.append(1))
    compiled = torch.compile(model, backend=backend)
    compiled(torch.randn(3, 2))
    calls.clear()
    return compiled, calls


def _assert_rejected(compiled, calls, patch_map, error, match):
    with pytest.raises(error, match=match):
        with pb.patch(compiled, patch_map):
            compiled(torch.randn(3, 2))
    assert calls == []
    assert active_state().roots == ()


def test_non_dict_map(counted):
    _assert_rejected(*counted, [("linear.input", ZeroPatch())], ValueError, "must be a dict")


def test_unknown_name_lists_close_matches(counted):
    _assert_rejected(*counted, {"linear.inptu": ZeroPatch()}, KeyError, "close matches: linear.input")


def test_non_patch_value(counted):
    _assert_rejected(*counted, {"linear.input": torch.zeros(2)}, ValueError, "must be a Patch")


def test_malformed_path(backend):
    compiled = torch.compile(TupleModel(), backend=backend)
    compiled(torch.randn(3, 2))
    with pytest.raises(KeyError, match="malformed node name"):
        with pb.patch(compiled, {"output|sub_0|sub_0": ZeroPatch()}):
            pass


def test_value_that_does_not_broadcast(counted):
    _assert_rejected(
        *counted,
        {"linear.output": AddPatch(value=torch.ones(4), slice=(0,))},
        ValueError,
        r"'linear.output'.*shape \(4,\).*shape \(3,\)",
    )


def test_slice_out_of_range(counted):
    _assert_rejected(*counted, {"linear.output": ZeroPatch(slice=(slice(None), 7))}, IndexError, "linear.output")


def test_lossy_dtype_refused(counted):
    _assert_rejected(
        *counted,
        {"linear.output": ReplacePatch(value=torch.ones(3, dtype=torch.complex64))},
        ValueError,
        "complex64",
    )


def test_same_patch_in_two_places(counted):
    probe = ProbePatch()
    _assert_rejected(*counted, {"linear.input": probe, "linear.output": probe}, ValueError, "same ProbePatch")


def test_patch_before_first_call_validated_at_first_call(backend):
    model = LinearModel()
    calls = []
    model.linear.register_forward_pre_hook(lambda module, args: calls.append(1))
    compiled = torch.compile(model, backend=backend)
    with pytest.raises(KeyError, match="no node named 'nope'"):
        with pb.patch(compiled, {"nope": ZeroPatch()}):
            compiled(torch.randn(3, 2))
    assert calls == [], "the model ran before the unknown name was reported"
    assert active_state().roots == ()


def test_patch_before_first_call_applies(backend):
    model = LinearModel()
    compiled = torch.compile(model, backend=backend)
    with pb.patch(compiled, {"linear.output": ZeroPatch()}):
        assert bool((compiled(torch.randn(3, 2)) == 0).all())


def test_patchable_graph_rejects_bad_inputs():
    with pytest.raises(ValueError, match="rejected the example inputs"):
        pb.PatchableGraph(LinearModel(), torch.randn(3, 5), _backend="graphpatch_eager")


def test_exception_in_block_restores_context(backend):
    model, x = LinearModel(), torch.randn(3, 2)
    compiled = torch.compile(model, backend=backend)
    compiled(x)
    with pytest.raises(RuntimeError, match="boom"):
        with pb.patch(compiled, {"linear.output": ZeroPatch()}):
            raise RuntimeError("boom")
    assert active_state().roots == ()
    torch.testing.assert_close(compiled(x), model(x))


@pytest.mark.slow
def test_entry_point_without_import():
    code = (
        "import torch\n"
        "m = torch.nn.Linear(2, 3)\n"
        "x = torch.randn(4, 2)\n"
        "c = torch.compile(m, backend='graphpatch')\n"
        "assert torch.allclose(c(x), m(x))\n"
        "import sys; assert 'patch_backend' in sys.modules\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "ok"
