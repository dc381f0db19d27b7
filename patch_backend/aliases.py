"""TransformerLens hook names as aliases of native node names, for the supported HF families.

``blocks.3.hook_resid_pre`` is another name for ``transformer.h_3.hidden_states`` (GPT-2) or
``model.layers_3.hidden_states`` (Llama): an alias resolves to exactly one native node, so a
patch on it is a patch on that node and the compiled path needs no change. The native names
stay canonical (``pb.nodes(model)`` lists them); aliases are opt-in per model family, detected
from ``model.config.model_type``, so a model of another family never has a name intercepted.

Per-head aliases (``attn.hook_q``/``hook_k``/``hook_v``/``hook_z``) are *views* of a native
``[batch, pos, heads * d_head]`` node (for GPT-2 and GPT-NeoX a part of the fused q/k/v
projection): patches on the view are translated into patches on the native node where that is
exact (a single head, or a contiguous head range), and refused otherwise (docs/errors.md).
Hooks the model does not compute (``hook_pattern`` under SDPA, ``hook_pos_embed`` with rotary
positions) are listed with the reason, never approximated (docs/transformers.md has the table).
"""

from __future__ import annotations

import difflib
import threading
import weakref
from dataclasses import dataclass, replace
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .patches import AddPatch, CustomPatch, Patch, ProbePatch, RecordPatch, ReplacePatch, ZeroPatch, normalize_slice
from .capture.protected import glob_regex

__all__ = ["Alias", "AliasTable", "HeadView", "alias_table", "is_alias_pattern", "resolve_aliases", "translate"]

#: TransformerLens's top-level name parts; a name starting with one of them is an alias pattern
#: (only for a model of a supported family, whose native names never start so).
_TL_HEADS = ("blocks", "hook_", "ln_final")

#: The built-in patches that index the view with ``slice`` (translated to a native slice).
_SlicedPatch = Union[ZeroPatch, AddPatch, ReplacePatch]


@dataclass(frozen=True)
class HeadView:
    """Where a ``[batch, pos, head, d_head]`` view sits in the last dim of its native node.

    The native node's last dim is ``heads * d_head`` (``parts == 1``), or a fused q/k/v
    projection of ``parts`` parts laid out ``[part, head, d_head]`` (GPT-2's ``c_attn``) or, with
    ``heads_outer``, ``[head, part, d_head]`` (GPT-NeoX's ``query_key_value``).
    """

    heads: int
    d_head: int
    part: int = 0
    parts: int = 1
    heads_outer: bool = False

    def start(self, head: int) -> int:
        """First native column of ``head``."""
        if self.heads_outer:
            return (head * self.parts + self.part) * self.d_head
        return (self.part * self.heads + head) * self.d_head

    @property
    def contiguous(self) -> bool:
        """Whether a range of heads is one contiguous range of native columns."""
        return not self.heads_outer or self.parts == 1

    def split(self, native: torch.Tensor) -> torch.Tensor:
        """The view of a native activation: ``[..., heads, d_head]``."""
        if self.parts == 1:
            return native.unflatten(-1, (self.heads, self.d_head))
        if self.heads_outer:
            return native.unflatten(-1, (self.heads, self.parts, self.d_head))[..., self.part, :]
        return native.unflatten(-1, (self.parts, self.heads, self.d_head))[..., self.part, :, :]

    def merge(self, native: torch.Tensor, view: torch.Tensor) -> torch.Tensor:
        """``native`` with this view's part replaced by ``view`` (functional, so it traces)."""
        if self.parts == 1:
            return view.flatten(-2)
        shape = (self.heads, self.parts, self.d_head) if self.heads_outer else (self.parts, self.heads, self.d_head)
        dim = -2 if self.heads_outer else -3
        pieces = list(native.unflatten(-1, shape).unbind(dim))
        pieces[self.part] = view
        return torch.stack(pieces, dim).flatten(-3)


@dataclass(frozen=True)
class Rule:
    """One TransformerLens hook of a family: its native node (``{i}`` the layer, relative to the
    base model), its view, and what it needs from the model to exist."""

    hook: str
    native: str = ""
    layer: bool = True
    view: str = ""  # "", "q", "k", "v", "z"
    #: "eager_attention" (a softmax node), "sequential_residual" (GPT-NeoX's resid_mid)
    requires: str = ""
    #: Non-empty: the family never has this hook, and why.
    unavailable: str = ""


