"""What makes an Inductor compile in a worker thread safe next to compiled calls in other threads.

AOTAutograd traces with ``make_fx``, whose ``Tracer.trace`` sets torch.fx's tracing flag and
patches ``nn.Module.__call__``/``__getattr__`` for the whole process while it runs (torch 2.13).
Two things then go wrong in the other threads:

* calling a ``torch.compile``'d function raises in Dynamo ("Detected that you are using FX to
  symbolically trace a dynamo-optimized function"), before any code of ours runs: Dynamo takes
  the process-wide flag for a trace of *its own thread*. ``allow_compiled_calls`` sets Dynamo's
  ``force_compile_during_fx_trace`` for the calling thread only (torch 2.13's config overrides
  are per thread, ``ContextVar``-backed), so that thread's compiled calls run as usual while
  the worker traces; the worker's own context keeps the default (``forbid_compiled_calls``).
  The patched ``Module.__call__`` of a make_fx trace (``PythonKeyTracer``) only forwards the
  call, so an eager or compiled forward in another thread computes the same thing.
* a Dynamo *compile* in another thread (a new frame, a recompile, a lazily compiled backward)
  would trace through the patched ``Module.__call__``. ``on_dynamo_compile`` registers Dynamo's
  compile start/end callbacks, with which the worker and Dynamo's compiles exclude each other
  (runtime/worker.py).

Each function returns False where the running torch lacks the interface; the worker then
compiles in the calling thread (``compile_policy`` "sync"), announced once through ``gates``.
"""

from __future__ import annotations

from typing import Any, Callable

from .gates import fallback

_FLAG = "force_compile_during_fx_trace"


def _dynamo_config() -> Any:
    import torch._dynamo.config as dynamo_config

    return dynamo_config


def _probe_callbacks() -> Any:
    """Dynamo's compile callback handler, or None."""
    try:
        from torch._dynamo.callback import callback_handler
    except ImportError:
        return None
    if not (hasattr(callback_handler, "register_start_callback") and hasattr(callback_handler, "register_end_callback")):
        return None
    return callback_handler


def _probe_flag() -> bool:
    try:
        return hasattr(_dynamo_config(), _FLAG)
    except ImportError:
        return False


def background_supported() -> bool:
    """Whether this torch has both interfaces; warns once (docs/errors.md row 27) if not."""
    if _probe_flag() and _probe_callbacks() is not None:
        return True
    fallback(
        "threads",
        "Dynamo's force_compile_during_fx_trace or its compile callbacks are missing, so a compile in a "
        "worker thread is not safe next to compiled calls; compile_policy 'background' compiles in the "
        "call instead ('sync')",
    )
    return False


def warm_up() -> None:
    """Runs, in the calling thread, the one-off ``torch.fx.symbolic_trace`` Inductor does at its
    first compile in a process (``InterpreterShim._dummy_gm``, cached). Under a plain
    ``torch.fx.Tracer`` a module called in another thread raises ("module is not installed as
    a submodule"), so that trace must not run on the worker while callers run forwards."""
    try:
        from torch._inductor.loop_body import InterpreterShim

        InterpreterShim._dummy_gm()
    except (ImportError, AttributeError):
        pass  # another torch: its first compile may differ; nothing to warm


def allow_compiled_calls() -> None:
    """Lets the calling thread (its context) call compiled code while another thread FX-traces.

    Set when a thread submits a background compile, reset by ``wait_for_compiles``; while set,
    it changes only what happens if this thread itself FX-traces a compiled function (Dynamo
    then compiles inside that trace instead of raising)."""
    config = _dynamo_config()
    if not getattr(config, _FLAG):
        setattr(config, _FLAG, True)


def forbid_compiled_calls() -> None:
    """Dynamo's default for the current context: a compiled call inside an FX trace of this
    thread raises. The worker runs in a copy of the caller's context and resets it there."""
    config = _dynamo_config()
    if getattr(config, _FLAG):
        setattr(config, _FLAG, False)


def on_dynamo_compile(start: Callable[[Any], None], end: Callable[[Any], None]) -> bool:
    """Makes Dynamo call ``start(args)`` when a compile begins in any thread and ``end(args)``
    when it ends (outermost only, from the thread that entered or left last). Idempotent, and
    called before each background compile: ``torch._dynamo.reset()`` clears the callbacks."""
    handler = _probe_callbacks()
    if handler is None:
        return False
    if start not in handler.start_callbacks:
        handler.register_start_callback(start)
    if end not in handler.end_callbacks:
        handler.register_end_callback(end)
    return True
