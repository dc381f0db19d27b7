"""pb.sweep's eager tier without a second capture: a chunk's cells as ``vmap`` over the base graph.

A sweep chunk runs K cells as row blocks of one forward at K·B rows. That forward needs the
graph Dynamo captures at K·B: a second capture of the whole model (2-3 s for 12 GPT-2 layers on
the 2-core CPU, about half of what the forward-hook loop the sweep replaces takes in all). While
a chunk runs uncompiled anyway (the eager tier), the same rows come from the graph already
captured at B: ``torch.func.vmap`` maps each cell's slot inputs, and leaves the graph's inputs
unmapped. So

* every op before the first patched site sees no mapped input and runs once, at B: the
  fan-out's prefix reuse (fanout.py), with no graph matching;
* every op after it runs over the K cells at once, as in the K·B forward;
* each cell's rows are, by vmap's definition, what that cell gives alone: no op can mix cells.

The graph's outputs come back with K in front. One that depends on a batched input (``input_ids``
of the sweep) has the batch first and becomes K·B rows, as the K·B forward returns it; one that
does not (a position table) is returned as it is, once. An output that depends on a patched site
but has no batch dimension first has no K·B form: the program is refused (``VmapRefused``), as is
any op vmap cannot map (data-dependent shapes, in-place writes of a mapped value into an unmapped
tensor, random ops): the sweep then runs that chunk, and the rest, on the K·B graph.
"""

from __future__ import annotations

import operator
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, FrozenSet, List, Optional, Sequence, Set, Tuple

import torch
import torch.fx
import torch.nn.functional as F

from ..capture.capture import GraphCapture
from ..capture.naming import Site
from .fanout import target_name
from .prepared import LeanSlot, SiteKey, SweepProgram, build_sweep_program

#: What a chunk feeds one slot: (keep, fill, index), each with the K cells first.
CellSlotInputs = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]

#: vmap runs ops without a batching rule one cell at a time, and says so once per op. Correct,
#: only slower; the sweep's user did not write the vmap and cannot act on it.
_NO_BATCH_RULE = r"There is a performance drop because we have not yet implemented the batching rule"


class VmapRefused(Exception):
    """The chunk cannot run as vmap over the base graph (the message says why)."""


@dataclass(frozen=True)
class OutputForm:
    """How one graph output of the mapped program becomes the K·B forward's output."""

    #: True: the batch is its first dimension, K·B rows (cell k's at ``k*B:(k+1)*B``);
    #: False: it depends on no cell and on no batched input, and is returned once.
    rows: bool


class VmappedProgram:
    """The base graph with a lean slot per site (prepared.py), called under vmap over cells."""

    def __init__(self, program: SweepProgram, forms: Sequence[OutputForm], cells: int) -> None:
        self.program = program
        self.forms = tuple(forms)
        self.cells = cells

    @property
    def slots(self) -> List[LeanSlot]:
        return self.program.slots

    @property
    def slot_index(self) -> Dict[SiteKey, int]:
        return self.program.slot_index

    def call(self, args: Sequence[Any], slot_inputs: Dict[int, CellSlotInputs]) -> List[Any]:
        """``slot_inputs``: per slot some cell patches, its inputs with the K cells first. The
        other slots get the untouched inputs, unmapped: what runs before the first patched site
        stays one computation at B."""
        extra: List[torch.Tensor] = []
        mapped_dims: List[Any] = []
        for position in range(len(self.slots)):
            given = slot_inputs.get(position)
            extra.extend(given or self.program.identity(position))
            mapped_dims.extend([0 if given else None] * 3)
        fn = self.program.fn
        if fn is None:
            raise RuntimeError("patch_backend internal error: a vmapped sweep program was called before it was built")
        count = self.program.original_outputs

        def one_cell(*cell_extra: torch.Tensor) -> Tuple[Any, ...]:
            return tuple(fn(*args, *cell_extra)[:count])

        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=_NO_BATCH_RULE)
                mapped = torch.func.vmap(one_cell, in_dims=tuple(mapped_dims), randomness="error")(*extra)
        except Exception as error:  # noqa: BLE001 - any op vmap cannot map refuses the form
            raise VmapRefused(f"vmap over the cells failed: {type(error).__name__}: {error}") from error
        return [
            value.flatten(0, 1) if form.rows else value[0]
            for value, form in zip(mapped, self.forms)
        ]


