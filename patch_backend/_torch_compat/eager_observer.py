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

import inspect
import logging
import sys
import threading
import weakref
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch

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


@dataclass(frozen=True)
class EagerForward:
    """A forward Dynamo ran eagerly for this package's backends, as observed on its first run."""

    reason: str
    calls: Tuple[EagerCall, ...]
    #: Calls per path in the observed forward (a module called twice gets ``_0``/``_1`` scopes).
    counts: Tuple[Tuple[Tuple[str, ...], int], ...]


_observed_forwards: "weakref.WeakKeyDictionary[torch.nn.Module, EagerForward]" = weakref.WeakKeyDictionary()
#: The same by forward code: Dynamo skips the code for every later instance without a trace, so
#: another instance of the class is named from the first one's observation.
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
    forward = inspect.unwrap(getattr(type(module), "forward", None) or (lambda: None))
    code = getattr(forward, "__code__", None)
    with _lock:
        return _observed_codes.get(code) if code is not None else None


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


def _code_parameters(code: Any) -> Tuple[Tuple[str, ...], Optional[str], Optional[str]]:
    """(named parameters after ``self``, ``*args`` name, ``**kwargs`` name) of a function code."""
    count = code.co_argcount + code.co_kwonlyargcount
    names = code.co_varnames
    varargs = names[count] if code.co_flags & inspect.CO_VARARGS else None
    varkw = names[count + (1 if varargs else 0)] if code.co_flags & inspect.CO_VARKEYWORDS else None
    return tuple(names[1:count]), varargs, varkw


def _call_arguments(code: Any, f_locals: Dict[str, Any]) -> Tuple[Tuple[str, Tuple[str, ...], LeafFacts], ...]:
    named, varargs, varkw = _code_parameters(code)
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


def _observe_eager_forward(module: torch.nn.Module, code: Any, reason: str) -> None:
    """Watches the forward Dynamo is about to run eagerly, once (its first run): which module
    calls it makes (its own included) with their arguments and results, read off the Python
    frames through ``sys.setprofile`` for this thread until the forward returns, then removed.
    A forward hook cannot see this call (``Module._call_impl`` chose its hook-free path before
    Dynamo met the forward), and nothing else records the module calls of an eager frame.

    Skipped where a profiler is already set (it is left alone): the forward is then observed
    on a later first run of another instance, or not named."""
    with _lock:
        if module in _observed_forwards:
            return
    active = sys.getprofile()
    if getattr(active, _OBSERVER, False):
        return  # inside a forward being observed: its observation records this one's calls
    if active is not None:
        fallback("eager_observe", "a profiler is active, so the module boundaries of a forward Dynamo runs "
                 "eagerly are not observed and get no names")
        return
    paths: Dict[int, Tuple[str, ...]] = {}
    codes: Dict[Any, None] = {}
    for name, child in module.named_modules(remove_duplicate=False):
        paths.setdefault(id(child), tuple(name.split(".")) if name else ())
        forward = inspect.unwrap(getattr(type(child), "forward", None) or (lambda: None))
        child_code = getattr(forward, "__code__", None)
        if child_code is not None and child_code.co_argcount:
            codes[child_code] = None
    open_calls: List[Tuple[Any, Tuple[str, ...], Tuple[Any, ...]]] = []
    calls: List[EagerCall] = []
    counts: Dict[Tuple[str, ...], int] = {}
    started = [False]

    def finish() -> None:
        sys.setprofile(None)
        if not calls or calls[-1].path != ():
            return  # the forward raised before returning: nothing reliable to name
        observed = EagerForward(reason, tuple(calls), tuple(counts.items()))
        with _lock:
            _observed_forwards[module] = observed
            _observed_codes.setdefault(code, observed)
            _observed_version[0] += 1

    def profile(frame: Any, event: str, arg: Any) -> None:
        try:
            if event == "call":
                frame_code = frame.f_code
                if frame_code not in codes:
                    return
                f_locals = frame.f_locals
                path = paths.get(id(f_locals.get(frame_code.co_varnames[0])))
                if path is None or (not started[0] and (path != () or frame_code is not code)):
                    return
                started[0] = True
                ordinal = counts.get(path, 0)
                counts[path] = ordinal + 1
                open_calls.append((frame, path, (ordinal, _call_arguments(frame_code, f_locals))))
            elif event == "return" and open_calls and open_calls[-1][0] is frame:
                _, path, (ordinal, arguments) = open_calls.pop()
                result: list = []
                _structure_leaves(arg, (), result)
                _, varargs, varkw = _code_parameters(frame.f_code)
                # Inner calls return first: kept in call order (the outer forward's call last).
                calls.append(EagerCall(path, ordinal, arguments, tuple(result), varargs, varkw))
                if not open_calls:
                    finish()
        except Exception as error:  # never break a forward for a name
            logger.debug("eager forward not observed: %r", error)
            open_calls.clear()
            calls.clear()
            sys.setprofile(None)

    setattr(profile, _OBSERVER, True)
    sys.setprofile(profile)


#: Marks this package's observer (``_observe_eager_forward``).
_OBSERVER = "_patch_backend_eager_observer"


