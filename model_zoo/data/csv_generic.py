"""Any delimited file: which columns are fields (role, kind, transform) and which is the
label come from a YAML config or from command-line flags; other columns are dropped.

YAML example::

    label: clicked
    task: binary
    delimiter: ","
    fields:
      - {name: user_country, role: context}
      - {name: hour, role: context}
      - {name: ad_id, role: item}
      - {name: ad_topics, role: item, kind: multi, separator: "|"}
      - {name: price_cents, role: item, transform: log_square}
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator
from tqdm import tqdm

from model_zoo.data.csv_stream import DEFAULT_BLOCK_BYTES, check_inputs, read_header, stream_csv
from model_zoo.data.source import Malformed, RawChunk, RawField, RawSource
from model_zoo.data.tokens import clean, log_square_tokens, split_multi, valid_integers
from model_zoo.schema import Kind, Role, Task

NUMBER_PATTERN = r"^[-+]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?$"


class CsvField(RawField):
    separator: str = Field(default="|", min_length=1, description="between a multi-valued field's values")

    @model_validator(mode="after")
    def _transform_on_single(self) -> "CsvField":
        if self.kind == Kind.multi and self.transform != "none":
            raise ValueError(f"field {self.name!r}: transforms apply to single-valued fields only")
        return self


class CsvConfig(BaseModel):
    label: str
    task: Task = Task.binary
    fields: list[CsvField] = Field(min_length=1)
    delimiter: str = Field(default=",", min_length=1, max_length=1)
    header: bool = True
    column_names: list[str] | None = Field(default=None, description="required when the file has no header")
    quote_char: str | None = '"'
    encoding: str = "utf-8"

    @model_validator(mode="after")
    def _consistent(self) -> "CsvConfig":
        if not self.header and not self.column_names:
            raise ValueError("a file without a header needs column_names")
        if self.label in {f.name for f in self.fields}:
            raise ValueError(f"label {self.label!r} is also listed as a field")
        return self

    @classmethod
    def from_yaml(cls, path: str | Path) -> "CsvConfig":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config not found: {path}")
        try:
            return cls.model_validate(yaml.safe_load(path.read_text(encoding="utf-8")))
        except (yaml.YAMLError, ValidationError) as error:
            raise ValueError(f"invalid CSV config {path}: {_one_line(error)}") from None


def config_from_flags(
    header: Sequence[str],
    label: str,
    context_fields: Sequence[str],
    item_fields: Sequence[str] = (),
    multi_fields: Sequence[str] = (),
    multi_separator: str = "|",
    log_square_fields: Sequence[str] = (),
    delimiter: str = ",",
    task: Task = Task.binary,
) -> CsvConfig:
    """A config for a file with a header; item fields default to every other column."""
    if not context_fields:
        raise ValueError("a CSV without --config needs --context-fields")
    items = list(item_fields) or [c for c in header if c != label and c not in context_fields]
    fields = [
        CsvField(
            name=name,
            role=Role.context if name in context_fields else Role.item,
            kind=Kind.multi if name in multi_fields else Kind.single,
            transform="log_square" if name in log_square_fields else "none",
            separator=multi_separator,
        )
        for name in [*context_fields, *items]
    ]
    unknown = sorted((set(multi_fields) | set(log_square_fields)) - {f.name for f in fields})
    if unknown:
        raise ValueError(f"--multi-fields/--log-square-fields name columns that are not fields: {unknown}")
    return CsvConfig(label=label, task=task, fields=fields, delimiter=delimiter)


class CsvSource(RawSource):
    dataset = "csv"

    def __init__(self, inputs: Sequence[str | Path], config: CsvConfig, block_bytes: int = DEFAULT_BLOCK_BYTES) -> None:
        self.inputs = check_inputs(inputs)
        self.config = config
        self.block_bytes = block_bytes
        self.label = config.label
        self.task = config.task
        self.fields = tuple(RawField(**f.model_dump(exclude={"separator"})) for f in config.fields)
        self._separators = {f.name: f.separator for f in config.fields}

    def chunks(self, malformed: Malformed, progress: tqdm | None = None) -> Iterator[RawChunk]:
        next_row = 0
        for path in self.inputs:
            columns = self._columns(path)
            for batch in stream_csv(
                path, columns, malformed,
                delimiter=self.config.delimiter, quote_char=self.config.quote_char or False,
                skip_rows=1 if self.config.header else 0, encoding=self.config.encoding,
                block_bytes=self.block_bytes, progress=progress,
            ):  # fmt: skip
                row_ids = np.arange(next_row, next_row + batch.num_rows, dtype=np.uint64)
                next_row += batch.num_rows
                yield self._tokens(batch, row_ids, malformed)

    def _columns(self, path: Path) -> list[str]:
        columns = (
            read_header(path, self.config.delimiter, self.config.encoding)
            if self.config.header
            else list(self.config.column_names or [])
        )
        missing = sorted({self.label, *(f.name for f in self.fields)} - set(columns))
        if missing:
            raise ValueError(f"{path} lacks columns {missing}")
        return columns

    def _tokens(self, batch: pa.RecordBatch, row_ids: np.ndarray, malformed: Malformed) -> RawChunk:
        label_text = clean(batch.column(self.label))
        label_ok = pc.match_substring_regex(label_text, NUMBER_PATTERN).fill_null(False)
        labels = pc.cast(pc.if_else(label_ok, label_text, "0"), pa.float64())
        if self.task == Task.binary:
            label_ok = pc.and_(label_ok, pc.is_in(labels, value_set=pa.array([0.0, 1.0])))
        keep = np.asarray(label_ok.to_numpy(zero_copy_only=False), dtype=bool)
        malformed.add("bad_label", int(np.count_nonzero(~keep)))
        cleaned = {f.name: clean(batch.column(f.name)) for f in self.fields}
        for field in self.fields:
            if field.transform == "log_square":
                ok = valid_integers(cleaned[field.name])
                malformed.add("non_numeric_integer", int(np.count_nonzero(keep & ~ok)))
                keep &= ok
        mask = pa.array(keep)
        tokens = {}
        for field in self.fields:
            column = cleaned[field.name].filter(mask)
            if field.kind == Kind.multi:
                tokens[field.name] = split_multi(column, self._separators[field.name])
            elif field.transform == "log_square":
                tokens[field.name] = log_square_tokens(column)
            else:
                tokens[field.name] = column
        label = pc.cast(labels.filter(mask), pa.float32()).to_numpy()
        return RawChunk(tokens, label, row_ids[keep])


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())
