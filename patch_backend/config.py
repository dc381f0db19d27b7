"""Settings of patch_backend, in the style of ``torch._inductor.config``.

Read and set them as attributes (``pb.config.max_variants = 128``) or for a block::

    with pb.config.patch(max_variants=8):
        ...

Every setting lives here, so a reader finds what can be tuned in one place and a test can
change one without leaking it into the next.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from typing import Any, Dict, Iterator

#: Patched variants (one per distinct patch structure) kept per captured graph; beyond it the
#: least recently used are dropped and recompiled on reuse (``pb.set_max_variants``).
max_variants: int = 64

#: Warn once per site when a custom patch callable does not trace and runs opaquely.
warn_opaque_custom: bool = True

#: Compile each captured graph region by region, split at the blocks of its most repeated
#: ``ModuleList`` (program/regions.py), so structurally identical blocks share one compiled
#: artifact and a new patch structure recompiles only the block it touches. False: compile
#: every graph whole, as before.
regional_compile: bool = True

#: When a call's program has not been compiled yet:
#:
#: - ``"background"`` (the default): run this call at once on the eager interpreter with the
#:   same patches (an unpatched call: the captured graph) while Inductor compiles the program
#:   on the compile worker thread; later calls use it once it is ready
#:   (``pb.wait_for_compiles()`` waits for the compiles in flight). The thread that started a
#:   compile may keep calling compiled code meanwhile (runtime/worker.py says how torch 2.13's
#:   process-wide FX tracing state is kept out of its way); another thread's *first* compiled
#:   call during a compile may still meet Dynamo's "FX to symbolically trace" error.
#: - ``"sync"``: compile it now, in the call, and run it (the first call of each patch
#:   structure, and the first unpatched call, pay Inductor's compile).
#: - ``"never"``: never compile patched programs; patched calls always run on the eager
#:   interpreter (unpatched calls still run Inductor's code, compiled in the call).
#:
#: Results agree whichever tier ran; ``pb.stats`` counts calls per tier. The environment
#: variable ``PATCH_BACKEND_COMPILE_POLICY`` sets it for a process (a benchmark, a subprocess
#: started by a test).
COMPILE_POLICIES = ("background", "sync", "never")
compile_policy: str = os.environ.get("PATCH_BACKEND_COMPILE_POLICY", "background")
if compile_policy not in COMPILE_POLICIES:
    raise ValueError(f"PATCH_BACKEND_COMPILE_POLICY must be one of {COMPILE_POLICIES}, got {compile_policy!r}")

#: pb.sweep's eager tier (program/vmapped.py): while a sweep runs its chunks uncompiled, each
#: chunk's K cells run as ``torch.func.vmap`` over the base-batch graph, so the sweep needs no
#: second Dynamo capture at K x the batch (seconds per model) and every op before the first
#: patched site runs once. False: every chunk runs the graph captured at K x the batch.
sweep_vmap: bool = True

#: Under ``compile_policy="background"``, a sweep stays on the eager tier (above) while it
#: expects to finish within this many seconds; a longer one moves to compiled programs (captured
#: at the chunk's rows, compiled on the worker while its chunks keep running eagerly).
sweep_eager_seconds: float = 10.0

#: How the ranks of a sharded sweep share the compile of its program (docs/scaling.md). In every
#: mode all ranks declare the sweep's whole site set, so they need one and the same program.
#:
#: - ``"cache"``: the first rank with cells compiles first (it runs its first chunk alone); the
#:   others wait for it and then find its graphs in Inductor's FX graph and AOTAutograd caches of
#:   the cache directory they share (``TORCHINDUCTOR_CACHE_DIR``; ranks on one host share the
#:   default one).
#: - ``"broadcast"``: the same, but the compiling rank sends its artifacts
#:   (``torch.compiler.save_cache_artifacts``, what ``pb.save_cache`` writes) to the others
#:   through the process group and they load them: no shared filesystem needed.
#: - ``"none"``: every rank compiles when its first chunk needs the program, all at once.
#: - ``"auto"`` (the default): ``"cache"`` when all ranks run on one host with one cache
#:   directory, else ``"broadcast"``.
#:
#: Only a sweep that some rank has not run yet in this process (same model, sites, chunk and
#: input shapes) waits for the compiling rank; repeated sweeps run at once on every rank. The
#: environment variable ``PATCH_BACKEND_COMPILE_SHARING`` sets it for a process.
COMPILE_SHARING_MODES = ("auto", "cache", "broadcast", "none")
compile_sharing: str = os.environ.get("PATCH_BACKEND_COMPILE_SHARING", "auto")

_lock = threading.Lock()
_module = sys.modules[__name__]


def _settings() -> Dict[str, Any]:
    return {
        name: value
        for name, value in vars(_module).items()
        if not name.startswith("_") and not callable(value) and not isinstance(value, type(sys))
        and name not in {"annotations", "COMPILE_POLICIES", "COMPILE_SHARING_MODES"}
    }


def _check(name: str, value: Any) -> None:
    settings = _settings()
    if name not in settings:
        raise AttributeError(f"patch_backend.config has no setting {name!r}; settings: {sorted(settings)}")
    if name == "max_variants" and (not isinstance(value, int) or value < 1):
        raise ValueError(f"config.max_variants must be an int of at least 1, got {value!r}")
    if name == "compile_policy" and value not in COMPILE_POLICIES:
        raise ValueError(f"config.compile_policy must be one of {COMPILE_POLICIES}, got {value!r}")
    if name == "compile_sharing" and value not in COMPILE_SHARING_MODES:
        raise ValueError(f"config.compile_sharing must be one of {COMPILE_SHARING_MODES}, got {value!r}")
    if name == "sweep_eager_seconds" and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
        raise ValueError(f"config.sweep_eager_seconds must be a number of seconds >= 0, got {value!r}")


@contextlib.contextmanager
def patch(**changes: Any) -> Iterator[None]:
    """Sets the given settings for the duration of the block, restoring them afterwards."""
    for name, value in changes.items():
        _check(name, value)
    with _lock:
        saved = {name: getattr(_module, name) for name in changes}
        for name, value in changes.items():
            setattr(_module, name, value)
    try:
        yield
    finally:
        with _lock:
            for name, value in saved.items():
                setattr(_module, name, value)


def set(name: str, value: Any) -> None:  # noqa: A001 - mirrors config.patch for one setting
    """Sets one setting after checking its name and value."""
    _check(name, value)
    setattr(_module, name, value)
