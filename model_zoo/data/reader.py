"""Prepared parquet back to ``FeatureBatch``: from an arrow table, from a dict of numpy
arrays (what Ray Data hands a ``map_batches`` function), batch by batch over a split
(optionally shuffled with a bounded buffer), or a whole small split at once."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from model_zoo.batch import FeatureBatch
from model_zoo.data.layout import SPLITS, columns_for, load_schema, split_files, weights_column
from model_zoo.schema import FeatureSchema, Kind

DEFAULT_SHUFFLE_BUFFER_ROWS = 1 << 18


def batch_from_table(
    schema: FeatureSchema, table: pa.Table | pa.RecordBatch, fields: Sequence[str] | None = None, *, checked: bool = False
) -> FeatureBatch:
    """The rows of ``table`` (in the prepared layout) over ``fields`` (default: every
    schema field); the label is attached when the table has it. ``checked``: the rows
    come from a dataset whose index ranges ``check_index_ranges`` has passed (no
    per-batch range check)."""
    names = schema.ordered(list(fields if fields is not None else schema.names))
    columns: dict[str, object] = {}
    for name in names:
        if schema.field(name).kind == Kind.single:
            columns[name] = _column(table, name).to_numpy()  # int32 as stored
        else:
            values = _column(table, name)
            weights = _column(table, weights_column(name))
            columns[name] = (_padded(values), _padded(weights, np.float32))
    label = _column(table, schema.label).to_numpy().astype(np.float32) if schema.label in table.column_names else None
    return FeatureBatch.from_columns(schema, columns, label, check=not checked)


def check_index_ranges(directory: str | Path, schema: FeatureSchema) -> None:
    """Every split's indices inside their fields' vocabularies, from the parquet footers'
    row-group min/max (what the writer recorded; no row is read): once per dataset,
    where the training loop then skips the per-batch check."""
    for split in SPLITS:
        for path in split_files(directory, split):
            metadata = pq.ParquetFile(path).metadata
            leaf_field = {metadata.schema.column(i).path.split(".")[0]: i for i in range(metadata.num_columns)}
            for spec in schema.fields:
                if spec.name not in leaf_field:
                    raise ValueError(f"{path} lacks the column {spec.name!r}")
                for group in range(metadata.num_row_groups):
                    column = metadata.row_group(group).column(leaf_field[spec.name])
                    stats = column.statistics
                    if column.num_values == 0:
                        continue
                    if stats is None or not stats.has_min_max:
                        raise ValueError(f"{path}: no min/max statistics for {spec.name!r} (written without statistics)")
                    if stats.min < 0 or stats.max >= spec.vocab_size:
                        raise ValueError(
                            f"{path}: field {spec.name!r} has indices outside [0, {spec.vocab_size}): "
                            f"min {stats.min}, max {stats.max}"
                        )


def batch_from_numpy(
    schema: FeatureSchema, data: Mapping[str, np.ndarray], fields: Sequence[str] | None = None
) -> FeatureBatch:
    """Like ``batch_from_table`` for a dict of numpy arrays: a list column arrives as a
    2-D array (equal lengths) or an object array of 1-D arrays."""
    names = schema.ordered(list(fields if fields is not None else schema.names))
    columns: dict[str, object] = {}
    for name in names:
        if schema.field(name).kind == Kind.single:
            columns[name] = np.asarray(data[name])
        else:
            values = _padded_rows(data[name])
            weights = _padded_rows(data[weights_column(name)], np.float32)
            columns[name] = (values, weights)
    label = data.get(schema.label)
    return FeatureBatch.from_columns(schema, columns, None if label is None else np.asarray(label))


def iter_tables(
    directory: str | Path,
    split: str,
    batch_size: int,
    *,
    columns: Sequence[str] | None = None,
    shuffle: bool = False,
    seed: int = 0,
    drop_last: bool = False,
    shuffle_buffer_rows: int = DEFAULT_SHUFFLE_BUFFER_ROWS,
) -> Iterator[pa.Table]:
    """Tables of ``batch_size`` rows over a split's files. With ``shuffle``, row groups
    come in a seeded random order and rows are permuted within a buffer of about
    ``shuffle_buffer_rows`` rows, so memory stays bounded on any split size."""
    if batch_size < 1:
        raise ValueError("batch_size must be positive")
    rng = np.random.default_rng(seed)
    files = {path: pq.ParquetFile(path) for path in split_files(directory, split)}
    units = [(path, group) for path, handle in files.items() for group in range(handle.num_row_groups)]
    if shuffle:
        units = [units[i] for i in rng.permutation(len(units))]
    target = max(batch_size, shuffle_buffer_rows) if shuffle else batch_size
    pending: list[pa.Table] = []
    pending_rows = 0
    for path, group in units:
        table = files[path].read_row_group(group, columns=list(columns) if columns is not None else None)
        pending.append(table)
        pending_rows += table.num_rows
        if pending_rows >= target:
            buffer = _combined(pending, rng if shuffle else None)
            full = buffer.num_rows - buffer.num_rows % batch_size
            yield from (buffer.slice(start, batch_size) for start in range(0, full, batch_size))
            pending = [buffer.slice(full)]
            pending_rows = buffer.num_rows - full
    if pending_rows:
        buffer = _combined(pending, rng if shuffle else None)
        for start in range(0, buffer.num_rows, batch_size):
            part = buffer.slice(start, batch_size)
            if part.num_rows == batch_size or not drop_last:
                yield part


def iter_batches(
    directory: str | Path,
    split: str,
    batch_size: int,
    *,
    fields: Sequence[str] | None = None,
    shuffle: bool = False,
    seed: int = 0,
    drop_last: bool = False,
    shuffle_buffer_rows: int = DEFAULT_SHUFFLE_BUFFER_ROWS,
) -> Iterator[FeatureBatch]:
    """``FeatureBatch``es of a prepared split (see ``iter_tables``)."""
    schema = load_schema(directory)
    names = tuple(fields if fields is not None else schema.names)
    for table in iter_tables(
        directory, split, batch_size, columns=columns_for(schema, names), shuffle=shuffle, seed=seed,
        drop_last=drop_last, shuffle_buffer_rows=shuffle_buffer_rows,
    ):  # fmt: skip
        yield batch_from_table(schema, table, names)


def load_split(directory: str | Path, split: str, fields: Sequence[str] | None = None) -> FeatureBatch:
    """A whole split as one batch (for data that fits in memory)."""
    schema = load_schema(directory)
    names = tuple(fields if fields is not None else schema.names)
    columns = columns_for(schema, names)
    table = pa.concat_tables(pq.read_table(path, columns=columns) for path in split_files(directory, split))
    return batch_from_table(schema, table, names)


def _combined(tables: list[pa.Table], rng: np.random.Generator | None) -> pa.Table:
    table = pa.concat_tables(tables).combine_chunks()
    return table if rng is None else table.take(pa.array(rng.permutation(table.num_rows)))


def _column(table: pa.Table | pa.RecordBatch, name: str) -> pa.Array:
    column = table.column(name)
    return column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column


def _padded(column: pa.Array, dtype: type | None = None) -> np.ndarray:
    """A list column as a (rows, longest) array, zero-padded (default: the values' type)."""
    offsets = np.asarray(column.offsets)
    values = column.flatten().to_numpy()
    return _pad(values, offsets, values.dtype if dtype is None else dtype)


def _padded_rows(column: np.ndarray, dtype: type | None = None) -> np.ndarray:
    """Like ``_padded`` for a 2-D or object array of rows."""
    column = np.asarray(column)
    if column.dtype != object:
        return column.astype(dtype or column.dtype).reshape(len(column), -1)
    lengths = np.array([len(row) for row in column], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    values = np.concatenate([np.asarray(row) for row in column]) if len(column) else np.zeros(0, np.int64)
    return _pad(values, offsets, values.dtype if dtype is None else dtype)


def _pad(values: np.ndarray, offsets: np.ndarray, dtype: type) -> np.ndarray:
    offsets = offsets - offsets[0]
    lengths = np.diff(offsets)
    rows = len(lengths)
    padded = np.zeros((rows, max(int(lengths.max(initial=0)), 1)), dtype=dtype)
    row_of_value = np.repeat(np.arange(rows), lengths)
    position = np.arange(len(values)) - np.repeat(offsets[:-1], lengths)
    padded[row_of_value, position] = values
    return padded
