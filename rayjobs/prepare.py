"""``rankstream prepare``: raw Criteo / Avazu / MovieLens-1M / any CSV -> parquet splits,
schema.json, vocab/ and stats.json (docs/data.md)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from model_zoo.data.avazu import AvazuSource
from model_zoo.data.criteo import CriteoSource
from model_zoo.data.csv_generic import CsvConfig, CsvSource, config_from_flags
from model_zoo.data.csv_stream import check_inputs, read_header
from model_zoo.data.movielens import MovieLensSource
from model_zoo.data.prepare import PrepareConfig, prepare_dataset
from model_zoo.data.source import RawSource
from model_zoo.schema import Task
from rayjobs.options import FlatCommand, command


class CsvFlags(BaseModel):
    """For ``--dataset csv``: a YAML config, or flags for a file with a header."""

    model_config = ConfigDict(extra="forbid")

    config: Path | None = Field(default=None, description="csv: YAML column config (see docs/data.md)")
    label: str | None = Field(default=None, description="csv: label column")
    task: Task = Field(default=Task.binary, description="csv: binary (clicks) or regression (ratings)")
    item_fields: list[str] = Field(default=[], description="csv: item columns (none given: every other column)")
    multi_fields: list[str] = Field(default=[], description="csv: multi-valued columns")
    multi_separator: str = Field(default="|", min_length=1, description="csv: between the values of a multi-valued column")
    log_square_fields: list[str] = Field(default=[], description="csv: integer columns binned as floor(ln(x)^2)")
    delimiter: str = Field(default=",", min_length=1, max_length=1, description="csv: between columns")


class PrepareJob(PrepareConfig):
    """`rankstream prepare`: the raw data, where the dataset goes and how it is split."""

    model_config = ConfigDict(extra="forbid")

    dataset: Literal["criteo", "avazu", "movielens1m", "csv"] = Field(description="the raw data's format")
    input: list[Path] = Field(min_length=1, description="input files (movielens1m: its directory or its three .dat files)")
    out: Path = Field(description="output directory")
    context_fields: list[str] | None = Field(
        default=None, description="override the default context fields (commas or spaces); every other field is an item field"
    )
    csv: CsvFlags = CsvFlags()

    @model_validator(mode="after")
    def _csv_columns(self) -> "PrepareJob":
        if self.dataset == "csv" and self.csv.config is None and not self.csv.label:
            raise ValueError("--dataset csv needs --config or --label and --context-fields")
        return self


# The write sizes (row group, file) are the writer's, not the dataset's.
FLAGS = FlatCommand("Prepare", PrepareJob, sections={"csv": CsvFlags}, exclude=("row_group_rows", "file_rows"))


def build_source(args: PrepareJob) -> RawSource:
    if args.dataset == "criteo":
        source: RawSource = CriteoSource(args.input)
    elif args.dataset == "avazu":
        source = AvazuSource(args.input)
    elif args.dataset == "movielens1m":
        source = MovieLensSource(args.input)
    else:
        source = CsvSource(args.input, csv_config(args))
    if args.context_fields:
        source.set_context_fields(args.context_fields)
    return source


def csv_config(args: PrepareJob) -> CsvConfig:
    csv = args.csv
    if csv.config is not None:
        return CsvConfig.from_yaml(csv.config)
    first = check_inputs(args.input)[0]
    return config_from_flags(
        header=read_header(first, csv.delimiter),
        label=csv.label,
        context_fields=args.context_fields or [],
        item_fields=csv.item_fields,
        multi_fields=csv.multi_fields,
        multi_separator=csv.multi_separator,
        log_square_fields=csv.log_square_fields,
        delimiter=csv.delimiter,
        task=csv.task,
    )


def run_prepare(args: PrepareJob) -> int:
    stats = prepare_dataset(build_source(args), args.out, args)
    print_summary(args.out, stats)
    return 0


def print_summary(out: Path, stats: dict) -> None:
    rows = stats["rows"]
    print(f"wrote {out}: " + ", ".join(f"{split} {count:,}" for split, count in rows.items()) + " rows")
    print(f"  {sum(rows.values()):,} rows at {stats['rows_per_second']:,.0f} rows/s "
          f"(count pass {stats['seconds']['count_pass']:.1f} s, encode pass {stats['seconds']['encode_pass']:.1f} s)")
    print(f"  {len(stats['vocab_size'])} fields, vocabulary sizes {sum(stats['vocab_size'].values()):,} in total; "
          f"label mean (train) {stats['label_mean']['train']}")
    print("  mean rare rate " + ", ".join(f"{s} {r:.4f}" for s, r in stats["mean_rare_rate"].items())
          + "; mean missing rate " + ", ".join(f"{s} {r:.4f}" for s, r in stats["mean_missing_rate"].items()))
    malformed = stats["malformed"]
    print(f"  malformed rows skipped: {malformed['total']:,}"
          + (f" {malformed['by_reason']}" if malformed["total"] else ""))


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("prepare", help="raw data -> parquet splits + schema + vocabulary")
    command(parser, FLAGS, run_prepare)


if __name__ == "__main__":
    from rayjobs.cli import run_module

    run_module(["prepare"])