def build_vmapped(
    capture: GraphCapture,
    sites: List[Site],
    capacities: Dict[SiteKey, int],
    args: Sequence[Any],
    batched_inputs: FrozenSet[int],
    cells: int,
) -> VmappedProgram:
    """The base graph's lean-slot program (``capacities`` per cell) and each output's form.

    ``batched_inputs``: positions of the graph inputs that are the sweep's inputs (batch first).
    Raises ``VmapRefused`` when an output that a patch can reach has no batch dimension first.
    """
    built: List[torch.fx.GraphModule] = []

    def keep_graph(gm: torch.fx.GraphModule, example: Sequence[Any]) -> Callable:
        _batch_attention(gm)
        built.append(gm)
        return gm.forward

    program = build_sweep_program(capture, sites, capacities, args, keep_graph)
    forms = output_forms(built[0], len(args), batched_inputs, program.original_outputs, _batch(args, batched_inputs))
    return VmappedProgram(program, forms, cells)


# -- attention over cells ----------------------------------------------------------------------
# vmap has no batching rule for CPU's fused attention kernel and runs it once per cell (about a
# seventh of a 12-layer GPT-2 chunk's time). The cells are just more rows for it: this op's rule
# runs one attention call over the K·B rows.


@torch.library.custom_op("patch_backend::attention_over_cells", mutates_args=())
def attention_over_cells(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: Optional[torch.Tensor],
    is_causal: bool, scale: Optional[float], enable_gqa: bool,
) -> torch.Tensor:
    """``scaled_dot_product_attention`` without dropout (the vmapped graph's form of it)."""
    return F.scaled_dot_product_attention(
        query, key, value, attn_mask=attn_mask, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa
    )


@attention_over_cells.register_fake
def _attention_shape(query, key, value, attn_mask, is_causal, scale, enable_gqa):
    return query.new_empty(*query.shape[:-1], value.shape[-1])


@attention_over_cells.register_vmap
def _attention_rule(info, in_dims, query, key, value, attn_mask, is_causal, scale, enable_gqa):
    q_dim, k_dim, v_dim, mask_dim = in_dims[:4]
    if q_dim is None and k_dim is None and v_dim is None and mask_dim is None:
        # Before the first patched site: one computation for every cell.
        return attention_over_cells(query, key, value, attn_mask, is_causal, scale, enable_gqa), None
    cells = info.batch_size
    per_cell = query.dim() - (q_dim is not None)
    if per_cell != 4 or (attn_mask is not None and attn_mask.dim() - (mask_dim is not None) > 4):
        # Not [batch, heads, length, features]: one call per cell, as vmap would do.
        def cell(k: int, t: Optional[torch.Tensor], d: Optional[int]) -> Optional[torch.Tensor]:
            return t if t is None or d is None else t.select(d, k)

        return torch.stack([
            attention_over_cells(cell(k, query, q_dim), cell(k, key, k_dim), cell(k, value, v_dim),
                                 cell(k, attn_mask, mask_dim), is_causal, scale, enable_gqa)
            for k in range(cells)
        ]), 0
    rows = [_cells_first(t, d, cells) for t, d in ((query, q_dim), (key, k_dim), (value, v_dim))]
    batch = max(t.shape[1] for t in rows)
    q, k, v = (t.expand(cells, batch, *t.shape[2:]).reshape(cells * batch, *t.shape[2:]) for t in rows)
    mask = None if attn_mask is None else _mask_rows(attn_mask, mask_dim, cells, batch)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
    return out.reshape(cells, batch, *out.shape[1:]), 0


def _cells_first(t: torch.Tensor, dim: Optional[int], cells: int) -> torch.Tensor:
    return t.expand(cells, *t.shape) if dim is None else t.movedim(dim, 0)


def _mask_rows(mask: torch.Tensor, dim: Optional[int], cells: int, batch: int) -> torch.Tensor:
    """A mask for the K·B rows: one that broadcasts over the batch stays as it is, else its
    rows are cell k's at ``k*B:(k+1)*B``."""
    if dim is None and (mask.dim() < 4 or mask.shape[0] == 1):
        return mask
    mask = _cells_first(mask, dim, cells)
    while mask.dim() < 5:
        mask = mask.unsqueeze(1)
    mask = mask.expand(cells, batch, *mask.shape[2:])
    return mask.reshape(cells * batch, *mask.shape[2:])


