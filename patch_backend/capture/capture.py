"""What the backend records about each Dynamo graph, before anything is named.

Names depend on the root model, which the backend does not know: ``torch.compile(model)``
hands it graphs whose module paths are relative to the traced frame's ``self``, and Dynamo
reuses one compiled frame for every instance of a module class (all transformer blocks share
the graph of a block whose forward graph-breaks). So a capture stores frame-relative facts, and
each *call* records which instance it ran for (its first parameter's identity); ``index.py``
later resolves both against the root the user names.
"""

from __future__ import annotations

import itertools
import logging
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.fx

from .._torch_compat.eager_observer import eager_observations_version, forward_code
from .._torch_compat.frame import (
    CallerLink, FrameInfo, call_path, continued_frame_locals, find_callers, passed_arguments, returning_callers,
)
from .._torch_compat.sources import placeholder_source
from .._torch_compat.symbolic import is_symbolic

logger = logging.getLogger(__name__)

#: Global order of first appearance of (graph, instance): names continue per-scope counters
#: across graph breaks in the order graphs first ran.
_sequence = itertools.count()
_registry_lock = threading.Lock()
_captures: "weakref.WeakSet[GraphCapture]" = weakref.WeakSet()
#: Bumped whenever a capture or a new occurrence appears, so name tables know to refresh.
_version = [0]

@dataclass
class PlaceholderInfo:
    index: int
    node_name: str
    local: str
    path: Tuple[str, ...]
    #: 'param' (parameter/buffer/tensor attribute of the frame's self), 'constant' (a Python
    #: number attribute Dynamo lifted as an input: not named) or 'input'.
    kind: str


