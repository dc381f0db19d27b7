"""The name table of one root model: every captured graph occurrence that runs inside it.

The root is whatever the user names (``pb.patch(model, ...)``, ``pb.nodes(model)``, a
PatchableGraph's module). Occurrences are found by parameter identity (see capture.py) and named
in first-run order, so per-scope counters continue across graph breaks; a recompiled frame
restarts from the counters its first compile started from, so it gets the same names.
"""

from __future__ import annotations

import bisect
import dataclasses
import difflib
import math
import threading
import weakref
from collections import Counter
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Set, Tuple

from torch import nn

from .. import aliases
from .._torch_compat.eager_observer import forward_code, observed_eager_forward, observed_itself, set_sequence_source
from .._torch_compat.frame import eager_fallback_reason
from ..validation import unknown_name_error
from .capture import GraphCapture, _sequence, all_captures, registry_version
from .naming import (
    EagerSite, ScopeCounters, Site, eager_boundary_sites, extend_scope, format_module_path, module_at, name_occurrence,
)
from .protected import SCOPE, ProtectedNames, glob_regex, protected_name, split_name

Occurrence = Tuple[int, Optional[int]]  # (capture uid, instance key)

# Calls in a forward Dynamo runs eagerly are stamped on the clock graphs' first runs are
# numbered by, so that their names are listed where the unbroken model has them.
set_sequence_source(_sequence.__next__)


@dataclass
class NamedSite:
    #: The graph holding the site; None for a module boundary no graph covers (``eager``).
    capture: Optional[GraphCapture]
    instance: Optional[int]
    site: Site
    eager: Optional[EagerSite] = None


