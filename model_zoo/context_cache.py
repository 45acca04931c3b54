"""Reusing encoded contexts across requests: a bounded LRU cache of context states.

A state is a frozen dataclass whose tensors have one row per context (nested states
and tuples of tensors included, as in multi-embedding and RaFM states); its other
fields (the field names) are shared by every row. The cache keeps each of those
tensors' rows in one preallocated tensor of ``capacity`` rows (a slot per context):
a batch's cached contexts are one gather per tensor and its new ones one write, with
no tensor or state object per entry for Python or its garbage collector to walk.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from typing import Any, TypeVar

import numpy as np
import torch
from torch import Tensor

from model_zoo.batch import FeatureBatch
from model_zoo.models.base import ContextState

State = TypeVar("State", bound=ContextState)


def _is_field_names(value: Any) -> bool:
    """A tuple of field names (or empty): shared by every row, never split or joined."""
    return isinstance(value, tuple) and (not value or isinstance(value[0], str))


def _map_tensors(value: Any, tensor_op: Callable[[Tensor], Tensor]) -> Any:
    """``value`` with each of its row tensors replaced by ``tensor_op`` of it, in one fixed order."""
    if isinstance(value, Tensor):
        return tensor_op(value)
    if _is_field_names(value):
        return value  # not walked name by name
    if isinstance(value, tuple):
        return tuple(_map_tensors(v, tensor_op) for v in value)
    if dataclasses.is_dataclass(value):
        return type(value)(**{f.name: _map_tensors(getattr(value, f.name), tensor_op) for f in dataclasses.fields(value)})
    return value


def _tensors(state: ContextState) -> list[Tensor]:
    """The row tensors of ``state``, in ``_map_tensors`` order."""
    found: list[Tensor] = []
    _map_tensors(state, lambda t: found.append(t) or t)
    return found


def _with_tensors(template: State, tensors: Sequence[Tensor]) -> State:
    """``template``'s structure holding ``tensors`` (in ``_map_tensors`` order)."""
    remaining = iter(tensors)
    return _map_tensors(template, lambda _: next(remaining))


class ContextCache:
    """LRU cache of encoded contexts for one model (a new model gets a new cache, so
    entries are implicitly keyed by model version)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._slots: OrderedDict[Hashable, int] = OrderedDict()  # key -> its row in the store, least recent first
        self._store: list[Tensor] = []  # per row tensor of a state: (capacity, ...), allocated on the first encode
        self._template: ContextState | None = None  # a state's structure, to rebuild states around gathered rows
        self.hits = 0
        self.lookups = 0

    def __len__(self) -> int:
        return len(self._slots)

    @property
    def hit_ratio(self) -> float:
        return self.hits / self.lookups if self.lookups else 0.0

    def encode(
        self, encode_context: Callable[[FeatureBatch], ContextState], context: FeatureBatch, keys: Sequence[Hashable]
    ) -> tuple[ContextState, Tensor]:
        """(state, row_of_context): a state holding every distinct context of the batch
        once (the cached ones first), and for each context row of ``context`` its row in
        that state. Only contexts neither in the cache nor earlier in the batch are
        encoded, in one call."""
        distinct: dict[Hashable, int] = {}
        first_rows: list[int] = []
        for row, key in enumerate(keys):
            if key not in distinct:
                distinct[key] = len(distinct)
                first_rows.append(row)
        if not distinct:
            raise ValueError("no contexts to encode")
        self.lookups += len(distinct)
        hit_slots: list[int] = []
        order = np.empty(len(distinct), dtype=np.int64)  # distinct position -> row of the state
        missing: list[int] = []  # distinct positions to encode
        for position, key in enumerate(distinct):
            slot = self._slots.get(key) if self.capacity else None
            if slot is None:
                missing.append(position)
            else:
                self._slots.move_to_end(key)
                order[position] = len(hit_slots)
                hit_slots.append(slot)
        self.hits += len(hit_slots)
        cached = None
        if hit_slots:
            index = torch.tensor(hit_slots, dtype=torch.int64, device=self._store[0].device)
            cached = [stored.index_select(0, index) for stored in self._store]
        if missing:
            fresh = context if len(missing) == len(keys) else context.rows(torch.tensor([first_rows[p] for p in missing]))
            encoded = encode_context(fresh)
            order[missing] = np.arange(len(hit_slots), len(hit_slots) + len(missing))
            tensors = _tensors(encoded)
            state = encoded if cached is None else _with_tensors(encoded, [torch.cat(pair) for pair in zip(cached, tensors)])
            if self.capacity:
                distinct_keys = list(distinct)
                self._remember([distinct_keys[p] for p in missing], encoded, tensors)
        else:
            state = _with_tensors(self._template, cached)
        row_of_context = torch.from_numpy(order[np.fromiter(map(distinct.__getitem__, keys), dtype=np.int64, count=len(keys))])
        return state, row_of_context

    def _remember(self, keys: list[Hashable], encoded: ContextState, tensors: list[Tensor]) -> None:
        """Store row n of ``encoded`` as ``keys[n]``, evicting the least recently used
        entries when full (after the batch's cached rows were gathered)."""
        if not self._store:
            with torch.inference_mode(False):  # written to in and out of inference mode
                self._store = [t.new_empty((self.capacity, *t.shape[1:])) for t in tensors]
            self._template = encoded  # its structure and shared fields; its rows are never read
        rows: dict[int, int] = {}  # slot -> row of encoded; a slot reused within the batch keeps the later row
        for row, key in enumerate(keys):
            if len(self._slots) < self.capacity:
                slot = len(self._slots)
            else:
                _, slot = self._slots.popitem(last=False)
            self._slots[key] = slot
            rows[slot] = row
        device = self._store[0].device
        slots = torch.tensor(list(rows), dtype=torch.int64, device=device)
        source = torch.tensor(list(rows.values()), dtype=torch.int64, device=device)
        for stored, tensor in zip(self._store, tensors):
            stored.index_copy_(0, slots, tensor.index_select(0, source))