@dataclass(eq=False)
class GraphCapture:
    """One Dynamo graph with the frame facts naming needs."""

    gm: torch.fx.GraphModule
    frame: FrameInfo
    code_key: int
    placeholders: List[PlaceholderInfo]
    #: Index of a parameter placeholder whose identity tells the calling instance, if any.
    anchor_index: Optional[int]
    #: Relative (to the frame's self) path of the anchor parameter.
    anchor_path: Tuple[str, ...] = ()
    #: (instance key, first-seen sequence number); instance key is id() of the anchor argument.
    occurrences: Dict[Optional[int], int] = field(default_factory=dict)
    uid: int = field(default_factory=lambda: next(_sequence))
    #: Instance key → weak reference to the anchor parameter it was computed from.
    anchors: Dict[int, "weakref.ref[torch.Tensor]"] = field(default_factory=dict)
    #: True when Dynamo handed us a graph with symbolic shapes.
    dynamic: bool = False
    #: Weak reference to the backend's dispatcher (stats, variants): Dynamo owns the dispatcher,
    #: so when it drops a graph (``torch._dynamo.reset()``, a deleted model) the capture goes too.
    dispatcher_ref: Optional[weakref.ref] = None
    #: Resume graphs: per instance key, the input locals holding the forward's own argument
    #: (``_resume_arguments``; None where that could not be read).
    resume_held: Dict[Any, Optional[frozenset]] = field(default_factory=dict)
    #: Graphs returning from a module's forward: per instance key, the callers (innermost first)
    #: returning that result as it is (``frame.returning_callers``): their ``output`` is named here.
    returned_by: Dict[Any, Tuple["weakref.ref[torch.nn.Module]", ...]] = field(default_factory=dict)
    #: The module whose forward is being compiled, while capture_graph records the first call.
    compiling: Optional[torch.nn.Module] = field(default=None, repr=False)
    #: Per instance key: when, before this key's first run on its thread, each graph returning
    #: from a frame no module's forward called last ran ((uid, instance) → sequence number).
    #: Where one is the model's own return and ran after the occurrence before this one, this
    #: occurrence first ran in a later forward (index.py).
    after_return: Dict[Any, Dict[Tuple[int, Any], int]] = field(default_factory=dict)
    #: Per instance key with a call path (``("call", key, path)``): the module whose forward
    #: made each call on the path (None where unknown), read on the key's first call; the
    #: index places a call inside its caller's call with them (``block_1.mlp``).
    call_modules: Dict[Any, Tuple[Optional["weakref.ref[torch.nn.Module]"], ...]] = field(default_factory=dict)
    #: Per instance key of a module forward's first graph: the calling forwards whose own
    #: arguments its inputs are (``_link_caller_arguments``), read on the key's first call.
    caller_links: Dict[Any, Tuple[CallerLink, ...]] = field(default_factory=dict)
    #: For a graph of a module's forward that another module's forward calls (the caller's
    #: graph broke at the call): that forward's code. Each call then also records where it was
    #: made (``frame.call_path``), so a module called twice in one forward is two occurrences,
    #: ``block_0`` and ``block_1``, even when one graph serves both calls (index.py).
    called_forward: Any = field(default=None, repr=False)
    #: Whether a run may be a model's forward returning: the graph returns from a frame that no
    #: module's forward called (``after_return``).
    marks_return: bool = False

    @property
    def dispatcher(self):
        return self.dispatcher_ref() if self.dispatcher_ref is not None else None

    def __hash__(self) -> int:
        return id(self)

    def _forget_anchor(self, anchor_id: int) -> None:
        """Drops the occurrences recorded under an anchor id (also inside call keys) and what
        was read per occurrence for them."""
        stale = [key for key in self.occurrences if _anchor_id(key) == anchor_id]
        if not stale:
            return
        with _registry_lock:
            for key in stale:
                for table in (self.occurrences, self.resume_held, self.returned_by, self.call_modules, self.caller_links,
                              self.after_return):
                    table.pop(key, None)
            _version[0] += 1

    def record_call(self, args: Sequence[object]) -> Optional[Any]:
        """Notes which instance this call runs for; returns its instance key."""
        frame = self.frame
        if self.anchor_index is not None:
            anchor = args[self.anchor_index]
            if not isinstance(anchor, torch.Tensor):
                # capture_graph picks as anchor a parameter whose example input is a tensor, and
                # Dynamo's guards keep it one; anything else means the call does not match.
                raise TypeError(
                    f"graph argument {self.anchor_index} (parameter {'.'.join(self.anchor_path)!r}) should be "
                    f"a tensor, got {type(anchor).__name__}"
                )
            key: Any = id(anchor)
            if key not in self.anchors or self.anchors[key]() is not anchor:
                # ids are reused once a tensor dies: the weak reference tells a live anchor
                # from a dead model's (index.py checks it before naming an occurrence), and
                # what was recorded under the id belongs to the dead model: forgotten, so this
                # model's first run of the graph is now.
                self.anchors[key] = weakref.ref(anchor)
                self._forget_anchor(key)
        elif frame.is_resume and frame.self_module is None:
            key = _continued_instance(frame)
        else:
            key = None
        if key is None and frame.self_module is None:
            # Nothing here says which model this runs for (a resume graph holding neither
            # ``self`` nor a parameter, whose frame had no earlier graph): it belongs to the
            # model whose parameters the thread saw last, never to another instance whose
            # forward shares the code.
            key = _last_anchored()
        if self.called_forward is not None:
            path = call_path(self.called_forward, self.compiling)
            if path is not None:
                key = ("call", key, path)
                if key not in self.call_modules:
                    callers: List[Optional[torch.nn.Module]] = []
                    call_path(self.called_forward, self.compiling, callers)
                    self.call_modules[key] = tuple(None if m is None else weakref.ref(m) for m in callers)
        if frame.is_resume or not frame.returns:
            _track_frames(self, key)
        if self.anchor_index is not None:
            _open_frames.last = ("after", self.uid, key)
        if frame.is_resume and key not in self.resume_held:
            self.resume_held[key] = _resume_arguments(frame, self.placeholders, args)
        if key not in self.caller_links and frame.self_module is not None:
            # Per call: which caller arguments the inputs are depends on the call's site and
            # on the module running (one graph may serve several instances).
            self.caller_links[key] = _link_caller_arguments(self, args, self.resume_held.get(key) if frame.is_resume else None)
        if frame.returns and key not in self.returned_by and (frame.self_module is not None or frame.is_resume):
            # Read per instance (one graph of a block's forward serves every block, and not
            # every caller returns its result directly), on the first call of each.
            self.returned_by[key] = tuple(weakref.ref(m) for m in returning_callers(self.compiling))
        if key not in self.occurrences:
            with _registry_lock:
                self.occurrences.setdefault(key, next(_sequence))
                self.after_return[key] = dict(_latest_returns())
                _version[0] += 1
        if self.marks_return:
            # Perhaps a model's forward returning (index.py tells which were): a graph first
            # run after it is of a later forward.
            latest = _latest_returns()
            if len(latest) > 256:
                latest.clear()  # graphs of models long gone, mostly; theirs return again
            latest[(self.uid, key)] = next(_sequence)
        return key


