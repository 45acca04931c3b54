"""Per-split counts gathered while writing: rows, label mean, and per field the share
of values at the missing and rare indices."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from model_zoo.data.layout import SPLITS
from model_zoo.schema import MISSING_INDEX, RARE_INDEX, FeatureSchema, Kind


def index_values(table: pa.Table, name: str, kind: Kind) -> np.ndarray:
    column = table[name].combine_chunks()
    if kind == Kind.multi:
        column = column.flatten()
    return column.to_numpy()


@dataclass
class SplitCounts:
    rows: int = 0
    label_sum: float = 0.0
    values: dict[str, int] = field(default_factory=dict)  # per field: values seen (rows, or bag entries)
    missing: dict[str, int] = field(default_factory=dict)
    rare: dict[str, int] = field(default_factory=dict)


class DatasetStats:
    def __init__(self, schema: FeatureSchema) -> None:
        self.schema = schema
        self.splits = {split: SplitCounts() for split in SPLITS}

    def add(self, split: str, table: pa.Table) -> None:
        counts = self.splits[split]
        counts.rows += table.num_rows
        counts.label_sum += float(np.sum(table[self.schema.label].to_numpy(), dtype=np.float64))
        for spec in self.schema.fields:
            indices = index_values(table, spec.name, spec.kind)
            counts.values[spec.name] = counts.values.get(spec.name, 0) + len(indices)
            counts.missing[spec.name] = counts.missing.get(spec.name, 0) + int(np.count_nonzero(indices == MISSING_INDEX))
            counts.rare[spec.name] = counts.rare.get(spec.name, 0) + int(np.count_nonzero(indices == RARE_INDEX))

    def to_dict(self) -> dict[str, object]:
        def rates(which: str) -> dict[str, dict[str, float]]:
            result = {}
            for split, counts in self.splits.items():
                numerators = getattr(counts, which)
                result[split] = {
                    name: numerators.get(name, 0) / counts.values[name] if counts.values.get(name) else 0.0
                    for name in self.schema.names
                }
            return result

        rare, missing = rates("rare"), rates("missing")
        return {
            "rows": {split: c.rows for split, c in self.splits.items()},
            "label_mean": {split: (c.label_sum / c.rows if c.rows else None) for split, c in self.splits.items()},
            "vocab_size": {spec.name: spec.vocab_size for spec in self.schema.fields},
            "mean_rare_rate": {split: _mean(per_field) for split, per_field in rare.items()},
            "mean_missing_rate": {split: _mean(per_field) for split, per_field in missing.items()},
            "rare_rate": rare,
            "missing_rate": missing,
        }


def _mean(per_field: dict[str, float]) -> float:
    return float(np.mean(list(per_field.values()))) if per_field else 0.0
