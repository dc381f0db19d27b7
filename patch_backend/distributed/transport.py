"""The collectives of a sharded sweep: the counted channel, step 3's hand-over and step 4's
exchange of statuses and rows as raw bytes (headers of fixed size, rows padded to an agreed room),
and step 5's delivery of every rank's rows in the caller's order."""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from .failures import DistributedSweepError, RankFailure
from .planning import ShardPlan


#: Every dtype a metric's rows may have, by position (the same table on every rank: one torch).
_DTYPES: Tuple[torch.dtype, ...] = tuple(
    getattr(torch, name)
    for name in (
        "float32", "float64", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool",
        "complex64", "complex128", "uint16", "uint32", "uint64",
    )
    if isinstance(getattr(torch, name, None), torch.dtype)
)


#: Dimensions of a cell's metric rows that a header carries; more travel pickled (``_Header.PICKLED``).
_MAX_DIMS = 8


@dataclass(frozen=True)
class _Header:
    """Step 4's message in front of a rank's rows: its shard finished (how many rows, each
    cell's shape and dtype, how many bytes they take) or failed. Fixed size, so the headers and
    the rows of every rank travel in one ``all_gather`` of bytes."""

    #: ``dtype`` of a rank whose rows cannot travel as raw bytes (more than ``_MAX_DIMS``
    #: dimensions, a dtype outside ``_DTYPES``): every rank's rows then travel pickled.
    PICKLED = -2

    failed: int
    rows: int
    #: Whether this rank's one-cell check found that batching changes rows (its shard then
    #: ran one forward per cell): every other rank redoes its shard so too.
    cell_by_cell: int
    #: Index in ``_DTYPES``; -1: no rows; ``PICKLED``.
    dtype: int
    nbytes: int
    ndim: int
    dims: Tuple[int, ...] = (0,) * _MAX_DIMS

    def encode(self) -> List[int]:
        return [self.failed, self.rows, self.cell_by_cell, self.dtype, self.nbytes, self.ndim, *self.dims]

    @classmethod
    def decode(cls, row: Sequence[int]) -> "_Header":
        failed, rows, cell_by_cell, dtype, nbytes, ndim, *dims = (int(value) for value in row)
        return cls(failed, rows, cell_by_cell, dtype, nbytes, ndim, tuple(dims))

    @property
    def shape(self) -> Tuple[int, ...]:
        """Each cell's shape (the rows' shape without the leading cell dimension)."""
        return tuple(self.dims[: self.ndim])


#: Bytes of a header: int64 fields, a multiple of 16 so that the rows behind it can be viewed
#: as any dtype (a view needs its offset aligned to the element size).
_HEADER_BYTES = 8 * (6 + _MAX_DIMS)


#: The most bytes per rank that step 4's one exchange reserves for rows it has not seen yet
#: (``_result_bytes``). Rows larger than that, or larger than reserved, are sent in a second
#: exchange at their exact size, so a sweep pays one collective for its results when they are
#: small (each costs a wake-up of every rank, on a loaded machine milliseconds) and never pads
#: large ones.
INLINE_RESULT_BYTES = 1 << 22


#: Bytes per cell of the last sharded sweep's rows (every rank learns the same from step 4's
#: headers): what the next sweep reserves for its rows, expecting the same metric.
_LEARNED_RESULT_BYTES: Dict[str, int] = {}


def _communication_device() -> torch.device:
    """Tensors of a collective live where the backend wants them: CUDA for NCCL-only groups."""
    backend = str(dist.get_backend())
    if "gloo" not in backend and "nccl" in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _input_device(inputs: Any) -> torch.device:
    values = inputs.values() if isinstance(inputs, Mapping) else inputs
    for value in values:
        if isinstance(value, torch.Tensor):
            return value.device
    return torch.device("cpu")