#: Per thread: (uid, instance) of each graph returning from a frame that no module's forward
#: called (a model's forward returning, unless the frame's caller was not found: index.py
#: checks) → the sequence number of its latest run.
_returns = threading.local()


def _latest_returns() -> Dict[Tuple[int, Any], int]:
    latest = getattr(_returns, "latest", None)
    if latest is None:
        latest = _returns.latest = {}
    return latest


def _anchor_id(key: Any) -> Any:
    """The anchor id an instance key was made from (inside a call key), or None."""
    if isinstance(key, tuple) and key and key[0] == "call":
        return _anchor_id(key[1])
    return key if isinstance(key, int) else None


#: Per thread: the frame invocations whose graph ended at a graph break and whose resume graphs
#: have not all run yet, innermost last: (id of the code being continued, occurrence).
_open_frames = threading.local()


def _frame_stack() -> list:
    stack = getattr(_open_frames, "stack", None)
    if stack is None:
        stack = _open_frames.stack = []
    return stack


def _continued_code_id(frame: FrameInfo) -> Optional[int]:
    if frame.is_resume:
        return id(frame.original_code) if frame.original_code is not None else None
    return frame.code_id


def _last_anchored() -> Optional[Any]:
    return getattr(_open_frames, "last", None)


def _continued_instance(frame: FrameInfo) -> Optional[Any]:
    """A resume graph that uses no parameter of its module (e.g. only the residual add after a
    block's MLP broke the graph) belongs to the invocation it continues: the innermost open
    frame of the same code. Its key, ("via", uid, instance), names it like that occurrence."""
    code_id = _continued_code_id(frame)
    for uid, code, instance in reversed(_frame_stack()):
        if code == code_id and code is not None:
            return ("via", uid, instance)
    return None


def _track_frames(capture: "GraphCapture", key: Any) -> None:
    stack = _frame_stack()
    frame = capture.frame
    code_id = _continued_code_id(frame)
    if not frame.is_resume:
        # The first graph of a frame that breaks: open it (anchored at this occurrence).
        stack.append((capture.uid, code_id, key))
        del stack[:-64]
        return
    for position in range(len(stack) - 1, -1, -1):
        if stack[position][1] == code_id:
            if frame.returns:
                del stack[position:]  # the frame returned: it and anything left inside it close
            else:
                del stack[position + 1:]
            return


