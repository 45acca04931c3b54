"""Reusing encoded contexts across requests: a bounded LRU cache of one-row context
states, and the row operations that split and join any model's ``ContextState``.

A state is a frozen dataclass whose tensors have one row per context (nested states
and tuples of tensors included, as in multi-embedding and RaFM states); its other
fields (the field names) are shared by every row.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from typing import Any, TypeVar

import torch
from torch import Tensor

from model_zoo.batch import FeatureBatch
from model_zoo.models.base import ContextState

State = TypeVar("State", bound=ContextState)


def _is_field_names(value: Any) -> bool:
    """A tuple of field names (or empty): shared by every row, never split or joined."""
    return isinstance(value, tuple) and (not value or isinstance(value[0], str))


def _map_rows(value: Any, tensor_op: Callable[[Tensor], Tensor]) -> Any:
    if isinstance(value, Tensor):
        return tensor_op(value)
    if _is_field_names(value):
        return value  # not walked name by name: that was most of state_row's cost
    if isinstance(value, tuple):
        return tuple(_map_rows(v, tensor_op) for v in value)
    if dataclasses.is_dataclass(value):
        return type(value)(**{f.name: _map_rows(getattr(value, f.name), tensor_op) for f in dataclasses.fields(value)})
    return value


def _join(values: Sequence[Any]) -> Any:
    first = values[0]
    if isinstance(first, Tensor):
        return torch.cat(values)
    if _is_field_names(first):
        return first
    if isinstance(first, tuple):
        return tuple(_join([v[i] for v in values]) for i in range(len(first)))
    if dataclasses.is_dataclass(first):
        return type(first)(**{f.name: _join([getattr(v, f.name) for v in values]) for f in dataclasses.fields(first)})
    return first


def state_row(state: State, row: int) -> State:
    """Context ``row`` of ``state`` as a one-row state that owns its memory (a view
    would keep the whole batch's tensors alive in the cache)."""
    return _map_rows(state, lambda t: t[row : row + 1].clone())


def join_states(states: Sequence[State]) -> State:
    """One state whose rows are the rows of ``states`` in order."""
    if not states:
        raise ValueError("nothing to join")
    return states[0] if len(states) == 1 else _join(states)


class ContextCache:
    """LRU cache of encoded contexts for one model (a new model gets a new cache, so
    entries are implicitly keyed by model version)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[Hashable, ContextState] = OrderedDict()
        self.hits = 0
        self.lookups = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def hit_ratio(self) -> float:
        return self.hits / self.lookups if self.lookups else 0.0

    def encode(
        self, encode_context: Callable[[FeatureBatch], ContextState], context: FeatureBatch, keys: Sequence[Hashable]
    ) -> tuple[ContextState, Tensor]:
        """(state, row_of_context): a state holding every distinct context of the batch
        once, and for each context row of ``context`` its row in that state. Only
        contexts neither in the cache nor earlier in the batch are encoded, in one call."""
        distinct: dict[Hashable, int] = {}
        first_rows: list[int] = []
        for row, key in enumerate(keys):
            if key not in distinct:
                distinct[key] = len(distinct)
                first_rows.append(row)
        self.lookups += len(distinct)
        cached: list[ContextState] = []
        order: list[int] = []  # distinct position -> row of the joined state
        missing: list[int] = []  # distinct positions to encode
        for position, key in enumerate(distinct):
            state = self._entries.get(key) if self.capacity else None
            if state is None:
                missing.append(position)
                order.append(-1)
            else:
                self._entries.move_to_end(key)
                order.append(len(cached))
                cached.append(state)
        self.hits += len(cached)
        parts = list(cached)
        if missing:
            fresh = context if len(missing) == len(keys) else context.rows(torch.tensor([first_rows[p] for p in missing]))
            encoded = encode_context(fresh)
            for offset, position in enumerate(missing):
                order[position] = len(cached) + offset
            parts.append(encoded)
            if self.capacity:
                distinct_keys = list(distinct)
                for offset, position in enumerate(missing):
                    self._remember(distinct_keys[position], state_row(encoded, offset))
        state = join_states(parts)
        order_tensor = torch.tensor(order, dtype=torch.int64)
        row_of_context = order_tensor[torch.tensor([distinct[k] for k in keys], dtype=torch.int64)]
        return state, row_of_context

    def _remember(self, key: Hashable, state: ContextState) -> None:
        self._entries[key] = state
        if len(self._entries) > self.capacity:
            self._entries.popitem(last=False)
