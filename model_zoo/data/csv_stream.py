"""Streaming reads of delimited text with pyarrow: every column as a string (so a bad
number never aborts the read), rows with the wrong column count skipped and counted,
and a byte-based progress bar."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
from tqdm import tqdm

from model_zoo.data.source import Malformed

# ~35k Criteo rows per chunk. pyarrow's streaming reader keeps a couple of dozen blocks
# in flight, so the block size sets most of the reading memory (8 MB: ~300 MB).
DEFAULT_BLOCK_BYTES = 8 << 20


def check_inputs(paths: Sequence[str | Path]) -> tuple[Path, ...]:
    """Existing readable files, or a one-line error naming the first bad path."""
    if not paths:
        raise ValueError("no input files given")
    checked = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise FileNotFoundError(f"input not found: {path}")
        if not path.is_file():
            raise ValueError(f"input is not a file: {path}")
        if not os.access(path, os.R_OK):
            raise PermissionError(f"input not readable: {path}")
        checked.append(path)
    return tuple(checked)


def read_header(path: Path, delimiter: str, encoding: str = "utf-8") -> list[str]:
    with path.open(encoding=encoding, newline="") as handle:
        line = handle.readline().rstrip("\r\n")
    if not line:
        raise ValueError(f"{path} is empty: expected a header line")
    return [name.strip() for name in line.split(delimiter)]


def stream_csv(
    path: Path,
    column_names: Sequence[str],
    malformed: Malformed,
    *,
    delimiter: str,
    quote_char: str | bool = False,
    skip_rows: int = 0,
    encoding: str = "utf-8",
    block_bytes: int = DEFAULT_BLOCK_BYTES,
    progress: tqdm | None = None,
) -> Iterator[pa.RecordBatch]:
    """Record batches of string columns; ``.gz`` inputs are decompressed on the fly."""

    def skip_invalid(row: pacsv.InvalidRow) -> str:
        malformed.add("wrong_column_count")
        return "skip"

    read_options = pacsv.ReadOptions(
        column_names=list(column_names), skip_rows=skip_rows, block_size=block_bytes, encoding=encoding
    )
    parse_options = pacsv.ParseOptions(
        delimiter=delimiter, quote_char=quote_char, invalid_row_handler=skip_invalid
    )
    convert_options = pacsv.ConvertOptions(column_types={name: pa.string() for name in column_names})
    with pa.OSFile(str(path)) as raw:
        stream = pa.CompressedInputStream(raw, "gzip") if path.suffix == ".gz" else raw
        try:
            reader = pacsv.open_csv(stream, read_options, parse_options, convert_options)
        except pa.ArrowInvalid as error:  # e.g. an empty file: nothing to read
            if "Empty CSV file" in str(error):
                return
            raise ValueError(f"cannot read {path}: {error}") from None
        reported = 0
        while True:
            try:
                batch = reader.read_next_batch()
            except StopIteration:
                break
            except pa.ArrowInvalid as error:  # e.g. invalid UTF-8: not a per-row problem we can skip
                raise ValueError(f"cannot read {path}: {error}") from None
            yield batch
            if progress is not None:
                position = raw.tell()
                progress.update(position - reported)
                reported = position
        if progress is not None:
            progress.update(path.stat().st_size - reported)
