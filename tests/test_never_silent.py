"""Never silent (issue 9): a patch whose node never ran in its context's forwards raises.

``pb.patch`` raises ``PatchNotAppliedError`` on a normal exit for every name it added whose node
did not run although the model did (docs/errors.md, row 15); the uncompiled model called twice
under patches of its compiled wrapper raises at the second call (row 16). Models are tiny and
mostly run under ``graphpatch_eager``; the GPT-2 ``generate`` case (issue 9, case 10) uses
``graphpatch``.
"""

from __future__ import annotations

import threading
from typing import Any, Dict, List, Tuple

import pytest
import torch
import torch._dynamo.testing
from torch import nn

import patch_backend as pb
from fixtures import GraphBreakModel
from patch_backend import AddPatch, PatchNotAppliedError, ProbePatch, ZeroPatch
from patch_backend.context import active_state
from patch_backend.never_silent import watching_hooks


class Gated(nn.Module):
    """``extra`` runs only when ``flag`` is True; ``unused`` never runs."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 3)
        self.extra = nn.Linear(3, 3)
        self.unused = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor, flag: bool = False) -> torch.Tensor:
        x = self.linear(x)
        if flag:
            x = self.extra(x)
        return x


def captured(backend: Any) -> Tuple[nn.Module, Any, torch.Tensor]:
    """A Gated model, its compiled wrapper with both branches captured, and an input."""
    model = Gated()
    compiled = torch.compile(model, backend=backend)
    x = torch.randn(2, 3)
    compiled(x, True)
    compiled(x, False)
    return model, compiled, x


def assert_clean(*modules: nn.Module) -> None:
    """No patch active, and no context holding the watching hook on the model (its wrapper has
    none): the hook a context leaves for the next one is idle (the next call outside a context removes
    them, ``test_idle_hooks_go_at_the_next_unpatched_call``), and no other hook is left."""
    assert active_state().roots == ()
    for module in modules:
        hooks = len(module._forward_pre_hooks) + len(module._forward_hooks)
        users = watching_hooks(module)
        if users is None:
            assert hooks == 0
        else:
            assert users == 0 and module is modules[0]
            assert hooks == 1  # the root's pre-hook


# -- the exit check --------------------------------------------------------------------------------


def test_branch_not_taken_raises_at_exit_naming_the_node(backend):
    model, compiled, x = captured(backend)
    probe = ProbePatch()
    with pytest.raises(PatchNotAppliedError) as info:
        with pb.patch(compiled, {"extra.output": ZeroPatch(), "linear.output": probe}):
            compiled(x, False)
    message = str(info.value)
    assert "'extra.output' (ZeroPatch)" in message
    assert "not entered in any of the 1 forward" in message
    assert "linear.output" not in message  # it ran
    torch.testing.assert_close(probe.activation, model.linear(x))
    assert_clean(model, compiled)


def test_every_missing_node_is_named(backend):
    model, compiled, x = captured(backend)
    with pytest.raises(PatchNotAppliedError, match=r"'extra.linear' \(AddPatch\), 'extra.weight' \(ProbePatch\)"):
        with pb.patch(compiled, {"extra.linear": AddPatch(value=1.0), "extra.weight": ProbePatch()}):
            compiled(x, False)
            compiled(x, False)
    assert_clean(model, compiled)


def test_branch_taken_raises_nothing(backend):
    model, compiled, x = captured(backend)
    with pb.patch(compiled, {"extra.output": ZeroPatch()}):
        out = compiled(x, False)
        patched = compiled(x, True)
    torch.testing.assert_close(patched, torch.zeros(2, 3))
    torch.testing.assert_close(out, model(x, False))
    assert_clean(model, compiled)


def test_submodule_never_used_is_refused_on_entry(backend):
    """A module that never ran has no nodes: the name is unknown, refused before anything runs."""
    model, compiled, x = captured(backend)
    with pytest.raises(KeyError, match="no node named 'unused.output'"):
        with pb.patch(compiled, {"unused.output": ZeroPatch()}):
            pytest.fail("entered")
    assert_clean(model, compiled)


def test_context_where_the_model_never_ran_raises_nothing(backend):
    model, compiled, _ = captured(backend)
    with pb.patch(compiled, {"extra.output": ZeroPatch()}):
        pass
    with pb.patch(model, {"extra.output": ZeroPatch()}):  # the plain module: nothing watched
        pass
    assert_clean(model, compiled)


def test_body_exception_propagates_unchanged_and_restores(backend):
    model, compiled, x = captured(backend)
    error = ValueError("boom")
    with pytest.raises(ValueError) as info:
        with pb.patch(compiled, {"extra.output": ZeroPatch()}):
            compiled(x, False)
            raise error
    assert info.value is error
    assert info.value.__context__ is None and info.value.__cause__ is None
    assert_clean(model, compiled)
    torch.testing.assert_close(compiled(x, True), model(x, True))


def test_node_in_the_second_graph_of_a_graph_break_passes(backend):
    model, x = GraphBreakModel(), torch.randn(2, 3)
    compiled = torch.compile(model, backend=backend)
    compiled(x)
    probe = ProbePatch()
    with pb.patch(compiled, {"second.output": ZeroPatch(), "first.output": probe}):
        out = compiled(x)
    torch.testing.assert_close(out, torch.ones(2, 3))
    torch.testing.assert_close(probe.activation, model.first(x))
    assert_clean(model, compiled)


def test_patched_before_the_first_call_across_a_graph_break(backend):
    """Names of a model not captured yet are found during its first forward: still checked."""
    model, x = GraphBreakModel(), torch.randn(2, 3)
    compiled = torch.compile(model, backend=backend)
    with pb.patch(compiled, {"second.output": ZeroPatch()}):
        out = compiled(x)
    torch.testing.assert_close(out, torch.ones(2, 3))
    assert_clean(model, compiled)


class EndsOutsideGraphs(nn.Module):
    """The forward's last graph is not the one it returns from: nothing after the break."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x)
        torch._dynamo.graph_break()
        return y