@dataclass(frozen=True)
class Family:
    model_types: Tuple[str, ...]
    rules: Tuple[Rule, ...]
    #: Layout of q/k/v: "separate" (q_proj/k_proj/v_proj), "fused_parts_outer" (GPT-2),
    #: "fused_heads_outer" (GPT-NeoX).
    qkv: str = "separate"


_ROTARY = (
    "rotary position embeddings rotate q and k inside attention; no position vector is added "
    "to the residual stream (TransformerLens has no hook_pos_embed for rotary models either)"
)


def _block_rules(layer: str, attn: str, mlp: str, q: str, k: str, v: str, z: str) -> Tuple[Rule, ...]:
    return (
        Rule("hook_resid_pre", f"{layer}.hidden_states"),
        Rule("attn.hook_q", q, view="q"),
        Rule("attn.hook_k", k, view="k"),
        Rule("attn.hook_v", v, view="v"),
        Rule("attn.hook_pattern", f"{attn}.softmax", requires="eager_attention"),
        Rule("attn.hook_z", z, view="z"),
        Rule("hook_attn_out", f"{attn}.output|sub_0"),  # attention returns (output, weights)
        Rule("hook_resid_mid", f"{layer}.add", requires="sequential_residual"),
        Rule("hook_mlp_out", f"{mlp}.output"),
        Rule("hook_resid_post", f"{layer}.output"),
    )


_GPT2 = Family(
    ("gpt2",),
    (
        Rule("hook_embed", "wte.output", layer=False),
        Rule("hook_pos_embed", "wpe.output", layer=False),
        *_block_rules(
            "h_{i}", "h_{i}.attn", "h_{i}.mlp",
            "h_{i}.attn.c_attn.output", "h_{i}.attn.c_attn.output", "h_{i}.attn.c_attn.output",
            "h_{i}.attn.c_proj.x",
        ),
        Rule("ln_final.hook_normalized", "ln_f.output", layer=False),
    ),
    qkv="fused_parts_outer",
)

_NEOX = Family(
    ("gpt_neox",),
    (
        Rule("hook_embed", "embed_in.output", layer=False),
        Rule("hook_pos_embed", layer=False, unavailable=_ROTARY),
        *_block_rules(
            "layers_{i}", "layers_{i}.attention", "layers_{i}.mlp",
            "layers_{i}.attention.query_key_value.output", "layers_{i}.attention.query_key_value.output",
            "layers_{i}.attention.query_key_value.output", "layers_{i}.attention.dense.input",
        ),
        Rule("ln_final.hook_normalized", "final_layer_norm.output", layer=False),
    ),
    qkv="fused_heads_outer",
)

_LLAMA_LIKE = Family(
    ("llama", "mistral", "qwen2", "gemma"),
    (
        Rule("hook_embed", "embed_tokens.output", layer=False),
        Rule("hook_pos_embed", layer=False, unavailable=_ROTARY),
        *_block_rules(
            "layers_{i}", "layers_{i}.self_attn", "layers_{i}.mlp",
            "layers_{i}.self_attn.q_proj.output", "layers_{i}.self_attn.k_proj.output",
            "layers_{i}.self_attn.v_proj.output", "layers_{i}.self_attn.o_proj.input",
        ),
        Rule("ln_final.hook_normalized", "norm.output", layer=False),
    ),
)

FAMILIES: Tuple[Family, ...] = (_GPT2, _NEOX, _LLAMA_LIKE)


@dataclass(frozen=True)
class Alias:
    """A TransformerLens name and the native node it stands for (``view``: per-head alias)."""

    name: str
    native: str
    view: Optional[HeadView] = None


@dataclass(frozen=True)
class AliasTable:
    """The aliases of one model, in TransformerLens order, and the hooks it cannot offer."""

    model_type: str
    aliases: Dict[str, Alias]
    #: TransformerLens name -> why this model has no node for it.
    unavailable: Dict[str, str]

    @property
    def names(self) -> List[str]:
        return list(self.aliases)


def family_of(root: nn.Module) -> Optional[Family]:
    model_type = getattr(getattr(root, "config", None), "model_type", None)
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    return None


