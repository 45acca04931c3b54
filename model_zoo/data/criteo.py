"""Criteo Display Advertising Challenge ``train.txt``: tab-separated, no header,
label, I1..I13 (integer counts, may be empty), C1..C26 (hashed categories, may be empty).

Integer features become tokens by the competition winners' ⌊ln(x)²⌋ binning (the
"log_square" transform, recorded in their vocabularies so serving bins raw integers
the same way). Criteo is anonymised, so the context/item split is a convention:
by default I1..I13 and C1..C13 are context, C14..C26 item (``--context-fields`` overrides).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tqdm import tqdm

from model_zoo.data.csv_stream import DEFAULT_BLOCK_BYTES, check_inputs, stream_csv
from model_zoo.data.source import Malformed, RawChunk, RawField, RawSource
from model_zoo.data.tokens import clean, log_square_tokens, valid_integers
from model_zoo.schema import Role, Task

INTEGER_FIELDS = tuple(f"I{i}" for i in range(1, 14))
CATEGORY_FIELDS = tuple(f"C{i}" for i in range(1, 27))
COLUMNS = ("label", *INTEGER_FIELDS, *CATEGORY_FIELDS)
DEFAULT_CONTEXT_FIELDS = (*INTEGER_FIELDS, *CATEGORY_FIELDS[:13])


class CriteoSource(RawSource):
    dataset = "criteo"
    label = "label"
    task = Task.binary

    def __init__(self, inputs: Sequence[str | Path], block_bytes: int = DEFAULT_BLOCK_BYTES) -> None:
        self.inputs = check_inputs(inputs)
        self.block_bytes = block_bytes
        self.fields = tuple(
            RawField(
                name=name,
                role=Role.context if name in DEFAULT_CONTEXT_FIELDS else Role.item,
                transform="log_square" if name in INTEGER_FIELDS else "none",
            )
            for name in (*INTEGER_FIELDS, *CATEGORY_FIELDS)
        )

    def chunks(self, malformed: Malformed, progress: tqdm | None = None) -> Iterator[RawChunk]:
        next_row = 0
        for path in self.inputs:
            for batch in stream_csv(
                path, COLUMNS, malformed, delimiter="\t", block_bytes=self.block_bytes, progress=progress
            ):
                row_ids = np.arange(next_row, next_row + batch.num_rows, dtype=np.uint64)
                next_row += batch.num_rows
                yield self._tokens(batch, row_ids, malformed)

    def _tokens(self, batch: pa.RecordBatch, row_ids: np.ndarray, malformed: Malformed) -> RawChunk:
        label_text = clean(batch.column("label"))
        label_ok = pc.is_in(label_text, value_set=pa.array(["0", "1"])).fill_null(False).to_numpy(zero_copy_only=False)
        integers = {name: clean(batch.column(name)) for name in INTEGER_FIELDS}
        integers_ok = np.logical_and.reduce([valid_integers(column) for column in integers.values()])
        malformed.add("bad_label", int(np.count_nonzero(~label_ok)))
        malformed.add("non_numeric_integer", int(np.count_nonzero(label_ok & ~integers_ok)))
        keep = label_ok & integers_ok
        mask = pa.array(keep)
        tokens = {name: log_square_tokens(column.filter(mask)) for name, column in integers.items()}
        tokens.update({name: clean(batch.column(name).filter(mask)) for name in CATEGORY_FIELDS})
        label = pc.cast(label_text.filter(mask), pa.float32()).to_numpy()
        return RawChunk(tokens, label, row_ids[keep])
