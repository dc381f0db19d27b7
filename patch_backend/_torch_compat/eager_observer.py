"""What a forward Dynamo runs eagerly called and returned, watched on its first run.

A forward Dynamo gives up on ("falling back to eager") runs in no graph, yet the unbroken model
names its module boundaries (docs/naming.md, "Limits"). Nothing in torch records the module
calls of such a frame, and a forward hook cannot see the call (``Module._call_impl`` chose its
hook-free path before Dynamo met the forward), so the one run after Dynamo gave up is watched
through a profile function on the thread (``sys.setprofile``): which modules it calls, with which
arguments, and what each returned. ``frame.install_eager_fallback_log`` starts a watch; the
names are made in ``capture/naming.py`` (``eager_boundary_sites``).
"""

from __future__ import annotations

import dis
import inspect
import itertools
import logging
import os
import sys
import threading
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .calls import skip_frame_and_calls
from .gates import fallback

logger = logging.getLogger(__name__)

_lock = threading.Lock()

#: What one tensor leaf looked like when observed: (shape, dtype); None for a non-tensor leaf.
LeafFacts = Optional[Tuple[Tuple[int, ...], torch.dtype]]


@dataclass(frozen=True)
class EagerCall:
    """One module call made while a forward Dynamo gave up on ran eagerly (that forward's own
    call included, at path ``()``): no graph holds its boundary, so its names come from here."""

    #: The called module's path relative to the module whose forward ran eagerly.
    path: Tuple[str, ...]
    #: Its k-th call in the observed forward, and how many calls it had there.
    ordinal: int
    #: Tensor (and other) leaves of its arguments: (forward parameter, path inside it, facts);
    #: a ``*args`` item has its position as the first path part, a ``**kwargs`` one its key.
    arguments: Tuple[Tuple[str, Tuple[str, ...], LeafFacts], ...]
    #: Leaves of what it returned: (path, facts), paths as ``_walk`` spells them (``sub_1``, keys).
    result: Tuple[Tuple[Tuple[str, ...], LeafFacts], ...]
    #: The forward's ``*args`` / ``**kwargs`` parameter names, if any.
    varargs: Optional[str] = None
    varkw: Optional[str] = None
    #: When the call started and returned, on the clock graphs' first runs are numbered by
    #: (``set_sequence_source``), so its names can be listed where the unbroken model has them.
    start: int = -1
    end: int = -1


@dataclass(frozen=True)
class EagerForward:
    """A forward Dynamo ran eagerly for this package's backends, as observed on its first run."""

    reason: str
    calls: Tuple[EagerCall, ...]
    #: Calls per path in the observed forward (a module called twice gets ``_0``/``_1`` scopes).
    counts: Tuple[Tuple[Tuple[str, ...], int], ...]
    #: Whether a graph of this package's backends was captured or first ran inside the observed
    #: forward (the clock ticked between its calls' stamps): the forward's names are then only
    #: a part of its model's, the rest being those graphs' (index.py names another instance of
    #: the class from this observation only once that instance's model has run).
    graphs_inside: bool = True
    #: The forwards that return its result as it is (``return self.block(x)``), innermost first,
    #: each as the path from that caller to the one before (the first: to this module): their
    #: ``output`` is this result, and no graph holds it (Dynamo compiles nothing after the call).
    returned_through: Tuple[Tuple[str, ...], ...] = ()
    #: The forwards that passed it their own arguments unchanged, innermost first: (path from
    #: that caller to the one before, (this forward's parameter, the caller's parameter) pairs).
    #: Those arguments are the callers' inputs too, and no graph holds them.
    passed_through: Tuple[Tuple[Tuple[str, ...], Tuple[Tuple[str, str], ...]], ...] = ()


_observed_forwards: "weakref.WeakKeyDictionary[torch.nn.Module, EagerForward]" = weakref.WeakKeyDictionary()
#: The same by forward code: Dynamo skips the code for every later instance without a trace, so
#: another instance of the class is named from the latest observation (whose graphs are the
#: likeliest still alive: index.py lists the borrowed names among them).
_observed_codes: "weakref.WeakKeyDictionary[Any, EagerForward]" = weakref.WeakKeyDictionary()
_observed_version = [0]


