"""Whether a module call runs under Dynamo, and functions Dynamo must leave alone, at no cost
per call.

The never-ran check (never_silent.py) keeps one forward pre-hook on a model patched through its
torch.compile wrapper, to tell the wrapper's calls (Dynamo evaluates the forward's frame; a
graph of the model runs or Dynamo falls back) from calls of the uncompiled model
(``compiled.generate``). The wrapper's call has Dynamo's frame-evaluation callback set while the
model's hooks run (torch runs a user module's hooks outside the traced frame, under the
callback); a call of the model itself has none. Reading the callback is
``torch._C._dynamo.eval_frame.get_eval_frame_callback``: no public API says whether the current
call is under Dynamo (``torch.compiler.is_compiling`` is False there, as the hook is not traced).

A hook running under the callback must not be compiled as a frame of its own, nor may what it
calls. ``torch.compiler.disable`` ensures that with a Python wrapper that sets and restores the
callback around every call, and would hide the callback from the hook. Instead the code objects
are given Dynamo's frame strategies (``set_code_exec_strategy``, private): the hook's own frame
is skipped (it reads the callback), and the function it hands the work to is skipped with
everything it calls, as under ``disable``. Both carry ``_torchdynamo_disable``, so a trace that
inlines the model's ``_call_impl`` (the model called inside another compiled function) treats
them as ``disable``d functions, as before.

Where the running torch lacks these, ``available()`` is False (announced once through ``gates``)
and the caller watches nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, TypeVar

from .gates import fallback

_Function = TypeVar("_Function", bound=Callable[..., Any])


@dataclass(frozen=True)
class _FrameApi:
    """The private pieces, found once."""

    callback: Callable[[], Any]
    set_strategy: Callable[..., Any]
    action: Any
    strategy: Any


def _probe_frame_api() -> Optional[_FrameApi]:
    """Dynamo's callback getter and frame strategies, or None (a test simulates their absence)."""
    try:
        from torch._C._dynamo.eval_frame import get_eval_frame_callback, set_code_exec_strategy
        from torch._dynamo.types import FrameAction, FrameExecStrategy
    except ImportError:
        return None
    if not hasattr(FrameAction, "SKIP"):
        return None
    return _FrameApi(get_eval_frame_callback, set_code_exec_strategy, FrameAction, FrameExecStrategy)


_API = _probe_frame_api()


def available() -> bool:
    """Whether ``dynamo_callback``, ``skip_frame`` and ``skip_frame_and_calls`` work here; warns
    once where they do not (the caller then watches nothing)."""
    if _API is None:
        fallback(
            "frame strategies",
            "this torch has no Dynamo frame strategies or callback getter: calls of a patched model "
            "outside its torch.compile wrapper (compiled.generate) are not detected; patches there "
            "do not apply and nothing says so at the call",
        )
        return False
    return True


def _no_callback() -> Any:
    return None


#: Dynamo's frame-evaluation callback on this thread (None outside Dynamo). The C function
#: itself where it exists, so that calling it from a hook under the callback opens no frame.
dynamo_callback: Callable[[], Any] = _API.callback if _API is not None else _no_callback


def skip_frame(function: _Function) -> _Function:
    """Dynamo runs ``function``'s frame as it is, under its callback, and still evaluates the
    frames it calls: it may only call builtins and ``skip_frame_and_calls`` functions."""
    if _API is not None:
        _API.set_strategy(function.__code__, _API.strategy(_API.action.SKIP, _API.action.DEFAULT))
    function._torchdynamo_disable = True  # type: ignore[attr-defined]
    return function


def skip_frame_and_calls(function: _Function) -> _Function:
    """Dynamo runs ``function`` and everything it calls as they are (``disable``'s effect, with
    no wrapper)."""
    if _API is not None:
        _API.set_strategy(function.__code__, _API.strategy(_API.action.SKIP, _API.action.SKIP))
    function._torchdynamo_disable = True  # type: ignore[attr-defined]
    return function