class RootIndex:
    def __init__(self, root: nn.Module) -> None:
        self._root = weakref.ref(root)
        self._version = -1
        self._lock = threading.RLock()
        self.names: List[str] = []
        self.by_name: Dict[str, List[NamedSite]] = {}
        self.by_occurrence: Dict[Occurrence, Dict[str, Site]] = {}
        #: Names declared with pb.prepare (one compiled variant covers them all).
        self.declared: frozenset = frozenset()
        #: Non-tensor leaves of a result (``output|sub_1`` holding an int): not nodes, kept to
        #: say why a patch there is refused.
        self.non_tensor: Dict[str, Site] = {}
        #: Occurrences of graphs that return from the root's own forward: when one is about to
        #: run, no graph of the forward is left to capture, so a name still unknown is an error
        #: (before that, during a first forward with graph breaks, it may be in a later graph).
        self.root_returns: frozenset = frozenset()
        #: Module-boundary names of calls no graph covers (a forward Dynamo ran eagerly):
        #: patched through forward hooks (eager_boundaries.py); empty for most models.
        self.eager_sites: Dict[str, EagerSite] = {}

    @property
    def root(self) -> nn.Module:
        root = self._root()
        if root is None:
            raise ReferenceError("the model this name table belongs to was deleted")
        return root

    def refresh(self) -> "RootIndex":
        if self._version == registry_version():
            return self
        with self._lock:
            version = registry_version()
            if self._version != version:
                self._rebuild()
                self._version = version
        return self

    def _rebuild(self) -> None:
        root = self.root
        tensor_paths: Dict[int, List[Tuple[str, ...]]] = {}
        for name, tensor in list(root.named_parameters(remove_duplicate=False)) + list(
            root.named_buffers(remove_duplicate=False)
        ):
            tensor_paths.setdefault(id(tensor), []).append(tuple(name.split(".")))
        module_paths: Dict[int, Tuple[str, ...]] = {}
        for name, module in root.named_modules(remove_duplicate=False):
            module_paths.setdefault(id(module), tuple(name.split(".")) if name else ())

        pending = []
        captures = all_captures()
        self._by_uid = {capture.uid: capture for capture in captures}
        for capture in captures:
            for instance, sequence in list(capture.occurrences.items()):
                prefix = self._prefix_of(capture, instance, tensor_paths, module_paths)
                if prefix is not None:
                    pending.append((sequence, capture, instance, prefix))
        pending.sort(key=lambda item: item[0])

        # A module's scope gets ``_<k>`` when it is invoked more than once in the forward, which
        # is known only once every graph is counted: name until the counts settle (a suffixed
        # parent renames its children, so nesting can take one more pass per level).
        returning = {(capture.uid, instance) for _, capture, instance, prefix in pending if prefix == () and capture.frame.returns}
        totals: Dict[str, int] = {}
        for _ in range(8):
            named, calls = self._name_occurrences(root, pending, totals, module_paths, returning, self._by_uid)
            counted = {scope: n for scope, n in calls.items() if n > 1}
            if counted == totals:
                break
            totals = counted
        names: List[str] = []
        by_name: Dict[str, List[NamedSite]] = {}
        by_occurrence: Dict[Occurrence, Dict[str, Site]] = {}
        non_tensor: Dict[str, Site] = {}
        root_returns = set()
        taken = {site.name for _, _, _, sites in named for site in sites}
        scopes = _scopes(taken)
        named = [(c, i, p, [_unclash(site, scopes, taken) for site in sites]) for c, i, p, sites in named]
        protected = ProtectedNames([site.name for _, _, _, sites in named for site in sites])
        order: Dict[str, float] = {}  # name → the first run of the graph it is first in
        for (sequence, _, _, _), (capture, instance, prefix, sites) in zip(pending, named):
            if prefix == () and capture.frame.returns:
                root_returns.add((capture.uid, instance))
            table = by_occurrence.setdefault((capture.uid, instance), {})
            for site in sites:
                renamed = protected_name(site.name, protected)
                if renamed != site.name:
                    site = dataclasses.replace(site, name=renamed)
                if site.kind == "value":
                    non_tensor.setdefault(site.name, site)
                    continue
                table[site.name] = site
                if site.name not in by_name:
                    names.append(site.name)
                    order[site.name] = sequence
                by_name.setdefault(site.name, []).append(NamedSite(capture, instance, site))
        eager_sites = self._name_eager_boundaries(root, names, by_name, non_tensor, ran=bool(pending))
        if eager_sites:
            # Where the unbroken model lists them: among the graphs' names by when they ran
            # (another instance's observation: through the graphs around them, _place_borrowed).
            stamps = {name: eager.stamp for name, eager in eager_sites.items()}
            borrowed = _place_borrowed(root, pending, eager_sites)
            for name, eager in eager_sites.items():
                order[name] = borrowed.get(name, eager.order)
            names = sorted(names, key=lambda name: (order.get(name, math.inf), stamps.get(name, 0.0)))
        self.names, self.by_name, self.by_occurrence = names, by_name, by_occurrence
        self.non_tensor, self.root_returns = non_tensor, frozenset(root_returns)
        self.eager_sites = eager_sites

    @staticmethod
    def _name_eager_boundaries(
        root: nn.Module,
        names: List[str],
        by_name: Dict[str, List[NamedSite]],
        non_tensor: Dict[str, Site],
        ran: bool,
    ) -> Dict[str, EagerSite]:
        """Boundary names of the module calls made while a forward Dynamo gave up on ran eagerly
        (observed on its first run, _torch_compat/eager_observer.py), where no graph already names
        them: the names the unbroken model has there, so a graph break Dynamo cannot resume from
        does not change them (docs/naming.md).

        A module whose own run was not observed (Dynamo skips the forward's code for every later
        instance without a trace) is named from another instance's observation only once its
        model has run (``ran``: a graph of the model ran), since every front-end reads a non-empty
        table as "the model ran, these are its names": before that, the table would hold these
        names but not those of the model's graphs (pb.record's glob, a context's entry check and
        pb.prepare then refused the graphs' names). The one exception is a root whose whole
        forward is that eager forward with no graph inside it: no call can add a name, so the
        table is complete before the first call."""
        eager_sites: Dict[str, EagerSite] = {}
        for frame_path, module in module_paths_by_object(root):
            observed = observed_eager_forward(module)
            if observed is None:
                continue
            timed = observed_itself(module)
            if not timed and not ran and (frame_path != () or observed.graphs_inside):
                continue  # this instance has not run: named with its model's graphs
            for site, eager in eager_boundary_sites(root, frame_path, observed, timed):
                if site.name in by_name or site.name in non_tensor:
                    continue
                if eager is None:
                    non_tensor[site.name] = site
                    continue
                names.append(site.name)
                by_name[site.name] = [NamedSite(None, None, site, eager)]
                eager_sites[site.name] = eager
        return eager_sites

    @staticmethod
    def _name_occurrences(root: nn.Module, pending: list, totals: Dict[str, int],
                          module_paths: Dict[int, Tuple[str, ...]], returning: Set[Tuple[int, Any]],
                          by_uid: Dict[int, GraphCapture]):
        """Names every occurrence in first-run order with counters continued across graphs; a
        recompiled frame restarts from the counters its first compile started from.

        The occurrences of one model need not be one forward. A graph of the root's own frame
        (the frame the model's first graph came from) that runs later begins another forward,
        split differently: the same forward under ``no_grad`` as one graph after a split under
        grad mode, or a dtype's recompile. Each such forward continues its own counters (from
        where its first graph's counters started), and a module's call count is the most
        calls it has in any one forward, not the sum over the forwards (``head`` called once
        in each is ``head``, not ``head_0``/``head_1``). So does a graph first run after this
        model's forward returned (``returning``: its occurrences returning from the root's
        frame; ``GraphCapture.after_return``), when the root's first graph is empty and no graph
        of its frame marks the start. Returns the occurrences' sites and those per-forward call
        counts.

        A graph of a module's forward that its caller's graph broke into records the path of
        calls that led to it (``("call", key, path)``, capture.record_call): each distinct
        (module, path) is one call of the module, counted like an inlined one (``block_0``,
        ``block_1``), and a call made inside another such call is scoped inside it
        (``block_1.mlp``), opened when the first graph inside it runs."""
        counters = ScopeCounters(totals)
        group_start: Dict[Tuple[Any, ...], ScopeCounters] = {}
        calls: Counter = Counter()
        root_code: Optional[int] = None  # the root frame's code: its graph begins a forward
        #: (module path, call path) → the call's scope, in this forward.
        open_calls: Dict[Tuple[Tuple[str, ...], Any], str] = {}
        named = []

        def call_scope(prefix: Tuple[str, ...], path: Any, callers: Tuple[Any, ...], used: ScopeCounters,
                       enclosing: Dict[Tuple[str, ...], str]) -> str:
            """The scope of the call of the module at ``prefix`` made along ``path``; opened (and
            counted) at first sight, inside the call of the module that made it. ``enclosing``
            receives the scopes of the calls it is made in, by module path."""
            caller = callers[0]() if callers and callers[0] is not None else None
            caller_prefix = module_paths.get(id(caller)) if caller is not None else None
            outer = None
            if caller_prefix and len(path) > 1 and len(prefix) > len(caller_prefix) and prefix[: len(caller_prefix)] == caller_prefix:
                outer = enclosing[caller_prefix] = call_scope(caller_prefix, path[1:], callers[1:], used, enclosing)
            if (prefix, path) not in open_calls:
                plain = format_module_path(root, prefix)
                if outer is not None and caller_prefix is not None:
                    plain = extend_scope(outer, module_at(root, caller_prefix), prefix[len(caller_prefix):], True)
                open_calls[(prefix, path)] = used.call(plain)
            return open_calls[(prefix, path)]

        previous = -1  # the sequence of the occurrence before
        for sequence, capture, instance, prefix in pending:
            path = _call_path_of(instance)
            group: Tuple[Any, ...] = (capture.code_key, prefix, path)
            if path is not None and not capture.frame.is_resume:
                # Any graph beginning this call (a recompile, or the same call split otherwise
                # in another forward: transformers' checkpointing __call__ compiled once with
                # the forward inlined, once the forward alone) restarts from the call's start.
                group = ("call", prefix, path)
            begins = prefix == () and not capture.frame.is_resume
            if begins and root_code is None:
                root_code = capture.code_key
            elif begins and capture.code_key == root_code:
                _most_calls(calls, counters.calls)
                start = group_start.get(group)
                counters = start.snapshot() if start is not None else ScopeCounters(totals)
                open_calls = {}
            else:
                ended = capture.after_return.get(instance, {})
                if any(ended.get(key, -1) > previous for key in returning):
                    _most_calls(calls, counters.calls)  # the model returned since: a later forward
                    counters = ScopeCounters(totals)
                    open_calls = {}
            previous = sequence
            if group in group_start and not begins:
                used = group_start[group].snapshot()
            else:
                group_start.setdefault(group, counters.snapshot())
                used = counters
            scope = None
            enclosing: Dict[Tuple[str, ...], str] = {}
            if path is not None and prefix:
                scope = call_scope(prefix, path, _call_modules(by_uid, capture, instance), used, enclosing)
            sites = name_occurrence(capture, root, prefix, used, instance, scope, enclosing)
            named.append((capture, instance, prefix, sites))
        _most_calls(calls, counters.calls)
        return named, calls

    def _prefix_of(self, capture, instance, tensor_paths, module_paths) -> Optional[Tuple[str, ...]]:
        if isinstance(instance, tuple) and instance and instance[0] == "call":
            # One call of a module's forward, made at a known site (capture.record_call).
            return self._prefix_of(capture, instance[1], tensor_paths, module_paths)
        if isinstance(instance, tuple) and instance and instance[0] == "via":
            # A resume graph without parameters: where the invocation it continues runs.
            continued = self._by_uid.get(instance[1])
            if continued is None or continued is capture:
                return None
            return self._prefix_of(continued, instance[2], tensor_paths, module_paths)
        if isinstance(instance, tuple) and instance and instance[0] == "after":
            # Ran right after a graph of this model: the one module of this model running the
            # frame's code (never another instance's, see capture.record_call).
            anchored = self._by_uid.get(instance[1])
            if anchored is None or self._prefix_of(anchored, instance[2], tensor_paths, module_paths) is None:
                return None
            return self._code_owner(capture)
        if instance is not None:
            reference = capture.anchors.get(instance)
            if reference is None or reference() is None:
                return None  # the anchor died: its id may now belong to another tensor
            anchor = capture.anchor_path
            for path in tensor_paths.get(instance, ()):
                if len(path) >= len(anchor) and path[len(path) - len(anchor):] == anchor:
                    return path[: len(path) - len(anchor)]
            return None
        module = capture.frame.self_module
        if module is not None:
            return module_paths.get(id(module))
        # A resume function whose ``self`` is no longer live, seen before any graph of a model.
        return self._code_owner(capture)

    def _code_owner(self, capture: GraphCapture) -> Optional[Tuple[str, ...]]:
        """The one module of this root whose forward the resume graph continues, if only one."""
        code = capture.frame.original_code
        if code is None:
            return None
        owners = [
            path
            for path, candidate in module_paths_by_object(self.root)
            if forward_code(candidate) is code
        ]
        return owners[0] if len(owners) == 1 else None

    def sites_for(self, capture: GraphCapture, instance: Optional[int]) -> Optional[Dict[str, Site]]:
        self.refresh()
        return self.by_occurrence.get((capture.uid, instance))

    def declared_sites(self, capture: GraphCapture, instance: Optional[int]) -> List[Site]:
        sites = self.sites_for(capture, instance) or {}
        return [sites[name] for name in sorted(self.declared) if name in sites]

    def match(self, pattern: Optional[str]) -> List[str]:
        self.refresh()
        if pattern is None:
            return list(self.names)
        if aliases.is_alias_pattern(self.root, pattern):
            return aliases.match(self.root, pattern, self.names)  # TransformerLens names
        regex = glob_regex(pattern)
        return [name for name in self.names if regex.fullmatch(name)]

    def match_all(self, patterns: Any) -> List[str]:
        """Names matching any of ``patterns`` (a name, NodePath or glob, or a list of them), in
        pattern order; a pattern that matches nothing raises KeyError with close matches."""
        if isinstance(patterns, str) or hasattr(patterns, "_name"):
            patterns = [patterns]
        names: List[str] = []
        for pattern in patterns:
            matched = self.match(str(pattern))
            if not matched:
                raise unknown_name_error(str(pattern), self)
            names.extend(name for name in matched if name not in names)
        return names

    def close_matches(self, name: str, count: int = 5) -> List[str]:
        if aliases.is_alias_pattern(self.root, name):
            return aliases.close_matches(self.root, name, count)
        return difflib.get_close_matches(name, self.names, n=count, cutoff=0.5)