def eager_observations_version() -> int:
    """Bumped whenever an eagerly run forward was observed (name tables then refresh)."""
    return _observed_version[0]


def observed_eager_forward(module: torch.nn.Module) -> Optional[EagerForward]:
    """What the forward of ``module`` (or, if not observed itself, of its class) called and
    returned when Dynamo ran it eagerly for this package's backends; None if it never did."""
    with _lock:
        found = _observed_forwards.get(module)
        if found is not None:
            return found
        if not _observed_codes:
            return None
    code = forward_code(module)
    with _lock:
        return _observed_codes.get(code) if code is not None else None


def observed_itself(module: Optional[torch.nn.Module]) -> bool:
    """Whether ``module``'s own run was observed (not only another instance's of its class)."""
    if module is None:
        return True  # a dead module needs no observation
    with _lock:
        return module in _observed_forwards


def _leaf_facts(value: Any) -> LeafFacts:
    return (tuple(int(s) for s in value.shape), value.dtype) if isinstance(value, torch.Tensor) else None


def _structure_leaves(value: Any, path: Tuple[str, ...], out: list, depth: int = 0) -> None:
    """Leaves of a real value, with the paths ``_walk`` gives a traced one (``sub_<k>``, keys)."""
    if depth > 8:
        return
    if isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _structure_leaves(item, path + (f"sub_{index}",), out, depth + 1)
    elif isinstance(value, dict):
        for key, item in value.items():
            _structure_leaves(item, path + (str(key),), out, depth + 1)
    else:
        out.append((path, _leaf_facts(value)))


def code_parameters(code: Any) -> Tuple[Tuple[str, ...], Optional[str], Optional[str]]:
    """(named parameters after ``self``, ``*args`` name, ``**kwargs`` name) of a function code."""
    count = code.co_argcount + code.co_kwonlyargcount
    names = code.co_varnames
    varargs = names[count] if code.co_flags & inspect.CO_VARARGS else None
    varkw = names[count + (1 if varargs else 0)] if code.co_flags & inspect.CO_VARKEYWORDS else None
    return tuple(names[1:count]), varargs, varkw


def _call_arguments(code: Any, f_locals: Dict[str, Any]) -> Tuple[Tuple[str, Tuple[str, ...], LeafFacts], ...]:
    named, varargs, varkw = code_parameters(code)
    leaves: list = []
    for name in named:
        found: list = []
        _structure_leaves(f_locals.get(name), (), found)
        leaves.extend((name, path, facts) for path, facts in found)
    if varargs is not None:
        for position, item in enumerate(f_locals.get(varargs) or ()):
            found = []
            _structure_leaves(item, (), found)
            leaves.extend((varargs, (str(position),) + path, facts) for path, facts in found)
    if varkw is not None:
        for key, item in (f_locals.get(varkw) or {}).items():
            found = []
            _structure_leaves(item, (), found)
            leaves.extend((varkw, (str(key),) + path, facts) for path, facts in found)
    return tuple(leaves)


_sequence_source: List[Callable[[], int]] = [itertools.count().__next__]


def set_sequence_source(source: Callable[[], int]) -> None:
    """The clock eager calls are stamped with: capture's, which numbers graphs' first runs, so
    that both orders interleave (a C callable: it runs inside the profile function)."""
    _sequence_source[0] = source


def forward_code(module: torch.nn.Module) -> Any:
    """The code of ``module``'s own forward, under any decorators (``functools.wraps`` chains);
    None where it has none (a C function)."""
    forward = inspect.unwrap(getattr(type(module), "forward", None) or (lambda: None))
    return getattr(forward, "__code__", None)


_TORCH_DIR = os.path.dirname(torch.__file__)
_CONVERT_FRAME = os.path.join("_dynamo", "convert_frame.py")


def _dynamo_caller(depth: int = 256) -> Any:
    """The frame that called the frame Dynamo is converting now (None if not found): the
    ``f_back`` of the outermost frame of Dynamo's frame callback (``convert_frame.py``) on this
    thread's stack, looking no further than the first frame outside torch beyond it. Whatever
    Dynamo then runs for the frame it converts (the original code, when it gave up on it) starts
    and ends before this frame returns."""
    frame: Any = sys._getframe(1)
    entry = None
    for _ in range(depth):
        if frame is None:
            break
        filename = frame.f_code.co_filename
        if filename.endswith(_CONVERT_FRAME):
            entry = frame
        elif entry is not None and not filename.startswith(_TORCH_DIR):
            break
        frame = frame.f_back
    return entry.f_back if entry is not None else None


