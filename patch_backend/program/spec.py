"""The program spec: what one patched graph call does, as typed data.

A ``ProgramSpec`` lists the patched sites of one graph and, per site, its entries in application
order: a specialised patch op, a probe output, a custom op, or a declared *slot*. It holds the
patch *structure* only (kinds, slice forms, where each value comes from), never the values, so
it is hashable and serves as the cache key of a compiled variant: sweeping values or positions
reuses one variant. ``lower`` is the one place that reads a selection: it gives the spec and, in
the same walk, the ``RuntimeValues`` (ints, scalars, tensors) that feed the spec's slots, so the
slot numbering of the two can never disagree.

Three readers share the spec: ``insert.insert`` (the FX pass behind every compiled variant),
``prepared.build_prepared`` (a slot program over declared sites) and ``eager.PatchingInterpreter``
(the reference). ``uses`` and ``Prefixes`` are the site/chain/order logic all of them follow.
"""

from __future__ import annotations

import enum
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Dict, Generic, Hashable, List, Optional, Sequence, Tuple, TypeVar, Union

import torch
import torch.fx

from ..capture.naming import Site
from ..patches import (
    PROBE_PATCHES,
    VALUE_PATCHES,
    AddPatch,
    Patch,
    ProbePatch,
    RecordPatch,
    ReplacePatch,
    ZeroPatch,
    normalize_slice,
)
from .custom import callable_structure, lower_custom, patch_function

if TYPE_CHECKING:
    from .plan import Selection


# -- slice forms -------------------------------------------------------------------------------
@dataclass(frozen=True)
class IntIndex:
    """``x[k]`` along one dim; ``slot`` indexes the runtime int vector."""

    slot: int


@dataclass(frozen=True)
class SliceRange:
    """``x[start:stop:step]`` along one dim; each bound a runtime int slot, None where omitted.

    ``positive`` (the step's sign) decides the compiled comparisons, so it is structure.
    """

    start: Optional[int]
    stop: Optional[int]
    step: Optional[int]
    positive: bool


@dataclass(frozen=True)
class IndexTensor:
    """An advanced index (list or 1-d integer tensor): a runtime tensor slot of this shape."""

    slot: int
    shape: Tuple[int, ...]
    dtype: torch.dtype


@dataclass(frozen=True)
class AllDims:
    """``...``: as many full dims as the other elements leave."""


MaskedElement = Union[IntIndex, SliceRange, IndexTensor, AllDims]


@dataclass(frozen=True)
class WholeTensor:
    """No slice: the patch covers the whole value."""


@dataclass(frozen=True)
class MaskedSlice:
    """A slice compiled as a mask from runtime ints/tensors: one variant for every position."""

    elements: Tuple[MaskedElement, ...]


@dataclass(frozen=True)
class ConstantIndex:
    """A fallback element compiled as a constant (None, a bool, an int or slice next to them).

    Compared by ``repr``, which tells ``True`` from ``1`` and hashes slices (unhashable before
    Python 3.12).
    """

    value: Any = field(compare=False)
    text: str


@dataclass(frozen=True)
class ConstantSlice:
    """An index masks cannot express (None, bools, several advanced indices): compiled as
    Python indexing with its numbers as constants, so the numbers are structure here."""

    elements: Tuple[Union[ConstantIndex, IndexTensor], ...]


SliceForm = Union[WholeTensor, MaskedSlice, ConstantSlice]


# -- values ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorValue:
    slot: int
    shape: Tuple[int, ...]
    dtype: torch.dtype
    requires_grad: bool


@dataclass(frozen=True)
class ScalarValue:
    """A number patch value: one element of the runtime float64 vector."""

    slot: int


ValueRef = Union[TensorValue, ScalarValue]


# -- entries -----------------------------------------------------------------------------------
class PatchKind(enum.Enum):
    ZERO = "zero"
    ADD = "add"
    REPLACE = "replace"


@dataclass(frozen=True)
class PatchOp:
    """A Zero/Add/Replace patch, specialised to its slice form; ``value`` is None for zero."""

    kind: PatchKind
    form: SliceForm
    value: Optional[ValueRef]


@dataclass(frozen=True)
class ProbeOutput:
    """A ProbePatch/RecordPatch: the value at this point becomes an extra graph output."""