def _base_prefix(root: nn.Module) -> str:
    """``transformer.`` for GPT2LMHeadModel, ``""`` for GPT2Model itself (HF's base_model_prefix)."""
    prefix = getattr(root, "base_model_prefix", "")
    return f"{prefix}." if prefix and isinstance(getattr(root, prefix, None), nn.Module) else ""


def _head_view(family: Family, rule: Rule, config: Any) -> Optional[HeadView]:
    if not rule.view:
        return None
    heads = config.num_attention_heads
    d_head = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    if rule.view == "z":
        return HeadView(heads, d_head)
    part = "qkv".index(rule.view)
    if family.qkv == "fused_parts_outer":
        return HeadView(heads, d_head, part, 3)
    if family.qkv == "fused_heads_outer":
        return HeadView(heads, d_head, part, 3, heads_outer=True)
    return HeadView(heads if rule.view == "q" else kv_heads, d_head)


def _missing_requirement(rule: Rule, config: Any) -> str:
    implementation = getattr(config, "_attn_implementation", None) or "eager"
    if rule.requires == "eager_attention" and implementation != "eager":
        return (
            f"attention runs as one fused kernel (attn_implementation={implementation!r}), so the "
            "pattern is never computed; build the model with attn_implementation='eager' to get it"
        )
    if rule.requires == "sequential_residual" and getattr(config, "use_parallel_residual", False):
        return (
            "attention and MLP read the same residual in parallel (use_parallel_residual=True), so "
            "there is no residual between them (TransformerLens has none for parallel models either)"
        )
    return ""


def _build_table(root: nn.Module, family: Family) -> AliasTable:
    # A transformers PretrainedConfig (family_of found model_type on it); untyped here, so that
    # transformers stays an optional dependency.
    config: Any = root.config
    prefix = _base_prefix(root)
    aliases: Dict[str, Alias] = {}
    unavailable: Dict[str, str] = {}
    layers = range(config.num_hidden_layers)
    for rule in family.rules:
        for layer in layers if rule.layer else [None]:
            name = f"blocks.{layer}.{rule.hook}" if rule.layer else rule.hook
            reason = rule.unavailable or _missing_requirement(rule, config)
            if reason:
                unavailable[name] = reason
                continue
            native = prefix + rule.native.format(i=layer)
            aliases[name] = Alias(name, native, _head_view(family, rule, config))
    order = {name: position for position, name in enumerate(_tl_order(aliases, config.num_hidden_layers))}
    ordered = dict(sorted(aliases.items(), key=lambda item: order[item[0]]))
    return AliasTable(config.model_type, ordered, unavailable)


def _tl_order(aliases: Mapping[str, Alias], layers: int) -> List[str]:
    """TransformerLens's order: embeddings, then block by block, then ln_final."""
    head = [name for name in aliases if not name.startswith(("blocks.", "ln_final"))]
    blocks = [name for layer in range(layers) for name in aliases if name.startswith(f"blocks.{layer}.")]
    tail = [name for name in aliases if name.startswith("ln_final")]
    return head + blocks + tail


_tables: "weakref.WeakKeyDictionary[nn.Module, Tuple[Any, AliasTable]]" = weakref.WeakKeyDictionary()
_tables_lock = threading.Lock()


def alias_table(root: nn.Module) -> Optional[AliasTable]:
    """The model's alias table, or None for a model of an unsupported family."""
    family = family_of(root)
    if family is None:
        return None
    config = root.config
    key = (id(config), getattr(config, "_attn_implementation", None), getattr(config, "use_parallel_residual", None))
    with _tables_lock:
        cached = _tables.get(root)
        if cached is None or cached[0] != key:
            cached = _tables[root] = (key, _build_table(root, family))
    return cached[1]


def is_alias_pattern(root: nn.Module, pattern: str) -> bool:
    """Whether ``pattern`` is a TransformerLens name or glob for this model."""
    return family_of(root) is not None and pattern.startswith(_TL_HEADS)


def match(root: nn.Module, pattern: str, native_names: Sequence[str]) -> List[str]:
    """TransformerLens names matching a glob, in TransformerLens order, whose node was captured."""
    table = alias_table(root)
    if table is None:
        return []
    present = set(native_names)
    regex = glob_regex(pattern)
    return [name for name, alias in table.aliases.items() if alias.native in present and regex.fullmatch(name)]


