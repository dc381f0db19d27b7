"""``graphpatch_eager``: the captured graph interpreted in Python, patches applied by ``op``.

This is the reference the compiled backend is tested against, so it follows graphpatch 0.2.3's
documented Patch API literally: at each site the value is cloned once if any patch there requires
it, then every patch's ``op`` runs in list order.
"""

from __future__ import annotations

from typing import Any, Dict, Tuple

import torch
import torch.fx

from .plan import Chain, Selection, chains, dangling, needs_clone


def apply_site(value: Any, patches) -> Any:
    if needs_clone(patches) and isinstance(value, torch.Tensor):
        value = value.clone()
    for patch in patches:
        value = patch.op(value)
    return value


class PatchingInterpreter(torch.fx.Interpreter):
    def __init__(self, gm: torch.fx.GraphModule, selection: Selection) -> None:
        super().__init__(gm, garbage_collect_values=True)
        self.selection = selection
        self.use_chains: Dict[Tuple[str, str], Chain] = chains(gm.graph, selection)
        self.unused = dangling(gm.graph, selection, self.use_chains)
        self.patched: Dict[Tuple[str, Chain], Any] = {}

    def _through(self, producer: str, chain: Chain) -> Any:
        """Value of ``producer`` after the sites in ``chain``; each prefix computed once."""
        key = (producer, chain)
        if key not in self.patched:
            before = self._through(producer, chain[:-1]) if len(chain) > 1 else self.env_by_name[producer]
            self.patched[key] = apply_site(before, self.selection[chain[-1]].patches)
        return self.patched[key]

    def run(self, *args: Any) -> Any:
        self.env_by_name: Dict[str, Any] = {}
        self.patched = {}
        return super().run(*args)

    def run_node(self, node: torch.fx.Node) -> Any:
        result = super().run_node(node)
        self.env_by_name[node.name] = result
        for position in self.unused:
            if self.selection[position].site.node == node.name:
                apply_site(result, self.selection[position].patches)
        return result

    def fetch_args_kwargs_from_env(self, node: torch.fx.Node):
        def load(arg: torch.fx.Node) -> Any:
            chain = self.use_chains.get((arg.name, node.name))
            return self._through(arg.name, chain) if chain else self.env[arg]

        args = torch.fx.node.map_arg(node.args, load)
        kwargs = torch.fx.node.map_arg(node.kwargs, load)
        return args, kwargs
