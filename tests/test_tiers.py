"""Execution tiers (config.compile_policy): eager while a patched program compiles, then compiled.

The suite's conftest sets compile_policy="sync"; these tests set the policy they test (the
library's default is "background": test_background_is_the_default). Some tests hold the compile
worker inside a torch.fx trace (``traced_gate``), the state in which torch 2.13 sets its
process-wide FX tracing flag and patches ``nn.Module.__call__``, and call compiled models then.
"""

import copy
import os
import subprocess
import sys
import threading
import warnings

import pytest
import torch

import patch_backend as pb
from fixtures import NestedModel, TwoLayerMLP
from patch_backend import AddPatch, ProbePatch, ReplacePatch, ZeroPatch
from patch_backend.capture.capture import all_captures
from patch_backend.capture.index import index_for
from patch_backend.runtime import dispatcher as dispatcher_module


@pytest.fixture
def model_and_input():
    model, x = TwoLayerMLP(), torch.randn(4, 8)
    compiled = torch.compile(model, backend="graphpatch")
    compiled(x)  # captures and compiles the plain graph before any test replaces the compiler
    eager = torch.compile(copy.deepcopy(model), backend="graphpatch_eager")
    eager(x)
    return model, x, compiled, eager


class _Arrivals(list):
    """The graphs whose background compile reached the gate. The worker takes a queued compile
    when it gets to it, so a test that counts arrivals waits for them rather than racing it."""

    def __init__(self) -> None:
        super().__init__()
        self._changed = threading.Condition()

    def arrive(self, gm: object) -> None:
        with self._changed:
            self.append(gm)
            self._changed.notify_all()

    def reach(self, count: int, timeout: float = 120) -> int:
        """Waits until ``count`` compiles arrived (or the timeout passed); returns how many did."""
        with self._changed:
            self._changed.wait_for(lambda: len(self) >= count, timeout=timeout)
            return len(self)


@pytest.fixture
def gated_compiler(monkeypatch):
    """Inductor, held at a gate until the test opens it (a compile that takes a while), for the
    compiles of the background worker (a new graph's plain compile, in the call, passes)."""
    real = dispatcher_module.compile_graph
    gate = threading.Event()
    started = _Arrivals()

    def compile_at_gate(gm, example, options):
        if threading.current_thread() is threading.main_thread():
            return real(gm, example, options)
        started.arrive(gm)
        assert gate.wait(timeout=300), "the test never opened the gate"
        return real(gm, example, options)

    monkeypatch.setattr(dispatcher_module, "compile_graph", compile_at_gate)
    yield gate, started
    gate.set()
    pb.wait_for_compiles(timeout=300)


def _patches():
    """A map with a slice, a tensor value, a scalar value and a probe: every kind of input."""
    return {
        "layers_0.up.output": ZeroPatch(slice=(slice(None), 3)),
        "layers_0.output": AddPatch(value=torch.linspace(0, 1, 8)),
        "layers_1.act.gelu": ReplacePatch(value=0.5, slice=(1,)),
        "layers_1.down.output": ProbePatch(),
    }


def _run(compiled, x, patches):
    with pb.patch(compiled, patches):
        out = compiled(x)
    return out, patches["layers_1.down.output"].activation


def test_background_runs_eager_until_compiled_and_both_tiers_agree(model_and_input, gated_compiler):
    _, x, compiled, eager = model_and_input
    gate, started = gated_compiler
    expected, expected_probe = _run(eager, x, _patches())
    with pb.config.patch(compile_policy="background"):
        first, first_probe = _run(compiled, x, _patches())  # the compile waits at the gate
        stats = pb.stats(compiled)
        assert (stats.eager_calls, stats.compiled_calls, stats.variants_compiled) == (1, 0, 0)
        second, _ = _run(compiled, x, _patches())  # still compiling: eager again, no second compile
        assert pb.stats(compiled).eager_calls == 2
        gate.set()
        assert pb.wait_for_compiles(timeout=300)
        third, third_probe = _run(compiled, x, _patches())
    stats = pb.stats(compiled)
    assert (stats.eager_calls, stats.compiled_calls, stats.variants_compiled) == (2, 1, 1)
    assert len(started) == 1
    assert stats.compile_seconds > 0
    for result, probe in ((first, first_probe), (third, third_probe)):
        torch.testing.assert_close(result, expected)
        torch.testing.assert_close(probe, expected_probe)
    torch.testing.assert_close(second, expected)