def capture_graph(gm: torch.fx.GraphModule, example_inputs: Sequence[object], frame: FrameInfo) -> GraphCapture:
    self_local = frame.self_local
    _resolve_stack_modules(frame)
    placeholders: List[PlaceholderInfo] = []
    anchor_index = None
    anchor_path: Tuple[str, ...] = ()
    for index, node in enumerate(n for n in gm.graph.nodes if n.op == "placeholder"):
        parsed = placeholder_source(node)
        if parsed is None:
            placeholders.append(PlaceholderInfo(index, node.name, "", (), "input"))
            continue
        local, path = parsed
        if _holds_scalar(frame, local, parsed[1]):
            # A Python number attribute Dynamo made a graph input (after seeing two values of it
            # in one code, e.g. GPT-2's ``attn.scaling`` once two widths were compiled): the first
            # compile baked it in, so it has no name there, and naming it here would make names
            # depend on what was compiled before in the process.
            placeholders.append(PlaceholderInfo(index, node.name, local, path, "constant"))
            continue
        prefix = frame.self_prefix
        if local in frame.module_locals:
            # A module on the resume function's stack: its parameters, under its path.
            path = frame.module_locals[local] + path
            is_attribute = len(path) > len(frame.module_locals[local])
        elif local == self_local and prefix and path[: len(prefix)] == prefix:
            path = path[len(prefix):]  # the module is args[0] of a wrapper: paths relative to it
            is_attribute = frame.self_module is not None and len(path) > 0
        else:
            is_attribute = local == self_local and not prefix and frame.self_module is not None and len(path) > 0
        kind = "param" if is_attribute else "input"
        placeholders.append(PlaceholderInfo(index, node.name, local, path, kind))
        if (
            kind == "param"
            and anchor_index is None
            and index < len(example_inputs)
            and isinstance(example_inputs[index], torch.Tensor)
        ):
            anchor_index, anchor_path = index, path
    module = frame.self_module
    capture = GraphCapture(
        gm=gm,
        frame=frame,
        code_key=frame.code_id,
        placeholders=placeholders,
        anchor_index=anchor_index,
        anchor_path=anchor_path,
        dynamic=any(is_symbolic(n.meta.get("example_value")) for n in gm.graph.nodes if n.op == "placeholder"),
    )
    if module is not None and find_callers(module):
        capture.called_forward = frame.original_code if frame.is_resume else (frame.code or forward_code(module))
    capture.marks_return = frame.returns and capture.called_forward is None
    capture.compiling = module
    try:
        capture.record_call(example_inputs)
    finally:
        capture.compiling = None
    with _registry_lock:
        _captures.add(capture)
        _version[0] += 1
    logger.debug(
        "captured graph %d of %s: %d placeholders (%d parameters), dynamic=%s",
        capture.uid, frame.code_name or "<unknown frame>", len(placeholders),
        sum(p.kind == "param" for p in placeholders), capture.dynamic,
    )
    return capture


def _holds_scalar(frame: FrameInfo, local: str, path: Tuple[str, ...]) -> bool:
    """Whether the attribute at ``path`` below the frame's module ``local`` (its ``self``, or a
    module a resume function holds) is a Python number rather than a tensor."""
    if not path:
        return False
    if local == frame.self_local:
        value: Any = frame.self_module
        prefix = frame.self_prefix  # the module is args[0] of a wrapper: paths start below it
        if prefix and path[: len(prefix)] == prefix:
            path = path[len(prefix):]
    else:
        reference = frame.stack_modules.get(local)
        value = reference() if reference is not None else None
    if not isinstance(value, torch.nn.Module):
        return False
    for segment in path:
        value = getattr(value, segment, None)
        if value is None:
            return False
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _resolve_stack_modules(frame: FrameInfo) -> None:
    """Paths, below the continued forward's module, of the modules a resume function holds on
    its stack (``self.post`` in ``self.post(self.inner(x))`` when ``inner`` broke the graph).
    The forward's module is the resume function's ``self`` or, where that is no longer live,
    the suspended forward's (found on the Python stack). Unresolved locals stay inputs."""
    if not frame.stack_modules:
        return
    owner = frame.self_module
    if owner is None and frame.original_code is not None and frame.original_code.co_argcount:
        continued = continued_frame_locals(frame.original_code)
        candidate = continued.get(frame.original_code.co_varnames[0]) if continued else None
        owner = candidate if isinstance(candidate, torch.nn.Module) else None
    if owner is None:
        return
    paths = {id(module): tuple(name.split(".")) for name, module in owner.named_modules() if name}
    for local, reference in frame.stack_modules.items():
        module = reference()
        if module is not None and id(module) in paths:
            frame.module_locals[local] = paths[id(module)]