def test_unknown_name_of_a_model_patched_before_its_first_call_raises_at_exit(backend):
    """No graph returns from this forward, so the first call cannot tell a typo from a name of a
    later graph (docs/errors.md, row 12): the exit check does."""
    model, x = EndsOutsideGraphs(), torch.randn(2, 3)
    compiled = torch.compile(model, backend=backend)
    with pytest.raises(KeyError, match="no node named 'linear.outptu'.*close matches: linear.output"):
        with pb.patch(compiled, {"linear.output": ZeroPatch(), "linear.outptu": ZeroPatch()}):
            torch.testing.assert_close(compiled(x), torch.zeros(2, 3))
    assert_clean(model, compiled)


# -- nested contexts ---------------------------------------------------------------------------------


def test_nested_contexts_check_the_names_they_added(backend):
    model, compiled, x = captured(backend)
    with pb.patch(compiled, {"linear.output": ProbePatch()}):
        with pytest.raises(PatchNotAppliedError) as info:
            with pb.patch(compiled, {"extra.output": ZeroPatch()}):
                compiled(x, False)
        assert "'extra.output'" in str(info.value) and "linear.output" not in str(info.value)
        # The outer name ran inside the inner context: that counts for the outer one too.
    with pytest.raises(PatchNotAppliedError, match=r"^'extra.output' \(ZeroPatch\) never ran"):
        with pb.patch(compiled, {"extra.output": ZeroPatch()}):
            with pb.patch(compiled, {"linear.output": ProbePatch()}):
                compiled(x, False)
    assert_clean(model, compiled)


def test_inner_context_where_the_model_never_ran_raises_nothing(backend):
    model, compiled, x = captured(backend)
    with pb.patch(compiled, {"linear.output": AddPatch(value=1.0)}):
        compiled(x, False)
        with pb.patch(compiled, {"extra.output": ZeroPatch()}):
            pass
    assert_clean(model, compiled)


# -- the uncompiled model under patches of its wrapper -----------------------------------------------


