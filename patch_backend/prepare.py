"""``pb.prepare``: declares the sites a model will be patched at, so one compiled variant serves
every patch map within them (program/prepared.py builds it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Hashable, List, Optional, Sequence, Tuple

from . import aliases
from .capture.index import index_for
from .capture.naming import Site
from .roots import resolve_root
from .program.prepared import build_prepared, fits, site_key
from .runtime.requests import GraphFacts, Request


def prepare(model: Any, sites: Any) -> List[str]:
    """Declares sites of ``model`` whose patches share one compiled program.

    Any patch map of Zero/Add/Replace patches (with probes around them) within the declared
    sites then runs the one prepared program, fed per-site ``(keep, fill)`` inputs, instead of
    compiling a variant per patch structure: declare before trying many site combinations.

    Args:
        model: the module, its ``torch.compile`` result or a ``PatchableGraph``, already run once.
        sites: a name, ``NodePath`` or glob pattern, or a list of them (TransformerLens aliases
            too).

    Returns:
        The declared names, in pattern order.

    Raises:
        RuntimeError: the model has not been run yet, so it has no names.
        KeyError: a pattern that matches no node, with close matches (docs/errors.md row 1).

    Example::

        pb.prepare(compiled, "transformer.h_*.mlp.output")
        for layer in range(n_layers):
            with pb.patch(compiled, {f"transformer.h_{layer}.mlp.output": pb.ZeroPatch()}):
                compiled(input_ids)   # one compiled program for every layer
    """
    index = index_for(resolve_root(model))
    if not index.names:
        raise RuntimeError(
            f"pb.prepare needs the names of {type(index.root).__name__}: call the compiled model once first"
        )
    names = index.match_all(sites)
    index.declared = index.declared | frozenset(_native(index.root, name) for name in names)
    return names


def _native(root: Any, name: str) -> str:
    """The node a TransformerLens alias stands for (a per-head view declares its whole node)."""
    return aliases.lookup(root, name).native if aliases.is_alias_pattern(root, name) else name


# -- the front-end: a selection within the declared sites runs their one prepared program ------


def prepared_key(sites: Sequence[Site]) -> Hashable:
    """The prepared program of a site set (a sweep over the same sites shares it)."""
    return ("prepared", frozenset(site_key(site) for site in sites))


def prepared_request(
    state: Any, graph: GraphFacts, instance: Any, selection: Any, owners: Tuple[Any, ...]
) -> Optional[Request]:
    """pb.patch's request when ``selection`` fits the sites the patched models declared here;
    None when nothing is declared or a patch does not fit a slot (a variant serves it)."""
    declared = _declared(state, graph.capture, instance)
    if not declared or not fits(selection, declared.keys):
        return None
    capture, sites = graph.capture, declared.sites
    return Request(
        key=declared.key,
        build=lambda compile_fn, args: build_prepared(capture, sites, args, compile_fn),
        interpret=lambda args: graph.interpreted(),
        run=lambda program, args: program.run(selection, args),
        owners=owners,
    )


@dataclass(frozen=True)
class Declared:
    """The declared sites of one graph occurrence under one patch state."""

    sites: List[Site]
    #: site key → 0, the form ``program.prepared.fits`` takes.
    keys: Dict[Any, int]
    key: Hashable


def _declared(state: Any, capture: Any, instance: Any) -> Optional[Declared]:
    """Computed once per state and occurrence (the memo holds it for the state's lifetime)."""
    memo_key = ("declared", capture.uid, instance)
    if memo_key in state.memo:
        return state.memo[memo_key]
    sites: List[Site] = []
    for entry in state.roots:
        if entry.index.declared:
            sites.extend(entry.index.declared_sites(capture, instance))
    declared = None
    if sites:
        declared = Declared(sites, {site_key(site): 0 for site in sites}, prepared_key(sites))
    state.memo[memo_key] = declared
    return declared
