"""Pass 1: token counts per field over the training rows, kept as arrow tables and
merged with arrow's hash aggregation, so tens of millions of distinct Criteo values
cost tens of bytes each instead of a Python dict entry each."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from model_zoo.data.source import RawField
from model_zoo.vocab import FieldVocabulary, Vocabulary

MIN_MERGE_ROWS = 1 << 20  # merge pending per-chunk counts once they hold this many entries


def flat_tokens(column: pa.Array) -> pa.Array:
    """A field's tokens with multi-valued rows flattened; nulls (missing) kept."""
    return column.flatten() if pa.types.is_list(column.type) else column


class TokenCounter:
    def __init__(self, fields: tuple[RawField, ...]) -> None:
        self.fields = fields
        self._merged: dict[str, pa.Table | None] = {f.name: None for f in fields}
        self._pending: dict[str, list[pa.Table]] = {f.name: [] for f in fields}

    def add(self, tokens: dict[str, pa.Array]) -> None:
        for field in self.fields:
            counts = pc.value_counts(flat_tokens(tokens[field.name]).drop_null())
            table = pa.table({"token": counts.field("values"), "count": counts.field("counts")})
            pending = self._pending[field.name]
            pending.append(table)
            merged = self._merged[field.name]
            # Amortized: merge only when pending counts outgrow what is already merged.
            if sum(len(t) for t in pending) >= max(MIN_MERGE_ROWS, 0 if merged is None else len(merged)):
                self._merge(field.name)

    def counts(self, field: str) -> pa.Table:
        """(token, count) for every token seen, sorted by count descending then token."""
        self._merge(field)
        merged = self._merged[field]
        if merged is None:
            merged = pa.table({"token": pa.array([], pa.string()), "count": pa.array([], pa.int64())})
        return merged.sort_by([("count", "descending"), ("token", "ascending")])

    def vocabulary(self, min_count: int) -> Vocabulary:
        """Tokens seen at least ``min_count`` times, most frequent first (index 2 upwards)."""
        vocabularies = []
        for field in self.fields:
            counts = self.counts(field.name)
            kept = counts.filter(pc.greater_equal(counts["count"], min_count))
            vocabularies.append(FieldVocabulary(field.name, kept["token"].to_pylist(), field.transform))
        return Vocabulary(vocabularies)

    def _merge(self, field: str) -> None:
        pending = self._pending[field]
        if not pending:
            return
        merged = self._merged[field]
        parts = pending if merged is None else [merged, *pending]
        summed = pa.concat_tables(parts).group_by("token").aggregate([("count", "sum")])
        self._merged[field] = pa.table({"token": summed["token"], "count": summed["count_sum"]})
        self._pending[field] = []
