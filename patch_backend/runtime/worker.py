"""The compile worker: one thread that builds compiled programs while callers run eager forms.

Why a thread, and what keeps it safe (torch 2.13, ``_torch_compat/threads.py``):

* The worker compiles in a *copy of the submitting thread's context*: torch's config overrides
  (Inductor's and Dynamo's) are per thread, so without the copy a background compile would
  ignore the user's ``torch._inductor.config`` settings and key torch's caches differently.
* While a compile is in flight, every thread may call compiled code although the worker's
  ``make_fx`` trace sets torch.fx's process-wide tracing flag (``compiled_calls_during_traces``).
* Dynamo compiles in any thread and the worker's *FX traces* exclude each other: a Dynamo
  compile that starts while the worker is inside a ``Tracer.trace`` (AOTAutograd's make_fx,
  an Inductor pattern-matcher replacement) waits for that trace to end, and the worker enters
  a trace only when no Dynamo compile runs or waits. Dynamo would otherwise trace through the
  ``nn.Module.__call__`` that make_fx patches for the whole process, and copy the worker's
  node meta into its own nodes. The rest of a compile (Inductor's lowering, scheduling, code
  generation and C++ build) runs beside Dynamo compiles: a new capture in the caller's thread
  waits at most for one trace of the worker, never for a whole compile.
* Python's GIL: Inductor's compile is mostly Python, and a thread waiting for the GIL gets it
  only after the holder's switch interval (5 ms by default). Eager forms release and retake the
  GIL around every op, so a forward of a few hundred ops would wait seconds. While a compile is
  in flight the switch interval is ``SWITCH_INTERVAL``; the default is restored after.

* Cores: Inductor's compile keeps one core busy, and an eager form that runs meanwhile with
  every intra-op (OpenMP/MKL) thread waits at each op's barrier for a thread that shares that
  core: on a 2-core machine an eager forward took 10x as long with 2 threads as with 1 beside
  a busy thread (docs/performance.md, run R3). ``fewer_threads`` runs the eager tier with one
  intra-op thread fewer while a compile runs. torch's thread count is per thread once a thread
  has run an op, but a new thread takes the process-wide value, so the worker sets its own
  count (the submitter's) when it starts: Inductor writes that count into the C++ kernels
  it generates.

* The caller first: a job waits to *start* while an eager-tier call runs (``foreground``), so
  the call that asked for a compile runs alone, then the compile starts (a compile that already
  runs goes on). Beside a starting compile, the first call of a new patch structure at 12
  layers took 5x its time alone (the GIL). ``wait_for_compiles`` and ``FOREGROUND_LIMIT`` keep a
  caller that waits for compiles, or one that never stops calling, from holding jobs forever.

One worker: compiles run one at a time, in the order they were asked, and leave the other core
(if any) to the callers. At interpreter exit, compiles still queued are dropped (a script that
got its results does not wait for compiles no call will use) and the one running is waited for:
abandoning it inside Inductor's C++ thread pools aborts the process ("terminate called without
an active exception"). The wait runs among ``threading``'s exit hooks, before
``concurrent.futures`` shuts the pools that compile needs. A worker *process* would avoid the GIL and the shared tracing state
altogether; it needs the region graphs pickled and the second compile to hit torch's on-disk
caches exactly (docs/performance.md, "what remains").
"""

from __future__ import annotations

import atexit
import concurrent.futures
import contextlib
import contextvars
import queue
import sys
import threading
import time
from typing import Callable, Iterator, Optional, Set, Tuple

import torch

from .._torch_compat import threads as torch_threads

#: The GIL switch interval (seconds) while a background compile runs (see the docstring).
SWITCH_INTERVAL = 0.0002
#: Whether eager forms beside a running compile use one intra-op thread fewer (``fewer_threads``).
FEWER_THREADS = True

#: Seconds a queued job waits at most for eager-tier calls to end (``foreground``).
FOREGROUND_LIMIT = 10.0