def test_second_uncompiled_call_raises_before_it_computes(backend):
    model, compiled, x = captured(backend)
    computed: List[int] = []
    with pytest.raises(PatchNotAppliedError, match=r"called again outside its compiled graphs.*'linear.output'"):
        with pb.patch(compiled, {"linear.output": ZeroPatch()}):
            model(x)
            handle = model.linear.register_forward_pre_hook(lambda module, args: computed.append(1))
            model(x)
    handle.remove()
    assert computed == []
    assert_clean(model, compiled)


def test_single_uncompiled_call_raises_at_exit(backend):
    model, compiled, x = captured(backend)
    with pytest.raises(PatchNotAppliedError, match=r"'linear.output' \(ZeroPatch\) never ran.*ran 1 time, always outside"):
        with pb.patch(compiled, {"linear.output": ZeroPatch()}):
            model(x)
    assert_clean(model, compiled)


def test_wrapper_call_that_dynamo_runs_eagerly_is_an_uncompiled_call(backend):
    """A call of the wrapper in which Dynamo runs the forward without its graphs (past the
    recompile limit, a new input dtype runs eagerly) applies no patch: at exit, the message says
    the forward ran outside its compiled graphs; a later compiled call in the block is not
    mistaken for it."""
    model, compiled, x = captured(backend)
    half = x.double()
    model.double()
    with torch._dynamo.config.patch(recompile_limit=1, accumulated_recompile_limit=1):
        with pytest.raises(PatchNotAppliedError, match=r"'linear.output' \(ZeroPatch\) never ran.*always outside"):
            with pb.patch(compiled, {"linear.output": ZeroPatch()}):
                torch.testing.assert_close(compiled(half), model.linear(half))  # unpatched: eager
        with pytest.raises(PatchNotAppliedError, match="called again outside its compiled graphs"):
            with pb.patch(compiled, {"linear.output": ZeroPatch()}):
                compiled(half)
                compiled(half)
    assert_clean(model, compiled)


def test_compiled_calls_under_force_eager_are_uncompiled_calls(backend):
    model, compiled, x = captured(backend)
    with torch.compiler.set_stance("force_eager"):
        with pytest.raises(PatchNotAppliedError, match=r"'linear.output' \(ZeroPatch\) never ran.*always outside"):
            with pb.patch(compiled, {"linear.output": ZeroPatch()}):
                compiled(x)
    with pb.patch(compiled, {"linear.output": ZeroPatch()}):  # and the check ends with the stance
        torch.testing.assert_close(compiled(x), torch.zeros(2, 3))
    assert_clean(model, compiled)


def test_uncompiled_call_after_a_compiled_one_is_allowed(backend):
    """An unpatched reference computed inside the block is legitimate: the patch did run."""
    model, compiled, x = captured(backend)
    with pb.patch(compiled, {"linear.output": ZeroPatch()}):
        torch.testing.assert_close(compiled(x), torch.zeros(2, 3))
        reference = model(x)
        reference = model(x)
    torch.testing.assert_close(reference, model.linear(x))
    assert_clean(model, compiled)


def test_patchable_graph_module_called_directly(backend):
    model, x = Gated(), torch.randn(2, 3)
    graph = pb.PatchableGraph(model, x, _backend=backend)
    with graph.patch({"linear.output": ZeroPatch()}):
        torch.testing.assert_close(graph(x), torch.zeros(2, 3))
    with pytest.raises(PatchNotAppliedError, match="'linear.output'"):
        with graph.patch({"linear.output": ZeroPatch()}):
            graph.module(x)
    assert_clean(model, graph)