@dataclass(frozen=True)
class EntryRef:
    """One entry of a spec: site position, entry position (= the patch's position in its list)."""

    site: int
    entry: int


@dataclass(frozen=True)
class CustomOp:
    """A CustomPatch or user Patch subclass, traced into the graph.

    Keyed by the callable's code and captured-value structure (custom.py). The traced stand-in
    of the callable is not part of the spec (it would keep the patch's captured values alive in
    the variant cache's keys): ``Lowered.calls`` has it, taking the lifted tensors
    (``tensors``: runtime tensor slots) and the probes it reads (``probes``: earlier probe
    entries of the same spec).
    """

    patch_type: type
    callable_key: Any
    probes: Tuple[EntryRef, ...]
    tensors: Tuple[int, ...]
    clone: bool


@dataclass(frozen=True)
class OpaqueOp:
    """A custom callable that does not trace: runs eagerly through ``opaque_patch`` (custom.py),
    which looks the callable up by ``slot`` for the call in progress."""

    slot: int


@dataclass(frozen=True)
class SlotOp:
    """A declared site (prepared.py): ``where(keep, x + fill, fill)`` with runtime (keep, fill)."""

    slot: int


Entry = Union[PatchOp, ProbeOutput, CustomOp, OpaqueOp, SlotOp]


@dataclass(frozen=True)
class SiteSpec:
    node: str
    consumers: Optional[frozenset]
    rank: Tuple[int, int]
    name: str
    #: Reference semantics (patch-api.txt): clone the value once here if any patch requires it.
    clone: bool
    entries: Tuple[Entry, ...]

    def reaches(self, user: str) -> bool:
        """Whether the fx node ``user`` sees the value patched here (None: every use does)."""
        return self.consumers is None or user in self.consumers


@dataclass(frozen=True)
class ProgramSpec:
    sites: Tuple[SiteSpec, ...]
    #: Lengths of the runtime int vector, float vector, tensor list; the number of slots.
    ints: int = 0
    scalars: int = 0
    tensors: int = 0
    slots: int = 0

    def __hash__(self) -> int:
        # The spec is the program cache's key, looked up on every patched call: its hash walks
        # every site and entry, so it is computed once per spec (the dataclass is frozen).
        try:
            return self._hash  # type: ignore[attr-defined]
        except AttributeError:
            cached = hash((self.sites, self.ints, self.scalars, self.tensors, self.slots))
            object.__setattr__(self, "_hash", cached)
            return cached

    def uses(self, graph: torch.fx.Graph) -> "Uses":
        """Per use of a patched value, the sites it passes through: those at the producer whose
        consumers include the user, in (rank, name) order."""
        sites = self.sites
        by_node: Dict[str, List[int]] = {}
        for position, site in enumerate(sites):
            by_node.setdefault(site.node, []).append(position)
        nodes = {node.name: node for node in graph.nodes}
        chains: Dict[Use, Chain] = {}
        for producer, positions in by_node.items():
            ordered = sorted(positions, key=lambda p: (sites[p].rank, sites[p].name))
            for user in nodes[producer].users:
                chain = tuple(p for p in ordered if sites[p].reaches(user.name))
                if chain:
                    chains[Use(producer, user.name)] = chain
        used = {p for chain in chains.values() for p in chain}
        return Uses(chains, tuple(p for p in range(len(sites)) if p not in used))


class RuntimeValues:
    """The values for one selection, in the order of the spec's slots.

    Plain data, never changed once made; a slots class rather than a frozen dataclass because
    one is made for every patched call, and a frozen dataclass's ``__init__`` costs several
    times more."""

    __slots__ = ("ints", "scalars", "tensors")

    def __init__(self, ints: Tuple[int, ...], scalars: Tuple[float, ...], tensors: Tuple[torch.Tensor, ...]) -> None:
        self.ints = ints
        self.scalars = scalars
        self.tensors = tensors

    def __repr__(self) -> str:
        return f"RuntimeValues(ints={self.ints!r}, scalars={self.scalars!r}, tensors={len(self.tensors)} tensors)"

    def inputs(self, device: torch.device) -> Sequence[torch.Tensor]:
        """The extra graph inputs, in the order ``insert`` adds the placeholders."""
        if not self.ints and not self.scalars:  # the common case: tensor values alone
            tensors = self.tensors
            for tensor in tensors:
                if tensor.device != device:
                    break
            else:
                return tensors
        inputs: List[torch.Tensor] = []
        if self.ints:
            inputs.append(torch.tensor(self.ints, dtype=torch.int64, device=device))
        if self.scalars:
            inputs.append(torch.tensor(self.scalars, dtype=torch.float64, device=device))
        for tensor in self.tensors:
            inputs.append(tensor if tensor.device == device else tensor.to(device))
        return inputs