_RETURNS = frozenset({"RETURN_VALUE", "RETURN_CONST"})
_return_offsets: "weakref.WeakKeyDictionary[Any, frozenset]" = weakref.WeakKeyDictionary()


def _returned(frame: Any, value: Any) -> bool:
    """Whether a frame at its ``return`` profile event returns ``value`` rather than unwinding
    an exception (both give the event; an unwinding one has ``None`` and stopped at the
    instruction that raised, not at a return)."""
    if value is not None:
        return True
    code = frame.f_code
    offsets = _return_offsets.get(code)
    if offsets is None:
        offsets = frozenset(i.offset for i in dis.get_instructions(code) if i.opname in _RETURNS)
        _return_offsets[code] = offsets
    return frame.f_lasti in offsets


class _Watch:
    """The profile function watching one forward Dynamo gave up on, on its first run; see
    ``_observe_eager_forward``. It is on the thread only between Dynamo giving up and the end of
    that forward: it restores the profile function it replaced (``previous``: None, or a watch
    whose forward has not started) when the forward returns or raises, and when ``anchor`` (the
    frame that called the frame Dynamo converted) returns or unwinds without the forward having
    started (Dynamo gave up on a wrapper whose forward it then compiled, or on code that is not
    the forward itself)."""

    def __init__(self, module: torch.nn.Module, watched: Any, reason: str, anchor: Any, previous: Optional["_Watch"],
                 returned_through: Tuple[Tuple[str, ...], ...] = (),
                 passed_through: Tuple[Tuple[Tuple[str, ...], Tuple[Tuple[str, str], ...]], ...] = ()) -> None:
        self.module = weakref.ref(module)
        self.returned_through = returned_through
        self.passed_through = passed_through
        self.watched = watched
        self.reason = reason
        self.anchor = anchor
        self.previous = previous
        self.started = False
        self.paths: Dict[int, Tuple[str, ...]] = {}
        self.codes: Dict[Any, None] = {}
        for name, child in module.named_modules(remove_duplicate=False):
            self.paths.setdefault(id(child), tuple(name.split(".")) if name else ())
            child_code = forward_code(child)
            if child_code is not None and child_code.co_argcount:
                self.codes[child_code] = None
        self.open_calls: List[Tuple[Any, Tuple[str, ...], int, Tuple[Any, ...], int]] = []
        self.calls: List[EagerCall] = []
        self.counts: Dict[Tuple[str, ...], int] = {}

    def stop(self) -> None:
        """Off the thread, the profile function it replaced back; frames dropped."""
        previous, self.previous, self.anchor = self.previous, None, None
        while previous is not None and observed_itself(previous.module()):
            previous = previous.previous  # waited for a forward now observed: done too
        if sys.getprofile() is self:
            sys.setprofile(previous)
        self.open_calls.clear()

    def _finish(self, returned: bool) -> None:
        module = self.module()
        calls = self.calls
        self.stop()
        if not returned or module is None or not calls or calls[-1].path != ():
            return  # the forward raised: nothing reliable to name
        # Each call took two stamps of the clock; any other tick was a graph's (capture.py).
        whole = calls[-1]
        graphs_inside = whole.end - whole.start - 1 != 2 * (len(calls) - 1)
        observed = EagerForward(self.reason, tuple(calls), tuple(self.counts.items()), graphs_inside, self.returned_through, self.passed_through)
        with _lock:
            _observed_forwards[module] = observed
            _observed_codes[self.watched] = observed
            _observed_version[0] += 1

    @skip_frame_and_calls
    def __call__(self, frame: Any, event: str, arg: Any) -> None:
        # Skipped by Dynamo with all it calls: the watched forward runs under Dynamo's frame
        # callback, which would otherwise convert this function's helpers (``_call_arguments``,
        # ``_leaf_facts``…) as frames of their own on the forward's first run.
        try:
            if event == "call":
                frame_code = frame.f_code
                if frame_code not in self.codes:
                    return
                f_locals = frame.f_locals
                path = self.paths.get(id(f_locals.get(frame_code.co_varnames[0])))
                if path is None or (not self.started and (path != () or frame_code is not self.watched)):
                    return
                self.started = True
                ordinal = self.counts.get(path, 0)
                self.counts[path] = ordinal + 1
                self.open_calls.append(
                    (frame, path, ordinal, _call_arguments(frame_code, f_locals), _sequence_source[0]())
                )
            elif event == "return":
                if self.open_calls and self.open_calls[-1][0] is frame:
                    _, path, ordinal, arguments, start = self.open_calls.pop()
                    returned = _returned(frame, arg)
                    if returned:
                        result: list = []
                        _structure_leaves(arg, (), result)
                        _, varargs, varkw = code_parameters(frame.f_code)
                        # Inner calls return first: kept in call order (the outer forward's last).
                        self.calls.append(EagerCall(
                            path, ordinal, arguments, tuple(result), varargs, varkw, start, _sequence_source[0]()
                        ))
                    if not self.open_calls:
                        self._finish(returned)
                elif frame is self.anchor:
                    self.stop()  # the forward never started (or never ended) here
        except Exception as error:  # never break a forward for a name
            logger.debug("eager forward not observed: %r", error)
            self.calls.clear()
            self.stop()