def close_matches(root: nn.Module, name: str, count: int = 5) -> List[str]:
    table = alias_table(root)
    if table is None:
        return []
    return difflib.get_close_matches(name, table.names + list(table.unavailable), n=count, cutoff=0.5)


def lookup(root: nn.Module, name: str) -> Alias:
    """The alias ``name`` stands for; KeyError saying why when there is none."""
    table = alias_table(root)
    assert table is not None
    alias = table.aliases.get(name)
    if alias is not None:
        return alias
    if name in table.unavailable:
        raise KeyError(
            f"TransformerLens name {name!r} has no node in this {table.model_type} model: {table.unavailable[name]} "
            "(docs/transformers.md, TransformerLens aliases)"
        )
    close = close_matches(root, name)
    hint = f"; close matches: {', '.join(close)}" if close else ""
    raise KeyError(
        f"no TransformerLens alias {name!r} for this {table.model_type} model ({len(table.aliases)} aliases; "
        f"pb.nodes(model, 'blocks.**') lists them){hint}"
    )


def resolve_aliases(root: nn.Module, by_name: Mapping[str, Tuple[Patch, ...]]) -> Dict[str, Tuple[Patch, ...]]:
    """A normalized patch map with every alias replaced by its native node, patches translated.

    Maps of models without aliases come back unchanged. Native names and aliases of one node
    merge in map order.
    """
    # Every pb.patch entry comes here: the cheap prefix test first, the model's family (which
    # reads its config) only for a map that may hold an alias.
    if not any(name.startswith(_TL_HEADS) for name in by_name) or family_of(root) is None:
        return dict(by_name)
    resolved: Dict[str, Tuple[Patch, ...]] = {}
    for name, patches in by_name.items():
        if is_alias_pattern(root, name):
            alias = lookup(root, name)
            name, patches = alias.native, tuple(translate(alias, patch) for patch in patches)
        resolved[name] = resolved.get(name, ()) + tuple(patches)
    return resolved


# -- translating a patch on a view into a patch on its native node -----------------------------


def translate(alias: Alias, patch: Patch) -> Patch:
    """The patch on ``alias.native`` that has ``patch``'s effect on the view; raises ValueError
    for what has no exact translation. A patch on an alias without a view is used as is."""
    view = alias.view
    if view is None:
        return patch
    if isinstance(patch, (ZeroPatch, AddPatch, ReplacePatch)):
        return _translate_sliced(alias, view, patch)
    if isinstance(patch, ProbePatch):
        return _ViewProbe(patch, view)
    if isinstance(patch, RecordPatch):
        return _ViewRecord(patch, view)
    op = patch.custom_op if isinstance(patch, CustomPatch) else patch.op
    if not callable(op):
        return patch  # validation refuses it, naming the node
    return CustomPatch(custom_op=_on_view(op, view))


def _on_view(op: Callable[[torch.Tensor], torch.Tensor], view: HeadView) -> Callable[[torch.Tensor], torch.Tensor]:
    def on_view(native: torch.Tensor) -> torch.Tensor:
        return view.merge(native, op(view.split(native)))

    return on_view


def _refuse(alias: Alias, patch: _SlicedPatch, why: str) -> ValueError:
    return ValueError(
        f"{type(patch).__name__}(slice={patch.slice!r}) at {alias.name!r} (a [batch, pos, head, d_head] view of "
        f"{alias.native!r}): {why}. Supported exactly: any batch and position index, then one head (int, "
        f"optionally with a d_head index or slice) or a contiguous head range (slice with step 1)"
        + ("" if alias.view is None or alias.view.contiguous else "; a range of several heads is not "
           "contiguous in this model's fused q/k/v projection: patch one head at a time")
    )


