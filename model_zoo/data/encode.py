"""Pass 2: tokens -> per-field indices (0 missing, 1 rare or unseen, 2.. vocabulary)
as an arrow table in the parquet layout of ``layout.py``."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from model_zoo.data.layout import arrow_schema, weights_column
from model_zoo.data.source import RawChunk
from model_zoo.schema import MISSING_INDEX, RARE_INDEX, RESERVED_INDICES, FeatureSchema, Kind
from model_zoo.vocab import Vocabulary


def encode_tokens(tokens: pa.Array, value_set: pa.Array) -> pa.Array:
    """int32 indices of single-valued tokens against a field's vocabulary tokens."""
    positions = pc.index_in(tokens, value_set=value_set)
    indices = pc.fill_null(pc.add(positions, RESERVED_INDICES), RARE_INDEX)
    return pc.cast(pc.if_else(pc.is_null(tokens), MISSING_INDEX, indices), pa.int32())


def bag_columns(values: pa.Array, offsets: np.ndarray) -> tuple[pa.ListArray, pa.ListArray]:
    """List columns of indices and equal weights (1/length: the bag's average)."""
    lengths = np.diff(offsets)
    weights = np.repeat((1.0 / np.maximum(lengths, 1)).astype(np.float32), lengths)
    arrow_offsets = pa.array(offsets.astype(np.int32))
    return (
        pa.ListArray.from_arrays(arrow_offsets, values),
        pa.ListArray.from_arrays(arrow_offsets, pa.array(weights, pa.float32())),
    )


class Encoder:
    def __init__(self, schema: FeatureSchema, vocabulary: Vocabulary) -> None:
        self.schema = schema
        self.arrow_schema = arrow_schema(schema)
        self._value_sets = {
            name: pa.array(vocabulary[name].tokens, pa.string()) for name in schema.names
        }

    def encode(self, chunk: RawChunk) -> pa.Table:
        columns: dict[str, pa.Array] = {}
        for spec in self.schema.fields:
            tokens = chunk.tokens[spec.name]
            value_set = self._value_sets[spec.name]
            if spec.kind == Kind.single:
                columns[spec.name] = encode_tokens(tokens, value_set)
            else:
                offsets = np.asarray(tokens.offsets)
                offsets = offsets - offsets[0]
                values = encode_tokens(tokens.flatten(), value_set)
                columns[spec.name], columns[weights_column(spec.name)] = bag_columns(values, offsets)
        columns[self.schema.label] = pa.array(chunk.label, pa.float32())
        return pa.table(columns, schema=self.arrow_schema)