def _link_caller_arguments(
    capture: "GraphCapture", example_inputs: Sequence[object], held: Optional[frozenset] = None
) -> Tuple[CallerLink, ...]:
    """For a module forward compiled as its own frame (the caller's graph broke at the call):
    which frame inputs are, unchanged, the calling forwards' own arguments. Without the break
    those are the callers' inputs (the model's ``x``), named where a caller's graph used them;
    here only this frame holds them, so it carries the callers' names too (naming.py). Up the
    call chain while a caller passed its argument on unchanged: ``x`` of a root calling a
    block calling the breaking module is also the block's ``h``. Read for the call running now
    (``capture.compiling`` while it is compiled, else the module running the graph's forward).
    For a resume graph (the forward's first graph was empty, or did not use the argument),
    only its inputs still holding the forward's own arguments (``held``) count.

    A caller parameter counts only if, at the call, it holds this very tensor and that tensor is
    what the caller received for it (``x = self.block(x)`` reassigns ``x`` only after the
    call). Where what the caller received is not known, only a parameter the caller's forward
    never assigns counts: it holds the argument wherever the call is."""
    if capture.compiling is not None:
        callers = find_callers(capture.compiling)
    else:
        module = capture.frame.self_module
        code = capture.frame.code or (forward_code(module) if module is not None else None)
        callers = find_callers(None, code) if code is not None else []
    values = {
        info.local: example_inputs[info.index]
        for info in capture.placeholders
        if info.kind == "input" and not info.path and info.index < len(example_inputs)
        and isinstance(example_inputs[info.index], torch.Tensor)
        and (not capture.frame.is_resume or (held is not None and info.local in held))
    }
    return tuple(CallerLink(weakref.ref(caller), pairs) for caller, pairs in passed_arguments(callers, values))


def _resume_arguments(frame: FrameInfo, placeholders: List[PlaceholderInfo], args: Sequence[object]) -> Optional[frozenset]:
    """For a resume function of a module's forward: which input locals still hold the argument
    the forward received (the same tensor object as the suspended forward's own slot for that
    parameter). A parameter the forward reassigned before the break (T5's ``position_bias =
    self.rel(...)`` in the first block only) holds a value of an earlier graph there, not an
    input. Read per instance: one resume graph serves every block. None where the suspended
    forward is not found on the stack."""
    if not frame.is_resume or frame.original_code is None:
        return None
    continued = continued_frame_locals(frame.original_code)
    if continued is None:
        return None
    held = set()
    for info in placeholders:
        if info.kind != "input" or info.path or info.index >= len(args):
            continue
        value = continued.get(info.local)
        if isinstance(value, torch.Tensor) and value is args[info.index]:
            held.add(info.local)
    return frozenset(held)


def all_captures() -> List[GraphCapture]:
    """Live captures (whose dispatcher Dynamo still holds), oldest first."""
    with _registry_lock:
        live = [c for c in _captures if c.dispatcher_ref is None or c.dispatcher_ref() is not None]
    return sorted(live, key=lambda capture: capture.uid)


def forget(capture: GraphCapture) -> None:
    """Called when Dynamo drops the graph's dispatcher: names must no longer include it."""
    with _registry_lock:
        _captures.discard(capture)
        _version[0] += 1


def registry_version() -> int:
    """Changes whenever a name table may change: a capture, a new occurrence, or a forward
    Dynamo ran eagerly observed (its module boundaries are named, index.py)."""
    return _version[0] + eager_observations_version()
