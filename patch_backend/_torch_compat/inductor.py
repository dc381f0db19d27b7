"""Inductor compilation of one (plain or patched) graph, honouring torch.compile's mode/options."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import sys
import threading
from typing import Any, Callable, Dict, Iterator, Mapping, Optional, Sequence, Set

import torch
import torch.fx

logger = logging.getLogger(__name__)


def inductor_config(options: Dict[str, Any]) -> Dict[str, Any]:
    """``mode=``/``options=`` as torch.compile gives them to a backend → Inductor config patches."""
    from torch._inductor import list_mode_options

    mode: Optional[str] = options.get("mode")
    patches: Dict[str, Any] = dict(list_mode_options(mode)) if mode else {}
    patches.update(options.get("options") or {})
    return patches


def compile_inductor(
    gm: torch.fx.GraphModule,
    example_inputs: Sequence[Any],
    options: Dict[str, Any],
    cacheable: Optional[Mapping[str, str]] = None,
) -> Callable:
    """Inductor's ``compile_fx`` on ``gm``; ``cacheable`` maps the qualified names of Python
    functions the graph calls (the patch ops, program/ops.py ``cache_keys``) to a key that changes
    with their code. AOTAutograd's cache refuses graphs calling functions it does not know (it
    cannot tell whether their code changed), so without them every patched variant bypassed it;
    Inductor's ``unsafe_marked_cacheable_functions`` admits them under that key."""
    from torch._inductor.compile_fx import compile_fx

    remember_vec_isa_probes()
    patches = inductor_config(options)
    marked = dict(cacheable or {})
    marked.update(patches.get("unsafe_marked_cacheable_functions") or {})
    patches["unsafe_marked_cacheable_functions"] = marked
    with cacheable_context(example_inputs):
        # Called with positional arguments, as Dynamo calls a backend's result.
        compiled: Callable = compile_fx(gm, list(example_inputs), config_patches=patches)  # type: ignore[assignment]
    return compiled


@contextlib.contextmanager
def cacheable_context(example_inputs: Sequence[Any]) -> Iterator[None]:
    """A tracing context whose fake mode has a ShapeEnv, unless one is active already.

    Inductor's FX graph cache and AOTAutograd's cache look up the ShapeEnv of the active tracing
    context and bypass themselves without one ("No shape env"). Dynamo provides it while it
    calls a backend; the dispatcher compiles later (at a graph's first plain or patched call),
    outside Dynamo, so without this every compile of this package missed torch's on-disk caches
    and a second process recompiled everything. Shapes stay static: real inputs are fakified
    with their concrete sizes.
    """
    from torch._guards import TracingContext, detect_fake_mode, tracing
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    mode = detect_fake_mode(list(example_inputs))
    if TracingContext.try_get() is not None or (mode is not None and mode.shape_env is None):
        # Inside Dynamo already, or fake inputs of a mode that cannot take a ShapeEnv (a second
        # mode would mix fake modes): compile as torch would without us.
        yield
        return
    if mode is None:
        mode = FakeTensorMode(shape_env=ShapeEnv(), allow_non_fake_inputs=True)
    with tracing(TracingContext(mode)):
        yield


