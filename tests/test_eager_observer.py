"""The observer of forwards Dynamo runs eagerly never outlives what it watches (issue 9).

``_torch_compat/eager_observer.py`` puts a profile function on the thread when Dynamo gives up
on a forward, to read the module boundaries of its first eager run. It must come off the thread
when that forward returns, when it raises, and when the forward it waits for never starts (Dynamo
gave up on a decorator's wrapper and then compiled the forward itself): a profile function left
behind slows every later Python call on the thread and, at interpreter exit, printed
"Exception ignored" (seen after tests/test_transformers.py's graph break in one GPT-2 block).
"""

from __future__ import annotations

import functools
import logging
import os
import subprocess
import sys
import textwrap
import warnings
from typing import Any, List

import pytest
import torch
from torch import nn

import patch_backend as pb
from patch_backend._torch_compat.eager_observer import observed_itself
from fixtures import output_with_hooks

BACKENDS = ["graphpatch_eager", "graphpatch"]


class _UserContext:
    """A user-defined context manager: a graph break under it makes Dynamo run the frame eagerly."""

    def __enter__(self) -> "_UserContext":
        return self

    def __exit__(self, *exc: Any) -> bool:
        return False


class Probe(nn.Module):
    """Records the thread's profile function as it runs (inside the watched forward)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: List[Any] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(sys.getprofile())
        return x


class EagerBody(nn.Module):
    def __init__(self, broken: bool = True, raises: bool = False) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.probe = Probe()
        self.broken = broken
        self.raises = raises

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x)
        with _UserContext():
            if self.broken:
                print("", end="")
            if self.raises:
                raise ValueError("first run fails")
            return self.probe(h) * 2


def _quiet(call, *args):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return call(*args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_profile_restored_after_an_observed_forward(backend: str) -> None:
    """The watch is on the thread while the forward runs (its calls are read) and off after."""
    torch._dynamo.reset()
    assert sys.getprofile() is None
    model = EagerBody()
    compiled = torch.compile(model, backend=backend)
    _quiet(compiled, torch.randn(2, 3))
    assert model.probe.seen and model.probe.seen[0] is not None  # watched during the first run
    assert sys.getprofile() is None
    assert observed_itself(model)
    assert {"x", "lin.weight", "lin.output", "output"} <= set(pb.nodes(compiled))
    _quiet(compiled, torch.randn(2, 3))
    assert model.probe.seen[1] is None  # only the first run is watched


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_watch_is_not_compiled_by_dynamo(backend: str) -> None:
    """The watched forward runs under Dynamo's frame callback; the watch and the helpers it
    calls must not be converted as frames of their own (each would cost a trace on the first
    run, and an op on a tensor there would make a graph of this package's code)."""

    class Records(logging.Handler):
        def __init__(self) -> None:
            super().__init__(logging.INFO)
            self.records: List[logging.LogRecord] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.records.append(record)

    torch._dynamo.reset()
    handler = Records()
    dynamo_logger = logging.getLogger("torch._dynamo")
    torch._logging.set_logs(dynamo=logging.INFO)
    dynamo_logger.addHandler(handler)
    try:
        _quiet(torch.compile(EagerBody(), backend=backend), torch.randn(2, 3))
    finally:
        dynamo_logger.removeHandler(handler)
        torch._logging.set_logs()
    records = handler.records
    traced = [r.getMessage() for r in records if "start tracing" in r.getMessage()]
    assert any("forward" in message for message in traced)  # the log is read
    package = os.path.dirname(pb.__file__)
    assert not [message for message in traced if package in message or "weakref.py" in message]


@pytest.mark.parametrize("backend", BACKENDS)
def test_profile_restored_when_the_forward_raises(backend: str) -> None:
    """A forward raising on its first eager run: the watch comes off, and nothing is recorded
    from the half-run (its boundaries stay unnamed: docs/naming.md, Limits)."""
    torch._dynamo.reset()
    model = EagerBody(raises=True)
    compiled = torch.compile(model, backend=backend)
    with pytest.raises(ValueError, match="first run fails"):
        _quiet(compiled, torch.randn(2, 3))
    assert sys.getprofile() is None
    assert not observed_itself(model)


def noisy(forward):
    """A decorator whose wrapper Dynamo gives up on (a graph break under a user context
    manager) while the forward it wraps compiles."""

    @functools.wraps(forward)
    def wrapper(self, *args: Any, **kwargs: Any) -> Any:
        if self.noisy:
            with _UserContext():
                print("", end="")
        return forward(self, *args, **kwargs)

    return wrapper


class Wrapped(nn.Module):
    def __init__(self, noisy: bool) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.noisy = noisy

    @noisy
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) * 2


