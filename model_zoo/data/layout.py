"""Where a prepared dataset keeps what, and the parquet columns a schema maps to.

DIR/schema.json, DIR/vocab/<field>.json, DIR/stats.json and DIR/<split>/part-NNNNN.parquet
with one int32 column per single-valued field, a list<int32> column plus a
list<float32> ``<field>__weights`` column per multi-valued field, and the float32 label.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from model_zoo.schema import FeatureSchema, Kind

SPLITS = ("train", "valid", "test")
SCHEMA_FILE = "schema.json"
VOCAB_DIR = "vocab"
STATS_FILE = "stats.json"
WEIGHTS_SUFFIX = "__weights"


def weights_column(field: str) -> str:
    """The parquet column holding a multi-valued field's per-value weights."""
    return field + WEIGHTS_SUFFIX


def arrow_schema(schema: FeatureSchema) -> pa.Schema:
    columns = []
    for spec in schema.fields:
        if spec.kind == Kind.single:
            columns.append(pa.field(spec.name, pa.int32(), nullable=False))
        else:
            columns.append(pa.field(spec.name, pa.list_(pa.int32()), nullable=False))
            columns.append(pa.field(weights_column(spec.name), pa.list_(pa.float32()), nullable=False))
    columns.append(pa.field(schema.label, pa.float32(), nullable=False))
    names = [c.name for c in columns]
    clashes = sorted({n for n in names if names.count(n) > 1})
    if clashes:
        raise ValueError(f"parquet column names clash: {clashes}")
    return pa.schema(columns)


def columns_for(schema: FeatureSchema, fields: tuple[str, ...] | list[str]) -> list[str]:
    """The parquet columns that hold ``fields`` (in schema order) and the label."""
    columns = []
    for name in schema.ordered(list(fields)):
        columns.append(name)
        if schema.field(name).kind == Kind.multi:
            columns.append(weights_column(name))
    return columns + [schema.label]


def split_dir(directory: str | Path, split: str) -> Path:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    return Path(directory) / split


def split_files(directory: str | Path, split: str) -> list[Path]:
    """A split's parquet files in write order; an error when the split is absent."""
    folder = split_dir(directory, split)
    files = sorted(folder.glob("part-*.parquet"))
    if not files:
        raise FileNotFoundError(f"no parquet files in {folder}")
    return files


def load_schema(directory: str | Path) -> FeatureSchema:
    path = Path(directory) / SCHEMA_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {SCHEMA_FILE} in {directory}")
    return FeatureSchema.load(path)