def _place_borrowed(root: nn.Module, pending: list, eager_sites: Dict[str, EagerSite]) -> Dict[str, float]:
    """Where to list boundary names taken from another instance's observation (no ``order`` of
    their own; a ``stamp`` on the clock of graphs' first runs, from that run): just before this
    model's run of the graph that followed the name in that run (after the graph that preceded
    it, for a name after every graph), so both instances list their names alike.

    Graphs are matched by code (each model may have its own compiles of a forward) and by rank:
    the graph was the k-th run of its code since the observed forward began, the match is this
    model's k-th first run of that code. A name with no such graph in the observed run (none ran
    inside it, or that instance's graphs are gone) keeps its default: listed last."""
    borrowed = {name: site for name, site in eager_sites.items() if math.isinf(site.order) and not math.isinf(site.stamp)}
    if not borrowed:
        return {}
    own: Dict[int, List[int]] = {}  # code -> this model's first runs of its graphs, in run order
    for sequence, capture, _, _ in pending:
        own.setdefault(capture.code_key, []).append(sequence)
    runs = sorted(
        (sequence, capture.code_key) for capture in all_captures() if capture.code_key in own
        for sequence in capture.occurrences.values()
    )
    sequences = [sequence for sequence, _ in runs]
    window: Dict[Tuple[str, ...], Tuple[float, float]] = {}  # per observed forward: when it ran
    for site in borrowed.values():
        if site.frame not in window:
            module = module_at(root, site.frame)
            observed = observed_eager_forward(module) if module is not None else None
            whole = [call for call in (observed.calls if observed is not None else ()) if call.path == ()]
            window[site.frame] = (whole[0].start, whole[0].end) if whole else (site.stamp, site.stamp)
    placed: Dict[str, float] = {}
    for name, site in borrowed.items():
        began, ended = window[site.frame]
        after = bisect.bisect_left(sequences, site.stamp)
        for position, side in ((after, -0.5), (after - 1, 0.5)):
            if not 0 <= position < len(runs) or not began <= runs[position][0] <= ended:
                continue  # not a graph of the observed run (that instance's graphs may be gone)
            sequence, code = runs[position]
            rank = sum(1 for s, c in runs if c == code and began <= s <= sequence)
            ours = own[code]
            if 0 < rank <= len(ours):
                placed[name] = ours[rank - 1] + side
                break
    return placed