def _translate_sliced(alias: Alias, view: HeadView, patch: _SlicedPatch) -> Patch:
    elements = () if patch.slice is None else normalize_slice(patch.slice)
    if len(elements) > 4:
        raise _refuse(alias, patch, f"{len(elements)} indices for a 4-d view")
    for element in elements:
        if element is Ellipsis or element is None or isinstance(element, bool):
            raise _refuse(alias, patch, f"index {element!r} is not supported on a view")
    lead = tuple(elements[:2]) + (slice(None),) * (2 - min(len(elements), 2))
    head = elements[2] if len(elements) > 2 else slice(None)
    within = elements[3] if len(elements) > 3 else slice(None)
    if isinstance(head, int):
        column = _single_head_columns(alias, view, patch, head, within)
        return replace(patch, slice=lead + (column,))
    if not isinstance(head, slice):
        raise _refuse(alias, patch, f"head index {head!r} is not an int or a slice")
    if not (isinstance(within, slice) and within == slice(None)):
        raise _refuse(alias, patch, "a d_head index needs a single head")
    heads = range(view.heads)[head]
    if len(heads) > 1 and (heads.step != 1 or not view.contiguous):
        raise _refuse(alias, patch, f"heads {list(heads)} are not one contiguous range of columns")
    first = view.start(heads.start) if len(heads) else 0
    column = slice(first, first + len(heads) * view.d_head)
    translated = replace(patch, slice=lead + (column,))
    if isinstance(patch, (AddPatch, ReplacePatch)):
        translated = replace(translated, value=_merged_value(alias, patch, len(heads), view.d_head))
    return translated


def _single_head_columns(alias: Alias, view: HeadView, patch: _SlicedPatch, head: int, within: Any) -> Any:
    if not -view.heads <= head < view.heads:
        raise IndexError(
            f"{type(patch).__name__} at {alias.name!r}: head {head} is out of range for {view.heads} heads"
        )
    columns = range(view.start(head % view.heads), view.start(head % view.heads) + view.d_head)
    if isinstance(within, int) and not isinstance(within, bool):
        try:
            return columns[within]
        except IndexError:
            raise IndexError(
                f"{type(patch).__name__} at {alias.name!r}: d_head index {within} is out of range for "
                f"d_head {view.d_head}"
            ) from None
    if isinstance(within, slice):
        selected = columns[within]
        if selected.step < 0:
            raise _refuse(alias, patch, "a negative step over d_head")
        return slice(selected.start, selected.start + len(selected) * selected.step, selected.step)
    raise _refuse(alias, patch, f"d_head index {within!r} is not an int or a slice")


def _merged_value(alias: Alias, patch: Union[AddPatch, ReplacePatch], heads: int, d_head: int) -> Any:
    """A value for ``[..., heads, d_head]`` reshaped to the native ``[..., heads * d_head]``."""
    value = patch.value
    if not isinstance(value, torch.Tensor) or value.dim() == 0:
        return value
    grouped = value if value.dim() >= 2 else value.unsqueeze(0)
    try:
        grouped = grouped.expand(*grouped.shape[:-2], heads, d_head)
    except RuntimeError:
        raise ValueError(
            f"{type(patch).__name__} at {alias.name!r}: value of shape {tuple(value.shape)} does not broadcast "
            f"to the selected [..., {heads} heads, {d_head}] of the view"
        ) from None
    return grouped.reshape(*grouped.shape[:-2], heads * d_head)


class _ViewProbe(ProbePatch):
    """The ProbePatch placed at the native node for a probe on a view: every activation it is
    handed is stored, as the view, in the user's probe."""

    # Set with object.__setattr__ in __init__ (before the dataclass __init__ runs, which sets
    # ``activation`` through the property below); annotated only, so they are not fields.
    _target: ProbePatch
    _view: HeadView

    def __init__(self, target: ProbePatch, view: HeadView) -> None:
        object.__setattr__(self, "_target", target)
        object.__setattr__(self, "_view", view)
        super().__init__()

    @property
    def activation(self) -> Any:
        return self._target.activation

    @activation.setter
    def activation(self, value: Any) -> None:
        if isinstance(value, torch.Tensor):
            value = self._view.split(value).contiguous()
        self._target.activation = value


class _ViewList(list):
    """Appends the view of each native activation to the user's RecordPatch list."""

    def __init__(self, target: List[Any], view: HeadView) -> None:
        super().__init__()
        self._target, self._view = target, view

    def append(self, value: Any) -> None:
        if isinstance(value, torch.Tensor):
            value = self._view.split(value).contiguous()
        self._target.append(value)


class _ViewRecord(RecordPatch):
    def __init__(self, target: RecordPatch, view: HeadView) -> None:
        super().__init__(activations=_ViewList(target.activations, view))