_lock = threading.Lock()
_changed = threading.Condition(_lock)
_thread: Optional[threading.Thread] = None
_jobs: "queue.SimpleQueue[Tuple[concurrent.futures.Future, contextvars.Context, Callable[[], None]]]" = queue.SimpleQueue()
_exiting = False
#: Whether the worker is running a job (the exit hook waits for it).
_running = False
_in_flight: Set[concurrent.futures.Future] = set()
#: Eager-tier calls running (``foreground``), and callers in ``wait_for_compiles``.
_foreground = 0
_draining = 0
#: Dynamo compiles running in other threads, those waiting for a worker trace to end, how many
#: ever waited, and how deep the worker is in FX traces.
_dynamo_compiles = 0
_dynamo_waiting = 0
_dynamo_waits = 0
_tracing = 0
#: The worker's outermost FX traces: how many, their seconds in all, and when the open one began.
_traces = 0
_trace_seconds = 0.0
_trace_began = 0.0
_saved_interval: Optional[float] = None
_worker = threading.local()
_hooks: Optional[bool] = None


def supported() -> bool:
    """Whether background compiles are safe on this torch (else they run in the call)."""
    global _hooks
    with _lock:
        if _hooks is None:
            _hooks = (
                torch_threads.background_supported()
                and torch_threads.on_dynamo_compile(_dynamo_start, _dynamo_end)
                and torch_threads.on_worker_traces(_is_worker, _trace_start, _trace_end)
            )
            if _hooks:
                torch_threads.warm_up()
        return _hooks


def submit(job: Callable[[], None]) -> concurrent.futures.Future:
    """Runs ``job`` on the worker, in a copy of the caller's context; the caller may call
    compiled code meanwhile."""
    global _thread
    context = contextvars.copy_context()
    torch_threads.on_dynamo_compile(_dynamo_start, _dynamo_end)
    future: concurrent.futures.Future = concurrent.futures.Future()
    with _lock:
        if _thread is None:
            ready = threading.Event()
            _thread = threading.Thread(
                target=_serve, args=(torch.get_num_threads(), ready), name="patch_backend-compile", daemon=True
            )
            _thread.start()
            ready.wait()  # its thread count is set before this thread may lower its own
        if not _in_flight:
            torch_threads.compiled_calls_during_traces(True)
        _in_flight.add(future)
    future.add_done_callback(_finished)
    _jobs.put((future, context, job))
    return future


def _serve(threads: int, ready: threading.Event) -> None:
    global _running
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    ready.set()
    while True:
        future, context, job = _jobs.get()
        with _changed:
            _changed.wait_for(lambda: not _foreground or _draining or _exiting, timeout=FOREGROUND_LIMIT)
            start = not _exiting
            _running = start
        try:
            if not start:
                future.cancel()  # exiting: dropped
            elif future.set_running_or_notify_cancel():
                try:
                    context.run(_in_worker, job)
                except BaseException as error:  # noqa: BLE001 - the job reports its own errors
                    future.set_exception(error)
                else:
                    future.set_result(None)
        finally:
            with _changed:
                _running = False
                _changed.notify_all()


def _at_exit() -> None:
    """Drops the queued compiles and waits for the running one (see the module docstring)."""
    global _exiting
    with _changed:
        _exiting = True
        _changed.wait_for(lambda: not _running)


# threading's exit hooks run before the interpreter joins threads and before atexit's, in the
# reverse order of registration: this one runs before concurrent.futures' (registered when it
# is imported, which torch does before this module is imported).
_register = getattr(threading, "_register_atexit", None)
if _register is not None:
    _register(_at_exit)
else:  # pragma: no cover - Pythons without threading's exit hooks
    atexit.register(_at_exit)


def _in_worker(job: Callable[[], None]) -> None:
    global _saved_interval
    _worker.active = True
    torch_threads.forbid_compiled_calls()
    with _changed:
        if _saved_interval is None:
            _saved_interval = sys.getswitchinterval()
            sys.setswitchinterval(min(_saved_interval, SWITCH_INTERVAL))
    job()


def _is_worker() -> bool:
    return getattr(_worker, "active", False)