@dataclass(frozen=True)
class Lowered:
    spec: ProgramSpec
    values: RuntimeValues
    #: Per custom op entry, ``call(value, probes, lifted)``: its callable rebuilt from inputs.
    calls: Dict[EntryRef, Callable]


# -- lowering a selection ----------------------------------------------------------------------
class _Values:
    """Collects runtime values while ``lower`` assigns their slots."""

    def __init__(self) -> None:
        self.ints: List[int] = []
        self.scalars: List[float] = []
        self.tensors: List[torch.Tensor] = []

    def int_slot(self, value: Any) -> int:
        self.ints.append(int(value))
        return len(self.ints) - 1

    def index_tensor(self, element: Any) -> IndexTensor:
        tensor = torch.as_tensor(element)
        self.tensors.append(tensor)
        return IndexTensor(len(self.tensors) - 1, tuple(tensor.shape), tensor.dtype)

    def value(self, value: Any) -> ValueRef:
        if isinstance(value, torch.Tensor):
            self.tensors.append(value)
            return TensorValue(len(self.tensors) - 1, tuple(value.shape), value.dtype, value.requires_grad)
        self.scalars.append(float(value))
        return ScalarValue(len(self.scalars) - 1)


def _maskable(index: Tuple[Any, ...]) -> bool:
    """Whether a mask from runtime positions can express the index (at most one advanced index,
    1-d integer; no None, bools or zero steps)."""
    advanced = 0
    for element in index:
        if isinstance(element, bool) or element is None:
            return False
        if isinstance(element, (list, torch.Tensor)):
            values = torch.as_tensor(element)
            if values.dim() != 1 or values.dtype == torch.bool or values.is_floating_point():
                return False
            advanced += 1
        elif isinstance(element, slice):
            if element.step == 0:
                return False
        elif not (isinstance(element, int) or element is Ellipsis):
            return False
    return advanced <= 1


def _slice_form(tensor_slice: Any, values: _Values) -> SliceForm:
    if tensor_slice is None:
        return WholeTensor()
    index = normalize_slice(tensor_slice)
    if not _maskable(index):
        return ConstantSlice(tuple(
            values.index_tensor(e) if isinstance(e, (list, torch.Tensor)) else ConstantIndex(e, repr(e))
            for e in index
        ))
    elements: List[MaskedElement] = []
    for element in index:
        if element is Ellipsis:
            elements.append(AllDims())
        elif isinstance(element, int):
            elements.append(IntIndex(values.int_slot(element)))
        elif isinstance(element, slice):
            start, stop, step = (None if b is None else values.int_slot(b) for b in (element.start, element.stop, element.step))
            elements.append(SliceRange(start, stop, step, element.step is None or element.step > 0))
        else:
            elements.append(values.index_tensor(element))
    return MaskedSlice(tuple(elements))


def _entry(patch: Patch, ref: EntryRef, values: _Values, probes: Dict[int, EntryRef], calls: Dict[EntryRef, Callable]) -> Entry:
    if isinstance(patch, PROBE_PATCHES):
        return ProbeOutput()
    if isinstance(patch, VALUE_PATCHES):
        form = _slice_form(patch.slice, values)
        if isinstance(patch, (AddPatch, ReplacePatch)):
            kind = PatchKind.ADD if isinstance(patch, AddPatch) else PatchKind.REPLACE
            return PatchOp(kind, form, values.value(patch.value))
        return PatchOp(PatchKind.ZERO, form, None)
    fn = patch_function(patch)
    lowering = lower_custom(fn, values.tensors, probes)
    calls[ref] = lowering.call
    return CustomOp(type(patch), callable_structure(fn, probes), lowering.probes, lowering.tensors, patch.requires_clone)