def _call_path_of(instance: Any) -> Optional[Any]:
    """The call path an occurrence key records (``("call", key, path)``, also inside a resume
    graph's ``("via", uid, key)``), or None."""
    while isinstance(instance, tuple) and instance:
        if instance[0] == "call":
            return instance[2]
        if instance[0] != "via":
            return None
        instance = instance[2]
    return None


def _call_modules(by_uid: Dict[int, GraphCapture], capture: GraphCapture, instance: Any) -> Tuple[Any, ...]:
    """The callers recorded for the call path in ``instance`` (``GraphCapture.call_modules``),
    looked up through a resume graph's ``("via", uid, key)``."""
    while isinstance(instance, tuple) and instance and instance[0] == "via":
        continued = by_uid.get(instance[1])
        if continued is None:
            return ()
        capture, instance = continued, instance[2]
    return capture.call_modules.get(instance, ())


def _most_calls(most: Counter, calls: Counter) -> None:
    """``most`` becomes, per scope, the larger of its count and ``calls``' (one forward's)."""
    for scope, count in calls.items():
        if count > most[scope]:
            most[scope] = count


def _scopes(names: Iterable[str]) -> Set[str]:
    """Every module scope of the tree: the dotted prefixes of a name's scope parts."""
    scopes: Set[str] = set()
    for name in names:
        parts = [part for part, role in split_name(name) if role == SCOPE]
        scopes.update(".".join(parts[:end]) for end in range(1, len(parts) + 1))
    return scopes