# -- regional compile (program/regions.py) ------------------------------------------------------
def fake_values(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> Dict[torch.fx.Node, Any]:
    """Every node's value on fake copies of ``example_inputs`` (shapes, strides, dtypes, aliasing).

    Region boundaries need the metadata of intermediate values (a region's inputs are another
    region's outputs). Running the graph on fake tensors gets it without running the model and,
    unlike a real run, without applying any in-place update of an input twice. Inputs that are
    already fake keep their mode (Dynamo's); real ones are converted in a fresh static mode.
    """
    from torch._guards import detect_fake_mode
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    mode = detect_fake_mode(list(example_inputs))
    if mode is None:
        # With a ShapeEnv, so compiling a region on these fakes can use torch's on-disk caches
        # (``cacheable_context``); sizes stay static.
        mode = FakeTensorMode(shape_env=ShapeEnv(), allow_non_fake_inputs=True)
    fakes = [
        mode.from_tensor(value, static_shapes=True)
        if isinstance(value, torch.Tensor) and not isinstance(value, FakeTensor) else value
        for value in example_inputs
    ]
    values: Dict[torch.fx.Node, Any] = {}

    class _Recorder(torch.fx.Interpreter):
        def run_node(self, node: torch.fx.Node) -> Any:
            result = super().run_node(node)
            values[node] = result
            return result

    with mode:
        _Recorder(gm).run(*fakes)
    return values


def dynamo_static_input(meta: Dict[str, Any]) -> bool:
    """Whether Dynamo marked the placeholder with this meta as a static input (a parameter or
    buffer under ``inline_inbuilt_nn_modules``), which CUDA graphs keep at a fixed address."""
    tensor_dict = meta.get("tensor_dict") or {}
    return bool(tensor_dict.get("_dynamo_static_input_type"))


def fx_graph_cache_counters() -> Dict[str, int]:
    """Inductor's FX-graph-cache and AOTAutograd-cache counters of this process (hits, misses,
    bypasses), as torch counts them: the measure of whether a compile was served from disk."""
    from torch._dynamo.utils import counters

    inductor = counters["inductor"]
    aot = counters["aot_autograd"]
    return {
        "fxgraph_cache_hit": int(inductor["fxgraph_cache_hit"]),
        "fxgraph_cache_miss": int(inductor["fxgraph_cache_miss"]),
        "fxgraph_cache_bypass": int(inductor["fxgraph_cache_bypass"]),
        "autograd_cache_hit": int(aot["autograd_cache_hit"]),
        "autograd_cache_miss": int(aot["autograd_cache_miss"]),
        "autograd_cache_bypass": int(aot["autograd_cache_bypass"]),
    }


# -- the CPU vector-ISA probe, remembered in the cache directory ----------------------------------
#: Name of the record, inside Inductor's cache directory, of the ISA probe libraries that loaded.
VEC_ISA_RECORD = os.path.join("patch_backend", "vec_isa_probes.json")

_isa_lock = threading.Lock()
#: ``original``: torch's probe (a test may replace it); ``known``: the record's keys, read once.
_isa_state: Dict[str, Any] = {"installed": False, "known": None, "original": None}
_isa_counts = {"probed": 0, "remembered": 0}


def remember_vec_isa_probes() -> bool:
    """Makes Inductor's CPU vector-ISA check reuse what an earlier process found on this machine.

    Before its first C++ kernel (compiled or loaded from the FX graph cache), every process runs
    ``valid_vec_isa_list``: for each ISA the CPU claims (AMX, AVX512-VNNI, AVX512, AVX2 here),
    a test library is built into the cache directory (kept there, so built once) and a *child
    Python process* ``dlopen``s it, to survive a library that crashes the loader. Those children
    are most of a warm process's first cache hit: about 2 s of the 4-layer bench's warm compile
    seconds on the 2-core CPU, where the kernels themselves load in tenths of a second. Whether
    a library loads depends on the library file and the machine, not on the process, so a
    successful probe is recorded in the cache directory (``VEC_ISA_RECORD``) under a key of
    the library (path, size, mtime), the host, the CPU's ISA flags, the Python executable and
    torch; a later process with the same key skips the child. Failures are not recorded (they
    are probed again), a record from another machine or torch never matches, and the first
    process of a cache directory probes exactly as torch does.

    Returns whether the hook is installed: torch releases without ``VecISA._probe_load`` probe
    inline in ``check_build``, and then nothing changes (a DEBUG log; this only saves time, it
    never changes what compiles)."""
    with _isa_lock:
        if _isa_state["installed"]:
            return True
        from torch._inductor import cpu_vec_isa

        original = getattr(cpu_vec_isa.VecISA, "_probe_load", None)
        if original is None:
            logger.debug("torch %s has no VecISA._probe_load: vector-ISA probes are not remembered", torch.__version__)
            return False

        def _probe_load(isa: "cpu_vec_isa.VecISA", output_path: str) -> bool:
            key = _probe_key(output_path)
            if key is not None and key in _known_probes():
                with _isa_lock:
                    _isa_counts["remembered"] += 1
                return True
            loaded = bool(_isa_state["original"](isa, output_path))
            with _isa_lock:
                _isa_counts["probed"] += 1
            if loaded and key is not None:
                _record_probe(key)
            return loaded

        _isa_state["original"] = original
        setattr(cpu_vec_isa.VecISA, "_probe_load", _probe_load)  # torch calls it as a method
        _isa_state["installed"] = True
        return True


def vec_isa_probe_counts() -> Dict[str, int]:
    """Vector-ISA probes of this process: ``probed`` (a child process loaded the library) and
    ``remembered`` (an earlier process's record answered)."""
    with _isa_lock:
        return dict(_isa_counts)


def _record_path() -> str:
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return os.path.join(cache_dir(), VEC_ISA_RECORD)


def _probe_key(output_path: str) -> Optional[str]:
    from torch._inductor.cpu_vec_isa import x86_isa_checker

    try:
        stat = os.stat(output_path)
        facts = [os.path.realpath(output_path), stat.st_size, stat.st_mtime_ns, platform.node(), platform.machine(),
                 sorted(x86_isa_checker()), sys.executable, torch.__version__, os.path.dirname(torch.__file__)]
    except OSError:
        return None
    return hashlib.sha256(json.dumps(facts).encode()).hexdigest()


def _read_record() -> Set[str]:
    try:
        with open(_record_path()) as handle:
            return {str(key) for key in json.load(handle)}
    except (OSError, ValueError, TypeError):
        return set()  # none yet, or unreadable: probe as torch does


def _known_probes() -> Set[str]:
    with _isa_lock:
        known = _isa_state["known"]
        if known is None:
            known = _isa_state["known"] = _read_record()
        return known


def _record_probe(key: str) -> None:
    with _isa_lock:
        known = _isa_state["known"] = _read_record() | (_isa_state["known"] or set()) | {key}
        path = _record_path()
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            temporary = f"{path}.tmp{os.getpid()}"
            with open(temporary, "w") as handle:
                json.dump(sorted(known), handle)
            os.replace(temporary, path)  # another process's record is replaced whole, never torn
        except OSError as error:
            logger.debug("vector-ISA probe record not written: %s", error)