@pytest.mark.parametrize(
    "policy, expected",
    [
        # (eager calls, compiled calls, variants compiled) after three patched calls
        ("sync", (0, 3, 1)),
        ("background", (1, 2, 1)),
        ("never", (3, 0, 0)),
    ],
)
def test_compile_policy(model_and_input, policy, expected):
    model, x, compiled, _ = model_and_input
    results = []
    with pb.config.patch(compile_policy=policy):
        for step in range(3):
            delta = torch.full((8,), float(step))
            with pb.patch(compiled, {"layers_0.output": AddPatch(value=delta)}):
                results.append(compiled(x))
            pb.wait_for_compiles(timeout=300)
    stats = pb.stats(compiled)
    assert (stats.eager_calls, stats.compiled_calls, stats.variants_compiled) == expected
    assert stats.patched_calls == 3
    for step, result in enumerate(results):
        h = x + model.layers[0](x) + step
        torch.testing.assert_close(result, h + model.layers[1](h))


def test_compile_policy_is_checked():
    with pytest.raises(ValueError, match="compile_policy must be one of"):
        pb.config.set("compile_policy", "later")


def test_a_failing_background_compile_warns_once_and_runs_eagerly(model_and_input, monkeypatch):
    _, x, compiled, eager = model_and_input
    attempts = []

    def failing_compile(gm, example, options):
        attempts.append(gm)
        raise RuntimeError("inductor fell over")

    monkeypatch.setattr(dispatcher_module, "compile_graph", failing_compile)
    expected, expected_probe = _run(eager, x, _patches())
    (uid,) = {uid for uid, _ in index_for(compiled._orig_mod).by_occurrence}
    with pb.config.patch(compile_policy="background"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first, first_probe = _run(compiled, x, _patches())
        assert pb.wait_for_compiles(timeout=300)
        results = [_run(compiled, x, _patches()) for _ in range(2)]
    failures = [w for w in caught if "failed" in str(w.message) and "background" in str(w.message)]
    assert len(failures) == 1
    assert f"graph {uid}" in str(failures[0].message) and "inductor fell over" in str(failures[0].message)
    assert len(attempts) == 1  # the program is not compiled again at every call
    stats = pb.stats(compiled)
    assert (stats.compile_failures, stats.eager_calls, stats.compiled_calls, stats.variants_compiled) == (1, 3, 0, 0)
    for result, probe in [(first, first_probe)] + results:
        torch.testing.assert_close(result, expected)
        torch.testing.assert_close(probe, expected_probe)


def test_a_new_patch_while_a_background_compile_runs(model_and_input, gated_compiler):
    model, x, compiled, eager = model_and_input
    gate, started = gated_compiler
    first_map = lambda: {"layers_0.output": AddPatch(value=torch.ones(8))}  # noqa: E731
    second_map = lambda: {"layers_1.up.output": ZeroPatch(slice=(slice(None), slice(0, 4)))}  # noqa: E731
    with pb.config.patch(compile_policy="background"):
        with pb.patch(compiled, first_map()):
            first = compiled(x)  # its compile now holds the worker, at the gate
        with pb.patch(compiled, second_map()):
            second = compiled(x)  # another structure: queued behind it, runs eagerly meanwhile
        assert started.reach(1) == 1 and pb.stats(compiled).eager_calls == 2
        assert not pb.wait_for_compiles(timeout=0.05)
        gate.set()
        assert pb.wait_for_compiles(timeout=300)
        assert len(started) == 2
        with pb.patch(compiled, first_map()):
            first_compiled = compiled(x)
        with pb.patch(compiled, second_map()):
            second_compiled = compiled(x)
    stats = pb.stats(compiled)
    assert (stats.eager_calls, stats.compiled_calls, stats.variants_compiled) == (2, 2, 2)
    for patch_map, results in ((first_map, (first, first_compiled)), (second_map, (second, second_compiled))):
        with pb.patch(eager, patch_map()):
            expected = eager(x)
        for result in results:
            torch.testing.assert_close(result, expected)


def test_background_compile_keeps_the_callers_grad_mode(model_and_input):
    model, x, compiled, _ = model_and_input
    delta = torch.zeros(8, requires_grad=True)
    with pb.config.patch(compile_policy="background"):
        for _ in range(2):  # eager tier, then the compiled program
            with pb.patch(compiled, {"layers_0.output": AddPatch(value=delta)}):
                out = compiled(x)
            out.sum().backward()
            pb.wait_for_compiles(timeout=300)
    assert pb.stats(compiled).compiled_calls == 1
    expected = torch.zeros(8, requires_grad=True)
    h = x + model.layers[0](x) + expected
    (h + model.layers[1](h)).sum().backward()
    torch.testing.assert_close(delta.grad, 2 * expected.grad)


def test_sweep_under_never_and_background_matches_cells_alone(model_and_input, gated_compiler):
    model, x, compiled, _ = model_and_input
    gate, started = gated_compiler
    cells = [{"layers_0.up.output": ZeroPatch(slice=(slice(None), p))} for p in range(6)]
    metric = lambda out: out.sum(-1)  # noqa: E731
    reference = []
    eager = torch.compile(copy.deepcopy(model), backend="graphpatch_eager")
    with torch.no_grad():
        for cell in cells:
            with pb.patch(eager, cell):
                reference.append(metric(eager(x)))
    reference = torch.stack(reference)
    # The chunks' K·B program (sweep_vmap=False: a short sweep would otherwise stay on its vmapped
    # eager tier and compile nothing, tests/test_sweep_vmap.py).
    with pb.config.patch(compile_policy="never", sweep_vmap=False):
        torch.testing.assert_close(pb.sweep(compiled, (x,), cells, metric, batch_size=2, progress=False), reference)
    assert not started
    with pb.config.patch(compile_policy="background", sweep_vmap=False):
        # Three chunks on the eager form while the program waits at the gate, then compiled.
        torch.testing.assert_close(pb.sweep(compiled, (x,), cells, metric, batch_size=2, progress=False), reference)
        assert started.reach(1) == 1
        gate.set()
        assert pb.wait_for_compiles(timeout=300)
        before = pb.stats(compiled).compiled_calls
        torch.testing.assert_close(pb.sweep(compiled, (x,), cells, metric, batch_size=2, progress=False), reference)
    stats = pb.stats(compiled)
    assert stats.variants_compiled == 1 and stats.compiled_calls == before + 3


def _long_inputs_only(t):
    return t * 2 if t.shape[0] > 4 else t


def _guarded_run(compiled, model, rows):
    """A traced CustomPatch that branches on the length: the symbolic compile assumes a range."""
    from patch_backend import CustomPatch

    x = torch.randn(rows, 8)
    with torch.no_grad():
        with pb.patch(compiled, {"layers_0.output": CustomPatch(custom_op=_long_inputs_only)}):
            patched = compiled(x)
        h = x + _long_inputs_only(model.layers[0](x))
        torch.testing.assert_close(patched, h + model.layers[1](h))


def test_background_compiles_each_shape_specialization_once():
    model = TwoLayerMLP(8)
    compiled = torch.compile(model, backend="graphpatch", dynamic=True)
    with pb.config.patch(compile_policy="background"):
        for rows in (3, 6, 2, 9):  # rows <= 4 and rows > 4 each compile one specialization
            _guarded_run(compiled, model, rows)
            pb.wait_for_compiles(timeout=300)
    stats = pb.stats(compiled)
    assert (stats.eager_calls, stats.compiled_calls, stats.variants_compiled) == (2, 2, 2)


def test_a_symbolic_capture_during_a_background_compile_does_not_wait_for_it(gated_compiler):
    """A graph with symbolic shapes compiles its plain program inside Dynamo's compile. While
    the worker holds the compile lock (its next FX trace would wait for that Dynamo compile),
    waiting for the lock there deadlocked: the graph's unpatched calls now run uncompiled."""
    gate, started = gated_compiler
    torch.manual_seed(0)
    model = TwoLayerMLP(8)
    compiled = torch.compile(model, backend="graphpatch")
    with pb.config.patch(compile_policy="background"), torch.no_grad():
        compiled(torch.randn(3, 8))  # a static capture: its plain compile waits at the gate
        assert started.reach(1) == 1
        # Another size: Dynamo recaptures with symbolic sizes while the worker holds the lock.
        for rows in (5, 6):
            x = torch.randn(rows, 8)
            torch.testing.assert_close(compiled(x), model(x))
    assert pb.stats(compiled).plain_uncompiled_graphs == 1
    gate.set()
    assert pb.wait_for_compiles(timeout=300)


def test_shape_specializations_are_bounded():
    model = TwoLayerMLP(8)
    compiled = torch.compile(model, backend="graphpatch", dynamic=True)
    with pb.config.patch(max_variants=1), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for rows in (3, 6, 2):  # the third call's specialization was dropped for the second's
            _guarded_run(compiled, model, rows)
    stats = pb.stats(compiled)
    assert (stats.variants_compiled, stats.evictions) == (3, 2)
    assert len([w for w in caught if "compiled more than 1 patched variants" in str(w.message)]) == 1


# -- the background default, and calls while the worker traces --------------------------------
#: One fresh process (the environment without PATCH_BACKEND_COMPILE_POLICY) for the two tests
#: below that need one: it prints the default policy, then sets "background" itself and exits
#: while the worker compiles. (A second interpreter with torch costs seconds on this machine.)
_FRESH_PROCESS = """
import sys, torch, patch_backend as pb
from patch_backend.runtime import worker
sys.path.insert(0, sys.argv[1])
from fixtures import TwoLayerMLP
print("default policy:", pb.config.compile_policy)
pb.config.set("compile_policy", "background")
model, x = TwoLayerMLP(), torch.randn(4, 8)
compiled = torch.compile(model, backend="graphpatch")
torch.testing.assert_close(compiled(x), model(x))
with pb.patch(compiled, {"layers_0.output": pb.AddPatch(value=1.0)}):
    compiled(x)  # a second compile, queued behind the plain one: dropped at exit
print("in flight at exit:", worker.in_flight())
"""


@pytest.fixture(scope="module")
def fresh_process():
    env = {key: value for key, value in os.environ.items() if key != "PATCH_BACKEND_COMPILE_POLICY"}
    return subprocess.run([sys.executable, "-c", _FRESH_PROCESS, os.path.dirname(__file__)],
                          env=env, capture_output=True, text=True)


def test_background_is_the_default(fresh_process):
    assert "default policy: background\n" in fresh_process.stdout, fresh_process.stderr[-2000:]


def _trace_waiting_at(gate: threading.Event, inside: threading.Event) -> None:
    """make_fx, as AOTAutograd calls it, of a function that waits at the gate: the worker then
    holds torch's process-wide FX tracing state (the flag, the patched ``nn.Module.__call__``)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    def waits(t):
        inside.set()
        assert gate.wait(timeout=300), "the test never opened the gate"
        return t + 1

    make_fx(waits)(torch.zeros(2))


@pytest.fixture
def traced_gate(monkeypatch):
    """Every background compile first runs a make_fx trace that waits at the gate."""
    real = dispatcher_module.compile_graph
    gate, inside = threading.Event(), threading.Event()
    started = _Arrivals()

    def compile_inside_a_trace(gm, example, options):
        if threading.current_thread() is threading.main_thread():
            return real(gm, example, options)
        started.arrive(gm)
        _trace_waiting_at(gate, inside)
        return real(gm, example, options)

    monkeypatch.setattr(dispatcher_module, "compile_graph", compile_inside_a_trace)
    yield gate, inside, started
    gate.set()
    pb.wait_for_compiles(timeout=300)


def test_compiled_calls_while_the_worker_traces(model_and_input, traced_gate):
    """The caller keeps calling the compiled model, unpatched and patched, while the worker is
    inside an FX trace (torch 2.13 raised "Detected that you are using FX to symbolically
    trace a dynamo-optimized function" here before the worker made it safe)."""
    model, x, compiled, eager = model_and_input
    gate, inside, started = traced_gate
    expected, expected_probe = _run(eager, x, _patches())
    with pb.config.patch(compile_policy="background"):
        first, first_probe = _run(compiled, x, _patches())
        assert inside.wait(timeout=300) and torch.fx._symbolic_trace.is_fx_tracing()
        during = [_run(compiled, x, _patches()) for _ in range(2)]
        plain = compiled(x)
        gate.set()
        assert pb.wait_for_compiles(timeout=300)
        after, after_probe = _run(compiled, x, _patches())
    stats = pb.stats(compiled)
    assert (stats.eager_calls, stats.compiled_calls, stats.variants_compiled) == (3, 1, 1)
    for result, probe in [(first, first_probe), (after, after_probe)] + during:
        torch.testing.assert_close(result, expected)
        torch.testing.assert_close(probe, expected_probe)
    torch.testing.assert_close(plain, model(x))


def test_a_new_capture_waits_for_the_worker(model_and_input, traced_gate):
    """A Dynamo compile (another model's first call) does not trace while the worker traces: it
    waits for the worker's trace (not its whole compile), then captures the same graph, with the same names, as ever."""
    _, x, compiled, _ = model_and_input
    gate, inside, started = traced_gate
    other, y = NestedModel(), torch.randn(2, 100)
    fresh = torch.compile(other, backend="graphpatch")
    with pb.config.patch(compile_policy="background"):
        with pb.patch(compiled, {"layers_0.output": AddPatch(value=torch.ones(8))}):
            compiled(x)
        assert inside.wait(timeout=300)
        opener = threading.Timer(0.5, gate.set)
        opener.start()
        result = fresh(y)  # Dynamo's compile start waits until the worker's trace is done
        assert gate.is_set()
        opener.join()
        assert pb.wait_for_compiles(timeout=300)
    torch.testing.assert_close(result, other(y))
    assert pb.stats(fresh).graphs == 1
    assert "a.b_1.c.linear.output" in pb.nodes(fresh)


def test_first_unpatched_call_runs_eagerly_while_the_plain_program_compiles(gated_compiler):
    gate, started = gated_compiler
    model, x = TwoLayerMLP(), torch.randn(4, 8)
    compiled = torch.compile(model, backend="graphpatch")
    with pb.config.patch(compile_policy="background"):
        first = compiled(x)  # captured now; its plain program waits at the gate
        second = compiled(x)
        assert started.reach(1) == 1
        assert pb.stats(compiled).plain_eager_calls == 2
        gate.set()
        assert pb.wait_for_compiles(timeout=300)
        third = compiled(x)
    stats = pb.stats(compiled)
    assert (stats.calls, stats.plain_eager_calls, stats.compile_failures) == (3, 2, 0)
    assert len(started) == 1 and stats.compile_seconds > 0
    for result in (first, second, third):
        torch.testing.assert_close(result, model(x))


def test_a_failing_plain_compile_warns_and_runs_the_graph_eagerly(monkeypatch):
    def failing_compile(gm, example, options):
        raise RuntimeError("inductor fell over")

    monkeypatch.setattr(dispatcher_module, "compile_graph", failing_compile)
    model, x = TwoLayerMLP(), torch.randn(4, 8)
    compiled = torch.compile(model, backend="graphpatch")
    with pb.config.patch(compile_policy="background"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = [compiled(x)]
        assert pb.wait_for_compiles(timeout=300)
        results += [compiled(x) for _ in range(2)]
    failures = [w for w in caught if "the plain program" in str(w.message) and "inductor fell over" in str(w.message)]
    assert len(failures) == 1
    stats = pb.stats(compiled)
    assert (stats.compile_failures, stats.plain_eager_calls) == (1, 3)
    for result in results:
        torch.testing.assert_close(result, model(x))


def test_the_worker_compiles_with_the_callers_torch_config(model_and_input, monkeypatch):
    """torch's config overrides are per thread (2.13): the worker runs in the caller's context."""
    seen = []
    real = dispatcher_module.compile_graph

    def recording(gm, example, options):
        seen.append((threading.current_thread() is threading.main_thread(),
                     torch._inductor.config.fallback_random))
        return real(gm, example, options)

    monkeypatch.setattr(dispatcher_module, "compile_graph", recording)
    _, x, compiled, _ = model_and_input
    with pb.config.patch(compile_policy="background"), torch._inductor.config.patch(fallback_random=True):
        with pb.patch(compiled, {"layers_0.output": AddPatch(value=torch.ones(8))}):
            compiled(x)
        assert pb.wait_for_compiles(timeout=300)
    assert seen == [(False, True)]


def test_stats_report_compile_seconds_per_region():
    """pb.stats: calls per tier (above) and the seconds each region's compile took, here the
    two blocks of TwoLayerMLP.layers sharing one artifact, compiled in the background."""
    from patch_backend.program.regions import clear_region_cache

    clear_region_cache()
    model, x = TwoLayerMLP(), torch.randn(4, 8)
    compiled = torch.compile(model, backend="graphpatch")
    with pb.config.patch(compile_policy="background"):
        compiled(x)
        assert pb.wait_for_compiles(timeout=300)
        plain = dict(pb.stats(compiled).compile_seconds_by_region)
        with pb.patch(compiled, {"layers_1.act.gelu": ZeroPatch()}):
            compiled(x)
        assert pb.wait_for_compiles(timeout=300)
    by_region = pb.stats(compiled).compile_seconds_by_region
    assert "layers[*]" in plain and plain["layers[*]"] > 0
    # The patched block is a second block artifact; the plain one and the rest were reused.
    assert set(by_region) == set(plain) and by_region["layers[*]"] > plain["layers[*]"]
    # Region compiles are a part of each program's compile (which also splits and keys regions).
    assert sum(by_region.values()) <= pb.stats(compiled).compile_seconds


def test_background_falls_back_to_sync_where_torch_lacks_the_interfaces(model_and_input, monkeypatch):
    """docs/errors.md row 27: without Dynamo's force_compile_during_fx_trace (or its compile
    callbacks) a worker thread is not safe, so "background" compiles in the call, and says so."""
    from patch_backend._torch_compat import gates, threads
    from patch_backend.runtime import tiers, worker

    monkeypatch.setattr(worker, "_hooks", None)
    monkeypatch.setattr(threads, "_probe_flag", lambda: False)
    gates.reset_warnings()
    _, x, compiled, _ = model_and_input
    with pb.config.patch(compile_policy="background"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert tiers.policy() == "sync"
        with pb.patch(compiled, {"layers_0.output": AddPatch(value=torch.ones(8))}):
            compiled(x)
    assert [str(w.message) for w in caught if issubclass(w.category, pb.PatchBackendWarning)] == [
        next(str(w.message) for w in caught if "force_compile_during_fx_trace" in str(w.message))
    ]
    stats = pb.stats(compiled)
    assert (stats.eager_calls, stats.compiled_calls, stats.variants_compiled) == (0, 1, 1)


def test_a_process_exits_cleanly_while_the_worker_compiles(fresh_process):
    """The running compile is waited for at exit (abandoning it in Inductor's C++ thread pools
    aborted the process: "terminate called without an active exception"), queued ones dropped.
    (The process is ``fresh_process``, above.)"""
    done = fresh_process
    assert done.returncode == 0, done.stderr[-2000:]
    assert "in flight at exit: 2" in done.stdout
    assert "terminate called" not in done.stderr and "failed" not in done.stderr


def _in_thread(fn):
    """Runs ``fn`` in a new thread; returns (thread, outcome) where outcome gets "result" or
    "error" when it ends."""
    outcome = {}

    def body():
        try:
            outcome["result"] = fn()
        except BaseException as error:  # noqa: BLE001 - handed to the test
            outcome["error"] = error

    thread = threading.Thread(target=body)
    thread.start()
    return thread, outcome


def test_another_threads_compiled_calls_while_the_worker_traces(model_and_input, traced_gate):
    """A thread that never submitted a compile calls compiled code while the worker is inside an
    FX trace: an already-captured model runs, and a model's first call (a new Dynamo capture)
    waits for the trace to end; neither raises Dynamo's "FX to symbolically trace" error
    (torch 2.13 raised it in such a thread before the flag became process-wide)."""
    from patch_backend.runtime import worker

    model, x, compiled, eager = model_and_input
    gate, inside, started = traced_gate
    other, y = NestedModel(), torch.randn(2, 100)
    fresh = torch.compile(other, backend="graphpatch")
    with pb.config.patch(compile_policy="background"):
        with pb.patch(compiled, {"layers_0.output": AddPatch(value=torch.ones(8))}):
            compiled(x)
        assert inside.wait(timeout=300) and torch.fx._symbolic_trace.is_fx_tracing()
        waits = worker.dynamo_waits()
        thread, outcome = _in_thread(lambda: (compiled(x), _run(compiled, x, _patches())))
        thread.join(timeout=300)
        assert "error" not in outcome, outcome.get("error")
        assert not gate.is_set()  # it ran while the worker traced
        thread, fresh_outcome = _in_thread(lambda: fresh(y))
        assert worker.wait_for_dynamo_waiters(waits + 1, timeout=300)  # waiting, not failing
        assert thread.is_alive() and not fresh_outcome
        gate.set()
        thread.join(timeout=300)
        assert pb.wait_for_compiles(timeout=300)
    assert "error" not in fresh_outcome, fresh_outcome.get("error")
    plain, (patched, probe) = outcome["result"]
    torch.testing.assert_close(plain, model(x))
    expected, expected_probe = _run(eager, x, _patches())
    torch.testing.assert_close(patched, expected)
    torch.testing.assert_close(probe, expected_probe)
    torch.testing.assert_close(fresh_outcome["result"], other(y))
    assert "a.b_1.c.linear.output" in pb.nodes(fresh)


def test_a_new_capture_does_not_wait_for_a_compile_outside_a_trace(model_and_input, gated_compiler):
    """While the worker compiles but is not inside an FX trace (here: held before it starts,
    as in Inductor's lowering and code generation), another model's first call captures at
    once: the compile never opens the gate, and no Dynamo compile waited."""
    from patch_backend.runtime import worker

    _, x, compiled, _ = model_and_input
    gate, started = gated_compiler
    other, y = NestedModel(), torch.randn(2, 100)
    fresh = torch.compile(other, backend="graphpatch")
    with pb.config.patch(compile_policy="background"):
        with pb.patch(compiled, {"layers_0.output": AddPatch(value=torch.ones(8))}):
            compiled(x)
        assert started.reach(1) == 1
        waits = worker.dynamo_waits()
        thread, outcome = _in_thread(lambda: fresh(y))
        thread.join(timeout=300)
        assert not gate.is_set() and not thread.is_alive()
        assert worker.dynamo_waits() == waits
        gate.set()
        assert pb.wait_for_compiles(timeout=300)
    assert "error" not in outcome, outcome.get("error")
    torch.testing.assert_close(outcome["result"], other(y))
    assert "a.b_1.c.linear.output" in pb.nodes(fresh)


def test_the_eager_tier_runs_with_one_thread_fewer_beside_a_compile(model_and_input, gated_compiler, monkeypatch):
    """The call that asks for a compile runs first, alone, with every thread (the compile
    starts after it: ``worker.foreground``); while a compile runs the eager tier runs with one
    intra-op thread fewer (the compile keeps a core busy); the caller's count is restored after
    the call, and the worker keeps the submitter's count (Inductor writes it into the kernels
    it generates)."""
    from patch_backend import CustomPatch

    _, x, compiled, eager = model_and_input
    gate, started = gated_compiler
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        seen = []
        in_worker = []
        real = dispatcher_module.compile_graph

        def counting(gm, example, options):
            in_worker.append(torch.get_num_threads())
            return real(gm, example, options)

        monkeypatch.setattr(dispatcher_module, "compile_graph", counting)

        compiles_started = started.__len__

        def record(value):
            if threading.current_thread() is threading.main_thread():  # not the worker's traces
                seen.append((torch.get_num_threads(), compiles_started()))
            return value * 2

        patches = {"layers_0.output": CustomPatch(custom_op=record)}
        with pb.config.patch(compile_policy="background"):
            with pb.patch(compiled, patches):
                result = compiled(x)
            assert started.reach(1) == 1
            with pb.patch(compiled, patches):
                compiled(x)  # beside the running compile (held at the gate)
            assert torch.get_num_threads() == 2
            gate.set()
            assert pb.wait_for_compiles(timeout=300)
        with pb.patch(eager, {"layers_0.output": CustomPatch(custom_op=lambda value: value * 2)}):
            expected = eager(x)
    finally:
        torch.set_num_threads(before)
    # (threads, compiles started) in each eager call: the first ran before its compile started.
    assert seen[:2] == [(2, 0), (1, 1)], seen
    # (``record``'s key reads its closure's values, so the second call compiles its own program.)
    assert in_worker and set(in_worker) == {2}
    torch.testing.assert_close(result, expected)


def test_the_worker_builds_the_name_table_after_the_plain_compile():
    """The first pb.patch of a model finds its node-name table built: the worker built it after
    the model's plain program (else that call pays for it before its forward)."""
    from patch_backend.capture import index as index_module
    from patch_backend.capture.capture import registry_version

    model, x = TwoLayerMLP(), torch.randn(4, 8)
    compiled = torch.compile(model, backend="graphpatch")
    with pb.config.patch(compile_policy="background"):
        compiled(x)
        assert pb.wait_for_compiles(timeout=300)
    table = index_module._indexes.get(model)
    assert table is not None and table._version == registry_version()
    assert "layers_0.output" in table.by_name


def test_a_background_compiler_renaming_its_graph_changes_no_name(monkeypatch):
    """AOTAutograd's cache renames a graph's placeholders (``p_0``, ``p_1``…) while it hashes
    it, on the worker, while the caller's thread may be naming the same graph. The compiler must
    get a graph of its own: names read meanwhile, and after, are the eager backend's, and a
    parameter patch still lands on the parameter."""
    model, x = TwoLayerMLP(), torch.randn(4, 8)
    eager = torch.compile(copy.deepcopy(model), backend="graphpatch_eager")
    eager(x)
    expected = pb.nodes(eager)
    assert "layers_0.up.weight" in expected
    real = dispatcher_module.compile_inductor
    renamed, gate = threading.Event(), threading.Event()
    received = []

    def renaming_compiler(gm, example, options, cacheable=()):
        received.append(gm)
        for position, node in enumerate(n for n in gm.graph.nodes if n.op == "placeholder"):
            node.target = f"p_{position}"
            node._rename(f"p_{position}")
        renamed.set()
        assert gate.wait(timeout=300), "the test never opened the gate"
        return real(gm, example, options, cacheable=cacheable)

    monkeypatch.setattr(dispatcher_module, "compile_inductor", renaming_compiler)
    compiled = torch.compile(model, backend="graphpatch")
    try:
        with pb.config.patch(compile_policy="background", regional_compile=False):
            compiled(x)  # runs the captured graph eagerly; its plain compile waits at the gate
            assert renamed.wait(timeout=300)
            assert pb.nodes(compiled) == expected
    finally:
        gate.set()
        assert pb.wait_for_compiles(timeout=300)
    assert len(received) == 1
    graphs = [capture.gm for capture in all_captures()]
    assert all(received[0] is not gm and received[0].graph is not gm.graph for gm in graphs)
    assert not any(node.name.startswith("p_") for gm in graphs for node in gm.graph.nodes)
    assert pb.nodes(compiled) == expected
    patches = {"layers_0.up.weight": ZeroPatch(), "layers_1.act.output": ProbePatch()}
    eager_patches = {"layers_0.up.weight": ZeroPatch(), "layers_1.act.output": ProbePatch()}
    with pb.patch(compiled, patches):
        out = compiled(x)
    with pb.patch(eager, eager_patches):
        reference = eager(x)
    torch.testing.assert_close(out, reference)
    torch.testing.assert_close(patches["layers_1.act.output"].activation, eager_patches["layers_1.act.output"].activation)
