"""Avazu CTR ``train`` CSV (with a header): id, click, hour (YYMMDDHH), C1, banner_pos,
site_*, app_*, device_*, C14..C21.

``id`` is dropped, ``click`` is the label, and ``hour`` becomes two fields, ``weekday``
(Monday = 0) and ``hour_of_day``. Roles: where the ad is shown and to whom
(banner_pos, site_*, app_*, device_*, weekday, hour_of_day) is context; the ad-side
anonymised fields C1 and C14..C21 are items.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tqdm import tqdm

from model_zoo.data.csv_stream import DEFAULT_BLOCK_BYTES, check_inputs, read_header, stream_csv
from model_zoo.data.source import Malformed, RawChunk, RawField, RawSource
from model_zoo.data.tokens import clean, integer_tokens
from model_zoo.schema import Role, Task

CONTEXT_COLUMNS = (
    "banner_pos", "site_id", "site_domain", "site_category", "app_id", "app_domain", "app_category",
    "device_id", "device_ip", "device_model", "device_type", "device_conn_type",
)  # fmt: skip
ITEM_COLUMNS = ("C1", *(f"C{i}" for i in range(14, 22)))
TIME_FIELDS = ("weekday", "hour_of_day")
REQUIRED_COLUMNS = ("click", "hour", *CONTEXT_COLUMNS, *ITEM_COLUMNS)


class AvazuSource(RawSource):
    dataset = "avazu"
    label = "click"
    task = Task.binary

    def __init__(self, inputs: Sequence[str | Path], block_bytes: int = DEFAULT_BLOCK_BYTES) -> None:
        self.inputs = check_inputs(inputs)
        self.block_bytes = block_bytes
        self.fields = (
            *(RawField(name=name, role=Role.context) for name in (*CONTEXT_COLUMNS, *TIME_FIELDS)),
            *(RawField(name=name, role=Role.item) for name in ITEM_COLUMNS),
        )

    def chunks(self, malformed: Malformed, progress: tqdm | None = None) -> Iterator[RawChunk]:
        next_row = 0
        for path in self.inputs:
            header = read_header(path, ",")
            missing = sorted(set(REQUIRED_COLUMNS) - set(header))
            if missing:
                raise ValueError(f"{path} lacks Avazu columns {missing}")
            for batch in stream_csv(
                path, header, malformed, delimiter=",", skip_rows=1, block_bytes=self.block_bytes, progress=progress
            ):
                row_ids = np.arange(next_row, next_row + batch.num_rows, dtype=np.uint64)
                next_row += batch.num_rows
                yield self._tokens(batch, row_ids, malformed)

    def _tokens(self, batch: pa.RecordBatch, row_ids: np.ndarray, malformed: Malformed) -> RawChunk:
        label_text = clean(batch.column("click"))
        label_ok = pc.is_in(label_text, value_set=pa.array(["0", "1"])).fill_null(False).to_numpy(zero_copy_only=False)
        hour_text = clean(batch.column("hour"))
        hours = pc.strptime(hour_text, format="%y%m%d%H", unit="s", error_is_null=True)
        # An empty hour is missing; a non-empty one that does not parse is malformed.
        hour_ok = np.asarray(pc.or_(pc.is_null(hour_text), pc.is_valid(hours)).to_numpy(zero_copy_only=False), dtype=bool)
        malformed.add("bad_label", int(np.count_nonzero(~label_ok)))
        malformed.add("bad_hour", int(np.count_nonzero(label_ok & ~hour_ok)))
        keep = label_ok & hour_ok
        mask = pa.array(keep)
        hours = hours.filter(mask)
        tokens = {name: clean(batch.column(name).filter(mask)) for name in (*CONTEXT_COLUMNS, *ITEM_COLUMNS)}
        tokens["weekday"] = integer_tokens(pc.day_of_week(hours))
        tokens["hour_of_day"] = integer_tokens(pc.hour(hours))
        label = pc.cast(label_text.filter(mask), pa.float32()).to_numpy()
        return RawChunk(tokens, label, row_ids[keep])