def probe_refs(selection: "Selection") -> Dict[int, EntryRef]:
    """id(ProbePatch) → its entry, for custom ops that read a probe of the same patch map."""
    return {
        id(patch): EntryRef(site, entry)
        for site, patches in enumerate(selection)
        for entry, patch in enumerate(patches.patches)
        if isinstance(patch, ProbePatch)
    }


def _site(site: Site, entries: Tuple[Entry, ...], clone: bool) -> SiteSpec:
    return SiteSpec(site.node, site.consumers, site.rank, site.name, clone, entries)


def lower(selection: "Selection") -> Lowered:
    """The spec of a selection and the runtime values that feed it (one walk for both)."""
    values = _Values()
    probes = probe_refs(selection)
    calls: Dict[EntryRef, Callable] = {}
    sites = tuple(
        _site(
            entry.site,
            tuple(_entry(patch, EntryRef(s, e), values, probes, calls) for e, patch in enumerate(entry.patches)),
            any(patch.requires_clone for patch in entry.patches),
        )
        for s, entry in enumerate(selection)
    )
    spec = ProgramSpec(sites, len(values.ints), len(values.scalars), len(values.tensors))
    return Lowered(spec, RuntimeValues(tuple(values.ints), tuple(values.scalars), tuple(values.tensors)), calls)


# -- lowering a selection of a known structure ---------------------------------------------------
#: ``walk`` reads the structure of exact ZeroPatch/AddPatch/ReplacePatch/ProbePatch/RecordPatch
#: objects only: a subclass may override ``op``.
_SCALAR_TYPES = (int, float, bool)


@dataclass(frozen=True)
class Walked:
    """A selection read without building its spec: ``key`` is its structure (the sites, and per
    patch its type, clone flag, slice form without the numbers, value shape, dtype, device and
    grad flag), ``values`` its runtime values in the slot order ``lower`` assigns."""

    key: Hashable
    values: RuntimeValues


def walk(selection: "Selection") -> Optional[Walked]:
    """The structure and values of a selection in one cheap walk; None where the structure
    holds something only ``lower`` can read (custom ops, index lists or tensors, None/bool
    elements, non-positive steps, a number too large for float64): such a selection is lowered
    in full at every call, as before. Every patched call walks its selection: the common
    patches are read first, and a patch without a slice costs no call.

    A site stands in the key by ``id``: ``Lowerings`` keeps the sites of every key alive, so an
    id there is never another site's.
    """
    ints: List[int] = []
    scalars: List[float] = []
    tensors: List[torch.Tensor] = []
    parts: List[Any] = []
    for entry in selection:
        patches: List[Any] = []
        for patch in entry.patches:
            kind = type(patch)
            if kind is AddPatch or kind is ReplacePatch or kind is ZeroPatch:
                tensor_slice = patch.slice  # type: ignore[attr-defined]
                if tensor_slice is None:
                    form: Any = None
                else:
                    form = walk_slice(tensor_slice, ints)
                    if form is UNWALKED:
                        return None
                if kind is ZeroPatch:
                    value_part: Any = None
                else:
                    value = patch.value  # type: ignore[attr-defined]
                    if isinstance(value, _Tensor):
                        value_part = (tuple(value.shape), value.dtype, value.device, value.requires_grad, value.is_meta)
                        tensors.append(value)
                    elif type(value) in _SCALAR_TYPES and not (type(value) is int and abs(value) > 2**53):
                        value_part = type(value)
                        scalars.append(float(value))
                    else:
                        return None
                patches.append((kind, patch.requires_clone, form, value_part))
            elif kind is ProbePatch or kind is RecordPatch:
                patches.append((kind, patch.requires_clone))
            else:
                return None
        parts.append((id(entry.site), tuple(patches)))
    return Walked(tuple(parts), RuntimeValues(tuple(ints), tuple(scalars), tuple(tensors)))


_Tensor = torch.Tensor
UNWALKED = object()