class _Channel:
    """The default group's collectives as one sharded sweep uses them, counted for ``Timings``
    (a steady sweep makes two: step 2's and step 4's ``all_gather``; ``all_gather_object`` and
    ``broadcast_object_list`` are two each, sizes then pickles)."""

    def __init__(self, rank: int, world: int) -> None:
        self.rank, self.world = rank, world
        self.device = _communication_device()
        self.collectives = 0
        self.pickled_bytes = 0
        self.sent_bytes = 0

    def gather(self, tensor: torch.Tensor) -> List[torch.Tensor]:
        """Every rank's ``tensor`` (the same shape and dtype on every rank), in rank order."""
        received = [torch.empty_like(tensor) for _ in range(self.world)]
        dist.all_gather(received, tensor)
        self.collectives += 1
        self.sent_bytes += tensor.numel() * tensor.element_size()
        return received

    def gather_objects(self, item: Any) -> List[Any]:
        """Every rank's ``item``, pickled: only where objects must travel (failures, rows that
        cannot travel as bytes)."""
        everyone: List[Any] = [None] * self.world
        dist.all_gather_object(everyone, item)
        self.collectives += 2
        self.pickled_bytes += len(pickle.dumps(item))
        return everyone

    def broadcast_object(self, item: Any, source: int) -> Any:
        """``source``'s ``item`` on every rank."""
        message: List[Any] = [item]
        dist.broadcast_object_list(message, src=source)
        self.collectives += 2
        if self.rank == source:
            self.pickled_bytes += len(pickle.dumps(item))
        return message[0]


@dataclass(frozen=True)
class _Exchange:
    """Step 4's outcome on one rank: every rank's header, and its rows as raw bytes (or, where
    some rank's rows could not travel as bytes, every rank's rows as tensors, pickled)."""

    headers: Tuple[_Header, ...]
    payloads: Tuple[Optional[torch.Tensor], ...]
    pickled: Optional[Tuple[Optional[torch.Tensor], ...]] = None


