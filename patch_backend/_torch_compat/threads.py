"""What makes an Inductor compile in a worker thread safe next to compiled calls in other threads.

AOTAutograd traces with ``make_fx``, whose ``Tracer.trace`` sets torch.fx's tracing flag and
patches ``nn.Module.__call__``/``__getattr__`` for the whole process while it runs (torch 2.13);
AOTAutograd also turns on torch.fx's process-wide ``preserve_node_meta`` around it, and the
nodes a Dynamo trace creates meanwhile copy the worker's current node meta (``nn_module_stack``
included: the names would be wrong). Inductor's own pattern-matcher passes trace small
replacement graphs the same way. Two things then go wrong in the other threads:

* calling a ``torch.compile``'d function raises in Dynamo ("Detected that you are using FX to
  symbolically trace a dynamo-optimized function"), before any code of ours runs: Dynamo takes
  the process-wide flag for a trace of *its own thread*. ``compiled_calls_during_traces``
  makes Dynamo's ``force_compile_during_fx_trace`` default to True for every thread while
  background compiles are in flight (torch 2.13's config values are per thread,
  ``ContextVar``-backed, so a per-thread setting missed threads that never submitted a
  compile); the worker's own context sets it back to False (``forbid_compiled_calls``). The
  patched ``Module.__call__`` of a make_fx trace (``PythonKeyTracer``) only forwards the call,
  so an eager or compiled forward in another thread computes the same thing.
* a Dynamo *compile* in another thread (a new frame, a recompile, a lazily compiled backward)
  would trace through the patched ``Module.__call__`` and copy the worker's node meta. So the
  two exclude each other, but only for the worker's FX traces, not its whole compile:
  ``on_worker_traces`` wraps ``torch.fx.Tracer.trace`` (every make_fx and symbolic trace goes
  through it) so that the worker announces each trace, and ``on_dynamo_compile`` registers
  Dynamo's compile start/end callbacks (runtime/worker.py). Inductor's lowering, scheduling,
  code generation and C++ compile, most of a compile, touch none of that process-wide state.

Each function returns False where the running torch lacks the interface; the worker then
compiles in the calling thread (``compile_policy`` "sync"), announced once through ``gates``.
"""

from __future__ import annotations

import functools
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
        config = _dynamo_config()
    except ImportError:
        return False
    entries = getattr(config, "_config", None)
    return hasattr(config, _FLAG) and isinstance(entries, dict) and hasattr(entries.get(_FLAG), "default")


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


def compiled_calls_during_traces(allowed: bool) -> None:
    """Sets the default of Dynamo's ``force_compile_during_fx_trace`` for every thread.

    True while background compiles are in flight: a compiled call in any thread then runs (or
    its new capture waits for the worker's trace, runtime/worker.py) instead of raising because
    the *worker* FX-traces. It changes what happens only where a thread itself FX-traces a
    compiled function (Dynamo then compiles inside that trace instead of raising). A thread's
    own setting of the flag (``torch._dynamo.config.patch``) still wins in that thread."""
    entry = _dynamo_config()._config.get(_FLAG)
    if entry is not None:
        entry.default = allowed


def forbid_compiled_calls() -> None:
    """Dynamo's default for the current context: a compiled call inside an FX trace of this
    thread raises. The worker sets it in its own context, whatever the process default."""
    setattr(_dynamo_config(), _FLAG, False)


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


_traces_hooked = False


def on_worker_traces(in_worker: Callable[[], bool], enter: Callable[[], None], leave: Callable[[], None]) -> bool:
    """Makes every ``torch.fx.Tracer.trace`` for which ``in_worker()`` is true call ``enter()``
    before it and ``leave()`` after it (nested traces included: the caller counts). Other
    threads' traces pay one call of ``in_worker``. Installed once per process."""
    global _traces_hooked
    try:
        from torch.fx import Tracer
    except ImportError:
        return False
    if _traces_hooked:
        return True
    original = Tracer.trace

    @functools.wraps(original)
    def trace(self: Any, *args: Any, **kwargs: Any) -> Any:
        if not in_worker():
            return original(self, *args, **kwargs)
        enter()
        try:
            return original(self, *args, **kwargs)
        finally:
            leave()

    Tracer.trace = trace  # type: ignore[method-assign]
    _traces_hooked = True
    return True