def _trace_start() -> None:
    """The worker enters an FX trace: after the Dynamo compiles running or waiting."""
    global _tracing, _traces, _trace_began
    with _changed:
        if _tracing == 0:
            _changed.wait_for(lambda: _dynamo_compiles == 0 and _dynamo_waiting == 0)
            _traces += 1
            _trace_began = time.perf_counter()
        _tracing += 1


def _trace_end() -> None:
    global _tracing, _trace_seconds
    with _changed:
        _tracing -= 1
        if _tracing == 0:
            _trace_seconds += time.perf_counter() - _trace_began
        _changed.notify_all()


def trace_report() -> Tuple[int, float]:
    """(outermost FX traces the worker ran, seconds spent in them): the only part of a
    background compile that a capture in another thread can wait for."""
    with _lock:
        return _traces, _trace_seconds


def _finished(future: concurrent.futures.Future) -> None:
    global _saved_interval
    with _changed:
        _in_flight.discard(future)
        if not _in_flight:
            torch_threads.compiled_calls_during_traces(False)
            if _saved_interval is not None:
                sys.setswitchinterval(_saved_interval)
                _saved_interval = None
        _changed.notify_all()


def _dynamo_start(args: object = None) -> None:
    global _dynamo_compiles, _dynamo_waiting, _dynamo_waits
    if _is_worker():
        return  # the worker's own compile never waits for itself
    with _changed:
        if _tracing:
            _dynamo_waiting += 1
            _dynamo_waits += 1
            _changed.notify_all()
            try:
                _changed.wait_for(lambda: not _tracing)
            finally:
                _dynamo_waiting -= 1
        _dynamo_compiles += 1


def _dynamo_end(args: object = None) -> None:
    global _dynamo_compiles
    if _is_worker():
        return
    with _changed:
        # Dynamo may call the end of a compile whose start ran before the hooks were registered.
        _dynamo_compiles = max(0, _dynamo_compiles - 1)
        _changed.notify_all()


def dynamo_waits() -> int:
    """How many Dynamo compiles (captures in other threads) have waited for a worker trace."""
    with _lock:
        return _dynamo_waits


def wait_for_dynamo_waiters(count: int, timeout: Optional[float] = None) -> bool:
    """Waits until ``dynamo_waits()`` reaches ``count`` (tests: a capture is waiting)."""
    with _changed:
        return _changed.wait_for(lambda: _dynamo_waits >= count, timeout=timeout)


@contextlib.contextmanager
def fewer_threads() -> Iterator[None]:
    """One intra-op thread fewer for the calling thread while a compile runs (see
    the module docstring); nothing otherwise. torch's MKL thread count is process-wide, so
    another thread's MKL calls run with the lower count meanwhile."""
    # A compile running now (a queued one waits for this call: ``foreground``).
    threads = torch.get_num_threads() if FEWER_THREADS and _running and not _is_worker() else 1
    if threads <= 1:
        yield
        return
    torch.set_num_threads(threads - 1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@contextlib.contextmanager
def foreground() -> Iterator[None]:
    """An eager-tier call: no queued compile starts until it returns (the module docstring)."""
    global _foreground
    if _is_worker():
        yield
        return
    with _changed:
        _foreground += 1
    try:
        yield
    finally:
        with _changed:
            _foreground -= 1
            _changed.notify_all()


def exiting() -> bool:
    """Whether the interpreter is exiting (a compile failing now fails for that reason)."""
    return _exiting


def in_flight() -> int:
    with _lock:
        return len(_in_flight)


def wait_for_compiles(timeout: Optional[float] = None) -> bool:
    """Waits until no background compile is in flight; returns False if ``timeout`` seconds
    passed first. Tests and benchmarks call it to know which tier the next call runs on."""
    global _draining
    deadline = None if timeout is None else time.monotonic() + timeout
    with _changed:
        # A caller inside an eager-tier call (a sweep's hand-over) must not wait for jobs that
        # wait for that call to end.
        _draining += 1
        _changed.notify_all()
        try:
            done = _changed.wait_for(
                lambda: not _in_flight, timeout=None if deadline is None else max(0.0, deadline - time.monotonic())
            )
        finally:
            _draining -= 1
    return done
