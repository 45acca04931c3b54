"""Parquet output: per split, files of at most ``file_rows`` rows made of row groups of
``row_group_rows`` rows (the unit a streaming reader or a Ray Data task reads)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from model_zoo.data.layout import SCHEMA_FILE, SPLITS, STATS_FILE, VOCAB_DIR, split_dir

DEFAULT_ROW_GROUP_ROWS = 1 << 17
DEFAULT_FILE_ROWS = 1 << 22


def prepare_output(directory: Path, overwrite: bool) -> None:
    """Create ``directory``; an existing dataset there is replaced only with ``overwrite``."""
    ours = [directory / name for name in (*SPLITS, VOCAB_DIR, SCHEMA_FILE, STATS_FILE)]
    present = [p for p in ours if p.exists()]
    if present and not overwrite:
        raise ValueError(f"{directory} already holds a dataset ({present[0].name}); pass --overwrite to replace it")
    for path in present:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    directory.mkdir(parents=True, exist_ok=True)


class SplitWriter:
    def __init__(
        self,
        directory: Path,
        split: str,
        schema: pa.Schema,
        row_group_rows: int = DEFAULT_ROW_GROUP_ROWS,
        file_rows: int = DEFAULT_FILE_ROWS,
    ) -> None:
        if file_rows < row_group_rows:
            raise ValueError("file_rows must be at least row_group_rows")
        self.folder = split_dir(directory, split)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.schema = schema
        self.row_group_rows = row_group_rows
        self.file_rows = file_rows
        self._buffer: list[pa.Table] = []
        self._buffered = 0
        self._writer: pq.ParquetWriter | None = None
        self._file_rows_written = 0
        self._files = 0

    def write(self, table: pa.Table) -> None:
        if table.num_rows == 0:
            return
        self._buffer.append(table)
        self._buffered += table.num_rows
        if self._buffered >= self.row_group_rows:
            self._flush(final=False)

    def close(self) -> None:
        self._flush(final=True)
        if self._files == 0:  # an empty split still gets a file, so readers see its schema
            self._open_file()
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def _flush(self, final: bool) -> None:
        if not self._buffer:
            return
        table = pa.concat_tables(self._buffer)
        full = table.num_rows if final else table.num_rows - table.num_rows % self.row_group_rows
        start = 0
        while start < full:
            if self._writer is None or self._file_rows_written >= self.file_rows:
                self._open_file()
            rows = min(self.row_group_rows, full - start)
            self._writer.write_table(table.slice(start, rows), row_group_size=rows)
            self._file_rows_written += rows
            start += rows
        rest = table.slice(full)
        self._buffer = [rest] if rest.num_rows else []
        self._buffered = rest.num_rows

    def _open_file(self) -> None:
        if self._writer is not None:
            self._writer.close()
        path = self.folder / f"part-{self._files:05d}.parquet"
        self._writer = pq.ParquetWriter(path, self.schema, compression="zstd")
        self._files += 1
        self._file_rows_written = 0

    def __enter__(self) -> "SplitWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