def test_watching_hook_compiles_nothing(backend):
    """The hook on the uncompiled model runs in compiled calls as its own compiled frame: the
    model's frames compile once whether the hook is there at their first call or not."""
    counter = torch._dynamo.testing.CompileCounterWithBackend(backend)
    model, x = Gated(), torch.randn(2, 3)
    compiled = torch.compile(model, backend=counter)
    with pb.patch(compiled, {"linear.output": ZeroPatch()}):
        torch.testing.assert_close(compiled(x), torch.zeros(2, 3))  # first compile, hook present
    for _ in range(3):
        torch.testing.assert_close(compiled(x), model(x))
        with pb.patch(compiled, {"linear.output": AddPatch(value=1.0)}):
            torch.testing.assert_close(compiled(x), model(x) + 1)
    assert counter.frame_count == 1
    with torch.no_grad():
        compiled(x)
        with pb.patch(compiled, {"linear.output": ZeroPatch()}):
            compiled(x)
    with torch.compiler.set_stance("fail_on_recompile"):  # the hooks compile nothing either
        for grad in (True, False):
            with torch.set_grad_enabled(grad), pb.patch(compiled, {"linear.output": ZeroPatch()}):
                torch.testing.assert_close(compiled(x), torch.zeros(2, 3))
    assert_clean(model, compiled)


def test_idle_hooks_go_at_the_next_unpatched_call(backend):
    """A loop of contexts registers the watching hook once, on the model (none on its wrapper);
    the first call outside a context removes it, so an unpatched loop runs without hooks (and
    computes the plain model)."""
    model, compiled, x = captured(backend)
    with pb.patch(compiled, {"linear.output": ZeroPatch()}):
        assert watching_hooks(model) == 1 and watching_hooks(compiled) is None
        compiled(x)
    hooks = (dict(model._forward_pre_hooks), dict(compiled._forward_pre_hooks), dict(compiled._forward_hooks))
    assert watching_hooks(model) == 0 and len(hooks[0]) == 1 and not hooks[1] and not hooks[2]
    for step in range(3):
        with pb.patch(compiled, {"linear.output": AddPatch(value=float(step))}):
            torch.testing.assert_close(compiled(x), model.linear(x) + step)
    # The same hook, not a new one: nothing was registered again.
    assert (dict(model._forward_pre_hooks), dict(compiled._forward_pre_hooks), dict(compiled._forward_hooks)) == hooks
    torch.testing.assert_close(compiled(x), model.linear(x))  # outside a context: removes it
    for module in (model, compiled):
        assert watching_hooks(module) is None
        assert len(module._forward_pre_hooks) == 0 and len(module._forward_hooks) == 0
    # The uncompiled model called directly removes its own idle hook too.
    with pb.patch(compiled, {"linear.output": ZeroPatch()}):
        compiled(x)
    torch.testing.assert_close(model(x), model.linear(x))
    assert watching_hooks(model) is None and len(model._forward_pre_hooks) == 0
    # A context that patches the plain module watches nothing, idle hooks or not: its eager
    # calls are not counted as calls outside the compiled graphs (they are not compiled at all).
    with pb.patch(compiled, {"linear.output": ZeroPatch()}):
        compiled(x)
    with pb.patch(model, {"linear.output": ZeroPatch()}):
        model(x)
        model(x)
    with pytest.raises(PatchNotAppliedError, match="called again outside its compiled graphs"):
        with pb.patch(compiled, {"linear.output": ZeroPatch()}):
            model(x)
            model(x)
    assert_clean(model, compiled)


def test_an_unpatched_call_in_another_thread_keeps_hooks_a_context_holds(backend):
    model, compiled, x = captured(backend)
    entered, called = threading.Event(), threading.Event()
    outcome: Dict[str, Any] = {}

    def patched() -> None:
        try:
            with pb.patch(compiled, {"linear.output": ZeroPatch()}):
                entered.set()
                called.wait(30)
                model(x)  # still seen: the other thread's unpatched call left the hooks
                model(x)
        except Exception as error:  # noqa: BLE001 - the outcome is the assertion
            outcome["error"] = error

    thread = threading.Thread(target=patched)
    thread.start()
    entered.wait(30)
    torch.testing.assert_close(compiled(x, True), model.extra(model.linear(x)))
    called.set()
    thread.join()
    assert isinstance(outcome.get("error"), PatchNotAppliedError)
    assert_clean(model, compiled)


# -- threads and sweeps ---------------------------------------------------------------------------------