def _observe_eager_forward(
    module: torch.nn.Module, code: Any, reason: str, returned_by: Sequence[torch.nn.Module] = (),
    passed_by: Sequence[Tuple[torch.nn.Module, Tuple[Tuple[str, str], ...]]] = (),
) -> None:
    """Watches the forward Dynamo is about to run eagerly, once (its first run): which module
    calls it makes (its own included) with their arguments and results, read off the Python
    frames through ``sys.setprofile`` for this thread (``_Watch``). A forward hook cannot see
    this call (``Module._call_impl`` chose its hook-free path before Dynamo met the forward), and
    nothing else records the module calls of an eager frame. Called from Dynamo's callback as it
    gives up on ``code`` (the forward, or a decorator's wrapper around it): what is watched is
    the module's own forward, the code its parameters are named after.

    Skipped where a profiler is already set (it is left alone): the forward is then observed
    on a later first run of another instance, or not named. Inside a forward being observed, the
    observation records this one's calls; a watch still waiting for its forward is replaced (and
    put back when this one ends). ``returned_by``: the callers returning its result as it is
    (``frame.returning_callers``), recorded as paths (``EagerForward.returned_through``);
    ``passed_by``: the callers that passed it their own arguments unchanged, with which
    (``EagerForward.passed_through``)."""
    with _lock:
        if module in _observed_forwards:
            return
    active = sys.getprofile()
    previous: Optional[_Watch] = None
    if isinstance(active, _Watch):
        if active.started:
            return  # inside a forward being observed: its observation records this one's calls
        previous = active
    elif active is not None:
        fallback("eager_observe", "a profiler is active, so the module boundaries of a forward Dynamo runs "
                 "eagerly are not observed and get no names")
        return
    anchor = _dynamo_caller()
    if anchor is None:
        fallback("eager_observe_anchor", "cannot find the frame Dynamo is converting on the stack, so the "
                 "module boundaries of a forward Dynamo runs eagerly are not observed and get no names")
        return
    watched = forward_code(module) or code
    passed = tuple(zip(_relative_paths(module, [caller for caller, _ in passed_by]), (pairs for _, pairs in passed_by)))
    watch = _Watch(module, watched, reason, anchor, previous, _relative_paths(module, returned_by), passed)
    sys.setprofile(watch)


def _relative_paths(module: torch.nn.Module, callers: Sequence[torch.nn.Module]) -> Tuple[Tuple[str, ...], ...]:
    """Per caller up a call chain (the nearest first): the path from it to the one before (the
    first: to ``module``); cut where one does not hold the one before."""
    paths: List[Tuple[str, ...]] = []
    inner = module
    for caller in callers:
        relative = next((tuple(name.split(".")) for name, child in caller.named_modules() if child is inner and name), None)
        if relative is None:
            break
        paths.append(relative)
        inner = caller
    return tuple(paths)