def _exchange_rows(
    channel: _Channel, rows: int, values: Optional[torch.Tensor], failure: Optional[RankFailure], cell_by_cell: bool,
    room: int,
) -> _Exchange:
    """Step 4 (and 5): every rank's status and rows, on every rank, in one ``all_gather`` of
    bytes: a fixed-size ``_Header`` followed by the rows, padded to ``room`` bytes (agreed in
    step 2). Rows that do not fit travel in a second ``all_gather`` at the exact size of the
    largest; rows that cannot travel as bytes, pickled. A failed rank sends its header only;
    its report travels afterwards (``_delivered``), when every rank knows that one failed."""
    header = _Header(int(failure is not None), rows, int(cell_by_cell), -1, 0, 0)
    data: Optional[torch.Tensor] = None
    if failure is None and values is not None:
        shape = tuple(values.shape[1:])
        try:
            if values.dtype not in _DTYPES or len(shape) > _MAX_DIMS:
                raise TypeError(values.dtype)
            data = values.detach().to(channel.device).contiguous().view(-1).view(torch.uint8)
            dims = shape + (0,) * (_MAX_DIMS - len(shape))
            header = _Header(0, rows, int(cell_by_cell), _DTYPES.index(values.dtype), data.numel(), len(shape), dims)
        except (TypeError, RuntimeError):
            data = None  # e.g. a dtype without a byte view: every rank's rows travel pickled
            header = _Header(0, rows, int(cell_by_cell), _Header.PICKLED, 0, len(shape))
    fits = data is not None and data.numel() <= room
    buffer = torch.zeros(_HEADER_BYTES + room, dtype=torch.uint8, device=channel.device)
    buffer[:_HEADER_BYTES] = torch.tensor(header.encode(), dtype=torch.int64, device=channel.device).view(torch.uint8)
    if fits and data is not None:
        buffer[_HEADER_BYTES : _HEADER_BYTES + data.numel()] = data
    received = channel.gather(buffer)
    headers = tuple(_Header.decode(tensor[:_HEADER_BYTES].view(torch.int64).tolist()) for tensor in received)
    if any(h.failed for h in headers):
        return _Exchange(headers, (None,) * len(headers))
    if any(h.dtype == _Header.PICKLED for h in headers):
        sent = None if values is None else values.detach().cpu()
        return _Exchange(headers, (None,) * len(headers), tuple(channel.gather_objects(sent)))
    largest = max(h.nbytes for h in headers)
    if largest <= room:
        payloads = tuple(tensor[_HEADER_BYTES : _HEADER_BYTES + h.nbytes] for tensor, h in zip(received, headers))
    else:
        # Some rank's rows did not fit the room reserved for them: every rank sends its rows
        # again, at the exact size of the largest (the headers already told everyone).
        again = torch.zeros(largest, dtype=torch.uint8, device=channel.device)
        if data is not None:
            again[: data.numel()] = data
        payloads = tuple(tensor[: h.nbytes] for tensor, h in zip(channel.gather(again), headers))
    # What the next sweep reserves per cell (every rank learns the same from the headers).
    _LEARNED_RESULT_BYTES["last"] = max((-(-h.nbytes // h.rows) for h in headers if h.rows), default=0)
    return _Exchange(headers, payloads)


def _delivered(
    channel: _Channel, exchange: _Exchange, failure: Optional[RankFailure], values: Optional[torch.Tensor],
    plan: ShardPlan, inputs: Any, world: int,
) -> torch.Tensor:
    """Step 5: every rank's rows in the caller's cell order, once every rank reported success
    (else every rank raises, with the failing ranks' reports), from step 4's bytes."""
    headers = exchange.headers
    if any(h.failed for h in headers):
        reports = channel.gather_objects(failure)
        raise DistributedSweepError([report for report in reports if report is not None], world)
    sent = [rank for rank, h in enumerate(headers) if h.rows]
    if exchange.pickled is not None:
        kinds = {(tuple(rows.shape[1:]), rows.dtype) for rank in sent if (rows := exchange.pickled[rank]) is not None}
    else:
        kinds = {(headers[rank].shape, _DTYPES[headers[rank].dtype]) for rank in sent if headers[rank].dtype >= 0}
    if len(kinds) != 1 or any(exchange.pickled is None and headers[rank].dtype < 0 for rank in sent):
        raise ValueError(
            f"pb.sweep on {world} ranks: ranks' metrics returned different shapes or dtypes per cell "
            f"({sorted(str(kind) for kind in kinds)}); the metric must give every cell the same shape"
        )
    (shape, dtype), = kinds
    device = _input_device(inputs) if values is None else values.device
    parts: List[torch.Tensor] = []
    for rank in sent:
        if exchange.pickled is not None:
            rows = exchange.pickled[rank]
            assert rows is not None
            parts.append(rows)
        else:
            payload = exchange.payloads[rank]
            assert payload is not None
            parts.append(payload.view(dtype).reshape(headers[rank].rows, *shape))
    result = (parts[0] if len(parts) == 1 else torch.cat(parts)).to(device=device, dtype=dtype)
    return plan.restore(result)


def _hand_over(channel: _Channel, sharing: str, leader: int, ok: bool) -> Any:
    """One exchange after the leader's first chunk: False when it failed, else True or,
    broadcasting, its compiled artifacts as bytes (True when torch has none to give or cannot
    serialize them: the others then compile for themselves, slower but never wrong)."""
    payload: Any = None
    if channel.rank == leader:
        payload = ok
        if ok and sharing == "broadcast":
            try:
                saved = torch.compiler.save_cache_artifacts()
            except Exception:
                saved = None
            payload = saved[0] if saved is not None else True
    return channel.broadcast_object(payload, leader)


def _expected_result_bytes(batch: int) -> int:
    """Bytes per cell this rank expects a cell's rows to take (step 2's ``result_bytes``): the
    last sharded sweep's, which likely had the same metric, else 4 bytes per row of the batch."""
    return _LEARNED_RESULT_BYTES.get("last", 4 * max(1, batch))


def _inline_room(result_bytes: int, longest: int) -> int:
    """Bytes each rank reserves for its rows in step 4's one exchange (the same on every rank:
    agreed inputs); 0 beyond ``INLINE_RESULT_BYTES``, where rows travel in a second exchange."""
    room = result_bytes * longest
    return room if room <= INLINE_RESULT_BYTES else 0