def test_threads_check_their_own_contexts(backend):
    model, compiled, x = captured(backend)
    with pb.patch(compiled, {"linear.output": ZeroPatch(), "extra.output": ZeroPatch()}):
        compiled(x, True)  # builds the variants before threads call them
    outcomes: Dict[str, Any] = {}
    barrier = threading.Barrier(2)

    def run(label: str, name: str, flag: bool) -> None:
        try:
            with pb.patch(compiled, {name: ZeroPatch()}):
                barrier.wait()
                for _ in range(5):
                    compiled(x, flag)
            outcomes[label] = None
        except Exception as error:  # noqa: BLE001 - the outcome is the assertion
            outcomes[label] = error

    threads = [
        threading.Thread(target=run, args=("missing", "extra.output", False)),
        threading.Thread(target=run, args=("applied", "linear.output", True)),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert outcomes["applied"] is None
    assert isinstance(outcomes["missing"], PatchNotAppliedError)
    assert "'extra.output'" in str(outcomes["missing"]) and "5 forwards" in str(outcomes["missing"])
    assert_clean(model, compiled)


def test_sweep_cell_on_a_branch_not_taken_raises(backend):
    model, compiled, x = captured(backend)
    with pytest.raises(PatchNotAppliedError, match="'extra.output' \\(ZeroPatch\\) never ran in this sweep chunk"):
        pb.sweep(compiled, (x, False), [{"extra.output": ZeroPatch()}], metric=lambda out: out.sum(-1), progress=False)
    grid = pb.sweep(compiled, (x, False), [{"linear.output": ZeroPatch()}], metric=lambda out: out.sum(-1), progress=False)
    torch.testing.assert_close(grid, torch.zeros(1, 2))


# -- GPT-2 generate on the torch.compile wrapper (issue 9, case 10) ------------------------------------


def tiny_gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=50, n_positions=32, bos_token_id=0, eos_token_id=0, pad_token_id=0
    )
    return GPT2LMHeadModel(config).eval()


@pytest.mark.transformers
def test_generate_on_the_compiled_wrapper_raises():
    pytest.importorskip("transformers")
    model = tiny_gpt2()
    counter = torch._dynamo.testing.CompileCounterWithBackend("graphpatch")
    compiled = torch.compile(model, backend=counter)
    ids = torch.randint(1, 50, (1, 5))
    with torch.no_grad():
        logits = compiled(ids).logits
        frames = counter.frame_count
        add = AddPatch(value=torch.zeros(50))
        # generate calls the uncompiled forward: the second step raises, before computing.
        with pytest.raises(PatchNotAppliedError) as info:
            with pb.patch(compiled, {"lm_head.output": add}):
                compiled.generate(ids, max_new_tokens=4, do_sample=False)
        message = str(info.value)
        assert "'lm_head.output' (AddPatch)" in message and "compiled.generate" in message
        assert "PatchableGraph(model, example_ids).generate" in message
        assert "model.forward = torch.compile(model.forward" in message
        assert_clean(model, compiled)
        # One step only: the check at exit says the same.
        with pytest.raises(PatchNotAppliedError, match=r"'lm_head.output' \(AddPatch\) never ran.*generate"):
            with pb.patch(compiled, {"lm_head.output": AddPatch(value=torch.zeros(50))}):
                compiled.generate(ids, max_new_tokens=1, do_sample=False)
        assert_clean(model, compiled)
        torch.testing.assert_close(compiled(ids).logits, logits)
    assert counter.frame_count == frames


@pytest.mark.transformers
def test_generate_through_patchable_graph_raises_nothing():
    """PatchableGraph.generate compiles the forward generate calls: the watching hook sees the
    model called outside Dynamo, then its graphs run, so nothing is reported."""
    pytest.importorskip("transformers")
    model = tiny_gpt2()
    ids = torch.randint(1, 50, (1, 5))
    graph = pb.PatchableGraph(model, ids, _backend="graphpatch_eager")
    forced = torch.full((50,), -1e4)
    forced[7] = 1e4
    with torch.no_grad(), graph.patch({"lm_head.output": AddPatch(value=forced)}):
        tokens = graph.generate(ids, max_new_tokens=3, do_sample=False)
    assert tokens[0, 5:].tolist() == [7, 7, 7]
    assert_clean(model, graph)
