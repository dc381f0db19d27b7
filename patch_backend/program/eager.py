"""``graphpatch_eager``: the captured graph interpreted in Python, patches applied by ``op``.

This is the reference the compiled backend is tested against, so it follows graphpatch 0.2.3's
documented Patch API literally: at each site the value is cloned once if any patch there requires
it, then every patch's ``op`` runs in list order. *Where* and in which order sites apply comes
from the same program spec the insertion pass builds from (spec.py: ``uses``, ``Prefixes``), so
the reference and the compiled variants cannot disagree about the walk.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Dict, FrozenSet, Hashable, List, Optional, Sequence

import torch
import torch.fx

from .plan import Selection
from .spec import Prefixes, ProgramSpec, Use, lower


@dataclass(frozen=True)
class SitePlan:
    """What the interpreter derives from a spec and the graph: which uses pass through which
    sites. One graph scan per spec, not per call (``Interpreted`` keeps them)."""

    spec: ProgramSpec
    chains: Dict[Use, Any]
    #: Nodes that read a patched value: the others load their arguments as they are.
    patched_readers: FrozenSet[str]
    #: node name → the sites there that no use passes through.
    dangling: Dict[str, List[int]]


def site_plan(gm: torch.fx.GraphModule, spec: ProgramSpec) -> SitePlan:
    uses = spec.uses(gm.graph)
    dangling: Dict[str, List[int]] = {}
    for site in uses.dangling:
        dangling.setdefault(spec.sites[site].node, []).append(site)
    return SitePlan(spec, uses.chains, frozenset(use.consumer for use in uses.chains), dangling)


def has_star_inputs(graph: torch.fx.Graph) -> bool:
    """A ``*args`` placeholder: only ``Interpreter.run`` binds those."""
    return any(node.op == "placeholder" and node.target.startswith("*") for node in graph.nodes)


class PatchingInterpreter(torch.fx.Interpreter):
    def __init__(self, gm: torch.fx.GraphModule, selection: Selection, plan: SitePlan, star_inputs: bool) -> None:
        super().__init__(gm, garbage_collect_values=True)
        self.selection = selection
        # The plan's fields as attributes: they are read per node.
        self.spec = plan.spec
        self.chains = plan.chains
        self.graph = gm.graph
        self.patched_readers = plan.patched_readers
        self.dangling = plan.dangling
        self.star_inputs = star_inputs

    def apply_site(self, value: Any, site: int) -> Any:
        """One site's patches: a clone if any requires it, then each ``op`` in entry order."""
        if self.spec.sites[site].clone and isinstance(value, torch.Tensor):
            value = value.clone()
        patches = self.selection[site].patches
        for entry in range(len(self.spec.sites[site].entries)):
            value = patches[entry].op(value)
        return value

    def run(
        self,
        *args: Any,
        initial_env: Optional[Dict[torch.fx.Node, Any]] = None,
        enable_io_processing: bool = True,
    ) -> Any:
        self.env_by_name: Dict[str, Any] = {}
        self.prefixes = Prefixes(self.env_by_name.__getitem__, self.apply_site)
        graph: torch.fx.Graph = self.graph
        if initial_env is not None or self.star_inputs:
            return super().run(*args, initial_env=initial_env, enable_io_processing=enable_io_processing)
        return self._run_in_order(graph, graph.process_inputs(*args) if enable_io_processing else args,
                                  enable_io_processing)

    def _run_in_order(self, graph: torch.fx.Graph, args: Sequence[Any], process_outputs: bool) -> Any:
        """``Interpreter.run`` without its per-node bookkeeping (current-node contexts, freeing
        values after their last use: ``env_by_name`` keeps every value for the prefixes anyway).
        The eager tier runs a new patch structure's first calls this way; at 12 GPT-2 layers
        (~700 nodes) that bookkeeping cost more than the forward's own ops."""
        self.env = {}
        inputs = iter(args)
        node = None
        try:
            for node in graph.nodes:
                if node.op == "placeholder":
                    result = next(inputs)
                elif node.op == "output":
                    outputs, _ = self.fetch_args_kwargs_from_env(node)
                    return graph.process_outputs(outputs[0]) if process_outputs else outputs[0]
                else:
                    node_args, node_kwargs = self.fetch_args_kwargs_from_env(node)
                    result = getattr(self, node.op)(node.target, node_args, node_kwargs)
                self.env[node] = result
                self.record(node, result)
        except Exception as error:
            if node is not None and hasattr(error, "add_note"):
                error.add_note(f"While executing {node.format_node()}")
            raise
        raise RuntimeError("patch_backend internal error: a graph without an output node")

    def run_node(self, node: torch.fx.Node) -> Any:
        result = super().run_node(node)
        self.record(node, result)
        return result

    def record(self, node: torch.fx.Node, result: Any) -> None:
        """Keeps ``result`` by name (the prefixes read it) and applies the sites no use reads."""
        self.env_by_name[node.name] = result
        for site in self.dangling.get(node.name, ()):
            self.apply_site(result, site)

    def fetch_args_kwargs_from_env(self, node: torch.fx.Node):
        if node.name not in self.patched_readers:
            return torch.fx.node.map_arg(node.args, self.env.__getitem__), torch.fx.node.map_arg(node.kwargs, self.env.__getitem__)

        def load(arg: torch.fx.Node) -> Any:
            chain = self.chains.get(Use(arg.name, node.name))
            return self.prefixes.through(arg.name, chain) if chain else self.env[arg]

        args = torch.fx.node.map_arg(node.args, load)
        kwargs = torch.fx.node.map_arg(node.kwargs, load)
        return args, kwargs


class Interpreted:
    """The eager form of a graph's selections: the captured graph run by the eager interpreter,
    which applies each patch's ``op`` (the ``graphpatch_eager`` semantics, the tests' oracle).
    One per graph (``GraphFacts.interpreted``): it keeps each spec's ``SitePlan``, so a call scans the
    graph only for a structure it has not run before."""

    MAX_PLANS = 64

    def __init__(self, gm: Any) -> None:
        self.gm = gm
        self.star_inputs = has_star_inputs(gm.graph)
        self._plans: Dict[Hashable, SitePlan] = {}
        self._lock = threading.Lock()

    def run(self, selection: Any, args: Sequence[Any]) -> Any:
        spec = lower(selection).spec
        plan = self._plans.get(spec)  # a read without the lock: writers add or clear
        if plan is None:
            plan = site_plan(self.gm, spec)
            with self._lock:
                if len(self._plans) >= self.MAX_PLANS:
                    self._plans.clear()
                self._plans[spec] = plan
        return PatchingInterpreter(self.gm, selection, plan, self.star_inputs).run(*args)

    def run_lowered(self, selection: Any, values: Any, args: Sequence[Any]) -> Any:
        """``run``, for callers holding a lowered selection: the interpreter applies each patch's
        own ``op``, so it needs the patches, not their lowered runtime values."""
        return self.run(selection, args)
