"""Criteo-format text with Criteo-like statistics (heavy-tailed counts, Zipf-distributed
hashed categories with millions of distinct values, empty fields), for measuring
``prepare`` at scale without the real file:

    python -m model_zoo.data.criteo_like --rows 9000000 --out /tmp/criteo_like.txt
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from model_zoo.data.criteo import CATEGORY_FIELDS, COLUMNS, INTEGER_FIELDS

# Distinct values per C field in the real 45M-row file, roughly (some fields are huge).
CATEGORY_CARDINALITY = (
    1460, 583, 10_000_000, 2_200_000, 305, 24, 12_500, 633, 3, 93_000, 5_600, 8_300_000, 3_200,
    27, 14_900, 5_500_000, 10, 5_600, 2_200, 4, 7_000_000, 18, 15, 286_000, 105, 142_000,
)  # fmt: skip
MISSING_RATE = 0.15
ZIPF_EXPONENT = 1.1  # ~2M distinct values in the big fields per 9M rows, as in the real file
CHUNK_ROWS = 1 << 18


def criteo_like_table(rows: int, rng: np.random.Generator) -> pa.Table:
    columns: dict[str, pa.Array] = {"label": pa.array((rng.random(rows) < 0.25).astype(np.int8))}
    for name in INTEGER_FIELDS:
        counts = np.floor(rng.lognormal(mean=1.5, sigma=2.0, size=rows)).astype(np.int64) - 1
        columns[name] = pa.array(counts, mask=rng.random(rows) < MISSING_RATE)
    for name, cardinality in zip(CATEGORY_FIELDS, CATEGORY_CARDINALITY):
        ranks = np.minimum(rng.zipf(ZIPF_EXPONENT, size=rows), cardinality).astype(np.uint64)
        hashes = ((ranks * np.uint64(2654435761) + np.uint64(CATEGORY_FIELDS.index(name))) & np.uint64(0xFFFFFFFF)).astype(">u4")
        nibbles = np.stack([(hashes >> shift) & 0xF for shift in range(28, -1, -4)], axis=1).astype(np.uint8)
        text = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)[nibbles]
        strings = pa.FixedSizeBinaryArray.from_buffers(pa.binary(8), rows, [None, pa.py_buffer(text.tobytes())])
        missing = pa.array(rng.random(rows) < MISSING_RATE)
        columns[name] = pc.if_else(missing, pa.scalar(None, pa.string()), strings.cast(pa.binary()).cast(pa.string()))
    return pa.table({name: columns[name] for name in COLUMNS})


def write_criteo_like(path: str | Path, rows: int, seed: int = 0) -> None:
    options = pacsv.WriteOptions(include_header=False, delimiter="\t", quoting_style="none")
    rng = np.random.default_rng(seed)
    with pacsv.CSVWriter(str(path), criteo_like_table(1, rng).schema, write_options=options) as writer:
        for start in range(0, rows, CHUNK_ROWS):
            writer.write_table(criteo_like_table(min(CHUNK_ROWS, rows - start), rng))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    write_criteo_like(args.out, args.rows, args.seed)


if __name__ == "__main__":
    main()