def _unclash(site: Site, scopes: Set[str], taken: Set[str]) -> Site:
    """No name is both a node and a scope: a result ``<scope>.output`` whose scope also has a
    child module called ``output`` (BERT's ``layer.output``, a ``BertOutput``) becomes the first
    free ``<scope>.output_<k>``; the module path keeps its name, as ``named_modules`` spells it.
    The ``|`` part follows (``output_1|sub_0``). (Ops avoid child module names as they are
    counted, naming.ScopeCounters.take.)"""
    head, bar, rest = site.name.partition("|")
    if head not in scopes:
        return site
    candidate, suffix = head, 1
    while candidate in scopes or candidate in taken or any(name.startswith(candidate + "|") for name in taken):
        candidate, suffix = f"{head}_{suffix}", suffix + 1
    return dataclasses.replace(site, name=candidate + bar + rest)


def module_paths_by_object(root: nn.Module):
    for name, module in root.named_modules():
        yield (tuple(name.split(".")) if name else ()), module


def no_graph_error(root: nn.Module, what: str, called: bool = False) -> RuntimeError:
    """The error for a model with no named node: not called yet, or (what Dynamo recorded) its
    forward ran eagerly, so there is nothing to name or patch (docs/porting.md)."""
    reason = eager_fallback_reason(root)
    name = type(root).__name__
    # Dynamo runs the forward of every instance of the class eagerly, but one instance's run
    # was observed: this one, not called yet, is named by its first call.
    learnt = not called and observed_eager_forward(root) is not None
    if reason is not None and not learnt:
        return RuntimeError(
            f"{what}: Dynamo ran {name}.forward eagerly ({reason}), so no graph holds its nodes and none "
            "can be named or patched; remove the graph break Dynamo cannot resume from (TORCH_LOGS=graph_breaks "
            "shows it; docs/porting.md, 'Frames Dynamo runs eagerly')"
        )
    if called:
        return RuntimeError(
            f"{what}: Dynamo compiled no part of its forward (it runs eagerly a forward it cannot trace or "
            "resume; TORCH_LOGS=graph_breaks says why), so no node can be named or patched"
        )
    return RuntimeError(
        f"{what}: call the model compiled with backend='graphpatch' (or 'graphpatch_eager') once, or wrap it "
        "in PatchableGraph(model, *example_args)"
    )


_indexes: "weakref.WeakKeyDictionary[nn.Module, RootIndex]" = weakref.WeakKeyDictionary()
_indexes_lock = threading.Lock()


def index_for(root: nn.Module) -> RootIndex:
    with _indexes_lock:
        index = _indexes.get(root)
        if index is None:
            index = _indexes[root] = RootIndex(root)
    return index.refresh()
