"""The two streaming passes: count tokens over the training rows, then encode every
row and write parquet. Memory is bounded by a chunk plus the token counts; nothing
holds the input whole."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pyarrow as pa
from pydantic import BaseModel, Field, field_validator
from tqdm import tqdm

from model_zoo.data.counting import TokenCounter
from model_zoo.data.encode import Encoder
from model_zoo.data.layout import SCHEMA_FILE, SPLITS, STATS_FILE, VOCAB_DIR
from model_zoo.data.source import Malformed, RawSource
from model_zoo.data.splits import DEFAULT_FRACTIONS, SplitAssigner, check_fractions
from model_zoo.data.stats import DatasetStats
from model_zoo.data.writer import DEFAULT_FILE_ROWS, DEFAULT_ROW_GROUP_ROWS, SplitWriter, prepare_output
from model_zoo.schema import FeatureSchema, FieldSpec
from model_zoo.vocab import Vocabulary


class PrepareConfig(BaseModel):
    min_count: int = Field(default=10, ge=1, description="rarer training values map to the rare index")
    split: tuple[float, float, float] = Field(default=DEFAULT_FRACTIONS, description="train,valid,test fractions")
    seed: int = Field(default=0, ge=0, description="of the split")
    row_group_rows: int = Field(default=DEFAULT_ROW_GROUP_ROWS, ge=1)
    file_rows: int = Field(default=DEFAULT_FILE_ROWS, ge=1)
    overwrite: bool = Field(default=False, description="replace a dataset already in the output directory")
    progress: bool | None = Field(default=None, description="a progress bar (unset: only on a terminal)")

    @field_validator("split")
    @classmethod
    def _fractions(cls, split: tuple[float, float, float]) -> tuple[float, float, float]:
        return check_fractions(split)


def prepare_dataset(source: RawSource, out: str | Path, config: PrepareConfig) -> dict[str, object]:
    """Write ``out``/{train,valid,test}/*.parquet, schema.json, vocab/ and stats.json;
    return the stats."""
    out = Path(out)
    prepare_output(out, config.overwrite)
    splitter = SplitAssigner(config.split, config.seed)

    started = time.perf_counter()
    counter = TokenCounter(source.fields)
    usable_rows = 0
    skipped = Malformed()  # reported from pass 2; here only for the error below
    with _progress(source, "count", config) as bar:
        for chunk in source.chunks(skipped, bar):
            usable_rows += len(chunk)
            counter.add(chunk.filter(splitter.assign(chunk.row_ids) == SPLITS.index("train")).tokens)
    if usable_rows == 0:
        raise ValueError(f"no usable rows in {', '.join(map(str, source.inputs))} (skipped: {skipped.as_dict()})")
    vocabulary = counter.vocabulary(config.min_count)
    schema = schema_for(source, vocabulary)
    counted = time.perf_counter()

    encoder = Encoder(schema, vocabulary)
    stats = DatasetStats(schema)
    malformed = Malformed()
    writers = [SplitWriter(out, split, encoder.arrow_schema, config.row_group_rows, config.file_rows) for split in SPLITS]
    with _progress(source, "encode", config) as bar:
        for chunk in source.chunks(malformed, bar):
            table = encoder.encode(chunk)
            assigned = splitter.assign(chunk.row_ids)
            for number, (split, writer) in enumerate(zip(SPLITS, writers)):
                part = table.filter(pa.array(assigned == number))
                writer.write(part)
                stats.add(split, part)
    for writer in writers:
        writer.close()
    finished = time.perf_counter()

    schema.save(out / SCHEMA_FILE)
    vocabulary.save(out / VOCAB_DIR)
    rows = sum(c.rows for c in stats.splits.values())
    report = {
        "dataset": source.dataset,
        "inputs": [str(p) for p in source.inputs],
        "input_bytes": source.input_bytes,
        "label": schema.label,
        "task": schema.task.value,
        "min_count": config.min_count,
        "split_fractions": list(config.split),
        "seed": config.seed,
        **stats.to_dict(),
        "malformed": {"total": malformed.total, "by_reason": malformed.as_dict()},
        "seconds": {"count_pass": round(counted - started, 3), "encode_pass": round(finished - counted, 3)},
        "rows_per_second": round(rows / max(finished - started, 1e-9), 1),
    }
    (out / STATS_FILE).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return report


def schema_for(source: RawSource, vocabulary: Vocabulary) -> FeatureSchema:
    fields = tuple(
        FieldSpec(name=f.name, role=f.role, kind=f.kind, vocab_size=vocabulary[f.name].size) for f in source.fields
    )
    return FeatureSchema(fields=fields, label=source.label, task=source.task)


def _progress(source: RawSource, pass_name: str, config: PrepareConfig) -> tqdm:
    disable = None if config.progress is None else not config.progress
    return tqdm(
        total=source.input_bytes, unit="B", unit_scale=True, desc=f"{source.dataset} {pass_name}", disable=disable
    )
