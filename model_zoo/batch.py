"""The one batch type every model takes.

A batch covers a subset of the schema's fields (all of them for training, the
context fields for ``encode_context``, the item fields for ``score_items``).
Single-valued fields sit together in one index matrix (one gather for all of
them); each multi-valued field is a padded bag of values with weights, where a
weight of 0 marks padding. Indices are per-field local indices (see schema.py),
int32 as the prepared parquet stores them (no widening pass per batch; embedding
lookups take int32), other integer input as int64.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import Tensor

from model_zoo.schema import Kind, FeatureSchema


@dataclass(frozen=True)
class Bag:
    """A multi-valued field: ``values`` (B, L) int32 or int64 and ``weights`` (B, L) float32."""

    values: Tensor
    weights: Tensor

    def rows(self, index: Tensor) -> "Bag":
        return Bag(self.values[index], self.weights[index])

    def padded(self, length: int) -> "Bag":
        extra = length - self.values.shape[1]
        if extra <= 0:
            return self
        return Bag(
            torch.nn.functional.pad(self.values, (0, extra)),
            torch.nn.functional.pad(self.weights, (0, extra)),
        )


@dataclass(frozen=True)
class FeatureBatch:
    fields: tuple[str, ...]  # covered fields in schema order
    single_fields: tuple[str, ...]  # the single-valued ones, in order, = columns of `single`
    single: Tensor  # (B, len(single_fields)) int32 or int64
    bag_fields: tuple[str, ...]  # the multi-valued ones, in order
    bags: tuple[Bag, ...]
    label: Tensor | None = None  # (B,) float32

    def __len__(self) -> int:
        if self.single_fields:
            return int(self.single.shape[0])
        if self.bags:
            return int(self.bags[0].values.shape[0])
        return int(self.single.shape[0])

    # -- construction ----------------------------------------------------------
    @classmethod
    def from_columns(
        cls,
        schema: FeatureSchema,
        columns: Mapping[str, object],
        label: Sequence[float] | np.ndarray | Tensor | None = None,
        check: bool = True,
    ) -> "FeatureBatch":
        """Build from per-field columns (``check``: the indices' ranges, see ``check``).

        A single-valued column is a sequence of ints. A multi-valued column is either
        a pair ``(values, weights)`` of equal-shape 2-D arrays (weight 0 = padding) or a
        sequence of per-row lists of ints (equal weights).
        """
        fields = schema.ordered(list(columns))
        single_fields = tuple(n for n in fields if schema.field(n).kind == Kind.single)
        bag_fields = tuple(n for n in fields if schema.field(n).kind == Kind.multi)
        single_columns = [np.asarray(columns[name]).reshape(-1) for name in single_fields]
        bags = tuple(_bag_from_column(columns[name]) for name in bag_fields)
        rows = len(single_columns[0]) if single_columns else bags[0].values.shape[0] if bags else 0
        single = (
            index_tensor(np.stack(single_columns, axis=1))  # one copy; mixed types stack as int64
            if single_columns
            else torch.zeros((rows, 0), dtype=torch.int64)
        )
        for name, bag in zip(bag_fields, bags):
            if bag.values.shape[0] != rows:
                raise ValueError(f"field {name!r} has {bag.values.shape[0]} rows, expected {rows}")
        batch = cls(fields, single_fields, single, bag_fields, bags, None)
        if label is not None:
            batch = batch.with_label(label)
        if check:
            batch.check(schema)
        return batch

    def with_label(self, label: Sequence[float] | np.ndarray | Tensor) -> "FeatureBatch":
        label_tensor = torch.as_tensor(np.asarray(label), dtype=torch.float32).reshape(-1)
        if label_tensor.shape[0] != len(self):
            raise ValueError(f"label has {label_tensor.shape[0]} rows, batch has {len(self)}")
        return replace(self, label=label_tensor)

    def check(self, schema: FeatureSchema) -> None:
        """Raise ValueError if any index is outside its field's vocabulary."""
        for column, name in enumerate(self.single_fields):
            _check_range(name, self.single[:, column], schema.field(name).vocab_size)
        for name, bag in zip(self.bag_fields, self.bags):
            _check_range(name, bag.values, schema.field(name).vocab_size)
            if bool((bag.weights < 0).any()) or not bool(torch.isfinite(bag.weights).all()):
                raise ValueError(f"field {name!r} has negative or non-finite weights")

    # -- views -----------------------------------------------------------------
    def select(self, schema: FeatureSchema, names: Sequence[str]) -> "FeatureBatch":
        """The same rows restricted to ``names``."""
        fields = schema.ordered(list(names))
        missing = sorted(set(fields) - set(self.fields))
        if missing:
            raise KeyError(f"batch lacks fields {missing}")
        single_fields = tuple(n for n in self.single_fields if n in fields)
        columns = [self.single_fields.index(n) for n in single_fields]
        bag_fields = tuple(n for n in self.bag_fields if n in fields)
        bags = tuple(self.bags[self.bag_fields.index(n)] for n in bag_fields)
        return FeatureBatch(
            fields, single_fields, self.single[:, columns], bag_fields, bags, self.label
        )

    def rows(self, index: Tensor | slice) -> "FeatureBatch":
        if isinstance(index, slice):
            index = torch.arange(len(self))[index]
        return FeatureBatch(
            self.fields,
            self.single_fields,
            self.single[index],
            self.bag_fields,
            tuple(bag.rows(index) for bag in self.bags),
            None if self.label is None else self.label[index],
        )

    def to(self, device: torch.device | str) -> "FeatureBatch":
        return FeatureBatch(
            self.fields,
            self.single_fields,
            self.single.to(device, non_blocking=True),
            self.bag_fields,
            tuple(Bag(b.values.to(device), b.weights.to(device)) for b in self.bags),
            None if self.label is None else self.label.to(device),
        )


def join_context_items(
    schema: FeatureSchema,
    context: FeatureBatch,
    items: FeatureBatch,
    context_index: Tensor | None = None,
) -> FeatureBatch:
    """Full rows: item row n joined with context row ``context_index[n]`` (default 0).

    This is what ``score_items`` must equal when fed to the full forward.
    """
    if context_index is None:
        context_index = torch.zeros(len(items), dtype=torch.int64)
    overlap = set(context.fields) & set(items.fields)
    if overlap:
        raise ValueError(f"fields on both sides: {sorted(overlap)}")
    repeated = context.rows(context_index)
    fields = schema.ordered(list(context.fields) + list(items.fields))
    single_fields = tuple(n for n in fields if n in repeated.single_fields or n in items.single_fields)
    single_parts = {
        **{n: repeated.single[:, i] for i, n in enumerate(repeated.single_fields)},
        **{n: items.single[:, i] for i, n in enumerate(items.single_fields)},
    }
    single = (
        torch.stack([single_parts[n] for n in single_fields], dim=1)
        if single_fields
        else torch.zeros((len(items), 0), dtype=torch.int64)
    )
    bag_parts = {
        **dict(zip(repeated.bag_fields, repeated.bags)),
        **dict(zip(items.bag_fields, items.bags)),
    }
    bag_fields = tuple(n for n in fields if n in bag_parts)
    return FeatureBatch(
        fields, single_fields, single, bag_fields, tuple(bag_parts[n] for n in bag_fields), items.label
    )


def concat_batches(batches: Sequence[FeatureBatch]) -> FeatureBatch:
    """Stack batches over the same fields row-wise (bags padded to a common length)."""
    first = batches[0]
    if any(b.fields != first.fields for b in batches):
        raise ValueError("batches cover different fields")
    bags = []
    for position in range(len(first.bags)):
        parts = [b.bags[position] for b in batches]
        length = max(p.values.shape[1] for p in parts)
        parts = [p.padded(length) for p in parts]
        bags.append(Bag(torch.cat([p.values for p in parts]), torch.cat([p.weights for p in parts])))
    labels = [b.label for b in batches]
    label = torch.cat(labels) if all(lab is not None for lab in labels) else None
    return FeatureBatch(
        first.fields,
        first.single_fields,
        torch.cat([b.single for b in batches]),
        first.bag_fields,
        tuple(bags),
        label,
    )


def _bag_from_column(column: object) -> Bag:
    if isinstance(column, tuple) and len(column) == 2:
        values = index_tensor(column[0])
        weights = torch.as_tensor(np.asarray(column[1]), dtype=torch.float32)
        if values.ndim != 2 or values.shape != weights.shape:
            raise ValueError("a bag column needs 2-D values and weights of equal shape")
        return Bag(values, weights)
    lists = [list(row) for row in column]  # type: ignore[union-attr]
    length = max([len(row) for row in lists] + [1])
    values = np.zeros((len(lists), length), dtype=np.int64)
    weights = np.zeros((len(lists), length), dtype=np.float32)
    for r, row in enumerate(lists):
        values[r, : len(row)] = row
        weights[r, : len(row)] = 1.0
    return Bag(torch.from_numpy(values), torch.from_numpy(weights))


def index_tensor(column: object) -> Tensor:
    """Indices as a tensor: int32 kept (the parquet layout's type), any other integers as int64."""
    array = np.asarray(column)
    return torch.from_numpy(array) if array.dtype == np.int32 else torch.as_tensor(array, dtype=torch.int64)


def _check_range(name: str, values: Tensor, vocab_size: int) -> None:
    if values.numel() and (int(values.min()) < 0 or int(values.max()) >= vocab_size):
        raise ValueError(
            f"field {name!r} has indices outside [0, {vocab_size}): "
            f"min {int(values.min())}, max {int(values.max())}"
        )