def walk_slice(tensor_slice: Any, ints: List[int]) -> Any:
    """A slice's form for ``walk`` (its numbers go to ``ints``, in ``_slice_form``'s order);
    ``UNWALKED`` for a slice only ``lower`` reads."""
    if tensor_slice is None:
        return None
    form: List[Any] = []
    for element in tensor_slice if isinstance(tensor_slice, (list, tuple)) else (tensor_slice,):
        if type(element) is int:
            ints.append(element)
            form.append(int)
        elif element is Ellipsis:
            form.append(Ellipsis)
        elif type(element) is slice:
            bounds = (element.start, element.stop, element.step)
            for bound in bounds:
                if bound is not None:
                    if type(bound) is not int:
                        return UNWALKED
                    ints.append(bound)
            if element.step is not None and element.step <= 0:
                return UNWALKED
            form.append(tuple(bound is None for bound in bounds))
        else:
            return UNWALKED
    return tuple(form)


class Lowerings:
    """One graph's specs by selection structure (``walk``): a loop of new patch maps of one
    structure lowers the first in full and only reads the values of the others.

    Bounded (emptied when full: a lowering is cheap to redo) and thread-safe. ``builds``
    counts full lowerings whose spec was stored, for tests.
    """

    MAX_ENTRIES = 1024

    def __init__(self) -> None:
        self._specs: Dict[Hashable, Tuple[ProgramSpec, Tuple[Site, ...]]] = {}
        self._lock = threading.Lock()
        self.builds = 0

    def spec_of(self, walked: Walked) -> Optional[ProgramSpec]:
        """The spec of a structure lowered before (None: ``lower`` it). A read without the
        lock: one ``dict.get`` is atomic, and writers replace or clear, never mutate, entries."""
        known = self._specs.get(walked.key)
        return None if known is None else known[0]

    def lower(self, selection: "Selection", walked: Optional[Walked]) -> Lowered:
        """``lower(selection)``, from the memo when ``walked`` (this call's walk) is known."""
        if walked is None:
            return lower(selection)
        spec = self.spec_of(walked)
        if spec is not None:
            return Lowered(spec, walked.values, {})
        lowered = lower(selection)
        values = lowered.values
        if (len(values.ints), len(values.scalars), len(values.tensors)) != (
            len(walked.values.ints), len(walked.values.scalars), len(walked.values.tensors)
        ) or lowered.calls:
            raise RuntimeError(
                "patch_backend internal error: spec.walk and spec.lower read a selection differently "
                f"({walked.key!r})"
            )
        with self._lock:
            if len(self._specs) >= self.MAX_ENTRIES:
                self._specs.clear()
            self._specs[walked.key] = (lowered.spec, tuple(entry.site for entry in selection))
            self.builds += 1
        return lowered

    def __len__(self) -> int:
        with self._lock:
            return len(self._specs)


def slot_spec(sites: Sequence[Site]) -> ProgramSpec:
    """A slot at every declared site, numbered in (rank, name) order."""
    ordered = sorted(sites, key=lambda s: (s.rank, s.name))
    return ProgramSpec(
        tuple(_site(site, (SlotOp(position),), False) for position, site in enumerate(ordered)), slots=len(ordered)
    )


# -- where the sites apply ---------------------------------------------------------------------
@dataclass(frozen=True)
class Use:
    """One use of a value: ``consumer`` reads ``producer`` (node names)."""

    producer: str
    consumer: str


#: Site positions a use passes through, in application order.
Chain = Tuple[int, ...]


@dataclass(frozen=True)
class Uses:
    chains: Dict[Use, Chain]
    #: Sites no use passes through (a probe on an unused weight): applied once, results unused.
    dangling: Tuple[int, ...]


V = TypeVar("V")


class Prefixes(Generic[V]):
    """A producer's value after a prefix of a chain, each prefix computed once.

    ``source(name)`` is the unpatched value, ``apply(value, site)`` applies one site; the FX pass
    emits nodes with it, the eager interpreter computes tensors.
    """

    def __init__(self, source: Callable[[str], V], apply: Callable[[V, int], V]) -> None:
        self.source = source
        self.apply = apply
        self.memo: Dict[Tuple[str, Chain], V] = {}

    def through(self, producer: str, chain: Chain) -> V:
        key = (producer, chain)
        if key not in self.memo:
            before = self.through(producer, chain[:-1]) if len(chain) > 1 else self.source(producer)
            self.memo[key] = self.apply(before, chain[-1])
        return self.memo[key]