class AroundWrapped(nn.Module):
    def __init__(self, noisy: bool) -> None:
        super().__init__()
        self.pre = nn.Linear(3, 3)
        self.w = Wrapped(noisy)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w(self.pre(x)) + 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_profile_restored_when_the_watched_forward_never_starts(backend: str) -> None:
    """Dynamo gives up on the wrapper, so a watch waits for ``Wrapped``'s own forward, which
    Dynamo then compiles (it never runs eagerly): the watch comes off as the frame that called
    the wrapper returns. Names and patches are those of the model without the break."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    x = torch.randn(2, 3)
    unbroken, broken = AroundWrapped(False), AroundWrapped(True)
    broken.load_state_dict(unbroken.state_dict())
    reference = torch.compile(unbroken, backend="graphpatch_eager")
    compiled = torch.compile(broken, backend=backend)
    _quiet(reference, x)
    assert sys.getprofile() is None
    _quiet(compiled, x)
    assert sys.getprofile() is None
    assert not observed_itself(broken.w)  # its forward ran in graphs
    assert pb.nodes(compiled) == pb.nodes(reference)
    assert {"w.x", "w.lin.output", "w.mul", "w.output"} <= set(pb.nodes(compiled))
    with torch.no_grad(), pb.patch(compiled, {"w.lin.output": pb.AddPatch(value=1.0)}):
        patched = _quiet(compiled, x)
    expected = output_with_hooks(unbroken, x, [unbroken.w.lin.register_forward_hook(lambda m, a, out: out + 1.0)])
    torch.testing.assert_close(patched, expected)


class WrappedEager(nn.Module):
    """Dynamo gives up on the wrapper and on the forward it wraps: the first watch (waiting for
    the forward) is replaced by the second, which observes it."""

    def __init__(self, noisy: bool) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.noisy = noisy

    @noisy
    def forward(self, x: torch.Tensor):
        h = self.lin(x)
        with _UserContext():
            if self.noisy:
                print("", end="")
            return h * 2, h


class AroundWrappedEager(nn.Module):
    def __init__(self, noisy: bool) -> None:
        super().__init__()
        self.pre = nn.Linear(3, 3)
        self.w = WrappedEager(noisy)
        self.post = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, h = self.w(self.pre(x))
        return self.post(y) + h


@pytest.mark.parametrize("backend", BACKENDS)
def test_wrapped_forward_run_eagerly_is_observed(backend: str) -> None:
    """The forward inside a wrapper Dynamo gave up on is observed under its own parameter names
    (``w.x``, not the wrapper's ``args``), listed where the unbroken model lists them; only the
    ops of its eagerly run body are missing, and a patch there equals a forward hook."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    x = torch.randn(2, 3)
    unbroken, broken = AroundWrappedEager(False), AroundWrappedEager(True)
    broken.load_state_dict(unbroken.state_dict())
    reference = torch.compile(unbroken, backend="graphpatch_eager")
    compiled = torch.compile(broken, backend=backend)
    _quiet(reference, x)
    _quiet(compiled, x)
    assert sys.getprofile() is None
    assert observed_itself(broken.w)
    names = pb.nodes(compiled)
    body_ops = {"w.mul", "w.lin.linear"}
    assert body_ops <= set(pb.nodes(reference))
    assert names == [name for name in pb.nodes(reference) if name not in body_ops]
    with torch.no_grad(), pb.patch(compiled, {"w.output|sub_1": pb.ZeroPatch(slice=(0,))}):
        patched = _quiet(compiled, x)

    def hook(module: nn.Module, args, output):
        second = output[1].clone()
        second[0] = 0
        return output[0], second

    expected = output_with_hooks(unbroken, x, [unbroken.w.register_forward_hook(hook)])
    torch.testing.assert_close(patched, expected)


_AT_EXIT = """
import sys, warnings
warnings.simplefilter("ignore")
sys.path.insert(0, {tests!r})
import torch
from test_eager_observer import AroundWrapped, EagerBody
for model in (AroundWrapped(True), EagerBody()):
    torch.compile(model, backend="graphpatch_eager")(torch.randn(2, 3))
print("profile:", sys.getprofile())
"""


@pytest.mark.slow
def test_nothing_left_on_the_thread_at_exit() -> None:
    """In a fresh interpreter (``-X dev``), after a watch that never started and one that
    observed: no profile function is left, and nothing is printed at exit."""
    script = textwrap.dedent(_AT_EXIT).format(tests=os.path.dirname(os.path.abspath(__file__)))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run(
        [sys.executable, "-X", "dev", "-c", script], capture_output=True, text=True, timeout=300, cwd=root
    )
    assert done.returncode == 0, done.stderr
    assert "profile: None" in done.stdout
    assert "Exception ignored" not in done.stderr, done.stderr