def _batch_attention(gm: torch.fx.GraphModule) -> None:
    """Calls of ``scaled_dot_product_attention`` without dropout become ``attention_over_cells``."""
    changed = False
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target is not F.scaled_dot_product_attention:
            continue
        bound = _sdpa_arguments(node)
        if bound is None or bound.pop("dropout_p", 0.0) != 0.0:
            continue
        node.target = torch.ops.patch_backend.attention_over_cells.default
        node.args = (bound["query"], bound["key"], bound["value"], bound.get("attn_mask"),
                     bound.get("is_causal", False), bound.get("scale"), bound.get("enable_gqa", False))
        node.kwargs = {}
        changed = True
    if changed:
        gm.recompile()


_SDPA_PARAMETERS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


def _sdpa_arguments(node: torch.fx.Node) -> Optional[Dict[str, Any]]:
    if len(node.args) > len(_SDPA_PARAMETERS) or set(node.kwargs) - set(_SDPA_PARAMETERS):
        return None
    bound = dict(zip(_SDPA_PARAMETERS, node.args))
    if set(bound) & set(node.kwargs):
        return None
    bound.update(node.kwargs)
    return bound if {"query", "key", "value"} <= set(bound) else None


def _batch(args: Sequence[Any], batched_inputs: FrozenSet[int]) -> int:
    sizes = {args[position].shape[0] for position in batched_inputs}
    if len(sizes) != 1:
        raise VmapRefused(f"the sweep's inputs reach the graph with batch sizes {sorted(sizes)}")
    return sizes.pop()


def output_forms(
    gm: torch.fx.GraphModule, inputs: int, batched_inputs: FrozenSet[int], outputs: int, batch: int
) -> List[OutputForm]:
    """Per graph output: rows (K·B) or once, from what it depends on (see the module docstring)."""
    placeholders = [node for node in gm.graph.nodes if node.op == "placeholder"]
    batched = _reached(gm, {placeholders[position] for position in batched_inputs})
    patched = _reached(gm, set(placeholders[inputs:]))
    output = next(node for node in gm.graph.nodes if node.op == "output")
    values = output.args[0]
    values = list(values) if isinstance(values, (tuple, list)) else [values]
    forms = []
    for position, value in enumerate(values[:outputs]):
        if not isinstance(value, torch.fx.Node):
            raise VmapRefused(f"graph output {position} is not a tensor the graph computes")
        example = value.meta.get("example_value", value.meta.get("val"))
        batch_first = isinstance(example, torch.Tensor) and example.dim() > 0 and example.shape[0] == batch
        if value in patched and not (batch_first and value in batched):
            raise VmapRefused(f"graph output {position} ({value.name}) depends on a patched site but has no batch dimension first")
        forms.append(OutputForm(rows=batch_first and value in batched))
    return forms


#: Ops whose result shares its input's storage: an in-place write into one reaches the others.
_VIEWS = frozenset({
    "getitem", "view", "view_as", "reshape", "slice", "select", "narrow", "transpose", "permute", "expand",
    "expand_as", "unsqueeze", "squeeze", "flatten", "unflatten", "t", "as_strided", "split", "chunk", "unbind",
    "contiguous", "detach", "movedim", "diagonal", "unfold", "T", "mT",
})


def _in_place(node: torch.fx.Node) -> bool:
    if node.op not in ("call_function", "call_method") or not node.args or not isinstance(node.args[0], torch.fx.Node):
        return False
    name = target_name(node)
    return node.target is operator.setitem or (name.endswith("_") and not name.endswith("__"))


def _aliases(node: torch.fx.Node) -> Set[torch.fx.Node]:
    """Every node that may share ``node``'s storage: up through views to their base, then down
    through the views of it."""
    base = node
    while target_name(base) in _VIEWS and base.args and isinstance(base.args[0], torch.fx.Node):
        base = base.args[0]
    found, stack = set(), [base]
    while stack:
        current = stack.pop()
        if current not in found:
            found.add(current)
            stack.extend(user for user in current.users if target_name(user) in _VIEWS and user.args and user.args[0] is current)
    return found


def _reached(gm: torch.fx.GraphModule, sources: Set[torch.fx.Node]) -> Set[torch.fx.Node]:
    """``sources`` and every node computed from them, where an in-place write of a reached value
    (``buf[:, 0] = h``, ``buf.copy_(x)``) reaches the written tensor and its views: the graph's
    later nodes read the written value through them."""
    reached = set(sources)
    for node in gm.graph.nodes:
        if node in reached or not any(arg in reached for arg in node.all_input_nodes):
            continue
        reached.add(node)
        if _in_place(node):
            reached |= _aliases(node.args[0])
    return reached
